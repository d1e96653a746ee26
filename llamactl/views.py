"""What the live views show (`ps`, `llamactl top`, the proxy's /status and its page): one typed snapshot, two
producers.

A `Snapshot` holds the GPUs (inventory records), one `InstanceView` per llama-server (estimated and actual
memory per device), the recent `Event`s and, from a proxy, the requests, per-model rates and GPU memory
history its page draws. Each field of an InstanceView is filled by the producer that can know it and None
where it cannot (a proxy knows requests in flight and TTLs, the local view the log and drift). Producers:
`from_instance()` (a state entry and its poll: `ps` and `local()`, which `top` draws) and the proxy's
status module; `to_json()` is /status's and `ps --json`'s document, `Snapshot.from_json()` reads a remote
one back, checked (`remote()`, which `top --url` draws). `gpu_segments()` splits a GPU's memory into each
instance, other programs and free: the bar both views draw.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llamactl.gpu.inventory import Gpu, Inventory
from llamactl.lifecycle import LIVE
from llamactl.units import format_bytes

if TYPE_CHECKING:
    from llamactl.servers.client import Live
    from llamactl.servers.state import Instance, StateStore

EVENTS_KEPT = 200
EVENTS_SHOWN = 50  # the recent events a snapshot carries
_LIVE_STATES = frozenset(s.value for s in LIVE)


@dataclass(frozen=True)
class Event:
    """Something that happened to an instance: launch, ready, stop and why, out of memory, crash."""

    at: float
    kind: str
    model: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "model": self.model, "detail": self.detail}


@dataclass
class EventLog:
    """Recent events, newest last."""

    items: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))

    def add(self, kind: str, model: str, detail: str = "") -> None:
        self.items.append(Event(time.time(), kind, model, detail))

    def recent(self, last: int = EVENTS_SHOWN) -> tuple[Event, ...]:
        return tuple(self.items)[-last:]


@dataclass(frozen=True)
class DeviceUse:
    """One device's memory for an instance: the estimate it was launched with, what it took once ready."""

    estimated_bytes: int | None = None
    actual_bytes: int | None = None


@dataclass(frozen=True)
class Drift:
    """The device whose actual memory is furthest from its estimate, and by how much (a signed fraction)."""

    device: str
    fraction: float


