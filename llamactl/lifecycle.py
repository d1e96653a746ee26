"""One lifecycle for an instance, shared by the state file, `ps`, the scheduler and the proxy's slots.

    stopped → starting → ready (⇄ busy) → stopping → stopped
                  └→ failed        └→ dead (the process went away)

`stopped` is never written to the state file (a stopped instance's entry is removed); `busy` is `ready`
with requests in flight, as the file and `ps` show it; `dead` and `failed` are what the file remembers of
an instance that is gone. The scheduler and the proxy's slots use the SLOT subset.
"""

from __future__ import annotations

from enum import Enum

from llamactl.errors import IllegalTransition


class Status(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    DEAD = "dead"
    FAILED = "failed"


S = Status
# what each status may become; `stopped` for a slot means "no instance" (a state entry is removed instead)
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.STOPPED: frozenset({S.STARTING, S.READY}),  # a start; or a running instance adopted (routed to)
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING, S.DEAD, S.STOPPED}),  # stopped: a failed start
    S.READY: frozenset({S.BUSY, S.STOPPING, S.DEAD, S.STOPPED}),  # stopped: a slot whose process died
    S.BUSY: frozenset({S.READY, S.STOPPING, S.DEAD}),
    S.STOPPING: frozenset({S.STOPPED, S.DEAD}),
    S.DEAD: frozenset({S.FAILED}),  # the reconcile saw it gone; its launcher knows it never became ready
    S.FAILED: frozenset(),
}


def check(old: Status, new: Status) -> Status:
    """`new`, if `old` may become it (staying is always allowed); IllegalTransition otherwise."""
    if new is not old and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old.value} → {new.value} is not a lifecycle transition")
    return new


LIVE = frozenset({Status.STARTING, Status.READY, Status.BUSY, Status.STOPPING})
SLOT = (Status.STOPPED, Status.STARTING, Status.READY, Status.STOPPING)  # a slot's phases
