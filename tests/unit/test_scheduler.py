"""The scheduler's decisions as a table: (seats, limits, request) → decision. No processes, no sleeps."""

from __future__ import annotations

import pytest

from llamactl.lifecycle import Status
from llamactl.scheduler import (Limits, Queue, Refuse, Seat, Start, Use, Wait, decide, expired, memory_victims,
                                over_limit, protected)

R, S, G, P = Status.READY, Status.STARTING, Status.STOPPED, Status.STOPPING


def seats(*rows: Seat) -> dict[str, Seat]:
    return {s.model: s for s in rows}


@pytest.mark.parametrize(("name", "table", "limits", "want"), [
    ("ready is used", seats(Seat("a", R)), Limits(), Use("a")),
    ("ready is used even when full", seats(Seat("a", R, waiting=64)), Limits(max_queue=64), Use("a")),
    ("stopped starts", seats(Seat("a", G)), Limits(), Start("a")),
    ("unknown seat starts", {}, Limits(), Start("a")),
    ("starting: wait for that start (single flight)", seats(Seat("a", S, waiting=3)), Limits(), Wait("a")),
    ("stopping: wait for the stop, then start again", seats(Seat("a", P)), Limits(), Wait("a")),
    ("queue full", seats(Seat("a", S, waiting=2)), Limits(max_queue=2), Refuse("queue_full", "")),
    ("room under max_instances", seats(Seat("a"), Seat("b", R)), Limits(max_instances=2), Start("a")),
    ("max_instances: the least recently used idle one goes",
     seats(Seat("a"), Seat("b", R, last_used=5), Seat("c", R, last_used=3)), Limits(max_instances=2),
     Start("a", ("c",))),
    ("max_instances: busy ones stay",
     seats(Seat("a"), Seat("b", R, last_used=5), Seat("c", R, last_used=3, in_flight=1)), Limits(max_instances=2),
     Start("a", ("b",))),
    ("max_instances: starting ones count and stay",
     seats(Seat("a"), Seat("b", S), Seat("c", R, last_used=9)), Limits(max_instances=2), Start("a", ("c",))),
    ("max_instances: not ours count and stay",
     seats(Seat("a"), Seat("b", R, ours=False)), Limits(max_instances=1), Queue("a", "")),
    ("max_instances: every one busy: wait for a seat", seats(Seat("a"), Seat("b", R, in_flight=2)),
     Limits(max_instances=1), Queue("a", "")),
    ("max_instances: queued ones stay", seats(Seat("a"), Seat("b", R, waiting=1)), Limits(max_instances=1),
     Queue("a", "")),
    ("max_instances: stopping ones hold their seat until gone", seats(Seat("a"), Seat("b", P)),
     Limits(max_instances=1), Queue("a", "")),
    ("max_instances: starting ones hold theirs", seats(Seat("a"), Seat("b", S)), Limits(max_instances=1),
     Queue("a", "")),
    ("max_instances: a stopping one's seat is not taken twice",
     seats(Seat("a"), Seat("b", P), Seat("c", R, last_used=1)), Limits(max_instances=2), Start("a", ("c",))),
    ("max_instances lowered by a reload: several go",
     seats(Seat("a"), Seat("b", R, last_used=1), Seat("c", R, last_used=2), Seat("d", R, last_used=3)),
     Limits(max_instances=1), Start("a", ("b", "c", "d"))),
])
def test_decide(name: str, table: dict[str, Seat], limits: Limits, want) -> None:
    got = decide("a", table, limits)
    if isinstance(want, Refuse):
        assert isinstance(got, Refuse) and got.kind == want.kind, name
    elif isinstance(want, Queue):
        assert isinstance(got, Queue) and got.model == want.model and "max_instances" in got.reason, name
    else:
        assert got == want, name


@pytest.mark.parametrize(("proposal", "adopt", "want"), [
    (("b", "c"), False, ("b",)),  # c has a request in flight
    (("b", "hand"), False, ("b",)),  # not a configured model: never without adopt
    (("b", "hand"), True, ("b", "hand")),
    (("d",), False, ()),  # d is not ours
])
def test_memory_victims(proposal, adopt, want) -> None:
    table = seats(Seat("a"), Seat("b", R), Seat("c", R, in_flight=1), Seat("d", R, ours=False))
    assert memory_victims(proposal, table, adopt=adopt) == want


def test_protected_and_expired() -> None:
    table = seats(Seat("idle", R, last_used=0), Seat("busy", R, in_flight=1, last_used=0),
                  Seat("queued", S, waiting=1), Seat("theirs", R, ours=False, last_used=0), Seat("off"))
    assert protected(table) == {"busy", "queued", "theirs"}
    ttl = {"idle": 10.0, "busy": 10.0, "queued": 10.0, "theirs": 10.0, "off": 10.0}
    assert expired(table, ttl, now=11.0) == ("idle",)
    assert expired(table, {**ttl, "idle": None}, now=11.0) == ()
    assert expired(table, ttl, now=9.0) == ()