@dataclass(frozen=True)
class InstanceView:
    """One llama-server as the views show it; None where its producer cannot know a field."""

    name: str
    model: str  # the GGUF path (the state file) or the configured model's name (a proxy)
    state: str  # a lifecycle.Status value; `busy` is `ready` with a slot processing
    pid: int | None = None
    port: int | None = None
    url: str | None = None
    gpu_ids: tuple[int, ...] = ()
    estimated_bytes: int | None = None
    actual_bytes: int | None = None
    devices: Mapping[str, DeviceUse] = field(default_factory=dict)  # "CPU", "GPU0", ...
    drift: Drift | None = None  # local only: from the figures recorded in the state file
    slots_busy: int | None = None
    slots_total: int | None = None
    tokens_per_s: float | None = None
    in_flight: int | None = None  # proxy only: requests it relays to this instance now
    queued: int | None = None  # proxy only: requests waiting for it
    started_at: float | None = None
    last_used: float | None = None
    idle_s: float | None = None
    ttl_s: float | None = None  # proxy only
    ttl_left_s: float | None = None  # proxy only
    aliases: tuple[str, ...] | None = None  # proxy only
    configured: bool | None = None  # proxy only: still in its config (a removed model goes once idle)
    started_by: str | None = None  # "cli", "proxy", "adopted" (the state file's)
    started_by_proxy: bool | None = None  # proxy only: started (or owned) by this proxy
    log_path: str | None = None  # local only: a path on this machine, never taken from a remote snapshot
    upstream: str | None = None  # proxy only: the box that serves it (a remote model), by its config name
    latency_ms: float | None = None  # proxy only: a remote box's answer time at the last poll

    @property
    def live(self) -> bool:
        return self.state in _LIVE_STATES

    @property
    def shown_model(self) -> str:
        return self.model.rsplit("/", 1)[-1]

    def to_json(self) -> dict[str, Any]:
        """/status's and `ps --json`'s object: `state` (the page's and top's) and `status` (ps's) say the same."""
        return {
            "name": self.name, "model": self.model, "state": self.state, "status": self.state, "pid": self.pid,
            "port": self.port, "url": self.url, "gpu_ids": list(self.gpu_ids), "started_at": self.started_at,
            "last_used": self.last_used, "started_by": self.started_by, "started_by_proxy": self.started_by_proxy,
            "estimated_bytes": self.estimated_bytes, "actual_bytes": self.actual_bytes,
            "devices": {d: {"estimated_bytes": u.estimated_bytes, "actual_bytes": u.actual_bytes}
                        for d, u in self.devices.items()},
            "drift": {"device": self.drift.device, "fraction": round(self.drift.fraction, 4)} if self.drift else None,
            "slots_busy": self.slots_busy, "slots_total": self.slots_total, "tokens_per_s": self.tokens_per_s,
            "in_flight": self.in_flight, "queued": self.queued, "idle_s": self.idle_s, "ttl_s": self.ttl_s,
            "ttl_left_s": self.ttl_left_s, "aliases": list(self.aliases) if self.aliases is not None else None,
            "configured": self.configured, "log_path": self.log_path, "upstream": self.upstream,
            "latency_ms": self.latency_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstanceView:
        """A remote instance with every field checked: a number that is not one, a wrong type, becomes None
        (a text its repr); `log_path` (a path on that machine) is dropped, never opened here."""
        drift = data.get("drift")
        aliases = data.get("aliases")
        return cls(
            name=_text(data.get("name")) or "-", model=_text(data.get("model")) or "-",
            state=_text(data.get("state", data.get("status"))) or "-",
            pid=_int(data.get("pid")), port=_int(data.get("port")), url=_text(data.get("url")),
            gpu_ids=tuple(data["gpu_ids"]) if isinstance(data.get("gpu_ids"), list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in data["gpu_ids"]) else (),
            estimated_bytes=_int(data.get("estimated_bytes")), actual_bytes=_int(data.get("actual_bytes")),
            devices={str(k): DeviceUse(_int(v.get("estimated_bytes")), _int(v.get("actual_bytes")))
                     for k, v in data["devices"].items() if isinstance(v, dict)} if isinstance(data.get("devices"), dict) else {},
            drift=Drift(drift["device"], float(drift["fraction"])) if isinstance(drift, dict) and isinstance(
                drift.get("device"), str) and _number(drift.get("fraction")) else None,
            slots_busy=_int(data.get("slots_busy")), slots_total=_int(data.get("slots_total")),
            tokens_per_s=_float(data.get("tokens_per_s")), in_flight=_int(data.get("in_flight")),
            queued=_int(data.get("queued")), started_at=_float(data.get("started_at")),
            last_used=_float(data.get("last_used")), idle_s=_float(data.get("idle_s")), ttl_s=_float(data.get("ttl_s")),
            ttl_left_s=_float(data.get("ttl_left_s")),
            aliases=tuple(str(a) for a in aliases) if isinstance(aliases, list) else None,
            configured=data["configured"] if isinstance(data.get("configured"), bool) else None,
            started_by=_text(data.get("started_by")),
            started_by_proxy=data["started_by_proxy"] if isinstance(data.get("started_by_proxy"), bool) else None,
            upstream=_text(data.get("upstream")), latency_ms=_float(data.get("latency_ms")),
        )


@dataclass(frozen=True)
class Snapshot:
    """The live picture at one moment. `requests`, `rates` and `history` are a proxy's (empty from the state
    file), JSON as its page draws them."""

    source: str  # the state dir, or the proxy ("proxy" from itself, its URL once read by top)
    at: float
    gpus: tuple[Gpu, ...] = ()
    gpu_note: str | None = None
    instances: tuple[InstanceView, ...] = ()
    events: tuple[Event, ...] = ()
    requests: tuple[Mapping[str, Any], ...] = ()
    rates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    history: tuple[Mapping[str, Any], ...] = ()
    queue: int | None = None

    def to_json(self) -> dict[str, Any]:
        from llamactl.gpu.inventory import to_json

        return {"source": self.source, "at": self.at, "gpus": to_json(Inventory(self.gpus, self.source)),
                "gpu_note": self.gpu_note, "instances": [i.to_json() for i in self.instances],
                "events": [e.to_json() for e in self.events], "requests": [dict(r) for r in self.requests],
                "rates": {k: dict(v) for k, v in self.rates.items()}, "history": [dict(h) for h in self.history],
                "queue": self.queue}

    @classmethod
    def from_json(cls, data: Any, url: str) -> Snapshot:
        """A remote /status document as the views may draw it: its shape checked (RemoteError otherwise),
        every field typed, a remote log path dropped; `source` is the URL."""
        from llamactl.errors import RemoteError

        if not isinstance(data, dict) or not isinstance(data.get("instances"), list) or not all(
                isinstance(i, dict) and isinstance(i.get("name"), str) for i in data["instances"]):
            raise RemoteError(f"{url}: /status is not a llamactl proxy's snapshot (unexpected shape)")
        events = data.get("events") if isinstance(data.get("events"), list) else []
        rates = data.get("rates") if isinstance(data.get("rates"), dict) else {}
        return cls(
            source=url, at=_float(data.get("at")) or 0.0, gpus=_gpus(data.get("gpus")),
            gpu_note=_text(data.get("gpu_note")),
            instances=tuple(InstanceView.from_json(i) for i in data["instances"]),
            events=tuple(Event(at=e["at"] if _number(e.get("at")) and 0 <= e["at"] < 2**33 else 0.0,
                               kind=str(e.get("kind", "-"))[:20], model=str(e.get("model", "-"))[:80],
                               detail=str(e.get("detail", ""))[:200]) for e in events if isinstance(e, dict)),
            requests=_dicts(data.get("requests")), history=_dicts(data.get("history")),
            rates={str(k): v for k, v in rates.items() if isinstance(v, dict)}, queue=_int(data.get("queue")))


def from_instance(inst: Instance, seen: Live | None, *, actual_bytes: int | None, drift: tuple[str, float] | None,
                  log_path: str, now: float) -> InstanceView:
    """A state entry as the views show it, with what its poll (`seen`) and NVML (`actual_bytes`) said."""
    from llamactl.servers.refresh import devices, shown_status

    return InstanceView(
        name=inst.name, model=inst.model, state=shown_status(inst, seen).value, pid=inst.pid, port=inst.port,
        url=f"http://{inst.host}:{inst.port}", gpu_ids=tuple(inst.gpu_ids),
        estimated_bytes=sum(inst.estimated_bytes.values()) or None, actual_bytes=actual_bytes,
        devices={d: DeviceUse(f["estimated_bytes"], f["actual_bytes"]) for d, f in devices(inst).items()},
        drift=Drift(*drift) if drift is not None else None,
        slots_busy=seen.slots_busy if seen else None, slots_total=seen.slots_total if seen else None,
        tokens_per_s=seen.tokens_per_s if seen else None, started_at=inst.started_at, last_used=inst.last_used,
        idle_s=now - inst.last_used if inst.live else None, started_by=inst.started_by, log_path=log_path)


def local(store: StateStore, inventory_fn: Callable[[], Inventory], events: EventLog,
          previous: Mapping[str, InstanceView] | None) -> Snapshot:
    """A snapshot from this machine: the state file reconciled and polled (as `ps`), NVML (as `gpus`), and what
    a proxy running on this state dir noted for its instances (TTL left, requests, its events)."""
    from llamactl.gpu.nvml import use_by_pid
    from llamactl.servers import proxy_notes
    from llamactl.servers.refresh import actual_bytes, drift, refresh

    rows = refresh(store)
    inv = inventory_fn()
    by_pid = {pid: sum(per_gpu.values()) for pid, per_gpu in use_by_pid(inv.gpus).items()}
    now = time.time()
    notes = proxy_notes.read_all(store.dir, now)
    instances = tuple(proxy_notes.annotate(
        from_instance(inst, seen, actual_bytes=actual_bytes(inst, by_pid if inst.gpu_ids else None), drift=drift(inst),
                      log_path=str(store.log_path(inst.name)), now=now), notes, now) for inst, seen in rows)
    _diff_events(events, previous, {i.name: i for i in instances}, proxy_notes.spoken_for(notes))
    told = sorted((*events.recent(), *(e for proxy in notes for e in proxy.events)), key=lambda e: e.at)
    return Snapshot(source=str(store.dir), at=now, gpus=inv.gpus, gpu_note=inv.note, instances=instances,
                    events=tuple(told[-EVENTS_SHOWN:]))


def _diff_events(events: EventLog, before: Mapping[str, InstanceView] | None, now: Mapping[str, InstanceView],
                 told: frozenset[str] = frozenset()) -> None:
    """Without a proxy's events, what changed between two snapshots is the event (`told`: instances a running
    proxy tells the events of)."""
    if before is None:
        return
    for name, inst in now.items():
        if name in told:
            continue
        old = before.get(name)
        if old is None or old.pid != inst.pid:
            events.add("launch", name, f"pid {inst.pid}, port {inst.port}")
        elif old.state != inst.state and {old.state, inst.state} != {"ready", "busy"}:
            kind = {"ready": "ready", "dead": "crash", "failed": "failed"}.get(inst.state, inst.state)
            events.add(kind, name, f"{old.state} → {inst.state}")
    for name in before.keys() - now.keys() - told:
        events.add("stopped", name, "no longer in the state file")


REMOTE_MAX_BYTES = 16 * 2**20  # a /status of hundreds of instances is a few hundred KiB
REMOTE_DEADLINE_S = 10.0  # the whole reply, however slowly it trickles


def remote(url: str, api_key: str | None, timeout_s: float = 5.0) -> Snapshot:
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
    except (httpx.InvalidURL, httpx.HTTPError) as exc:
        from llamactl.servers.client import remote_failure

        raise remote_failure(url, exc, timeout_s) from None
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise RemoteError(f"{url}: /status is not JSON (is this a llamactl proxy?)") from None
    return checked_snapshot(data, url)


def checked_snapshot(data: Any, url: str) -> Snapshot:
    """A remote /status document, checked and typed (`Snapshot.from_json`)."""
    return Snapshot.from_json(data, url)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) < 1e18


