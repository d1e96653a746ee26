"""What the proxy tells about itself: `/status` and `/status/stream` (the snapshot `llamactl top --url` and the
status page draw), `/running` (its instances only) and `/metrics` (Prometheus)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llamactl.gpu.inventory import Inventory
from llamactl.lifecycle import SLOT, Status
from llamactl.proxy.context import Proxy, proxy_of
from llamactl.proxy.pool import Pool, Slot
from llamactl.proxy.remote import Remotes
from llamactl.views import DeviceUse, InstanceView, Snapshot

disable_created_metrics()  # Prometheus' conventions: counters end in _total, no extra _created series

STREAM_INTERVAL_S = 1.0  # /status/stream sends at least this often, and at once on a change


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llamactl_requests", "Requests by model and HTTP status", ["model", "status"], registry=r)
        self.latency = Histogram("llamactl_request_seconds", "Request latency", ["model"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttfb = Histogram("llamactl_time_to_first_byte_seconds", "Time to the first upstream byte", ["model"],
                              registry=r, buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("llamactl_tokens", "Tokens reported by upstream usage", ["model", "kind"], registry=r)
        self.queue = Gauge("llamactl_queue_depth", "Requests waiting for a model to load", ["model"], registry=r)
        self.instances = Gauge("llamactl_instances", "Proxy instances by state", ["state"], registry=r)
        self.pool_counts = _PoolCounters()  # launches and evictions, counted by the pool
        r.register(self.pool_counts)
        self.pool_times = _PoolTimes()  # refusals, queue waits and load times, counted by the pool
        r.register(self.pool_times)
        self.gpu_used = Gauge("llamactl_gpu_memory_used_bytes", "GPU memory used", ["gpu"], registry=r)
        self.upstream_up = Gauge("llamactl_upstream_up", "Remote boxes: 1 reachable at the last poll, 0 not",
                                 ["upstream"], registry=r)
        self.upstream_latency = Gauge("llamactl_upstream_latency_seconds", "Remote boxes' answer time at the last "
                                      "poll", ["upstream"], registry=r)

    def refresh_remotes(self, remotes: Remotes) -> None:
        self.upstream_up.clear()
        self.upstream_latency.clear()
        for box in remotes.boxes:
            if box.reachable is not None:
                self.upstream_up.labels(box.name).set(int(box.reachable))
            if box.reachable and box.latency_ms is not None:
                self.upstream_latency.labels(box.name).set(box.latency_ms / 1000)

    def refresh(self, pool: Pool, inventory: Inventory | None) -> None:
        for phase in SLOT:
            self.instances.labels(phase.value).set(sum(1 for s in pool.slots.values() if s.phase is phase))
        for name, slot in pool.slots.items():
            self.queue.labels(name).set(slot.waiting)
        self.pool_counts.stats = self.pool_times.stats = pool.stats
        if inventory is not None:
            for gpu in inventory.gpus:
                self.gpu_used.labels(str(gpu.index)).set(gpu.memory_used_bytes)


class _PoolCounters:
    """The pool's counts as Prometheus metrics: launches, evictions, prompt caches saved and restored
    (`llamactl_launches_total`, `llamactl_cache_saves_total`, ...) and the caches' bytes on disk."""

    def __init__(self) -> None:
        self.stats: object | None = None

    def collect(self):
        launches = CounterMetricFamily("llamactl_launches", "Launches by model and result", labels=["model", "result"])
        evictions = CounterMetricFamily("llamactl_evictions", "Evictions (stops) by reason", labels=["reason"])
        saves = CounterMetricFamily("llamactl_cache_saves", "Slots' prompt caches saved before a stop (keep_cache), "
                                    "by model and result", labels=["model", "result"])
        restores = CounterMetricFamily("llamactl_cache_restores", "Slots' prompt caches restored after a start "
                                       "(keep_cache), by model and result", labels=["model", "result"])
        disk = GaugeMetricFamily("llamactl_cache_bytes", "Saved prompt caches on disk, by model", labels=["model"])
        stats = self.stats
        if stats is not None:
            for (model, result), count in stats.launches.items():  # type: ignore[attr-defined]
                launches.add_metric([model, result], count)
            for reason, count in stats.evictions.items():  # type: ignore[attr-defined]
                evictions.add_metric([reason], count)
            for family, counts in ((saves, stats.cache_saves), (restores, stats.cache_restores)):  # type: ignore[attr-defined]
                for (model, result), count in counts.items():
                    family.add_metric([model, result], count)
            for model, size in stats.cache_bytes.items():  # type: ignore[attr-defined]
                disk.add_metric([model], size)
        yield from (launches, evictions, saves, restores, disk)


class _PoolTimes:
    """Refusals by reason, and how long requests waited to be admitted and models took to load, per model."""

    def __init__(self) -> None:
        self.stats: object | None = None

    def collect(self):
        refusals = CounterMetricFamily("llamactl_refusals", "Requests refused, by model and reason (queue_full, "
                                       "queue_timeout, no_seat, no_fit, spill, no_room)", labels=["model", "reason"])
        waits = HistogramMetricFamily("llamactl_queue_wait_seconds", "Time a request waited to be admitted "
                                      "(a load, a seat, a slot)", labels=["model"])
        loads = HistogramMetricFamily("llamactl_load_seconds", "Time from launch to ready", labels=["model"])
        if self.stats is not None:
            for (model, reason), count in self.stats.refusals.items():  # type: ignore[attr-defined]
                refusals.add_metric([model, reason], count)
            for family, table in ((waits, self.stats.queue_wait), (loads, self.stats.load_time)):  # type: ignore[attr-defined]
                for model, durations in table.items():
                    family.add_metric([model], durations.cumulative(), durations.total)
        yield refusals
        yield waits
        yield loads


