"""One lifecycle for an instance, shared by the state file, `ps`, the scheduler and the proxy's slots.

    stopped → starting → ready (⇄ busy) → stopping → stopped
                  └→ failed        └→ dead (the process went away)

`stopped` is never written to the state file (a stopped instance's entry is removed); `busy` is `ready`
with requests in flight, as the file and `ps` show it; `dead` and `failed` are what the file remembers of
an instance that is gone. The scheduler and the proxy's slots use the SLOT subset.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    DEAD = "dead"
    FAILED = "failed"


LIVE = frozenset({Status.STARTING, Status.READY, Status.BUSY, Status.STOPPING})
SLOT = (Status.STOPPED, Status.STARTING, Status.READY, Status.STOPPING)  # a slot's phases
