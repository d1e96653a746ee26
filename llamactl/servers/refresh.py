"""The state file checked against the instances themselves, and what they really take.

`refresh()` reconciles the state, polls every live instance (concurrently, short timeouts), and writes back
what the polls show (activity as last use, readiness seen); `ps`, `top` and the views read instances this
way. `actual_bytes()`, `devices()` and `drift()` compare what an instance was estimated to take with what
it took.
"""

from __future__ import annotations

import time
from dataclasses import replace

from llamactl.gpu import nvml
from llamactl.servers import client
from llamactl.servers.state import Instance, StateStore, Status

DRIFT_THRESHOLD = 0.10  # an instance whose actual memory on a device is this far from the estimate is marked


def refresh(store: StateStore) -> list[tuple[Instance, client.Live | None]]:
    """Reconcile, poll live instances concurrently, record activity (last_used) and readiness seen."""
    instances = store.instances()
    # a worker's rpc-server speaks no HTTP: a GET would be read as tensor commands
    live = [i for i in instances.values() if i.live and i.pid is not None and i.serves_http]
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
    """`ready` with a slot processing is `busy` (a poll sees it before the state file does)."""
    if inst.status is Status.READY and seen is not None and seen.slots_busy:
        return Status.BUSY
    return inst.status


def gpu_use_by_pid() -> dict[int, int] | None:
    """GPU memory per process, summed over its GPUs (NVML); None without NVML."""
    devices, reason = nvml.devices()
    if reason:
        return None
    return {pid: sum(per_gpu.values()) for pid, per_gpu in nvml.use_by_pid(devices).items()}


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
