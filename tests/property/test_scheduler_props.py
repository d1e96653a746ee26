"""The proxy's pool under random interleavings of requests, request ends, starts and stops finishing (or
failing), instances dying, polls (TTL, stale configs, a lowered max_instances) and reloads, over several
models and limits. The pool is the real one; its effects are fakes that suspend on futures the test
resolves, so every interleaving is deterministic (no threads, no sleeps). After every step and at every
effect: a launch begins only with a seat free (processes, stopping ones included, < max_instances), no
instance with a request in flight is stopped, a request is only admitted to a ready slot; at
the end, with everything finished and idle, the (possibly lowered) max_instances holds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from llamactl.config import Config, ModelConfig
from llamactl.errors import NotReadyInTime, ProxyError
from llamactl.gpu.inventory import Inventory
from llamactl.lifecycle import Status
from llamactl.model.settings import ServerSettings
from llamactl.placement import Fit, Plan
from llamactl.proxy.pool import Pool
from llamactl.servers.state import Instance, StateStore
from tests.property.contract import counted, examples

MODELS = ("a", "b", "c", "d")


class World:
    """Fake effects whose launch and stop wait for the test, and the invariants checked as they act."""

    def __init__(self) -> None:
        self.running: dict[str, Instance] = {}  # processes that exist (stopping ones until their stop ends)
        self.pending: list[tuple[str, str, asyncio.Future]] = []  # (kind, name, gate)
        self.pool: Pool | None = None
        self.violations: list[str] = []
        self.port = 9000

    def processes(self) -> int:
        return len(self.running) + sum(1 for kind, _, _ in self.pending if kind == "launch")

    # effects the pool calls through asyncio.to_thread (patched below to run here, on the loop)
    def instances(self):
        return dict(self.running)

    def inventory(self):
        return Inventory(gpus=(), source="simulated")

    def plan(self, req, inv, instances):
        return Plan(fit=Fit.CPU, gpu_ids=(), tensor_split=None, resolved=None, estimate=None, capacities=())

    def alive(self, inst):
        return inst.name in self.running and self.running[inst.name].pid == inst.pid

    def environ(self, inst):
        return {}

    def record_activity(self, updates):
        pass

    async def launch(self, req):
        assert self.pool is not None
        limit = self.pool.config.max_instances
        if limit is not None and self.processes() >= limit:
            self.violations.append(f"launch of {req.name} with {self.processes()} processes (max_instances {limit})")
        gate = asyncio.get_running_loop().create_future()
        self.pending.append(("launch", req.name, gate))
        await gate
        if gate.result() is False:
            raise NotReadyInTime(f"{req.name}: not ready")
        self.port += 1
        inst = Instance(name=req.name, model=str(req.model), port=self.port, pid=self.port, create_time=1.0,
                        status=Status.READY)
        self.running[req.name] = inst
        return inst

    async def stop(self, name):
        assert self.pool is not None
        slot = self.pool.slots.get(name)
        if slot is not None and slot.in_flight:
            self.violations.append(f"stop of {name} with {slot.in_flight} requests in flight")
        gate = asyncio.get_running_loop().create_future()
        self.pending.append(("stop", name, gate))
        await gate
        self.running.pop(name, None)


step = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(MODELS)),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("finish"), st.integers(0, 20), st.booleans() | st.just(True)),
    st.tuples(st.just("die"), st.sampled_from(MODELS)),
    st.tuples(st.just("poll"),),
    st.tuples(st.just("reload"), st.sampled_from([None, 1, 2, 3]), st.sampled_from([None, 0.0, 1000.0])),
)


@settings(max_examples=examples(300), deadline=None)
@given(steps=st.lists(step, min_size=5, max_size=40), limit=st.sampled_from([1, 2, 3]),
       ttl=st.sampled_from([None, 0.0]))
@counted
def test_seats_and_in_flight_requests_hold_under_any_interleaving(steps, limit, ttl) -> None:
    asyncio.run(_run(steps, limit, ttl))


async def _run(steps, limit, ttl) -> None:
    world = World()
    models = {n: ModelConfig(name=n, path=Path(f"/nonexistent/{n}.gguf"), settings=ServerSettings()) for n in MODELS}
    config = Config(models=models, max_instances=limit, idle_ttl_s=ttl, load_timeout_s=1000.0, poll_interval_s=1000.0)
    pool = Pool(config, StateStore(Path("/nonexistent/state")), "llama-server", None, world.inventory,  # type: ignore[arg-type]
                effects=world)
    pool._request = lambda slot, protected, inv: _request(slot)  # type: ignore[method-assign]
    world.pool = pool
    real_to_thread = asyncio.to_thread

    async def on_loop(fn, *args, **kw):  # every effect on the loop, in order: the interleaving is the test's
        result = fn(*args, **kw)
        return await result if asyncio.iscoroutine(result) else result

    asyncio.to_thread = on_loop  # type: ignore[assignment]
    held: list = []  # slots with one of our requests in flight
    tasks: list[asyncio.Task] = []

    async def settle() -> None:
        for _ in range(60):
            await asyncio.sleep(0)

    async def request(model: str) -> None:
        for attempt in range(2):  # as app._forward: an instance found gone is forgotten and started again, once
            try:
                slot = await pool.acquire(model)
            except ProxyError:
                return
            if slot.phase is not Status.READY or slot.instance is None:
                world.violations.append(f"request for {model} admitted to a {slot.phase.value} slot")
            if world.alive(slot.instance):
                held.append(slot)
                return
            pool.release(slot)
            await pool.mark_dead(slot, "unreachable")

    try:
        for action in steps:
            kind = action[0]
            if kind == "request":
                tasks.append(asyncio.ensure_future(request(action[1])))
            elif kind == "release" and held:
                pool.release(held.pop(action[1] % len(held)))
            elif kind == "finish" and world.pending:
                _, _, gate = world.pending.pop(action[1] % len(world.pending))
                gate.set_result(action[2])
            elif kind == "die":
                world.running.pop(action[1], None)
            elif kind == "poll":
                tasks.append(asyncio.ensure_future(pool.poll_once()))
            elif kind == "reload":
                pool.reload(replace(pool.config, max_instances=action[1], idle_ttl_s=action[2]))
            await settle()
            assert not world.violations, world.violations
        # the end: every request ends, every start and stop finishes, polls run until nothing moves
        for _ in range(40):
            while held:
                pool.release(held.pop())
            while world.pending:
                world.pending.pop(0)[2].set_result(True)
            poll = asyncio.ensure_future(pool.poll_once())
            tasks.append(poll)
            await settle()
            if poll.done() and not world.pending and not held:
                break
        assert not world.violations, world.violations
        final = pool.config.max_instances
        if final is not None and pool.config.idle_ttl_s is None:
            assert len(world.running) <= final, (sorted(world.running), final)
    finally:
        asyncio.to_thread = real_to_thread  # type: ignore[assignment]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _request(slot):
    from llamactl.placement import Policy
    from llamactl.servers.launcher import LaunchRequest

    return LaunchRequest(model=slot.model.path, name=slot.model.name, settings=slot.model.settings, policy=Policy())
