"""The pool's management side with fake effects: keep_alive sets the TTL, a look (`hold`) never starts a model,
and an unload of every model waits for requests in flight. No processes, no HTTP."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.errors import BadRequestError, NotRunningError, UnknownModelError
from llamactl.model.registry import Residency
from llamactl.proxy import keepalive
from llamactl.servers.state import Status
from tests.unit.test_pool_effects import FakeEffects, make_pool, until

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), (30, 30.0), (2.5, 2.5), (0, 0.0), ("0", 0.0),
    (-1, keepalive.FOREVER), ("-1m", keepalive.FOREVER), ("-1", keepalive.FOREVER), (None, None),
])
def test_keep_alive_takes_ollamas_forms(value: object, seconds: float | None) -> None:
    assert keepalive.seconds(value) == seconds


@pytest.mark.parametrize("value", [True, "soon", "5 parsecs", [1], {"s": 1}, float("nan"), "1e400", 1e300])
def test_a_bad_keep_alive_is_a_400_naming_it(value: object) -> None:
    with pytest.raises(BadRequestError, match="keep_alive: expected a duration"):
        keepalive.seconds(value)


@pytest.mark.parametrize("body, out, value", [
    (b'{"model":"a","keep_alive":"5m","x":"\xc3\xa9"}', b'{"model":"a","x":"\xc3\xa9"}', "5m"),
    (b'{"model": "a", "keep_alive": 0}', b'{"model":"a"}', 0),
    (b'{"model": "a", "prompt": "say \\"keep_alive\\""}', b'{"model": "a", "prompt": "say \\"keep_alive\\""}', None),
    (b'{"model": "a", "options": {"keep_alive": 3}}', b'{"model": "a", "options": {"keep_alive": 3}}', None),
    (b'{"model": "a"}', b'{"model": "a"}', None),
])
def test_keep_alive_is_taken_out_of_the_body_and_nothing_else_changes(body: bytes, out: bytes, value: object) -> None:
    assert keepalive.strip(body) == (out, value)


def test_keep_alive_0_stops_the_model_when_its_request_ends(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake)

    async def go():
        first, second = await pool.acquire("a"), await pool.acquire("a")
        pool.release(first, 0.0)
        assert pool.slots["a"].phase is Status.READY  # another request is still in flight
        pool.release(second, 0.0)
        await until(lambda: pool.slots["a"].phase is Status.STOPPED)

    asyncio.run(go())
    assert fake.calls == [("launch", "a"), ("stop", "a")]
    assert pool.stats.evictions == {"keep_alive": 1}


def test_keep_alive_overrides_the_ttl_until_a_request_without_it(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake, idle_ttl_s=0.0)

    async def go():
        pool.release(await pool.acquire("a"), keepalive.FOREVER)
        pool.release(await pool.acquire("b"), 3600.0)
        assert pool.ttl_of(pool.slots["a"]) is None and pool.ttl_of(pool.slots["b"]) == 3600.0
        await pool.poll_once()
        assert {n: s.phase for n, s in pool.slots.items() if s.instance} == {"a": Status.READY, "b": Status.READY}
        pool.release(await pool.acquire("a"))  # no keep_alive: the configured idle_ttl (0) again
        await until(lambda: pool.ttl_of(pool.slots["a"]) == 0.0)
        await pool.poll_once()
        assert pool.slots["a"].phase is Status.STOPPED and pool.slots["b"].phase is Status.READY

    asyncio.run(go())


def test_keep_alive_0_leaves_a_pinned_model_and_a_removed_model_goes_whatever_was_asked(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake)
    pinned = replace(pool.config.models["a"], residency=Residency(pin=True))
    pool.reload(replace(pool.config, models={**pool.config.models, "a": pinned}))

    async def go():
        pool.release(await pool.acquire("a"), 0.0)
        pool.release(await pool.acquire("b"), keepalive.FOREVER)
        pool.reload(replace(pool.config, models={"a": pinned}))  # b removed
        assert pool.ttl_of(pool.slots["b"]) == 0.0
        await pool.poll_once()
        assert pool.slots["a"].phase is Status.READY and "b" not in pool.slots

    asyncio.run(go())


def test_a_look_never_starts_a_model_and_does_not_count_as_a_use(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake, idle_ttl_s=3600.0)

    async def go():
        with pytest.raises(NotRunningError, match="a is not running"):
            pool.hold("a")
        with pytest.raises(UnknownModelError):
            pool.hold("zz")
        pool.release(await pool.acquire("a"))
        used = pool.slots["a"].last_used = time.time() - 10
        slot = pool.hold("a")
        assert slot.in_flight == 1 and not pool.seats()["a"].evictable  # held against a stop meanwhile
        pool.unhold(slot)
        assert slot.in_flight == 0 and slot.last_used == used

    asyncio.run(go())
    assert fake.calls == [("launch", "a")]


def test_unload_all_stops_idle_ones_at_once_and_busy_ones_when_their_requests_end(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake)

    async def go():
        busy = await pool.acquire("a")
        pool.release(await pool.acquire("b"))
        unloading = asyncio.ensure_future(pool.unload_all(10.0))
        await until(lambda: pool.slots["b"].phase is Status.STOPPED)
        assert pool.slots["a"].phase is Status.READY and not unloading.done()
        pool.release(busy)
        done = await unloading
        assert done.stopped == ("b", "a") and done.busy == {} and done.not_ours == ()

    asyncio.run(go())
    assert fake.calls == [("launch", "a"), ("launch", "b"), ("stop", "b"), ("stop", "a")]


def test_unload_all_reports_what_stayed_busy_and_leaves_what_is_not_ours(tmp_path: Path) -> None:
    fake = FakeEffects()
    pool = make_pool(tmp_path, fake)

    async def go():
        held = await pool.acquire("a")
        pool.release(await pool.acquire("c"))
        pool.slots["c"].ours = False  # as an instance started by hand and routed to
        done = await pool.unload_all(0.2)
        assert done.stopped == () and done.busy == {"a": "ready, 1 in flight, 0 waiting"} and done.not_ours == ("c",)
        pool.release(held)

    asyncio.run(go())
    assert ("stop", "c") not in fake.calls