@pytest.mark.parametrize(("table", "limit", "want"), [
    (seats(Seat("a", R, last_used=1), Seat("b", R, last_used=2), Seat("c", R, last_used=3)), 1, ("a", "b")),
    (seats(Seat("a", R, last_used=1, in_flight=1), Seat("b", R, last_used=2), Seat("c", R, last_used=3)), 1, ("b", "c")),
    (seats(Seat("a", R, in_flight=1), Seat("b", S), Seat("c", R, last_used=3)), 1, ("c",)),  # the rest once idle
    (seats(Seat("a", R), Seat("b", P)), 2, ()),
    (seats(Seat("a", R), Seat("b", P), Seat("c", R, last_used=1)), 2, ("a",)),
    (seats(Seat("a", R)), None, ()),
])
def test_over_limit_stops_idle_ones_least_recently_used_first(table, limit, want) -> None:
    assert over_limit(table, Limits(max_instances=limit)) == want


NOW = 1000.0


@pytest.mark.parametrize(("name", "table", "requester", "want"), [
    ("a pinned model is never the max_instances victim",
     seats(Seat("b", R, last_used=1, pinned=True), Seat("c", R, last_used=5)), Seat("a"), Start("a", ("c",))),
    ("only pinned models: wait for a seat", seats(Seat("b", R, pinned=True)), Seat("a"), Queue("a", "(pinned)")),
    ("lower priority goes before the least recently used",
     seats(Seat("b", R, last_used=1, priority=5), Seat("c", R, last_used=9, priority=0)), Seat("a", priority=5),
     Start("a", ("c",))),
    ("a model never evicts one of higher priority",
     seats(Seat("b", R, priority=9)), Seat("a", priority=1), Queue("a", "(priority 9)")),
    ("equal priority may go", seats(Seat("b", R, priority=3)), Seat("a", priority=3), Start("a", ("b",))),
    ("min_resident: a model ready less than that long stays",
     seats(Seat("b", R, ready_since=NOW - 10, min_resident_s=60)), Seat("a"), Queue("a", "(min_resident)")),
    ("min_resident: once past it, it may go",
     seats(Seat("b", R, ready_since=NOW - 61, min_resident_s=60)), Seat("a"), Start("a", ("b",))),
    ("min_resident: the older one goes first even if more recently used",
     seats(Seat("b", R, last_used=1, ready_since=NOW - 5, min_resident_s=60),
           Seat("c", R, last_used=9, ready_since=NOW - 100, min_resident_s=60)), Seat("a"), Start("a", ("c",))),
])
def test_residency_rules_under_max_instances(name: str, table: dict[str, Seat], requester: Seat, want) -> None:
    got = decide("a", table, Limits(max_instances=1 if len(table) == 1 else 2), now=NOW, requester=requester)
    if isinstance(want, Queue):
        assert isinstance(got, Queue) and want.reason in got.reason, (name, got)
    else:
        assert got == want, name


def test_residency_rules_for_memory_ttl_and_lowered_limits() -> None:
    table = seats(Seat("pinned", R, pinned=True, last_used=0), Seat("high", R, priority=9, last_used=0),
                  Seat("young", R, ready_since=NOW - 1, min_resident_s=60, last_used=0), Seat("old", R, last_used=0))
    me = Seat("a", priority=1)
    # the planner's proposal, kept to what may go for this requester
    assert memory_victims(["pinned", "high", "young", "old"], table, adopt=False, requester=me, now=NOW) == ("old",)
    # the plan may not even propose them
    assert protected(table, me, NOW) == {"pinned", "high", "young"}
    # a TTL stops what is idle past it, but never a pinned model; min_resident does not hold a TTL back
    assert set(expired(table, dict.fromkeys(table, 10.0), NOW)) == {"high", "young", "old"}
    # a lowered max_instances stops idle ones (lowest priority, least recently used first), never a pinned one
    assert over_limit(table, Limits(max_instances=1)) == ("young", "old", "high")


@pytest.mark.parametrize(("name", "seat", "want"), [
    ("a free slot: use it", Seat("a", R, in_flight=1, capacity=2), Use("a")),
    ("every slot busy: wait in the proxy's queue", Seat("a", R, in_flight=2, capacity=2),
     Queue("a", "all 2 slots of a are busy", kind="slots")),
    ("every slot busy and the queue full: refuse", Seat("a", R, in_flight=2, waiting=3, capacity=2),
     Refuse("queue_full", "")),
    ("capacity unknown: llama-server queues", Seat("a", R, in_flight=50), Use("a")),
])
def test_per_model_slots(name: str, seat: Seat, want) -> None:
    got = decide("a", seats(seat), Limits(max_queue=3))
    assert got == want if not isinstance(want, Refuse) else (isinstance(got, Refuse) and got.kind == want.kind), name


def test_wake_order_batches_per_model_within_the_starvation_bound() -> None:
    from llamactl.scheduler import Waiting, wake_order

    waiting = [Waiting("a", since=1.0), Waiting("b", since=2.0), Waiting("b", since=3.0), Waiting("c", since=4.0),
               Waiting("b", since=5.0), Waiting("vip", priority=5, since=9.0)]
    names = lambda order: [waiting[i].model for i in order]  # noqa: E731
    # priority first, then the model with the most requests waiting (one load serves all three of b's)
    assert names(wake_order(waiting, now=10.0, max_wait_s=60)) == ["vip", "b", "b", "b", "a", "c"]
    # a has waited past max_wait: it goes before the bigger batch (but never before a higher priority)
    assert names(wake_order(waiting, now=62.0, max_wait_s=60)) == ["vip", "a", "b", "b", "b", "c"]
    # without batching: priority, then arrival
    assert names(wake_order(waiting, now=10.0, max_wait_s=60, batching=False)) == ["vip", "a", "b", "b", "c", "b"]
