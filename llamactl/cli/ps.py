"""`llamactl ps`: instances from the state file, reconciled, with live slots, speed and real memory."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import typer

from llamactl import render, views
from llamactl.cli.common import state_store, wants_json
from llamactl.servers import proxy_notes
from llamactl.servers.refresh import actual_bytes, drift, gpu_use_by_pid, refresh
from llamactl.servers.state import Status
from llamactl.units import format_bytes, format_duration


def command(
    ctx: typer.Context,
    prune: bool = typer.Option(False, "--prune", help="Remove dead and failed entries from the state file."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """List instances from the state file, reconciled with reality and polled for slots and speed."""
    store = state_store(ctx)
    rows = refresh(store)
    if prune:
        with store.edit() as current:
            for name in [n for n, i in current.items() if i.status in (Status.DEAD, Status.FAILED)]:
                del current[name]
        rows = [(i, s) for i, s in rows if i.status not in (Status.DEAD, Status.FAILED)]
    gpu_use = gpu_use_by_pid() if any(i.gpu_ids for i, _ in rows) else None
    now = time.time()
    notes = proxy_notes.read_all(store.dir, now)  # what a proxy running here knows: TTL left, requests
    shown = [proxy_notes.annotate(views.from_instance(i, s, actual_bytes=actual_bytes(i, gpu_use), drift=drift(i),
                                                      log_path=str(store.log_path(i.name)), now=now), notes, now)
             for i, s in rows]
    render.result(wants_json(ctx, json_output), Listing(tuple(shown), now))


@dataclass(frozen=True)
class Listing:
    """ps's result: the instances as seen at `now`."""

    instances: tuple[views.InstanceView, ...]
    now: float

    def to_json(self) -> list[object]:
        return [v.to_json() for v in self.instances]

    def text(self) -> Iterator[str]:
        if not self.instances:
            yield render.Note("no instances")
            return
        yield _table(self.instances, self.now)
        for view in self.instances:
            if view.drift is not None:
                fig = view.devices[view.drift.device]
                yield (f"! {view.name}: {view.drift.device} took {format_bytes(fig.actual_bytes)}, estimated "
                       f"{format_bytes(fig.estimated_bytes)} ({view.drift.fraction:+.0%}); the next plan for it uses "
                       "what was seen")


def _table(shown: Sequence[views.InstanceView], now: float) -> str:
    table = []
    for v in shown:
        actual = format_bytes(v.actual_bytes) if v.actual_bytes is not None else ("n/a" if v.live else "-")
        table.append([
            v.name, v.shown_model, v.state, v.pid or "-", v.port, ",".join(map(str, v.gpu_ids)) or "CPU",
            format_bytes(v.estimated_bytes), actual + (" !" if v.drift else ""),
            f"{v.slots_busy}/{v.slots_total}" if v.slots_total is not None else "-",
            f"{v.tokens_per_s:.1f}" if v.tokens_per_s else "-",
            format_duration(now - v.started_at) if v.live and v.started_at is not None else "-",
            format_duration(v.idle_s) if v.idle_s is not None else "-",
            format_duration(v.ttl_left_s) if v.ttl_left_s is not None else "-",
        ])
    return render.table(table, ["NAME", "MODEL", "STATUS", "PID", "PORT", "GPUS", "EST", "ACTUAL", "SLOTS", "TOK/S",
                                "UP", "IDLE", "TTL"], align_right_from=3)


def register(app: typer.Typer) -> None:
    app.command("ps")(command)
