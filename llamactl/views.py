"""What the live views show (`llamactl top`, the proxy's status page): one snapshot shape, two sources.

A snapshot is plain JSON: `gpus` (as `llamactl gpus --json`), `instances` (one per llama-server, with
estimated and actual memory per device), `events` (newest last) and, from a proxy, `requests` and
per-model `rates`. `local()` builds it from the state file, NVML and the instances themselves;
`remote()` asks a running proxy's `/status`. `gpu_segments()` splits a GPU's memory into each
instance, other programs and free: the bar both views draw.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamactl.units import format_bytes

EVENTS_KEPT = 200


@dataclass
class EventLog:
    """Recent events (launch, ready, stop and why, out of memory, crash), newest last."""

    items: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))

    def add(self, kind: str, model: str, detail: str = "") -> None:
        self.items.append({"at": time.time(), "kind": kind, "model": model, "detail": detail})

    def json(self, last: int = 50) -> list[dict[str, Any]]:
        return list(self.items)[-last:]


def local(store: Any, inventory_fn: Callable[[], Any], events: EventLog, previous: dict[str, dict] | None) -> dict[str, Any]:
    """A snapshot from this machine: the state file reconciled and polled (as `ps`), NVML (as `gpus`)."""
    from llamactl.cli.gpus import gpus_json
    from llamactl.cli.ps import actual_bytes, devices, drift, refresh, shown_status

    rows = refresh(store)
    inv = inventory_fn()
    from llamactl.gpu.nvml import use_by_pid

    by_pid = {pid: sum(per_gpu.values()) for pid, per_gpu in use_by_pid(inv.gpus).items()}
    now = time.time()
    instances = []
    for inst, seen in rows:
        status = shown_status(inst, seen).value
        instances.append({
            "name": inst.name, "model": inst.model.rsplit("/", 1)[-1], "state": status, "pid": inst.pid,
            "port": inst.port, "gpu_ids": list(inst.gpu_ids), "estimated_bytes": sum(inst.estimated_bytes.values()) or None,
            "actual_bytes": actual_bytes(inst, by_pid if inst.gpu_ids else None), "devices": devices(inst),
            "drift": drift(inst) is not None, "slots_busy": seen.slots_busy if seen else None,
            "slots_total": seen.slots_total if seen else None, "tokens_per_s": seen.tokens_per_s if seen else None,
            "queued": None, "idle_s": now - inst.last_used if inst.live else None, "ttl_left_s": None,
            "started_by": inst.started_by, "log": str(store.log_path(inst.name)),
        })
    _diff_events(events, previous, {i["name"]: i for i in instances})
    return {"source": str(store.dir), "at": now, "gpus": gpus_json(inv), "gpu_note": inv.note,
            "instances": instances, "events": events.json(), "requests": [], "rates": {}}


def _diff_events(events: EventLog, before: dict[str, dict] | None, now: dict[str, dict]) -> None:
    """Local mode has no event stream: what changed between two snapshots is the event."""
    if before is None:
        return
    for name, inst in now.items():
        old = before.get(name)
        if old is None or old["pid"] != inst["pid"]:
            events.add("launch", name, f"pid {inst['pid']}, port {inst['port']}")
        elif old["state"] != inst["state"] and {old["state"], inst["state"]} != {"ready", "busy"}:
            kind = {"ready": "ready", "dead": "crash", "failed": "failed"}.get(inst["state"], inst["state"])
            events.add(kind, name, f"{old['state']} → {inst['state']}")
    for name in before.keys() - now.keys():
        events.add("stopped", name, "no longer in the state file")


def remote(url: str, api_key: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    """A running proxy's snapshot (its /status)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.get(url.rstrip("/") + "/status", headers=headers, timeout=timeout_s)
    if reply.status_code == 401:
        from llamactl.errors import UsageError

        raise UsageError(f"{url}: the proxy wants an API key (--api-key or LLAMACTL_API_KEY)")
    reply.raise_for_status()
    data = reply.json()
    data.setdefault("source", url)
    return data


def gpu_segments(gpu: dict[str, Any], instances: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(label, bytes, kind) in bar order: each llamactl instance on this GPU, other programs, free."""
    total = gpu.get("memory_total_bytes") or 0
    used = gpu.get("memory_used_bytes") or 0
    ours: list[tuple[str, int, str]] = []
    for inst in instances:
        if gpu.get("index") not in inst.get("gpu_ids", []):
            continue
        k = inst["gpu_ids"].index(gpu["index"])
        dev = (inst.get("devices") or {}).get(f"GPU{k}", {})
        by_pid = next((p["used_memory_bytes"] for p in gpu.get("processes", []) if p.get("pid") == inst.get("pid")
                       and p.get("used_memory_bytes") is not None), None)
        size = by_pid or dev.get("actual_bytes") or dev.get("estimated_bytes") or 0
        ours.append((inst["name"], int(size), "instance"))
    others = max(used - sum(s for _, s, _ in ours), 0)
    return ours + [("other programs", others, "other"), ("free", max(total - used, 0), "free")]


def describe_bytes(n: int | None) -> str:
    return format_bytes(n) if n is not None else "-"
