"""The proxy's pool driven with fake effects: single flight, stop-then-start, max_instances, typed failures,
TTLs — no processes, no HTTP. Every effect is recorded in order."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.config import Config, ModelConfig
from llamactl.errors import LoadTimeoutError, ModelUnavailableError, NotReadyInTime, OutOfMemoryAtLoad, QueueFullError
from llamactl.gpu.inventory import Inventory
from llamactl.model.settings import ServerSettings
from llamactl.placement import Fit, Plan, Policy
from llamactl.fleet import FleetPlan, Placed
from llamactl.model.registry import Residency
from llamactl.proxy.pool import Pool
from llamactl.resolve import Door, resolve
from llamactl.servers.slot_cache import Cache, Outcome
from llamactl.servers.state import Instance, StateStore, Status

pytestmark = pytest.mark.timeout(20)


class FakeEffects:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate: dict[str, threading.Event] = {}  # hold a launch or a stop until set
        self.fail: dict[str, BaseException] = {}
        self.evict: tuple[str, ...] = ()
        self.running: dict[str, Instance] = {}
        self.preload: tuple[str, ...] = ()  # the fleet plan's resident preload models, in its order
        self.caches: list[Cache] = []  # what save_slots and restore_slots were given

    def _wait(self, key: str) -> None:
        if key in self.gate:
            assert self.gate[key].wait(10)

    def instances(self):
        return dict(self.running)

    def inventory(self):
        return Inventory(gpus=(), source="simulated")

    def door(self, config, model, given, inv):
        return Door(resolve(config, model, given), params=None, policy=Policy(), server=None)  # type: ignore[arg-type]

    def fleet(self, config, inv):
        return FleetPlan(tuple(Placed(n, Residency(preload=True), self.plan(None, inv, {}), True)
                               for n in self.preload), {})

    def plan(self, req, inv, instances):
        return Plan(fit=Fit.CPU, gpu_ids=(), tensor_split=None, resolved=None, estimate=None, capacities=(),
                    evict=self.evict)

    def launch(self, req):
        self.calls.append(("launch", req.name))
        self._wait(f"launch {req.name}")
        if req.name in self.fail:
            raise self.fail[req.name]
        argv = ("llama-server", "--slot-save-path", str(req.slot_save_path)) if req.slot_save_path else ()
        inst = Instance(name=req.name, model=str(req.model), port=9000 + len(self.calls), pid=4242,
                        create_time=1.0, status=Status.READY, argv=argv)
        self.running[req.name] = inst
        return inst

    def stop(self, name):
        self.calls.append(("stop", name))
        self._wait(f"stop {name}")
        self.running.pop(name, None)

    def alive(self, inst):
        return inst.name in self.running

    def environ(self, inst):
        return {}

    def record_activity(self, updates):
        self.calls.append(("record", ",".join(sorted(updates))))

    def save_slots(self, inst, api_key, cache):
        return self._cache_io("save", inst, cache)

    def restore_slots(self, inst, api_key, cache):
        return self._cache_io("restore", inst, cache)

    def _cache_io(self, action, inst, cache):
        self.calls.append((action, inst.name))
        self.caches.append(cache)
        self._wait(f"{action} {inst.name}")
        if f"{action} {inst.name}" in self.fail:
            raise self.fail[f"{action} {inst.name}"]
        return Outcome(files=2, disk_bytes=1234)


async def until(check, timeout_s: float = 10.0) -> None:
    """Wait on the loop (not a fixed sleep) until `check()` holds: threads may be slow on a busy machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def make_pool(tmp_path: Path, fake: FakeEffects, names=("a", "b", "c"), residency: Residency = Residency(),
              **config) -> Pool:
    models = {n: ModelConfig(name=n, path=tmp_path / f"{n}.gguf", settings=ServerSettings(), residency=residency)
              for n in names}
    for n in names:
        (tmp_path / f"{n}.gguf").write_bytes(b"")
    cfg = Config(models=models, **config)
    return Pool(cfg, StateStore(tmp_path / "state"), "llama-server", None, fake.inventory, effects=fake)  # type: ignore[arg-type]


