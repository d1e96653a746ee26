"""What a launch does next after what happened: pure decisions, apart from their effects (launcher.py).

Three moments decide a launch's course: a live instance already has the name (`--replace` or not), the
server ran out of memory while loading (retry once with more room, or give up), and the wait for readiness
failed or was interrupted (what becomes of the state entry, and which error goes on). Each is a function of
values to a value; `tests/unit/test_launch_rules.py` is their table.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum

from llamactl.errors import (ExitedEarly, KilledWhileLoading, LaunchError, LaunchInterrupted, LlamactlError, NameTaken,
                             OutOfMemoryAtLoad, StateError)
from llamactl.servers.state import Instance, Status


# --- a live instance has the name ------------------------------------------------------------------

class OnName(Enum):
    START = "start"  # no live instance of that name
    REPLACE = "replace"  # stop it first (--replace), then start


def on_name(name: str, existing: Instance | None, free: bool, replace_existing: bool) -> OnName:
    """Whether to start, or to stop the live instance of that name first; NameTaken without --replace.
    `free`: the scheduler would start it (nothing of that name is starting, ready or stopping)."""
    if free or existing is None:
        return OnName.START
    if not replace_existing:
        raise NameTaken(f"an instance named {name!r} is already {existing.status.value} "
                        f"(pid {existing.pid}, port {existing.port}); use --replace or another --name")
    return OnName.REPLACE


# --- out of memory while loading -------------------------------------------------------------------

@dataclass(frozen=True)
class AfterOom:
    learn: bool  # record the failure as an observation (what the load wanted, where)
    retry: bool  # plan again with the shortfall left free
    error: LlamactlError | None = None  # what goes on to the user when there is no retry


def after_oom(name: str, exc: OutOfMemoryAtLoad, host_tight: bool, tried: tuple[str, ...]) -> AfterOom:
    """After an out-of-memory failure at load. `tried`: the plans that failed so far, this one last (as
    launcher.describe_attempt says them); `host_tight`: the host's memory was near what the plan put there.

    A SIGKILL with memory to spare was someone else's kill, not the OOM killer: nothing to learn, no retry.
    Otherwise the failure is learned from, and retried once."""
    if isinstance(exc, KilledWhileLoading) and not host_tight:
        return AfterOom(learn=False, retry=False,
                        error=ExitedEarly(f"{exc.event} (not for lack of memory: the host has room for it)", exc.log_tail))
    if len(tried) < 2:
        return AfterOom(learn=True, retry=True)
    return AfterOom(learn=True, retry=False, error=OutOfMemoryAtLoad(
        f"{name}: out of memory while loading, twice; tried {tried[0]}, then {tried[1]}; see `llamactl logs {name}`",
        exc.log_tail))


# --- the wait for readiness failed, or was interrupted ---------------------------------------------

class Entry(Enum):
    KEEP = "keep"  # not ours any more (gone, another process's, being stopped): left as it is
    DROP = "drop"  # removed: an interrupt, or an out-of-memory failure (recorded as an observation instead)
    FAIL = "fail"  # marked failed, for `ps` to show


class Answer(Enum):
    INTERRUPTED = "interrupted"  # LaunchInterrupted: what was started is stopped
    ENTRY_REMOVED = "entry removed"  # evicted or replaced by another llamactl while it loaded
    FAILURE = "failure"  # the failure itself goes on


@dataclass(frozen=True)
class AfterWait:
    entry: Entry
    answer: Answer


def after_failed_wait(failure: BaseException, ended_by: int | None, entry: Instance | None, pid: int) -> AfterWait:
    """After the wait for readiness raised `failure` (a LaunchError, or KeyboardInterrupt for Ctrl-C) and the
    child was stopped. `ended_by`: its return code before our stop (None: it still ran); `entry`: its state
    entry now. An entry that is gone, another pid's, stopping, or dead by a SIGTERM (how llamactl stops;
    a SIGKILL at load is the OOM killer) was taken by whoever stopped it: that is the news, not the signal."""
    interrupted = isinstance(failure, KeyboardInterrupt)
    signalled = ended_by == -signal.SIGTERM
    taken = (entry is None or entry.pid != pid or entry.status is Status.STOPPING
             or (entry.status is Status.DEAD and signalled and not interrupted))
    if taken:
        return AfterWait(Entry.KEEP, Answer.INTERRUPTED if interrupted else Answer.ENTRY_REMOVED)
    if interrupted:
        return AfterWait(Entry.DROP, Answer.INTERRUPTED)
    return AfterWait(Entry.DROP if isinstance(failure, OutOfMemoryAtLoad) else Entry.FAIL, Answer.FAILURE)


def apply_entry(instances: dict[str, Instance], name: str, entry: Entry) -> None:
    """The decision's change to the state (inside the launcher's locked edit)."""
    if entry is Entry.DROP:
        del instances[name]
    elif entry is Entry.FAIL:
        instances[name] = instances[name].moved(Status.FAILED)


def answer(after: Answer, failure: BaseException, name: str, pid: int) -> BaseException:
    """The error a failed wait ends in."""
    if after is Answer.INTERRUPTED:
        return interrupted(name, pid)
    if after is Answer.ENTRY_REMOVED:
        return entry_removed(name)
    return failure


def entry_removed(name: str) -> LaunchError:
    return LaunchError(f"{name}: its state entry was removed while it loaded (evicted or replaced by another "
                       "llamactl); the llama-server just started was stopped")


def after_failed_record(failure: BaseException, name: str, pid: int) -> BaseException:
    """The error when spawning or recording failed after the child started (it has been stopped): a state
    that could not be written says so; Ctrl-C a moment before the wait is the same answer as during it."""
    if isinstance(failure, (StateError, OSError)):
        return StateError(f"{failure}; the llama-server just started was stopped")
    if isinstance(failure, KeyboardInterrupt):
        return interrupted(name, pid)
    return failure


def interrupted(name: str, pid: int) -> LaunchInterrupted:
    return LaunchInterrupted(f"interrupted: stopped {name} (pid {pid}) before it was ready")
