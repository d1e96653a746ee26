"""The scheduler's decisions, pure: given the seats (one per model) and a request, what to do next.

No I/O, no clocks, no asyncio: `decide()` takes values and returns a Decision, and
`memory_victims()` filters the planner's eviction proposal. The proxy's pool acts
on the decision through its effects (launch, stop, wait); the table-driven tests
in tests/unit/test_scheduler.py drive every row without a process.

One lifecycle (lifecycle.Status; a seat uses its SLOT phases): stopped → starting → ready → stopping → stopped. A request
for a model that is stopping waits for the stop, then starts it again: a read of
the phase never gates a mutation elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from llamactl.lifecycle import Status


@dataclass(frozen=True)
class Seat:
    """One model's instance as the scheduler sees it."""

    model: str
    phase: Status = Status.STOPPED  # one of lifecycle.SLOT
    in_flight: int = 0  # requests being served
    waiting: int = 0  # requests waiting for a start or stop in progress
    last_used: float = 0.0
    ours: bool = True  # it may be stopped to make room: started by this proxy, or adopt = true

    @property
    def running(self) -> bool:
        return self.phase in (Status.STARTING, Status.READY)

    @property
    def occupies(self) -> bool:
        """Holds a seat of max_instances: starting, ready or busy, and stopping until its process is gone."""
        return self.phase is not Status.STOPPED

    @property
    def evictable(self) -> bool:
        return self.phase is Status.READY and self.ours and self.in_flight == 0 and self.waiting == 0


@dataclass(frozen=True)
class Limits:
    max_instances: int | None = None
    max_queue: int = 64


@dataclass(frozen=True)
class Use:
    """Route to the ready instance."""

    model: str


@dataclass(frozen=True)
class Wait:
    """A start or a stop of this model is in progress: wait for it, then decide again."""

    model: str


@dataclass(frozen=True)
class Start:
    """Stop `stop` (least recently used first), then start the model."""

    model: str
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Queue:
    """No seat is free and none can be freed now (every instance busy, starting or stopping): wait for a
    change (a request ends, a stop finishes), then decide again; the caller bounds the wait."""

    model: str
    reason: str


@dataclass(frozen=True)
class Refuse:
    kind: str  # "queue_full" (429)
    reason: str


Decision = Use | Wait | Start | Queue | Refuse


def decide(model: str, seats: Mapping[str, Seat], limits: Limits) -> Decision:
    """What a request for `model` (a configured name) does next."""
    seat = seats.get(model, Seat(model))
    if seat.phase is Status.READY:
        return Use(model)
    if seat.waiting >= limits.max_queue:
        return Refuse("queue_full", f"{model}: {seat.waiting} requests already wait for it to load")
    if seat.phase in (Status.STARTING, Status.STOPPING):
        return Wait(model)
    victims: tuple[str, ...] = ()
    if limits.max_instances is not None:
        held = [s for s in seats.values() if s.occupies and s.model != model]
        excess = len(held) - limits.max_instances + 1
        if excess > 0:
            candidates = sorted((s for s in held if s.evictable), key=lambda s: s.last_used)
            if len(candidates) < excess:
                busy = ", ".join(sorted(s.model for s in held if not s.evictable))
                return Queue(model, f"max_instances ({limits.max_instances}) reached; held by {busy}")
            victims = tuple(s.model for s in candidates[:excess])
    return Start(model, victims)


def over_limit(seats: Mapping[str, Seat], limits: Limits) -> tuple[str, ...]:
    """Idle instances to stop, least recently used first, to come back within a lowered max_instances
    (as many as are idle now; the rest as they become idle)."""
    if limits.max_instances is None:
        return ()
    held = [s for s in seats.values() if s.occupies]
    excess = len(held) - limits.max_instances
    if excess <= 0:
        return ()
    return tuple(s.model for s in sorted((s for s in held if s.evictable), key=lambda s: s.last_used)[:excess])


def memory_victims(proposal: Iterable[str], seats: Mapping[str, Seat], *, adopt: bool) -> tuple[str, ...]:
    """The planner's eviction proposal, kept to what may go: idle seats of ours, and instances of no
    configured model only when `adopt` (hand-started ones are never stopped otherwise)."""
    out = []
    for name in proposal:
        seat = seats.get(name)
        if (seat is not None and seat.evictable) or (seat is None and adopt):
            out.append(name)
    return tuple(out)


def protected(seats: Mapping[str, Seat]) -> frozenset[str]:
    """Instances a plan may not propose to evict: requests in flight or queued, starting, or not ours."""
    return frozenset(s.model for s in seats.values()
                     if s.in_flight or s.waiting or s.phase is Status.STARTING or (s.phase is not Status.STOPPED and not s.ours))


def expired(seats: Mapping[str, Seat], ttl_s: Mapping[str, float | None], now: float) -> tuple[str, ...]:
    """Idle seats past their TTL (in flight or queued never expire; neither do instances not ours)."""
    return tuple(s.model for s in seats.values()
                 if s.evictable and ttl_s.get(s.model) is not None and now - s.last_used > ttl_s[s.model])  # type: ignore[operator]
