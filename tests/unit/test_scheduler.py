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
