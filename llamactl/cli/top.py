"""`llamactl top`: what the GPUs hold and why, live, in the terminal (rich's Live; no curses of our own).

Per GPU a memory bar split into each llamactl instance, other programs and free; the instances with
estimated vs actual memory, slots, speed, queue, idle time; recent events. Keys: q quit, ↑/↓ select,
e evict the selected instance (asks first), l its log tail, s change the sort. Reads the local state
and NVML, or a running proxy (`--url`, with `--api-key`). Not on a terminal: a plain table per refresh.
"""

from __future__ import annotations

import os
import queue
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import typer

from llamactl import views
from llamactl.render import safe_tree
from llamactl.cli.common import state_store
from llamactl.units import format_bytes, format_duration

if TYPE_CHECKING:  # rich loads when top runs, not with every llamactl command
    from rich.console import Group
    from rich.text import Text

    from llamactl.gpu.inventory import Gpu

# the instance table's columns: (header, its short form when the terminal is narrow, right-aligned)
COLUMNS = (("NAME", "NAME", False), ("MODEL", "MODEL", False), ("STATE", "STATE", False), ("GPUS", "GPU", False),
           ("EST", "EST", True), ("ACTUAL", "ACT", True), ("SLOTS", "SLOT", False), ("TOK/S", "T/S", True),
           ("QUEUE", "Q", True), ("IDLE", "IDLE", False), ("TTL", "TTL", False))
KEPT = frozenset({"NAME", "STATE"})  # never dropped as empty
MODEL_MIN = 9  # a model's file name is cut in the middle down to this many cells, before the table is cut
PANEL_CELLS = 4  # a panel's borders and padding around the table
PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
SORTS = ("name", "memory", "idle")
BAR_MIN, BAR_MAX = 20, 80


@dataclass
class Screen:
    """What the user has chosen: selection, sort, the log panel, a pending confirmation, a message."""

    selected: int = 0
    sort: str = "name"
    show_log: bool = False
    confirm: str | None = None  # the instance `e` asked to evict, until y/n
    message: str = ""
    snapshot: views.Snapshot = field(default_factory=lambda: views.Snapshot(source="", at=0.0))

    def instances(self) -> list[views.InstanceView]:
        rows = list(self.snapshot.instances)
        if self.sort == "memory":
            rows.sort(key=lambda i: -(i.actual_bytes or i.estimated_bytes or 0))
        elif self.sort == "idle":
            rows.sort(key=lambda i: -(i.idle_s or 0))
        else:
            rows.sort(key=lambda i: i.name)
        return rows

    def current(self) -> views.InstanceView | None:
        rows = self.instances()
        if not rows:
            return None
        self.selected = max(0, min(self.selected, len(rows) - 1))
        return rows[self.selected]


def _bar(gpu: Gpu, instances: tuple[views.InstanceView, ...], colors: dict[str, str], width: int) -> Text:
    from rich.text import Text

    total = gpu.memory_total_bytes or 1
    bar = Text()
    used_cells = 0
    segments = views.gpu_segments(gpu, instances)
    for label, size, kind in segments:
        cells = round(width * size / total) if kind != "free" else max(width - used_cells, 0)
        cells = min(cells, width - used_cells)
        used_cells += cells
        char, style = {"instance": ("█", colors.get(label, "white")), "other": ("▓", "grey50"), "free": ("░", "grey30")}[kind]
        bar.append(char * cells, style=style)
    return bar