def snapshot(proxy: Proxy, inv: Inventory | None) -> Snapshot:
    """The live picture `llamactl top --url` and the status page draw."""
    pool = proxy.pool
    now = time.time()
    instances = tuple(_instance(proxy, name, slot, now) for name, slot in sorted(pool.slots.items())) + _remote_rows(proxy)
    return Snapshot(source="proxy", at=now, gpus=inv.gpus if inv is not None else (),
                    gpu_note=inv.note if inv is not None else None, instances=instances, events=pool.events.recent(),
                    requests=tuple(proxy.recent)[-50:], rates=_rates(proxy, now), history=tuple(proxy.history),
                    queue=sum(s.waiting for s in pool.slots.values()))


def _instance(proxy: Proxy, name: str, slot: Slot, now: float) -> InstanceView:
    inst = slot.instance
    ttl = proxy.pool.ttl_of(slot)
    idle = now - slot.last_used if inst is not None and slot.last_used else None
    live = proxy.live.get(name) if inst is not None else None
    return InstanceView(
        name=name, model=name, state=slot.phase.value, aliases=tuple(slot.model.aliases),
        configured=name in proxy.pool.config.models, in_flight=slot.in_flight, queued=slot.waiting,
        last_used=slot.last_used or None, idle_s=idle if not slot.in_flight else 0.0, ttl_s=ttl,
        ttl_left_s=max(ttl - idle, 0.0) if ttl is not None and idle is not None else None,
        started_by_proxy=slot.ours, pid=inst.pid if inst else None, port=inst.port if inst else None,
        url=slot.base_url if inst else None, started_at=inst.started_at if inst else None,
        started_by=inst.started_by if inst else None, gpu_ids=tuple(inst.gpu_ids) if inst else (),
        estimated_bytes=sum(inst.estimated_bytes.values()) if inst else None,
        actual_bytes=sum(inst.actual_bytes.values()) or None if inst else None,
        devices={d: DeviceUse(inst.estimated_bytes.get(d), inst.actual_bytes.get(d)) for d in inst.estimated_bytes}
        if inst else {},
        slots_busy=live.slots_busy if live else None, slots_total=live.slots_total if live else None,
        tokens_per_s=live.tokens_per_s if live else None)


def _remote_rows(proxy: Proxy) -> tuple[InstanceView, ...]:
    """A row per (model, box) other boxes serve: `ready`, `unreachable` or `unknown` (not polled yet), the
    box's latency, the requests this proxy relays there now and, from an upstream's /running, the model's slots
    busy there (its requests in flight, everyone's) and its slots. Named `MODEL@UPSTREAM` when imported."""
    return tuple(InstanceView(name=model if model == box.name else f"{model}@{box.name}", model=model,
                              state=box.state, url=box.base_url, in_flight=box.in_flight.get(model, 0), queued=0,
                              slots_busy=box.slots[model][0] if model in box.slots else None,
                              slots_total=box.slots[model][1] if model in box.slots else None,
                              aliases=(), configured=True, started_by_proxy=False, started_by="remote",
                              upstream=box.name, latency_ms=box.latency_ms)
                 for model, box in proxy.remotes.served())


def _rates(proxy: Proxy, now: float) -> dict[str, dict[str, object]]:
    """Per model over the last minute: requests, and the median and 95th percentile latency."""
    rates: dict[str, dict[str, object]] = {}
    for r in proxy.recent:
        if now - float(r["at"]) <= 60:  # type: ignore[arg-type]
            entry = rates.setdefault(str(r["model"]), {"per_min": 0, "latencies": []})
            entry["per_min"] += 1  # type: ignore[operator]
            entry["latencies"].append(r["ms"])  # type: ignore[union-attr]
    for entry in rates.values():
        lat = sorted(entry.pop("latencies"))  # type: ignore[arg-type]
        entry["p50_ms"] = lat[len(lat) // 2] if lat else None
        entry["p95_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else None
    return rates


async def status(request: web.Request) -> web.Response:
    proxy = proxy_of(request)
    inv = await asyncio.to_thread(proxy.inventory_fn)
    return web.json_response(snapshot(proxy, inv).to_json())


async def running(request: web.Request) -> web.Response:
    """What runs now (every model not stopped, and the remote ones reachable): its state, GPUs, memory, requests,
    idle time and TTL left, in /status's keys."""
    proxy = proxy_of(request)
    now = time.time()
    rows = [_instance(proxy, name, slot, now) for name, slot in sorted(proxy.pool.slots.items())
            if slot.phase is not Status.STOPPED] + [row for row in _remote_rows(proxy) if row.state == "ready"]
    return web.json_response({"running": [row.to_json() for row in rows]})


async def status_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the snapshot at once, then on every change and at least every second."""
    proxy = proxy_of(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    request["relay_status"], request["relay_done"] = 200, True  # a stream the client ends is no abort
    while not proxy.shutting_down:
        inv = proxy.inventory or await asyncio.to_thread(proxy.inventory_fn)
        try:
            await response.write(f"data: {json.dumps(snapshot(proxy, inv).to_json())}\n\n".encode())
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            break
        proxy.changed.clear()
        try:
            await asyncio.wait_for(proxy.changed.wait(), STREAM_INTERVAL_S)
        except asyncio.TimeoutError:
            pass
    return response


async def prometheus(request: web.Request) -> web.Response:
    proxy = proxy_of(request)
    proxy.metrics.refresh(proxy.pool, proxy.inventory)
    proxy.metrics.refresh_remotes(proxy.remotes)
    return web.Response(body=generate_latest(proxy.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
