"""`llamactl gpus`: the GPU inventory as a table or JSON, once or refreshed in place."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import typer

from llamactl import render
from llamactl.cli.common import wants_json
from llamactl.gpu import inventory
from llamactl.units import format_bytes

WATCH_DEFAULT_S = 2.0
_CLEAR = "\x1b[H\x1b[2J"


def _process_text(gpu: inventory.Gpu) -> str:
    parts = []
    for proc in gpu.processes:
        used = "" if proc.used_memory_bytes is None else f" {format_bytes(proc.used_memory_bytes)}"
        who = f" [{proc.instance}]" if proc.instance else ""
        parts.append(f"{proc.pid}{who}{used}")
    return ", ".join(parts) or "-"


def gpus_table(inv: inventory.Inventory) -> str:
    rows = []
    remote = any(g.remote for g in inv.gpus)  # a WORKER column only when some device is lent by one
    for g in inv.gpus:
        where = [g.worker or "local"] if remote else []
        if g.error:
            rows.append([g.index, g.name, *where, f"error: {g.error}", "-", "-", "-"])
            continue
        util = "-" if g.utilization_gpu is None else f"{g.utilization_gpu}%"
        rows.append([g.index, g.name, *where, f"{format_bytes(g.memory_used_bytes)} / {format_bytes(g.memory_total_bytes)}",
                     format_bytes(g.memory_free_bytes), util, _process_text(g)])
    return render.table(rows, ["GPU", "NAME", *(["WORKER"] if remote else []), "USED / TOTAL", "FREE", "UTIL",
                               "PROCESSES (pid [instance] memory)"], align_right_from=3 if remote else 2)


@dataclass(frozen=True)
class GpuList:
    """gpus's result: the inventory, and for a refresh on a terminal the line that clears the screen first."""

    inv: inventory.Inventory
    header: str | None = None

    def to_json(self) -> list[dict[str, object]]:
        return inventory.to_json(self.inv)

    def text(self) -> Iterator[str]:
        if self.header is not None:
            yield self.header
        if self.inv.note:
            yield render.Note(self.inv.note)
        if self.inv.gpus:
            yield gpus_table(self.inv)


def command(
    ctx: typer.Context,
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Simulate GPUs: none, 24GiB,16GiB, 2x80GiB."),
    gpus_file: Optional[str] = typer.Option(None, "--gpus-file", help="Inventory file as printed by `gpus --json`."),
    watch: Optional[float] = typer.Option(None, "--watch", metavar="[SECONDS]",
                                          help=f"Refresh every SECONDS (default {WATCH_DEFAULT_S:g}) until Ctrl-C."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON (one document per refresh)."),
) -> None:
    """Inventory: name, memory total/used/free, utilisation, processes (llamactl instances marked)."""
    as_json = wants_json(ctx, json_output)
    if watch is not None and not (math.isfinite(watch) and watch >= 0.1):
        from llamactl.errors import UsageError

        raise UsageError(f"--watch needs a number of seconds >= 0.1, got {watch:g}")
    tty = sys.stdout.isatty()
    try:
        while True:
            header = None
            if watch is not None and tty:
                header = f"{_CLEAR}{time.strftime('%H:%M:%S')}  every {watch:g}s, Ctrl-C to stop\n"
            render.result(as_json, GpuList(_with_workers(ctx, inventory.resolve(gpus, gpus_file)), header),
                          compact=watch is not None)
            sys.stdout.flush()
            if watch is None:
                return
            time.sleep(watch)
    except KeyboardInterrupt:
        return  # the normal way out of --watch


def _with_workers(ctx: typer.Context, inv: inventory.Inventory) -> inventory.Inventory:
    """The local inventory and the devices the config's workers lend (asked each refresh)."""
    from llamactl.cli.common import load_config

    cfg = load_config(ctx)
    if not cfg.workers:
        return inv
    from llamactl.gpu.remote import with_workers

    return with_workers(inv, cfg.workers)


def register(app: typer.Typer) -> None:
    app.command("gpus")(command)
