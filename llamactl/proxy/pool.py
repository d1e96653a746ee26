"""The proxy's instances: one Slot per configured model, owned and changed here only.

What to do is decided by scheduler.py (pure, table-tested); this module is its
effects: start (adopt or launch), stop, wait. A Slot's lifecycle is scheduler.Status
(stopped → starting → ready → stopping). Requests call `acquire()` — never read
the phase and then act on it — which returns a ready slot with the request
counted in flight, starting the model first if needed: concurrent requests for a
model that is starting wait on that one launch (single flight), up to `max_queue`
of them; a request for a model that is stopping waits for the stop, then starts
it. Launching, stopping and state-file work run in threads; the event loop never
blocks on them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from llamactl.config import Config, ModelConfig
from llamactl.model.settings import SERVER_AUTO_SLOTS
from llamactl.errors import (GGUFError, ProxyError, LaunchError, LlamactlError, LoadTimeoutError, ModelUnavailableError, NoFitError,
                             NameTaken, NoRoomYet, SpillRefused, NotReadyInTime, NotRunningError, OutOfMemoryAtLoad, QueueFullError, UnknownModelError, UpstreamError)
from llamactl import views
from llamactl.gpu.inventory import Inventory
from llamactl.placement import Plan
from llamactl.fleet import FleetPlan, plan_configured
from llamactl.resolve import Door, Overrides, open_door
from llamactl.servers.probe import Server, ServerCaps
from llamactl.servers import launcher, procs, runner, slot_cache
from llamactl.servers.state import Instance, StateStore, Status
from llamactl import lifecycle, scheduler

__all__ = ["Pool", "PoolStats", "Slot", "Unloaded"]

log = logging.getLogger("llamactl.proxy")


@dataclass
class Slot:
    model: ModelConfig
    phase: Status = Status.STOPPED
    instance: Instance | None = None
    in_flight: int = 0
    waiting: int = 0
    last_used: float = 0.0
    ours: bool = False  # started by this proxy (stopped at shutdown unless --keep-instances)
    api_key: str | None = None
    task: asyncio.Future[None] | None = None  # the start or stop in progress (what a Wait waits for)
    stale: bool = False  # its config changed (SIGHUP): restarted with the new one once idle
    ready_since: float | None = None  # when it last became ready (min_resident counts from here)
    keep_alive_s: float | None = None  # the last ended request's keep_alive (negative: forever); None: the config's

    @property
    def base_url(self) -> str:
        assert self.instance is not None
        return f"http://{self.instance.host}:{self.instance.port}"


def _saves_into(inst: Instance, directory: Path) -> bool:
    """The instance was launched with `--slot-save-path directory`."""
    argv = inst.argv
    return any(argv[i] == "--slot-save-path" and argv[i + 1] == str(directory) for i in range(len(argv) - 1))


def _started_by_proxy(inst: Instance, env: dict[str, str]) -> bool:
    """Whether a proxy started this instance: its entry says so, or, when the entry was lost (its proxy killed
    between the spawn and the write) and re-adopted as "adopted", the environment llamactl gave it does."""
    return inst.started_by == "proxy" or env.get(launcher.STARTED_BY_ENV) == "proxy"


@dataclass(frozen=True)
class Unloaded:
    """What an unload of every model did: stopped, still busy at its deadline (why), not this proxy's to stop."""

    stopped: tuple[str, ...]
    busy: dict[str, str]
    not_ours: tuple[str, ...]


@dataclass
class PoolStats:
    """Counters the metrics endpoint reads (prometheus objects live in status.py)."""

    launches: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, result) → count
    evictions: dict[str, int] = field(default_factory=dict)  # reason → count
    refusals: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, reason) → requests refused
    queue_wait: dict[str, Durations] = field(default_factory=dict)  # model → time requests waited to be admitted
    load_time: dict[str, Durations] = field(default_factory=dict)  # model → time from launch to ready
    cache_saves: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, ok|failed) → slots
    cache_restores: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, ok|failed) → slots
    cache_bytes: dict[str, int] = field(default_factory=dict)  # model → its saved prompt caches on disk

    def refused(self, model: str, reason: str) -> None:
        self.refusals[(model, reason)] = self.refusals.get((model, reason), 0) + 1

    def waited(self, model: str, seconds: float) -> None:
        self.queue_wait.setdefault(model, Durations()).add(seconds)

    def loaded(self, model: str, seconds: float) -> None:
        self.load_time.setdefault(model, Durations()).add(seconds)


@dataclass
class Durations:
    """A histogram of durations in fixed buckets (seconds), for Prometheus."""

    BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
    counts: list[int] = field(default_factory=lambda: [0] * len(Durations.BUCKETS))
    total: float = 0.0
    n: int = 0

    def add(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations at most le), ending with +Inf: Prometheus' buckets."""
        out, running = [], 0
        for bound, count in zip(self.BUCKETS, self.counts):
            running += count
            out.append((str(float(bound)), running))
        return out + [("+Inf", self.n)]


