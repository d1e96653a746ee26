"""`llamactl ps`: instances from the state file, reconciled, with live slots, speed and real memory."""

from __future__ import annotations

import time

import typer

from llamactl import render
from llamactl.cli.common import state_store, wants_json
from llamactl.servers.refresh import actual_bytes, devices, drift, gpu_use_by_pid, refresh, shown_status
from llamactl.servers.state import Instance, Status
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
    if wants_json(ctx, json_output):
        render.emit_json([{
            "name": i.name, "model": i.model, "status": shown_status(i, s).value, "pid": i.pid, "port": i.port,
            "url": f"http://{i.host}:{i.port}", "gpu_ids": list(i.gpu_ids), "started_at": i.started_at,
            "last_used": i.last_used, "started_by": i.started_by,
            "estimated_bytes": sum(i.estimated_bytes.values()) or None, "actual_bytes": actual_bytes(i, gpu_use),
            "slots_busy": s.slots_busy if s else None, "slots_total": s.slots_total if s else None,
            "tokens_per_s": s.tokens_per_s if s else None, "log_path": str(store.log_path(i.name)),
            "devices": devices(i), "drift": _drift_json(i),
        } for i, s in rows])
        return
    if not rows:
        render.note("no instances")
        return
    table = []
    for inst, seen in rows:
        actual = actual_bytes(inst, gpu_use)
        slots = f"{seen.slots_busy}/{seen.slots_total}" if seen and seen.slots_total is not None else "-"
        tps = f"{seen.tokens_per_s:.1f}" if seen and seen.tokens_per_s else "-"
        table.append([
            inst.name, inst.model.rsplit("/", 1)[-1], shown_status(inst, seen).value, inst.pid or "-", inst.port,
            ",".join(map(str, inst.gpu_ids)) or "CPU", format_bytes(sum(inst.estimated_bytes.values()) or None),
            (format_bytes(actual) if actual is not None else ("n/a" if inst.live else "-")) + (" !" if drift(inst) else ""),
            slots, tps,
            format_duration(now - inst.started_at) if inst.live else "-",
            format_duration(now - inst.last_used) if inst.live else "-",
        ])
    print(render.table(table, ["NAME", "MODEL", "STATUS", "PID", "PORT", "GPUS", "EST", "ACTUAL", "SLOTS",
                               "TOK/S", "UP", "IDLE"], align_right_from=3))
    for inst, _ in rows:
        worst = drift(inst)
        if worst is not None:
            dev, rel = worst
            fig = devices(inst)[dev]
            print(f"! {inst.name}: {dev} took {format_bytes(fig['actual_bytes'])}, estimated "
                  f"{format_bytes(fig['estimated_bytes'])} ({rel:+.0%}); the next plan for it uses what was seen")


def _drift_json(inst: Instance) -> dict[str, object] | None:
    worst = drift(inst)
    return None if worst is None else {"device": worst[0], "fraction": round(worst[1], 4)}


def register(app: typer.Typer) -> None:
    app.command("ps")(command)