def test_concurrent_requests_share_one_launch(tmp_path: Path) -> None:
    fake = FakeEffects()
    fake.gate["launch a"] = threading.Event()
    pool = make_pool(tmp_path, fake)

    async def go():
        waiters = [asyncio.ensure_future(pool.acquire("a")) for _ in range(4)]  # its 4 slots (-np unset)
        await until(lambda: fake.calls == [("launch", "a")] and pool.slots["a"].waiting == 4)
        assert pool.slots["a"].phase is Status.STARTING
        fake.gate["launch a"].set()
        slots = await asyncio.gather(*waiters)
        assert all(s is pool.slots["a"] for s in slots) and pool.slots["a"].in_flight == 4

    asyncio.run(go())
    assert fake.calls == [("launch", "a")]


def test_a_request_for_a_stopping_model_waits_for_the_stop_then_starts(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake, idle_ttl_s=0.0)

    async def go():
        pool.release(await pool.acquire("a"))
        fake.gate["stop a"] = threading.Event()
        poll = asyncio.ensure_future(pool.poll_once())  # the TTL stops a: held mid-stop
        await until(lambda: ("stop", "a") in fake.calls)
        assert pool.slots["a"].phase is Status.STOPPING
        request = asyncio.ensure_future(pool.acquire("a"))
        await until(lambda: pool.slots["a"].waiting == 1)
        await asyncio.sleep(0.1)  # time in which a wrong pool would launch again
        assert fake.calls == [("launch", "a"), ("stop", "a")]  # no second launch while the stop runs
        fake.gate["stop a"].set()
        await poll
        assert (await request) is pool.slots["a"]

    asyncio.run(go())
    assert [c for c in fake.calls if c[0] != "record"] == [("launch", "a"), ("stop", "a"), ("launch", "a")]


def test_max_instances_stops_the_least_recently_used_idle_one_first(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake, max_instances=2)

    async def go():
        pool.release(await pool.acquire("a"))
        busy = await pool.acquire("b")  # b keeps a request in flight
        c = await pool.acquire("c")
        assert pool.slots["a"].phase is Status.STOPPED and busy.phase is Status.READY
        queued = asyncio.ensure_future(pool.acquire("a"))  # b and c both busy now: a waits for a seat
        await until(lambda: pool.slots["a"].waiting == 1)
        assert not queued.done() and pool.slots["a"].phase is Status.STOPPED
        pool.release(busy)  # b is idle: a takes its seat
        assert (await queued) is pool.slots["a"]
        assert pool.slots["b"].phase is Status.STOPPED and c.phase is Status.READY

    asyncio.run(go())
    assert fake.calls == [("launch", "a"), ("launch", "b"), ("stop", "a"), ("launch", "c"), ("stop", "b"),
                          ("launch", "a")]


def test_a_request_that_finds_every_seat_busy_waits_at_most_the_load_timeout(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake, max_instances=1, load_timeout_s=1.0, poll_interval_s=0.1)

    async def go():
        await pool.acquire("a")
        with pytest.raises(ModelUnavailableError, match=r"max_instances \(1\) reached; held by a; waited 1 s"):
            await pool.acquire("b")
        assert pool.slots["b"].waiting == 0

    asyncio.run(go())
    assert fake.calls == [("launch", "a")]


def test_a_victim_is_claimed_with_the_start_so_no_request_is_admitted_to_it(tmp_path: Path) -> None:
    """max_instances: the start that stops `a` claims it in the same step; a request for `a` that arrives
    before the stop begins waits for it (it used to be admitted, and then three instances ran)."""
    fake = FakeEffects()
    fake.gate["stop a"] = threading.Event()
    pool = make_pool(tmp_path, fake, max_instances=2)

    async def go():
        pool.release(await pool.acquire("a"))
        pool.release(await pool.acquire("b"))
        pool.slots["b"].last_used = pool.slots["a"].last_used + 1  # a is the least recently used
        c = asyncio.ensure_future(pool.acquire("c"))
        await asyncio.sleep(0)  # c's decision ran: a is claimed
        assert pool.slots["a"].phase is Status.STOPPING
        again = asyncio.ensure_future(pool.acquire("a"))
        await until(lambda: ("stop", "a") in fake.calls)
        assert pool.slots["a"].in_flight == 0
        await asyncio.sleep(0.1)  # time in which a wrong pool would launch c beside a that still runs
        assert ("launch", "c") not in fake.calls and set(fake.running) == {"a", "b"}  # c's seat is a's
        fake.gate["stop a"].set()
        await c  # meanwhile the waiting request for a took the idle b's seat
        pool.release(await again)
        assert set(fake.running) == {"a", "c"}

    asyncio.run(go())