# a failed start: (the launches metric's result, the proxy error it becomes; None = as it is)
_LAUNCH_FAILURES: dict[type[BaseException], tuple[str, type[LlamactlError] | None]] = {
    NotReadyInTime: ("timeout", LoadTimeoutError),
    OutOfMemoryAtLoad: ("oom", ModelUnavailableError),
    LaunchError: ("failed", UpstreamError),
    SpillRefused: ("spill", ModelUnavailableError),
    NoFitError: ("no_fit", ModelUnavailableError),
    NoRoomYet: ("no_room", ModelUnavailableError),  # waited the load timeout for memory others held
    ProxyError: ("failed", None),  # already the client's answer
    LlamactlError: ("failed", ModelUnavailableError),  # the state dir, a race with another launcher: not the client's fault
}


class Effects(Protocol):
    """Everything the pool does to the world, behind one small interface (blocking calls: the pool runs
    them in threads). ProcessEffects is the real one; tests drive the pool with a fake."""

    def instances(self) -> dict[str, Instance]: ...  # the state, reconciled
    def inventory(self) -> Inventory: ...
    def door(self, config: Config, model: str, given: Overrides, inv: Inventory) -> Door: ...  # resolved, header read
    def fleet(self, config: Config, inv: Inventory) -> FleetPlan: ...  # every configured model planned together
    def plan(self, req: launcher.LaunchRequest, inv: Inventory, instances: dict[str, Instance]) -> Plan: ...
    def launch(self, req: launcher.LaunchRequest) -> Instance: ...  # spawn, wait until ready, record
    def stop(self, name: str) -> None: ...  # TERM → KILL, reap, drop from the state
    def alive(self, inst: Instance) -> bool: ...  # still the process recorded
    def environ(self, inst: Instance) -> dict[str, str] | None: ...  # its environment, if ours
    def record_activity(self, updates: dict[str, tuple[int | None, Status, float]]) -> None: ...
    # keep_cache: every slot holding a prompt saved into the cache (before a stop), or the cache's slots of this
    # launch restored (after a start); bounded in time, failures reported in the outcome
    def save_slots(self, inst: Instance, api_key: str | None, cache: slot_cache.Cache) -> slot_cache.Outcome: ...
    def restore_slots(self, inst: Instance, api_key: str | None, cache: slot_cache.Cache) -> slot_cache.Outcome: ...


class ProcessEffects:
    """The real effects: llama-server processes, the state file, the inventory."""

    def __init__(self, store: StateStore, binary: str, caps: ServerCaps, inventory_fn: Callable[[], Inventory],
                 grace_s: float = runner.DEFAULT_GRACE_S, repack_types: frozenset[str] = frozenset()) -> None:
        self.store, self.binary, self.caps, self.inventory_fn, self.grace_s = store, binary, caps, inventory_fn, grace_s
        self.server = Server(binary, caps)  # its build is a key of learned GPU overheads
        self.repack_types = repack_types

    def instances(self) -> dict[str, Instance]:
        return self.store.instances()

    def inventory(self) -> Inventory:
        return self.inventory_fn()

    def door(self, config: Config, model: str, given: Overrides, inv: Inventory) -> Door:
        return open_door(config, model, given, inv, self.store.dir, self.server, self.repack_types)

    def fleet(self, config: Config, inv: Inventory) -> FleetPlan:
        return plan_configured(config, inv, self.store.dir, self.server, self.store.snapshot())

    def plan(self, req: launcher.LaunchRequest, inv: Inventory, instances: dict[str, Instance]) -> Plan:
        return launcher.plan_for(req, inv, instances)

    def launch(self, req: launcher.LaunchRequest) -> Instance:
        return launcher.launch(self.store, req, self.binary, self.caps, self.inventory_fn, grace_s=self.grace_s).instance

    def stop(self, name: str) -> None:
        launcher.stop_instances(self.store, [name], grace_s=self.grace_s)

    def alive(self, inst: Instance) -> bool:
        """Still the process we recorded; a child of ours that exited is reaped (no <defunct> left)."""
        ours = procs.check(inst.claim(self.store.dir)).ownership is procs.Ownership.OURS
        if not ours:
            procs.reap(inst.pid)
        return ours

    def environ(self, inst: Instance) -> dict[str, str] | None:
        return procs.environ_of(inst.claim(self.store.dir))

    def record_activity(self, updates: dict[str, tuple[int | None, Status, float]]) -> None:
        """Write busy/ready and last use back to the state (one edit), for `ps` in another shell; keep the
        instances' logs bounded (they log at verbosity 4, ~7 KB a request)."""
        for name in updates:
            runner.trim_log(self.store.log_path(name))
        with self.store.edit() as instances:
            for name, (pid, status, last_used) in updates.items():
                inst = instances.get(name)
                if inst is None or inst.pid != pid or inst.status not in (Status.READY, Status.BUSY):
                    continue
                last = max(inst.last_used, last_used)
                if (inst.status, inst.last_used) != (status, last):
                    instances[name] = inst.moved(status, last_used=last)

    def save_slots(self, inst: Instance, api_key: str | None, cache: slot_cache.Cache) -> slot_cache.Outcome:
        return slot_cache.save(f"http://{inst.host}:{inst.port}", api_key, inst.argv, inst.model, cache)

    def restore_slots(self, inst: Instance, api_key: str | None, cache: slot_cache.Cache) -> slot_cache.Outcome:
        return slot_cache.restore(f"http://{inst.host}:{inst.port}", api_key, inst.argv, inst.model, cache)