def render(screen: Screen, width: int = 120) -> Group:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    snap = screen.snapshot
    instances = screen.instances()
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(i.name for i in snap.instances))}
    parts: list[Any] = []
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.at or time.time()))
    source = snap.source
    source = source if len(source) <= 40 else "…" + source[-39:]
    parts.append(Text.assemble(("llamactl top", "bold"), f"  {source}  {stamp}  ",
                               (f"{len(instances)} instances", "bold"),
                               "   q quit · ↑↓ select · e evict · l log · s sort: " + screen.sort))
    if not snap.gpus:
        parts.append(Text(f"GPUs: none ({snap.gpu_note or 'no NVIDIA GPU visible'})", style="grey50"))
    bar_width = max(BAR_MIN, min(BAR_MAX, width - 40))
    for gpu in snap.gpus:
        if gpu.error:
            parts.append(Text(f"GPU {gpu.index} {gpu.name}: {gpu.error}", style="red"))
            continue
        facts = [f"GPU {gpu.index} {gpu.name}",
                 f"{format_bytes(gpu.memory_used_bytes)} / {format_bytes(gpu.memory_total_bytes)}"]
        if gpu.utilization_gpu is not None:
            facts.append(f"util {gpu.utilization_gpu}%")
        if gpu.temperature_c is not None:
            facts.append(f"{gpu.temperature_c}°C")
        if gpu.power_w is not None:
            facts.append(f"{gpu.power_w:.0f} W")
        head = Text("  ".join(facts), style="bold")
        legend = Text("  ")
        for label, size, kind in views.gpu_segments(gpu, snap.instances):
            style = colors.get(label, "white") if kind == "instance" else ("grey50" if kind == "other" else "grey30")
            legend.append(f"■ {label} {format_bytes(size)}  ", style=style)
        parts += [head, Text.assemble("  ", _bar(gpu, snap.instances, colors, bar_width)), legend]
    keep, headers, rows, gap = fit_columns([_cells(inst) for inst in instances], width - PANEL_CELLS)
    table = Table(expand=False, box=None, header_style="bold", pad_edge=False, padding=(0, gap, 0, 0))
    for i, header in zip(keep, headers):
        table.add_column(header, no_wrap=True, justify="right" if COLUMNS[i][2] else "left")
    current = screen.current()
    for inst, row in zip(instances, rows):
        style = "reverse" if current is not None and inst.name == current.name else ""
        table.add_row(Text(row[0], style=colors.get(inst.name, "")), *row[1:], style=style)
    parts.append(Panel(table if instances else Text("no instances", style="grey50"), title="instances", title_align="left"))
    events = snap.events[-8:]
    ev = Text()
    for e in events:
        ev.append(time.strftime("%H:%M:%S ", time.localtime(e.at)))
        ev.append(f"{e.kind:<9}", style="bold red" if e.kind in ("crash", "oom", "failed") else "bold")
        ev.append(f" {e.model}  {e.detail}\n")
    ev.rstrip()
    parts.append(Panel(ev if events else Text("none yet", style="grey50"), title="events", title_align="left"))
    if screen.show_log and current is not None:
        parts.append(Panel(Text(_log_tail(current)), title=f"log: {current.name}", title_align="left"))
    if screen.confirm:
        parts.append(Text(f"evict {screen.confirm}? y/n", style="bold yellow"))
    elif screen.message:
        parts.append(Text(screen.message, style="yellow"))
    return Group(*parts)


def _cells(inst: views.InstanceView) -> list[str]:
    """One instance's row, every column of COLUMNS."""
    slots = f"{inst.slots_busy}/{inst.slots_total}" if inst.slots_total is not None else _or_dash(inst.in_flight, str)
    if inst.upstream is not None:  # served by another box: where, and how fast it answered the last poll
        state = inst.state + (f" {inst.latency_ms:.0f}ms" if inst.latency_ms is not None else "")
        where = f"@{inst.upstream}"
    else:
        state, where = inst.state, (",".join(map(str, inst.gpu_ids)) or "CPU") if inst.pid else "-"
    return [inst.name, inst.shown_model, state, where,
            views.describe_bytes(inst.estimated_bytes), views.describe_bytes(inst.actual_bytes) + (" !" if inst.drift else ""),
            slots, f"{inst.tokens_per_s:.1f}" if inst.tokens_per_s else "-", _or_dash(inst.queued, str),
            _or_dash(inst.idle_s, format_duration), _or_dash(inst.ttl_left_s, format_duration)]


def fit_columns(rows: list[list[str]], width: int) -> tuple[list[int], list[str], list[list[str]], int]:
    """The columns to draw in `width` cells (their indices in COLUMNS), their headers, the rows and the gap
    between columns, before rich cuts anything: a column with nothing in it goes, then headers take their
    short forms, then columns stand one cell apart instead of two, then model names are cut in the middle
    (their start names the model, their end the quantisation)."""
    keep = [i for i, (header, _, _) in enumerate(COLUMNS)
            if header in KEPT or any(row[i] not in ("", "-") for row in rows)]
    rows = [[row[i] for i in keep] for row in rows]
    headers, gap = [COLUMNS[i][0] for i in keep], 2
    if _table_cells(headers, rows, gap) > width:
        headers = [COLUMNS[i][1] for i in keep]
    if _table_cells(headers, rows, gap) > width:
        gap = 1
    over = _table_cells(headers, rows, gap) - width
    model = keep.index(1) if 1 in keep else None
    if over > 0 and model is not None:
        longest = max(cell_len(row[model]) for row in rows)
        limit = max(MODEL_MIN, longest - over, cell_len(headers[model]))
        rows = [[_middle_cut(c, limit) if i == model else c for i, c in enumerate(row)] for row in rows]
    return keep, headers, rows, gap