def _float(value: object) -> float | None:
    return float(value) if _number(value) else None  # type: ignore[arg-type]


def _int(value: object) -> int | None:
    return int(value) if _number(value) else None  # type: ignore[call-overload]


def _text(value: object) -> str | None:
    """A string as it is, None as None, anything else its repr (cut): drawn, never trusted."""
    return value if value is None or isinstance(value, str) else repr(value)[:80]


def _dicts(value: object) -> tuple[Mapping[str, Any], ...]:
    return tuple(e for e in value if isinstance(e, dict)) if isinstance(value, list) else ()


def _gpus(value: object) -> tuple[Gpu, ...]:
    """The GPUs of a remote snapshot that pass `gpus --json`'s checks; the others are left out."""
    from llamactl.errors import UsageError
    from llamactl.gpu.inventory import gpu_from_json

    gpus = []
    for position, entry in enumerate(value if isinstance(value, list) else []):
        try:
            gpus.append(gpu_from_json(entry, position, "remote GPU"))
        except UsageError:
            continue
    return tuple(gpus)


def gpu_segments(gpu: Gpu, instances: tuple[InstanceView, ...]) -> list[tuple[str, int, str]]:
    """(label, bytes, kind) in bar order: each llamactl instance on this GPU, other programs, free."""
    ours: list[tuple[str, int, str]] = []
    for inst in instances:
        if gpu.index not in inst.gpu_ids:
            continue
        dev = inst.devices.get(f"GPU{inst.gpu_ids.index(gpu.index)}", DeviceUse())
        by_pid = next((p.used_memory_bytes for p in gpu.processes if p.pid == inst.pid
                       and p.used_memory_bytes is not None), None)
        ours.append((inst.name, int(by_pid or dev.actual_bytes or dev.estimated_bytes or 0), "instance"))
    others = max(gpu.memory_used_bytes - sum(s for _, s, _ in ours), 0)
    return ours + [("other programs", others, "other"), ("free", max(gpu.memory_total_bytes - gpu.memory_used_bytes, 0), "free")]


def describe_bytes(n: int | None) -> str:
    return format_bytes(n) if n is not None else "-"