async def _finished(stops: list[asyncio.Future[None]] | tuple) -> None:
    """Until these stops (claimed earlier, possibly awaited elsewhere too) are done; a failed one is logged there."""
    if stops:
        await asyncio.gather(*(asyncio.shield(t) for t in stops), return_exceptions=True)


class Pool:
    def __init__(self, config: Config, store: StateStore, binary: str, caps: ServerCaps,
                 inventory_fn: Callable[[], Inventory], *, repack_types: frozenset[str] = frozenset(),
                 gpu_overhead_bytes: int | None = None, grace_s: float = runner.DEFAULT_GRACE_S,
                 effects: Effects | None = None) -> None:
        self.config = config
        self.store = store
        self.gpu_overhead_bytes = gpu_overhead_bytes
        self.effects: Effects = effects or ProcessEffects(store, binary, caps, inventory_fn, grace_s, repack_types)
        self.slots: dict[str, Slot] = {name: Slot(model) for name, model in config.models.items()}
        self.stats = PoolStats()
        self.events = views.EventLog()  # launch, ready, stop and why, out of memory, crash: for top and the page
        self.on_change: Callable[[], None] | None = None
        self._waiters: list[tuple[scheduler.Waiting, asyncio.Future[None]]] = []  # waiting for any change

    # --- requests -------------------------------------------------------------------------------

    async def acquire(self, requested: str) -> Slot:
        """A ready slot for `requested` (name or alias) with this request counted in flight."""
        model = self.config.lookup(requested)
        if model is None:
            known = ", ".join(sorted(self.config.models)) or "none configured"
            raise UnknownModelError(f"model {requested!r} not found; known models: {known}")
        slot = self.slots[model.name]
        model = slot.model  # the running instance's config (a reload applies at its restart)
        queued_since: float | None = None
        arrived = time.monotonic()
        while True:
            decision = scheduler.decide(model.name, self.seats(), self._limits(model), now=time.time())
            if isinstance(decision, scheduler.Use) and slot.instance is not None:
                slot.in_flight += 1
                slot.last_used = time.time()
                self.stats.waited(model.name, time.monotonic() - arrived)
                return slot
            if isinstance(decision, scheduler.Refuse):
                self.stats.refused(model.name, "queue_full")
                raise QueueFullError(decision.reason, retry_after_s=max(1, int(self.config.poll_interval_s)))
            if isinstance(decision, scheduler.Queue):
                # no seat now, or none of its slots free: wait (a request ends, a stop finishes), bounded
                now = time.monotonic()
                limit_s = self._queue_timeout(model) if decision.kind == "slots" else self.config.load_timeout_s
                queued_since = queued_since or now
                queued_until = queued_since + limit_s
                if now >= queued_until:
                    self.stats.refused(model.name, "queue_timeout" if decision.kind == "slots" else "no_seat")
                if now >= queued_until and decision.kind == "slots":
                    raise QueueFullError(f"{model.name}: {decision.reason}; waited {limit_s:g} s for one",
                                         retry_after_s=max(1, int(limit_s)))
                if now >= queued_until:
                    raise ModelUnavailableError(f"{model.name}: {decision.reason}; waited "
                                                f"{self.config.load_timeout_s:g} s for a seat")
                slot.waiting += 1
                try:
                    await self._wait_change(min(queued_until - now, self.config.poll_interval_s),
                                            scheduler.Waiting(model.name, model.residency.priority, queued_since))
                finally:
                    slot.waiting -= 1
                continue
            if isinstance(decision, scheduler.Start):
                # seat and victims claimed in this step, before any await: no other request can take the seat
                # or be admitted to a victim from here on
                stopping = [t for t in (self._begin_stop(self.slots[v], "max_instances") for v in decision.stop)
                            if t is not None]
                self._move(slot, Status.STARTING)  # now, so the next request waits on this start (single flight)
                slot.task = asyncio.ensure_future(self._start(slot, stopping))
            assert slot.task is not None
            slot.waiting += 1
            try:
                await asyncio.shield(slot.task)
            finally:
                slot.waiting -= 1

    def _queue_timeout(self, model: ModelConfig) -> float:
        own = model.residency.queue_timeout_s
        return own if own is not None else self.config.load_timeout_s

    def release(self, slot: Slot, keep_alive_s: float | None = None) -> None:
        """The request ended; its `keep_alive` (None: none given) sets how long the model stays loaded idle."""
        slot.in_flight -= 1
        slot.last_used = time.time()
        slot.keep_alive_s = keep_alive_s
        if keep_alive_s == 0 and self._seat(slot).evictable:
            self._begin_stop(slot, "keep_alive")  # claimed now, before any other request is admitted to it
        if slot.in_flight == 0 or slot.waiting:
            self._changed()  # a slot came free for a queued request, or it may be stopped now (seat, memory)

    def hold(self, requested: str) -> Slot:
        """The ready slot of `requested`, counted in flight (so it is not stopped meanwhile), for a look at it:
        never started for one (NotRunningError), and its idle time goes on. Give it back with `unhold`."""
        model = self._configured(requested)
        slot = self.slots[model.name]
        if slot.phase is not Status.READY or slot.instance is None:
            raise NotRunningError(f"{model.name} is not running ({slot.phase.value}); a request for it, or "
                                  f"POST /models/{model.name}/load, starts it")
        slot.in_flight += 1
        return slot

    def unhold(self, slot: Slot) -> None:
        slot.in_flight -= 1
        if slot.in_flight == 0:
            self._changed()

    def ttl_of(self, slot: Slot) -> float | None:
        """How long the slot may stay idle: its last request's keep_alive, else its model's `ttl`, else
        `idle_ttl` (None: forever). A model removed from the config goes once idle, whatever was asked."""
        if slot.keep_alive_s is not None and slot.model.name in self.config.models:
            return None if slot.keep_alive_s < 0 else slot.keep_alive_s
        return slot.model.ttl_s if slot.model.ttl_s is not None else self.config.idle_ttl_s

    def _configured(self, requested: str) -> ModelConfig:
        model = self.config.lookup(requested)
        if model is None:
            known = ", ".join(sorted(self.config.models)) or "none configured"
            raise UnknownModelError(f"model {requested!r} not found; known models: {known}")
        return model

    async def mark_dead(self, slot: Slot, why: str, wait_s: float = 0.0) -> bool:
        """The upstream failed a request: if its process is gone, forget it (True) so the next request
        relaunches; if it still runs, keep it (False). `wait_s`: a process whose stream broke is most likely
        exiting; give it that long to be gone before calling it alive."""
        if slot.phase is Status.STOPPING:
            return True  # stopped meanwhile (a TTL, keep_alive 0): the next request waits for it and starts it
        deadline = time.monotonic() + wait_s
        while (slot.instance is not None and time.monotonic() < deadline
               and await asyncio.to_thread(self.effects.alive, slot.instance)):
            await asyncio.sleep(0.05)
        if slot.instance is not None and not await asyncio.to_thread(self.effects.alive, slot.instance):
            log.warning("%s: instance is gone (%s); the next request relaunches it", slot.model.name, why,
                        extra={"event": "crash", "model": slot.model.name, "reason": why})
            self._move(slot, Status.STOPPED, event=("crash", why), instance=None)
            return True
        return slot.instance is None

    async def unload(self, requested: str) -> bool:
        """Stop a model's instance now (the status page's and `top --url`'s evict); False if none ran."""
        model = self.config.lookup(requested)
        if model is None:
            raise UnknownModelError(f"model {requested!r} not found")
        slot = self.slots[model.name]
        if slot.phase is Status.STARTING:
            raise ModelUnavailableError(f"{model.name}: still starting, with {slot.waiting} requests waiting for it; "
                                        "not stopped (unload it once it is ready)")
        if slot.instance is None or slot.phase is not Status.READY:
            return False
        if slot.in_flight or slot.waiting:
            raise ModelUnavailableError(f"{model.name}: {slot.in_flight + slot.waiting} requests in flight or waiting; "
                                        "not stopped")
        if not (slot.ours or self.config.adopt):
            raise ModelUnavailableError(f"{model.name}: started by hand, not by this proxy; stop it with `llamactl evict`")
        await self._stop(slot, "unload")
        return True

    def may_stop(self, name: str) -> bool:
        """Whether the unload routes may stop this model's instance: this proxy's own, or any with adopt."""
        slot = self.slots.get(name)
        return slot is not None and (slot.ours or self.config.adopt)

    async def unload_all(self, wait_s: float) -> Unloaded:
        """Stop every instance this proxy may stop, each as soon as it has no request in flight or waiting
        (requests that come meanwhile are served; one for a stopped model starts it again), within `wait_s`."""
        deadline = time.monotonic() + wait_s
        stopped: list[str] = []
        while True:
            busy: dict[str, str] = {}
            stops = []
            for name, slot in sorted(self.slots.items()):
                if slot.phase is Status.STOPPED or (slot.instance is not None and not self.may_stop(name)):
                    continue
                if slot.phase is Status.STOPPING and slot.task is not None:
                    stops.append(slot.task)
                elif slot.phase is Status.READY and not (slot.in_flight or slot.waiting):
                    stops.append(self._begin_stop(slot, "unload"))
                    stopped.append(name)
                else:
                    busy[name] = f"{slot.phase.value}, {slot.in_flight} in flight, {slot.waiting} waiting"
            await _finished([t for t in stops if t is not None])
            now = time.monotonic()
            if not busy or now >= deadline:
                kept = tuple(n for n, s in sorted(self.slots.items()) if s.instance is not None and not self.may_stop(n))
                return Unloaded(tuple(stopped), busy, kept)
            await self._wait_change(min(deadline - now, self.config.poll_interval_s))

    # --- lifecycle (owner-only) -----------------------------------------------------------------

    def _move(self, slot: Slot, phase: Status, *, event: tuple[str, str] | None = None, **fields: object) -> None:
        """The one place a slot's phase changes: checked against the lifecycle's transitions, then the event
        (kind, detail) for top and the page, and the change notice that wakes waiting requests."""
        slot.phase = lifecycle.check(slot.phase, phase)
        slot.ready_since = (slot.ready_since or time.time()) if phase is Status.READY else None
        for key, value in fields.items():
            setattr(slot, key, value)
        if event is not None:
            self.events.add(event[0], slot.model.name, event[1])
        self._changed()

    def _changed(self) -> None:
        """Wake every waiting request; each decides again in scheduler.wake_order (priority, the starvation
        bound, the model with the most requests waiting), so the first to take a freed seat is that one."""
        waiters, self._waiters = self._waiters, []
        order = scheduler.wake_order((w for w, _ in waiters), time.monotonic(), self.config.max_wait_s,
                                     batching=self.config.batching)
        for i in order:
            fut = waiters[i][1]
            if not fut.done():
                fut.set_result(None)
        if self.on_change is not None:
            self.on_change()

    async def _wait_change(self, timeout_s: float, waiting: scheduler.Waiting | None = None) -> None:
        """Until the next change of any slot (or the timeout: instances started from a shell change unseen)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (waiting or scheduler.Waiting("", 0, time.monotonic()), fut)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(fut, max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def seats(self) -> dict[str, scheduler.Seat]:
        """The slots as the scheduler sees them (ours = may be stopped to make room)."""
        return {name: self._seat(s) for name, s in self.slots.items()}

    def _seat(self, s: Slot) -> scheduler.Seat:
        residency = s.model.residency
        return scheduler.Seat(s.model.name, s.phase, s.in_flight, s.waiting, s.last_used,
                              ours=s.ours or self.config.adopt, pinned=residency.pin, priority=residency.priority,
                              ready_since=s.ready_since, min_resident_s=residency.min_resident_s,
                              capacity=s.model.settings.parallel or SERVER_AUTO_SLOTS)

    def _limits(self, model: ModelConfig | None = None) -> scheduler.Limits:
        own = model.residency.max_queue if model is not None else None
        return scheduler.Limits(max_instances=self.config.max_instances,
                                max_queue=own if own is not None else self.config.max_queue)

    def _begin_stop(self, slot: Slot, reason: str) -> asyncio.Future[None] | None:
        """Claim a stop now, in the caller's step (no request is admitted to the slot from here on; it keeps
        its seat and memory until the process is gone), and run it in a task; None if nothing runs."""
        if slot.instance is None:
            if slot.phase is Status.READY:
                self._move(slot, Status.STOPPED)
            return None
        if slot.phase is Status.STOPPING and slot.task is not None and not slot.task.done():
            return slot.task  # already going
        self._move(slot, Status.STOPPING)
        slot.task = asyncio.ensure_future(self._stop_body(slot, reason, slot.instance.name))
        return slot.task

    async def _stop(self, slot: Slot, reason: str) -> None:
        task = self._begin_stop(slot, reason)
        if task is not None:
            await asyncio.shield(task)

    async def _stop_body(self, slot: Slot, reason: str, name: str) -> None:
        try:
            if slot.instance is not None:
                await self._keep_cache(slot, slot.instance, "save")  # before the TERM: the server writes them
            await asyncio.to_thread(self.effects.stop, name)
        except Exception as exc:  # the entry stays in the state; ps/evict see what is left
            log.error("%s: stopping it failed: %s", slot.model.name, exc,
                      extra={"event": "stop_failed", "model": slot.model.name, "error": str(exc)})
        finally:
            self.stats.evictions[reason] = self.stats.evictions.get(reason, 0) + 1
            log.info("%s: stopped (%s)", slot.model.name, reason,
                     extra={"event": "stopped", "model": slot.model.name, "reason": reason})
            self._move(slot, Status.STOPPED, event=("evict" if reason != "shutdown" else "stopped", reason),
                       instance=None, ours=False)

    def _request(self, slot: Slot, protected: frozenset[str], inv: Inventory) -> launcher.LaunchRequest:
        """The launch of this slot's model, resolved as every door resolves it (resolve.py)."""
        overrides = Overrides(placement={"gpu_overhead_bytes": self.gpu_overhead_bytes}
                              if self.gpu_overhead_bytes is not None else {})
        door = self.effects.door(self.config, slot.model.name, overrides, inv)
        if self.config.instance_api_keys:
            slot.api_key = secrets.token_urlsafe(24)
        return door.request(api_key=slot.api_key if self.config.instance_api_keys else None,
                            timeout_s=self.config.load_timeout_s, started_by="proxy",
                            replace_existing=self.config.adopt, protected=protected,
                            gpu_only=not slot.model.residency.spill,
                            slot_save_path=self._cache_dir(slot) if slot.model.residency.keep_cache else None)

    def _cache_dir(self, slot: Slot) -> Path:
        return slot_cache.cache_dir(self.store.dir, slot.model.name)

    async def _keep_cache(self, slot: Slot, inst: Instance, action: str) -> None:
        """keep_cache: save the slots' prompt caches (before a stop) or restore them (after a start, before any
        request is routed). Only an instance launched with this model's cache directory; a failure is logged and
        the stop or start goes on."""
        name = slot.model.name
        if not slot.model.residency.keep_cache or not _saves_into(inst, self._cache_dir(slot)):
            return
        cache = slot_cache.Cache(self._cache_dir(slot), slot.model.residency.cache_max_bytes)
        effect = self.effects.save_slots if action == "save" else self.effects.restore_slots
        try:
            outcome = await asyncio.to_thread(effect, inst, slot.api_key, cache)
        except Exception as exc:  # noqa: BLE001 - a cache is never worth a failed stop or start
            outcome = slot_cache.Outcome(failures=(f"{type(exc).__name__}: {exc}",),
                                         disk_bytes=self.stats.cache_bytes.get(name, 0))
        self._count_cache(name, action, outcome)

    def _count_cache(self, name: str, action: str, outcome: slot_cache.Outcome) -> None:
        counts = self.stats.cache_saves if action == "save" else self.stats.cache_restores
        for result, n in (("ok", outcome.files), ("failed", len(outcome.failures))):
            if n:
                counts[(name, result)] = counts.get((name, result), 0) + n
        self.stats.cache_bytes[name] = outcome.disk_bytes
        for why in outcome.failures:
            log.warning("%s: prompt cache %s failed: %s", name, action, why)
        if outcome.files:
            log.info("%s: prompt cache: %s %d slots", name, "saved" if action == "save" else "restored", outcome.files)

    async def _adopt_running(self, slot: Slot, instances: dict[str, Instance] | None = None) -> bool:
        """Route to a live instance of this model's name (started by hand, or by an earlier proxy).

        One an earlier proxy started is ours again: it counts against max_instances, gets its TTL and is
        stopped at shutdown. Its API key (instance_api_keys) is read back from its environment.
        """
        if instances is None:
            instances = await asyncio.to_thread(self.effects.instances)
        inst = instances.get(slot.model.name)
        if inst is None or inst.status not in (Status.READY, Status.BUSY) or inst.pid is None:
            return False
        env = await asyncio.to_thread(self.effects.environ, inst)
        if env is None:
            return False
        slot.api_key = env.get(runner.API_KEY_ENV) or None
        self._move(slot, Status.READY, instance=inst, ours=_started_by_proxy(inst, env))
        # idle time counts from the instance's last recorded use (the poller keeps it current), so a TTL
        # that ran out while no proxy watched stops it at the next poll
        slot.last_used = inst.last_used or time.time()
        log.info("%s: routing to running instance (pid %s, started by %s)", slot.model.name, inst.pid, inst.started_by,
                 extra={"event": "adopted", "model": slot.model.name, "pid": inst.pid, "started_by": inst.started_by})
        return True

    async def adopt_all(self) -> list[str]:
        """At start-up: take over every running instance of a configured model (after a crash or a restart)."""
        instances = await asyncio.to_thread(self.effects.instances)
        adopted = []
        for name, slot in self.slots.items():
            if slot.phase is Status.STOPPED and slot.task is None and await self._adopt_running(slot, instances):
                adopted.append(name)
            left = instances.get(name)
            if left is None or left.status is not Status.STARTING:
                continue
            env = await asyncio.to_thread(self.effects.environ, left)
            if env is not None and _started_by_proxy(left, env):
                # a proxy that died while starting it left it: nobody waits for it; the next request starts it
                log.warning("%s: stopping the instance a previous proxy left starting (pid %s)", name, left.pid,
                            extra={"event": "leftover_stopped", "model": name, "pid": left.pid})
                await asyncio.to_thread(self.effects.stop, name)
        if adopted:
            self._changed()
        return adopted

    def _holding(self, name: str) -> frozenset[str]:
        """Our instances whose memory will come free without us stopping anything now: busy, queued,
        starting or stopping (a model that would fit better without them waits for them)."""
        return frozenset(n for n, seat in self.seats().items()
                         if n != name and seat.ours and seat.phase is not Status.STOPPED and not seat.evictable)

    @staticmethod
    def _loading_elsewhere(slot: Slot, instances: dict[str, Instance]) -> str | None:
        """An instance of this name that another llamactl (a CLI launch) is starting or stopping: never ours to
        stop; the proxy routes to it once ready (or starts its own once it is gone)."""
        inst = instances.get(slot.model.name)
        if inst is not None and inst.status in (Status.STARTING, Status.STOPPING):
            return f"an instance of it is {inst.status.value} outside this proxy (pid {inst.pid})"
        return None

    async def _launch(self, slot: Slot) -> Instance:
        """Plan, stop the idle instances the plan needs gone (claimed in one step), launch; NoRoomYet when
        memory it needs is held by instances that will free it."""
        name = slot.model.name
        instances = await asyncio.to_thread(self.effects.instances)
        # the file says busy until the next poll writes it back; the pool knows which of ours are idle now
        seats = self.seats()
        instances = {n: (i.moved(Status.READY) if i.status is Status.BUSY and n in seats and seats[n].evictable else i)
                     for n, i in instances.items()}
        inv = await asyncio.to_thread(self.effects.inventory)
        # resolved off the loop: it reads the header and the calibration store
        me, now = self._seat(slot), time.time()
        req = await asyncio.to_thread(self._request, slot, scheduler.protected(self.seats(), me, now) | {name}, inv)
        proposal = await asyncio.to_thread(self.effects.plan, req, inv, instances)
        stopping = []
        for victim in scheduler.memory_victims(proposal.evict, self.seats(), adopt=self.config.adopt, requester=me,
                                               now=time.time()):
            other = self.slots.get(victim)
            task = self._begin_stop(other, "memory") if other is not None else asyncio.ensure_future(self._stop_other(victim))
            if task is not None:
                stopping.append(task)
        await _finished(stopping)
        # room was made above, under the proxy's rules; the launch itself evicts nothing more, and re-checks
        # its plan against every claim when it records the instance
        req = replace(req, may_evict=False, wait_for=self._holding(name))
        return await asyncio.to_thread(self.effects.launch, req)

    async def _stop_other(self, name: str) -> None:
        """An instance of no configured model, stopped for memory (adopt = true)."""
        await asyncio.to_thread(self.effects.stop, name)
        self.stats.evictions["memory"] = self.stats.evictions.get("memory", 0) + 1

    async def preload(self) -> list[str]:
        """At start-up: start the `preload` models the fleet plan makes resident (`llamactl plan` with no model
        shows it), one after another in its order; one that has no free seat without evicting is left."""
        inv = await asyncio.to_thread(self.effects.inventory)
        fleet = await asyncio.to_thread(self.effects.fleet, self.config, inv)
        started = []
        for name in fleet.preload_order():
            slot = self.slots.get(name)
            if slot is None or slot.phase is not Status.STOPPED or slot.task is not None:
                continue  # adopted, or a request started it first
            decision = scheduler.decide(name, self.seats(), self._limits(), now=time.time())
            if not isinstance(decision, scheduler.Start) or decision.stop:
                log.warning("%s: not preloaded: no seat without evicting another model", name,
                            extra={"event": "preload_skipped", "model": name})
                continue
            self._move(slot, Status.STARTING)
            slot.task = asyncio.ensure_future(self._start(slot, reason="preload"))
            try:
                await asyncio.shield(slot.task)
                started.append(name)
            except LlamactlError as exc:  # logged and counted by _start; the next model is tried all the same
                log.error("%s: preload failed: %s", name, exc, extra={"event": "preload_failed", "model": name})
        return started

    async def _start(self, slot: Slot, stopping: list[asyncio.Future[None]] | tuple = (),
                     reason: str = "on demand") -> None:
        name = slot.model.name
        started = time.monotonic()
        deadline = started + self.config.load_timeout_s
        try:
            await _finished(stopping)  # the max_instances victims claimed with this start
            announced = False
            while True:
                # one read decides: ready there → route to it; loading there → wait; nothing → launch
                instances = await asyncio.to_thread(self.effects.instances)
                if await self._adopt_running(slot, instances):
                    return
                why = self._loading_elsewhere(slot, instances)
                if why is None:
                    if not announced:
                        self.events.add("launch", name, reason)
                        announced = True
                    try:
                        instance = await self._launch(slot)
                        break
                    except NoRoomYet as exc:
                        if time.monotonic() >= deadline:
                            raise NoRoomYet(f"{exc}; waited {self.config.load_timeout_s:g} s", exc.holders) from None
                    except NameTaken as exc:  # another llamactl started it a moment ago: route to it, or wait
                        if time.monotonic() >= deadline:
                            raise ModelUnavailableError(f"{name}: {exc}") from None
                elif time.monotonic() >= deadline:
                    raise ModelUnavailableError(f"{name}: {why}; waited {self.config.load_timeout_s:g} s")
                await self._wait_change(min(deadline - time.monotonic(), self.config.poll_interval_s, 0.5))
            await self._keep_cache(slot, instance, "restore")
            slot.last_used = time.time()
            self._count(name, "ok")
            self.stats.loaded(name, time.monotonic() - started)
            log.info("%s: ready on port %s in %.1f s", name, instance.port, time.monotonic() - started,
                     extra={"event": "ready", "model": name, "port": instance.port, "pid": instance.pid,
                            "duration_ms": round((time.monotonic() - started) * 1000, 1)})
            self._move(slot, Status.READY, event=("ready", f"port {instance.port}, {time.monotonic() - started:.1f} s"),
                       instance=instance, ours=True)
        except GGUFError as exc:  # the file went missing or bad since the config was read: no paths to clients
            self._move(slot, Status.STOPPED, instance=None)
            self._count(name, "failed")
            log.error("%s: %s", name, exc, extra={"event": "launch_failed", "model": name, "result": "failed",
                                                  "error": str(exc)})
            raise ModelUnavailableError(f"{name}: its model file is missing or unreadable (details in the proxy's log)") from None
        except BaseException as exc:
            self._move(slot, Status.STOPPED, instance=None)
            for kind, (result, answer) in _LAUNCH_FAILURES.items():
                if isinstance(exc, kind):
                    self._count(name, result)
                    if result in ("no_fit", "spill", "no_room"):
                        self.stats.refused(name, result)
                    self.events.add(result if result in ("oom", "timeout", "no_fit", "no_room", "spill") else "failed", name, str(exc)[:200])
                    if answer is not None:  # the OpenAI-shaped error comes from the failure's type
                        log.error("%s: could not start: %s", name, exc,
                                  extra={"event": "launch_failed", "model": name, "result": result, "error": str(exc)})
                        raise answer(f"{name}: {exc}") from None
                    break
            raise
        finally:
            self._changed()

    def _count(self, name: str, result: str) -> None:
        self.stats.launches[(name, result)] = self.stats.launches.get((name, result), 0) + 1

    # --- background ---------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Liveness, idle TTLs, and last_used/busy written back to the state file (one edit per poll)."""
        now = time.time()
        for slot in list(self.slots.values()):
            if slot.phase is not Status.READY or slot.instance is None:
                continue
            inst = slot.instance
            if not await asyncio.to_thread(self.effects.alive, inst):
                log.warning("%s: instance (pid %s) is gone", slot.model.name, inst.pid,
                            extra={"event": "crash", "model": slot.model.name, "pid": inst.pid})
                self._move(slot, Status.STOPPED, event=("crash", f"pid {inst.pid} is gone"), instance=None)
                continue
        ttls = {name: self.ttl_of(s) for name, s in self.slots.items()}
        # every stop below is decided and claimed in one step (no await between the check and the claim), so
        # a request that arrives meanwhile either was admitted first (and the instance is not idle) or waits
        # for the stop and starts it again
        stopping = [self._begin_stop(self.slots[name], "ttl") for name in scheduler.expired(self.seats(), ttls, now)]
        seats = self.seats()
        for name, slot in list(self.slots.items()):
            if slot.stale and slot.instance is not None and seats[name].evictable and name in self.config.models:
                stopping.append(self._begin_stop(slot, "config changed"))  # restarted with the new settings on demand
        stopping += [self._begin_stop(self.slots[name], "max_instances")
                     for name in scheduler.over_limit(self.seats(), self._limits())]  # a lowered max_instances
        await _finished([t for t in stopping if t is not None])
        for slot in self.slots.values():
            if slot.instance is None:
                slot.stale = False
        for name in [n for n, s in self.slots.items() if n not in self.config.models and s.phase is Status.STOPPED]:
            del self.slots[name]  # removed from the config by a reload, and now stopped
        updates = {s.instance.name: (s.instance.pid, Status.BUSY if s.in_flight else Status.READY, s.last_used)
                   for s in self.slots.values() if s.instance is not None and s.phase is Status.READY}
        if updates:
            await asyncio.to_thread(self.effects.record_activity, updates)

    async def shutdown(self, keep_instances: bool) -> None:
        """Stop what this proxy started (unless kept); hand-started instances are never touched."""
        if keep_instances:
            return
        starting = [s.task for s in self.slots.values() if s.phase is Status.STARTING and s.task is not None]
        if starting:  # a start in progress would leave its instance running after we exit: let it finish first
            await asyncio.wait(starting, timeout=self.config.load_timeout_s)
        ours = [s for s in self.slots.values() if s.ours and s.instance is not None]
        await asyncio.gather(*(self._stop(s, "shutdown") for s in ours), return_exceptions=True)

    def reload(self, config: Config) -> None:
        """Apply a new config: added models appear; removed ones go when idle (the poller's TTL of 0)."""
        self.config = config
        for name, model in config.models.items():
            if name in self.slots:
                slot = self.slots[name]
                if slot.model != model and slot.instance is not None and slot.ours:
                    slot.stale = True  # path, settings, placement or args changed: restart once idle
                    log.info("%s: config changed; restarting it once idle", name,
                             extra={"event": "config_changed", "model": name})
                slot.model = model
            else:
                self.slots[name] = Slot(model)
        for name in [n for n in self.slots if n not in config.models]:
            slot = self.slots[name]
            if slot.instance is None and slot.phase is Status.STOPPED:
                del self.slots[name]
            else:
                slot.model = replace(slot.model, ttl_s=0.0)  # evicted by the poller once idle
        self._changed()  # a raised max_instances lets queued requests in