def _table_cells(headers: list[str], rows: list[list[str]], gap: int) -> int:
    """The width of a table without a box: each column as wide as its widest cell, `gap` cells between columns."""
    widths = [max([cell_len(h)] + [cell_len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    return sum(widths) + gap * (len(widths) - 1)


def cell_len(text: str) -> int:
    """Terminal cells of a string, as rich counts them (wide characters take two)."""
    from rich.cells import cell_len as cells

    return cells(text)


def _middle_cut(text: str, cells: int) -> str:
    if cell_len(text) <= cells:
        return text
    head = (cells - 1) // 2 + (cells - 1) % 2
    return text[:head] + "…" + text[len(text) - (cells - 1 - head):]


def _or_dash(value: float | int | None, shown: Callable[[Any], str]) -> str:
    return shown(value) if value is not None else "-"


def _log_tail(inst: views.InstanceView, lines: int = 12) -> str:
    from pathlib import Path

    from llamactl.servers.runner import tail

    return tail(Path(inst.log_path), lines) if inst.log_path else "(no log through --url)"


@contextmanager
def _keys() -> Iterator[queue.Queue[str]]:
    """Key presses (arrows as "up"/"down") from the terminal in cbreak mode, read in a thread."""
    keys: queue.Queue[str] = queue.Queue()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            ch = os.read(fd, 1).decode(errors="ignore")
            if ch == "\x1b":
                seq = os.read(fd, 2).decode(errors="ignore") if select.select([fd], [], [], 0.05)[0] else ""
                ch = {"[A": "up", "[B": "down"}.get(seq, "esc")
            keys.put(ch)

    tty.setcbreak(fd)
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield keys
    finally:
        stop.set()
        thread.join(timeout=1)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _evict(ctx: typer.Context, screen: Screen, name: str, url: str | None, api_key: str | None,
           events: views.EventLog) -> None:
    if url:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            reply = httpx.post(f"{url.rstrip('/')}/models/{name}/unload", headers=headers, json={}, timeout=60)
            screen.message = f"evicted {name}" if reply.status_code == 200 else f"evict {name}: {reply.status_code} {reply.text[:100]}"
        except httpx.HTTPError as exc:
            screen.message = f"evict {name}: {exc}"
        return
    from llamactl.servers.launcher import stop_instances

    stopped = stop_instances(state_store(ctx), [name])
    screen.message = f"evicted {name}" if stopped else f"{name} was not running"
    events.add("evict", name, "from llamactl top")


def command(
    ctx: typer.Context,
    interval: float = typer.Option(1.0, "--interval", "-d", min=0.2, help="Seconds between refreshes (as procps top -d)."),
    url: Optional[str] = typer.Option(None, "--url", help="A running proxy to watch (its /status), e.g. http://127.0.0.1:8080."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLAMACTL_API_KEY", help="The proxy's API key, if it has api_keys."),
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
) -> None:
    """Live view: GPU memory per instance, instances (estimated vs actual), events. q quits."""
    from llamactl.gpu import inventory

    events = views.EventLog()
    previous: dict[str, views.InstanceView] | None = None
    store = None if url else state_store(ctx)

    def snapshot() -> views.Snapshot:
        nonlocal previous
        if url:
            return safe_tree(views.remote(url, api_key))  # type: ignore[return-value]
        snap = views.local(store, lambda: inventory.resolve(None, None), events, previous)
        previous = {i.name: i for i in snap.instances}
        return safe_tree(snap)  # type: ignore[return-value]  # names and models drawn as text

    from rich.console import Console

    screen = Screen(snapshot=snapshot())
    interactive = sys.stdout.isatty() and sys.stdin.isatty() and not once
    if not interactive:
        console = Console(force_terminal=False, width=160, no_color=True)
        while True:
            console.print(render(screen, 160))
            if once:
                return
            time.sleep(interval)
            console.print("-" * 40)
            screen.snapshot = snapshot()
    from rich.live import Live

    console = Console()
    with _keys() as keys, Live(render(screen, console.width), console=console, screen=True, auto_refresh=False) as live:
        next_at = time.monotonic() + interval
        while True:
            try:
                key = keys.get(timeout=max(0.0, next_at - time.monotonic()))
            except queue.Empty:
                key = None
            if key is None:
                try:
                    screen.snapshot = snapshot()
                except Exception as exc:  # a proxy that went away: say so, keep trying
                    screen.message = f"refresh failed: {exc}"
                next_at = time.monotonic() + interval
            elif screen.confirm is not None:
                name, screen.confirm = screen.confirm, None
                if key.lower() == "y":
                    _evict(ctx, screen, name, url, api_key, events)
                    screen.snapshot = snapshot()
                else:
                    screen.message = f"kept {name}"
            elif key in ("q", "Q", "\x03"):
                return
            elif key == "up":
                screen.selected -= 1
            elif key == "down":
                screen.selected += 1
            elif key == "s":
                screen.sort = SORTS[(SORTS.index(screen.sort) + 1) % len(SORTS)]
            elif key == "l":
                screen.show_log = not screen.show_log
            elif key == "e":
                current = screen.current()
                if current is not None:
                    screen.confirm = current.name
            live.update(render(screen, console.width), refresh=True)


def register(app: typer.Typer) -> None:
    app.command("top")(command)
