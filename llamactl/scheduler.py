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
    pinned: bool = False  # never stopped by the proxy (pin = true)
    priority: int = 0  # a model never evicts one of higher priority
    ready_since: float | None = None  # when it became ready (for min_resident)
    min_resident_s: float = 0.0  # not evicted for another model before it has been ready this long
    capacity: int | None = None  # requests its instance serves at once (its slots, -np); more wait in our queue

    @property
    def running(self) -> bool:
        return self.phase in (Status.STARTING, Status.READY)

    @property
    def occupies(self) -> bool:
        """Holds a seat of max_instances: starting, ready or busy, and stopping until its process is gone."""
        return self.phase is not Status.STOPPED

    @property
    def evictable(self) -> bool:
        """Idle, ours and not pinned: a TTL, a lowered max_instances or another model may stop it."""
        return self.phase is Status.READY and self.ours and self.in_flight == 0 and self.waiting == 0 and not self.pinned

    def yields_to(self, other: "Seat | None", now: float | None) -> bool:
        """Whether this seat may be stopped to make room for `other` (None: for no model, e.g. max_instances
        lowered): evictable, not of higher priority, and ready at least min_resident (unless `now` is None)."""
        if not self.evictable:
            return False
        if other is not None and self.priority > other.priority:
            return False
        young = now is not None and self.ready_since is not None and now - self.ready_since < self.min_resident_s
        return not (other is not None and young)


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
    """Wait for a change (a request ends, a stop finishes), then decide again; the caller bounds the wait.
    `kind` "seat": no seat under max_instances is free and none can be freed now (every instance busy,
    starting, stopping, pinned...); "slots": the model is ready but every one of its slots is busy."""

    model: str
    reason: str
    kind: str = "seat"


@dataclass(frozen=True)
class Refuse:
    kind: str  # "queue_full" (429)
    reason: str


Decision = Use | Wait | Start | Queue | Refuse


def _victim_order(seat: Seat) -> tuple[int, float]:
    return seat.priority, seat.last_used  # lowest priority first, then least recently used


def decide(model: str, seats: Mapping[str, Seat], limits: Limits, now: float | None = None,
           requester: Seat | None = None) -> Decision:
    """What a request for `model` (a configured name) does next. `requester` carries the model's priority
    when it has no seat yet; `now` enables min_resident."""
    seat = seats.get(model, requester or Seat(model))
    if seat.phase is Status.READY:
        if seat.capacity is None or seat.in_flight < seat.capacity:
            return Use(model)
        if seat.waiting >= limits.max_queue:
            return Refuse("queue_full", f"{model}: all {seat.capacity} slots busy and {seat.waiting} requests queued")
        return Queue(model, f"all {seat.capacity} slots of {model} are busy", kind="slots")
    if seat.waiting >= limits.max_queue:
        return Refuse("queue_full", f"{model}: {seat.waiting} requests already wait for it to load")
    if seat.phase in (Status.STARTING, Status.STOPPING):
        return Wait(model)
    victims: tuple[str, ...] = ()
    if limits.max_instances is not None:
        held = [s for s in seats.values() if s.occupies and s.model != model]
        excess = len(held) - limits.max_instances + 1
        if excess > 0:
            candidates = sorted((s for s in held if s.yields_to(seat, now)), key=_victim_order)
            if len(candidates) < excess:
                busy = ", ".join(sorted(f"{s.model}{_why_held(s, seat, now)}" for s in held if not s.yields_to(seat, now)))
                return Queue(model, f"max_instances ({limits.max_instances}) reached; held by {busy}")
            victims = tuple(s.model for s in candidates[:excess])
    return Start(model, victims)


def _why_held(seat: Seat, requester: Seat, now: float | None) -> str:
    if seat.pinned:
        return " (pinned)"
    if seat.evictable and seat.priority > requester.priority:
        return f" (priority {seat.priority})"
    if seat.evictable:
        return " (min_resident)"
    return ""


def over_limit(seats: Mapping[str, Seat], limits: Limits) -> tuple[str, ...]:
    """Idle instances to stop, least recently used first, to come back within a lowered max_instances
    (as many as are idle now; the rest as they become idle)."""
    if limits.max_instances is None:
        return ()
    held = [s for s in seats.values() if s.occupies]
    excess = len(held) - limits.max_instances
    if excess <= 0:
        return ()
    return tuple(s.model for s in sorted((s for s in held if s.yields_to(None, None)), key=_victim_order)[:excess])


def memory_victims(proposal: Iterable[str], seats: Mapping[str, Seat], *, adopt: bool, requester: Seat | None = None,
                   now: float | None = None) -> tuple[str, ...]:
    """The planner's eviction proposal, kept to what may go for `requester`: idle seats of ours that yield
    to it, and instances of no configured model only when `adopt` (hand-started ones are never stopped
    otherwise)."""
    out = []
    for name in proposal:
        seat = seats.get(name)
        if (seat is not None and seat.yields_to(requester, now)) or (seat is None and adopt):
            out.append(name)
    return tuple(out)


def protected(seats: Mapping[str, Seat], requester: Seat | None = None, now: float | None = None) -> frozenset[str]:
    """Instances a plan may not propose to evict: requests in flight or queued, starting, not ours, pinned,
    and (for `requester`) of higher priority or loaded less than min_resident ago."""
    return frozenset(s.model for s in seats.values()
                     if s.in_flight or s.waiting or s.phase is Status.STARTING or (s.phase is not Status.STOPPED and not s.ours)
                     or (s.phase is Status.READY and not s.yields_to(requester, now)))


def expired(seats: Mapping[str, Seat], ttl_s: Mapping[str, float | None], now: float) -> tuple[str, ...]:
    """Idle seats past their TTL (in flight or queued never expire; neither do pinned ones nor instances not
    ours)."""
    return tuple(s.model for s in seats.values()
                 if s.evictable and ttl_s.get(s.model) is not None and now - s.last_used > ttl_s[s.model])  # type: ignore[operator]


@dataclass(frozen=True)
class Waiting:
    """A request (or a start) waiting for a change: which model, its priority, since when (monotonic s)."""

    model: str
    priority: int = 0
    since: float = 0.0


def wake_order(waiting: Iterable[Waiting], now: float, max_wait_s: float, *, batching: bool = True) -> list[int]:
    """The order in which waiting requests decide again when something frees (indices into `waiting`): the
    highest priority first; then, with batching, a model one of whose requests has waited max_wait_s or more
    (the starvation bound, the longest waiting first), then the model with the most requests waiting (one
    load serves them all), then arrival. Without batching: priority, then arrival (FIFO)."""
    items = list(waiting)
    count: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for w in items:
        count[w.model] = count.get(w.model, 0) + 1
        oldest[w.model] = min(oldest.get(w.model, w.since), w.since)

    def key(i: int) -> tuple:
        w = items[i]
        if not batching:
            return (-w.priority, w.since)
        starving = now - oldest[w.model] >= max_wait_s
        return (-w.priority, not starving, oldest[w.model] if starving else 0.0, -count[w.model], w.since)

    return sorted(range(len(items)), key=key)