def test_memory_evictions_come_from_the_plan_and_spare_busy_instances(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake)

    async def go():
        pool.release(await pool.acquire("a"))
        await pool.acquire("b")  # in flight
        fake.evict = ("a", "b")  # the planner wants both gone for c
        await pool.acquire("c")

    asyncio.run(go())
    assert fake.calls == [("launch", "a"), ("launch", "b"), ("stop", "a"), ("launch", "c")]


@pytest.mark.parametrize(("failure", "error", "result"), [
    (NotReadyInTime("not ready after 1 s"), LoadTimeoutError, "timeout"),
    (OutOfMemoryAtLoad("exited (out of memory while loading)"), ModelUnavailableError, "oom"),
])
def test_launch_failures_map_by_type(tmp_path: Path, failure, error, result) -> None:
    fake = FakeEffects()
    fake.fail["a"] = failure
    pool = make_pool(tmp_path, fake)

    async def go():
        with pytest.raises(error):
            await pool.acquire("a")
        assert pool.slots["a"].phase is Status.STOPPED
        del fake.fail["a"]
        assert (await pool.acquire("a")).phase is Status.READY  # the next request tries again

    asyncio.run(go())
    assert pool.stats.launches == {("a", result): 1, ("a", "ok"): 1}


def test_the_queue_is_bounded(tmp_path: Path) -> None:
    fake = FakeEffects()
    fake.gate["launch a"] = threading.Event()
    pool = make_pool(tmp_path, fake, max_queue=2)

    async def go():
        waiters = [asyncio.ensure_future(pool.acquire("a")) for _ in range(2)]
        await until(lambda: pool.slots["a"].waiting == 2)
        with pytest.raises(QueueFullError):
            await pool.acquire("a")
        fake.gate["launch a"].set()
        await asyncio.gather(*waiters)

    asyncio.run(go())


def test_an_instance_another_llamactl_just_made_ready_is_routed_to(tmp_path: Path) -> None:
    """The race CI met: the pool read the state (nothing ready), a CLI launch became ready, the pool's launch
    then found the name taken. It must route to that instance, not answer 503."""
    from llamactl.errors import NameTaken

    class Racing(FakeEffects):
        def launch(self, req):
            self.calls.append(("launch", req.name))
            self.running[req.name] = Instance(name=req.name, model="m", port=9100, pid=4343, create_time=1.0,
                                              status=Status.READY, started_by="cli")
            raise NameTaken(f"an instance named {req.name!r} was started meanwhile (pid 4343)")

        def environ(self, inst):
            return {"LLAMACTL_STARTED_BY": "cli"}

    fake = Racing()
    pool = make_pool(tmp_path, fake)

    async def go():
        slot = await pool.acquire("a")
        assert slot.instance is not None and slot.instance.pid == 4343 and not slot.ours

    asyncio.run(go())
    assert fake.calls == [("launch", "a")]


def test_preload_starts_the_fleet_plan_s_models_in_order_and_evicts_nothing(tmp_path: Path) -> None:
    fake = FakeEffects()
    fake.preload = ("c", "a", "b")
    pool = make_pool(tmp_path, fake, max_instances=2)
    started = asyncio.run(pool.preload())
    assert started == ["c", "a"] and [c for c in fake.calls if c[0] == "launch"] == [("launch", "c"), ("launch", "a")]
    assert pool.slots["b"].phase is Status.STOPPED  # no seat left without evicting a preloaded model
    assert [(e.kind, e.model, e.detail) for e in pool.events.recent() if e.kind == "launch"] == [
        ("launch", "c", "preload"), ("launch", "a", "preload")]


def test_requests_beyond_its_slots_wait_in_the_proxy_then_429(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake, names=("a",), load_timeout_s=5.0)
    model = pool.slots["a"].model
    pool.slots["a"].model = replace(model, settings=replace(model.settings, parallel=2),
                                    residency=replace(model.residency, queue_timeout_s=0.3, max_queue=3))

    async def go():
        first = [await pool.acquire("a") for _ in range(2)]  # both slots
        queued = [asyncio.ensure_future(pool.acquire("a")) for _ in range(3)]
        await until(lambda: pool.slots["a"].waiting == 3)
        assert pool.slots["a"].in_flight == 2  # the third request is not sent to llama-server
        with pytest.raises(QueueFullError):  # max_queue (3) of this model reached: 429 at once
            await pool.acquire("a")
        pool.release(first[0])  # a slot comes free: one queued request takes it
        await until(lambda: sum(q.done() for q in queued) == 1)
        assert pool.slots["a"].in_flight == 2
        # the other two wait queue_timeout for a slot, then 429 with Retry-After
        errors = await asyncio.gather(*queued, return_exceptions=True)
        late = [e for e in errors if isinstance(e, QueueFullError)]
        assert len(late) == 2 and all(e.retry_after_s >= 1 and "slots of a are busy" in str(e) for e in late)

    asyncio.run(go())


