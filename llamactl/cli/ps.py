"""`llamactl ps`: instances from the state file, reconciled, with live slots, speed and real memory."""

from __future__ import annotations

import time
from dataclasses import replace

import typer

from llamactl import render
from llamactl.cli.common import state_store, wants_json
from llamactl.gpu import nvml
from llamactl.servers import client
from llamactl.servers.state import Instance, Status, StateStore
from llamactl.units import format_bytes, format_duration


def actual_bytes(inst: Instance, gpu_use: dict[int, int] | None) -> int | None:
    """Real memory: NVML per-process use on GPUs; the process RSS for a CPU instance; None when unknowable.

    Inside a container NVML reports host pids, so a GPU instance whose pid NVML does not list is `n/a`.
    """
    if not inst.live or inst.pid is None:
        return None
    if inst.gpu_ids:
        if gpu_use is None:
            return None
        return gpu_use.get(inst.pid)
    try:
        import psutil

        return int(psutil.Process(inst.pid).memory_info().rss)
    except Exception:
        return None


DRIFT_THRESHOLD = 0.10  # ps marks an instance whose actual memory on a device is this far from the estimate


def devices(inst: Instance) -> dict[str, dict[str, int | None]]:
    """Per device ("CPU", "GPU0"...): the estimate it was launched with, and what it took once ready."""
    names = list(inst.estimated_bytes) + [d for d in inst.actual_bytes if d not in inst.estimated_bytes]
    return {d: {"estimated_bytes": inst.estimated_bytes.get(d), "actual_bytes": inst.actual_bytes.get(d)} for d in names}


def drift(inst: Instance) -> tuple[str, float] | None:
    """The device whose actual memory is furthest from its estimate, and by how much (a fraction), if beyond
    DRIFT_THRESHOLD. The host's RSS counts the process itself, so only GPUs, or the host of a CPU instance."""
    worst = None
    for dev, fig in devices(inst).items():
        est, got = fig["estimated_bytes"], fig["actual_bytes"]
        if not est or got is None or (dev == "CPU" and inst.gpu_ids):
            continue
        rel = (got - est) / est
        if abs(rel) > DRIFT_THRESHOLD and (worst is None or abs(rel) > abs(worst[1])):
            worst = (dev, rel)
    return worst


def _gpu_use_by_pid() -> dict[int, int] | None:
    devices, reason = nvml.devices()
    if reason:
        return None
    return {pid: sum(per_gpu.values()) for pid, per_gpu in nvml.use_by_pid(devices).items()}


def refresh(store: StateStore) -> list[tuple[Instance, client.Live | None]]:
    """Reconcile, poll live instances concurrently, record activity (last_used) and readiness seen."""
    instances = store.instances()
    live = [i for i in instances.values() if i.live and i.pid is not None]
    polled = dict(zip((i.name for i in live), client.poll_all([f"http://{i.host}:{i.port}" for i in live])))
    now = time.time()
    changed = {}
    for inst in live:
        seen = polled[inst.name]
        update = inst
        if seen.activity is not None and seen.activity != inst.activity:
            update = replace(update, activity=seen.activity, last_used=now)
        if seen.slots_busy:
            update = replace(update, last_used=now)
        if inst.status is Status.STARTING and seen.healthy:
            update = update.moved(Status.READY)
        if update != inst:
            changed[inst.name] = update
    if changed:
        with store.edit() as current:
            for name, update in changed.items():
                if name in current and current[name].pid == update.pid:
                    now_status = current[name].status
                    current[name] = current[name].moved(update.status if now_status is Status.STARTING else now_status,
                                                        activity=update.activity, last_used=update.last_used)
        instances = store.instances()
    return [(i, polled.get(i.name)) for i in sorted(instances.values(), key=lambda i: i.name)]


def shown_status(inst: Instance, seen: client.Live | None) -> Status:
    if inst.status is Status.READY and seen is not None and seen.slots_busy:
        return Status.BUSY
    return inst.status


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
    gpu_use = _gpu_use_by_pid() if any(i.gpu_ids for i, _ in rows) else None
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
