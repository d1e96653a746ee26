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
    from llamactl.gpu.inventory import to_json
    from llamactl.servers.refresh import actual_bytes, devices, drift, refresh, shown_status

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
    return {"source": str(store.dir), "at": now, "gpus": to_json(inv), "gpu_note": inv.note,
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


REMOTE_MAX_BYTES = 16 * 2**20  # a /status of hundreds of instances is a few hundred KiB
REMOTE_DEADLINE_S = 10.0  # the whole reply, however slowly it trickles


def remote(url: str, api_key: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    """A running proxy's snapshot (its /status), read as untrusted input: a deadline and a size bound on the
    reply, its shape checked, and no field taken for a local path (a remote `log` is dropped)."""
    import json
    import time

    import httpx

    from llamactl.errors import RemoteError

    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"{url}: not an http:// or https:// URL")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + REMOTE_DEADLINE_S
    body = bytearray()
    try:
        with httpx.stream("GET", url.rstrip("/") + "/status", headers=headers, timeout=timeout_s) as reply:
            if reply.status_code == 401:
                raise RemoteError(f"{url}: the proxy refused the API key" if api_key else
                                  f"{url}: the proxy wants an API key (--api-key or LLAMACTL_API_KEY)")
            if reply.status_code != 200:
                raise RemoteError(f"{url}: /status answered HTTP {reply.status_code}")
            for chunk in reply.iter_raw():
                body += chunk
                if len(body) > REMOTE_MAX_BYTES:
                    raise RemoteError(f"{url}: /status is larger than {REMOTE_MAX_BYTES // 2**20} MiB")
                if time.monotonic() > deadline:
                    raise RemoteError(f"{url}: /status did not arrive within {REMOTE_DEADLINE_S:g} s")
    except httpx.InvalidURL as exc:
        raise RemoteError(f"{url}: not a usable URL ({exc})") from None
    except httpx.ConnectError:
        raise RemoteError(f"{url}: nothing answers there (connection refused or no route)") from None
    except httpx.TimeoutException:
        raise RemoteError(f"{url}: no answer within {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise RemoteError(f"{url}: {type(exc).__name__}: {exc}") from None
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise RemoteError(f"{url}: /status is not JSON (is this a llamactl proxy?)") from None
    return checked_snapshot(data, url)


def checked_snapshot(data: Any, url: str) -> dict[str, Any]:
    """A remote /status document as the views may draw it: its shape checked (RemoteError otherwise), the
    fields they use typed, a remote log path dropped."""
    from llamactl.errors import RemoteError

    if not isinstance(data, dict) or not isinstance(data.get("instances"), list) or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str) for i in data["instances"]):
        raise RemoteError(f"{url}: /status is not a llamactl proxy's snapshot (unexpected shape)")
    data["instances"] = [_typed(i, _INSTANCE_NUMBERS, ("name", "model", "state")) for i in data["instances"]]
    gpus = data.get("gpus") if isinstance(data.get("gpus"), list) else []
    data["gpus"] = [_typed(g, _GPU_NUMBERS, ("name", "error")) for g in gpus
                    if isinstance(g, dict) and _number(g.get("index")) and _number(g.get("memory_total_bytes"))]
    events = data.get("events") if isinstance(data.get("events"), list) else []
    data["events"] = [{"at": e.get("at") if _number(e.get("at")) and 0 <= e["at"] < 2**33 else 0.0,
                       "kind": str(e.get("kind", "-"))[:20], "model": str(e.get("model", "-"))[:80],
                       "detail": str(e.get("detail", ""))[:200]} for e in events if isinstance(e, dict)]
    for key in ("requests", "history"):
        data[key] = [e for e in data.get(key) or [] if isinstance(e, dict)] if isinstance(data.get(key), list) else []
    data["source"] = url
    return data


_INSTANCE_NUMBERS = ("pid", "port", "in_flight", "queued", "idle_s", "ttl_s", "ttl_left_s", "last_used",
                     "tokens_per_s", "slots_busy", "slots_total", "estimated_bytes", "actual_bytes")
_GPU_NUMBERS = ("index", "memory_total_bytes", "memory_used_bytes", "memory_free_bytes", "utilization_gpu",
                "utilization_memory", "temperature_c", "power_w")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) < 1e18


def _typed(entry: dict[str, Any], numbers: tuple[str, ...], texts: tuple[str, ...]) -> dict[str, Any]:
    """A remote entry with the fields the views draw checked: numbers are numbers (else None), texts are
    strings (else their repr); a `log` (a path on that machine) dropped, never opened here."""
    out = {k: v for k, v in entry.items() if k != "log"}
    for key in numbers:
        if key in out and not _number(out[key]):
            out[key] = None
    for key in texts:
        if key in out and out[key] is not None and not isinstance(out[key], str):
            out[key] = repr(out[key])[:80]
    if not isinstance(out.get("gpu_ids"), list) or not all(isinstance(i, int) for i in out.get("gpu_ids", [])):
        out["gpu_ids"] = []
    devices = out.get("devices") if isinstance(out.get("devices"), dict) else {}
    out["devices"] = {str(k): {f: (v.get(f) if _number(v.get(f)) else None) for f in ("estimated_bytes", "actual_bytes")}
                      for k, v in devices.items() if isinstance(v, dict)}
    return out


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