KEEP = Residency(keep_cache=True, cache_max_bytes=1 << 20)


@pytest.mark.parametrize("reason", ["ttl", "memory", "max_instances", "unload", "shutdown"])
def test_keep_cache_saves_the_slots_before_every_stop(tmp_path: Path, reason: str) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake, residency=KEEP, max_instances=1 if reason == "max_instances" else None,
                     idle_ttl_s=0.0 if reason == "ttl" else None)

    async def go():
        pool.release(await pool.acquire("a"))
        if reason == "ttl":
            await pool.poll_once()
        elif reason == "memory":
            fake.evict = ("a",)
            await pool.acquire("b")
        elif reason == "max_instances":
            await pool.acquire("b")
        elif reason == "unload":
            assert await pool.unload("a")
        else:
            await pool.shutdown(keep_instances=False)
        assert pool.slots["a"].phase is Status.STOPPED

    asyncio.run(go())
    calls = [c for c in fake.calls if c[0] != "record"]
    assert calls[:4] == [("launch", "a"), ("restore", "a"), ("save", "a"), ("stop", "a")]
    assert fake.caches[0] == Cache(tmp_path / "state" / "slot-cache" / "a", 1 << 20)
    assert pool.stats.evictions == {reason: 1}
    assert pool.stats.cache_saves == {("a", "ok"): 2} and pool.stats.cache_bytes["a"] == 1234


def test_the_restore_runs_before_any_request_is_routed(tmp_path: Path) -> None:
    fake = FakeEffects()
    fake.gate["restore a"] = threading.Event()
    pool = make_pool(tmp_path, fake, residency=KEEP)

    async def go():
        first = asyncio.ensure_future(pool.acquire("a"))
        second = asyncio.ensure_future(pool.acquire("a"))
        await until(lambda: ("restore", "a") in fake.calls and pool.slots["a"].waiting == 2)
        assert pool.slots["a"].phase is Status.STARTING and pool.slots["a"].in_flight == 0
        fake.gate["restore a"].set()
        await asyncio.gather(first, second)
        assert pool.slots["a"].in_flight == 2

    asyncio.run(go())
    assert fake.calls == [("launch", "a"), ("restore", "a")]
    assert pool.stats.cache_restores == {("a", "ok"): 2}


@pytest.mark.parametrize("action", ["save", "restore"])
def test_a_failing_cache_never_blocks_the_stop_or_the_start(tmp_path: Path, action: str) -> None:
    fake = FakeEffects()
    fake.fail[f"{action} a"] = OSError("connection refused")
    pool = make_pool(tmp_path, fake, residency=KEEP)

    async def go():
        slot = await pool.acquire("a")
        assert slot.phase is Status.READY
        pool.release(slot)
        assert await pool.unload("a")
        assert slot.phase is Status.STOPPED and "a" not in fake.running

    asyncio.run(go())
    assert fake.calls == [("launch", "a"), ("restore", "a"), ("save", "a"), ("stop", "a")]
    counts = pool.stats.cache_saves if action == "save" else pool.stats.cache_restores
    assert counts == {("a", "failed"): 1}


def test_without_keep_cache_or_with_an_instance_not_launched_for_it_nothing_is_saved(tmp_path: Path) -> None:
    fake = FakeEffects()
    fake.running["b"] = Instance(name="b", model="m", port=9100, pid=4343, create_time=1.0, status=Status.READY,
                                 started_by="proxy")  # adopted: launched without this model's cache directory
    pool = make_pool(tmp_path, fake, names=("a",), residency=Residency())
    pool_keep = make_pool(tmp_path, fake, names=("b",), residency=KEEP)

    async def go():
        pool.release(await pool.acquire("a"))
        assert await pool.unload("a")
        pool_keep.release(await pool_keep.acquire("b"))
        assert await pool_keep.unload("b")

    asyncio.run(go())
    assert fake.calls == [("launch", "a"), ("stop", "a"), ("stop", "b")]
