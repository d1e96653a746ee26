"""Which processes are ours, and the only code that signals one.

A state entry is a claim (pid, create time, instance name, state dir), not a
fact: anybody who can write the state dir can plant one. A process is ours
only when all of these hold, checked against the kernel at the moment of use:
the pid is > 1 and not llamactl itself or its group; the process runs (not a
zombie); its create time equals the recorded one; and its environment carries
the tag llamactl gave the child (instance name + resolved state dir); and its
executable is a llama.cpp server (named `llama-server` or `ggml-rpc-server`:
the state file, which anyone who can write the dir may plant, cannot make a
`sleep` or a shell that carries the tags ours). A create time can be copied
from /proc/PID/stat; another user's environment cannot be read, nor a running
process's environment changed.

Signals go through a pidfd, so a pid that dies and is reused between the check
and the signal is never hit; `killpg` only when the process leads its own
group (llamactl starts every child in a new session) and that group is not
ours. Everything else is "not ours, left alone".
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from enum import Enum

import psutil

log = logging.getLogger(__name__)

INSTANCE_ENV = "LLAMACTL_INSTANCE"  # every child carries its instance name ...
STATE_DIR_ENV = "LLAMACTL_STATE_DIR"  # ... and the state dir that records it
CREATE_TIME_TOLERANCE_S = 0.05
KILL_WAIT_S = 5.0
SERVER_NAMES = ("llama-server", "ggml-rpc-server", "rpc-server")  # what llamactl starts (any suffix: -cuda, ...)


def is_server(exe: str) -> bool:
    """Whether an executable's path names a llama.cpp server (a binary replaced on disk reads "... (deleted)")."""
    return os.path.basename(exe.removesuffix(" (deleted)")).startswith(SERVER_NAMES)


def is_rpc_server(exe: str) -> bool:
    """Whether an executable's path names llama.cpp's RPC server (what `llamactl worker` starts)."""
    return os.path.basename(exe.removesuffix(" (deleted)")).startswith(SERVER_NAMES[1:])


class Ownership(str, Enum):
    OURS = "ours"
    GONE = "gone"  # no such process (or a zombie): nothing to signal
    FOREIGN = "foreign"  # a process runs under that pid, but nothing proves it is ours


@dataclass(frozen=True)
class Claim:
    """What a state entry says about its process."""

    pid: int | None
    create_time: float | None
    name: str
    state_dir: str  # resolved path, as put in the child's STATE_DIR_ENV


@dataclass(frozen=True)
class Verdict:
    ownership: Ownership
    reason: str = ""
    leads_group: bool = False


def plausible_pid(pid: object) -> bool:
    """An int > 1 that is not this process: pid 0, 1 and negatives have group or broadcast meanings to kill()."""
    return isinstance(pid, int) and not isinstance(pid, bool) and 1 < pid < 2**22 + 1 and pid != os.getpid()


def plausible_create_time(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def create_time_of(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def check(claim: Claim) -> Verdict:
    """Whether the claimed process is provably the instance llamactl started (see the module doc)."""
    if not plausible_pid(claim.pid):
        return Verdict(Ownership.FOREIGN, f"pid {claim.pid!r} is not one llamactl could have started")
    if not plausible_create_time(claim.create_time):
        return Verdict(Ownership.FOREIGN, "no valid create time recorded")
    assert isinstance(claim.pid, int) and claim.create_time is not None
    try:
        proc = psutil.Process(claim.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return Verdict(Ownership.GONE, "exited")
        if abs(proc.create_time() - claim.create_time) >= CREATE_TIME_TOLERANCE_S:
            return Verdict(Ownership.GONE, "exited (pid reused by another process)")
        env = proc.environ()
        exe = proc.exe()
        pgid = os.getpgid(claim.pid)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
        return Verdict(Ownership.GONE, "exited")
    except (psutil.AccessDenied, PermissionError):
        return Verdict(Ownership.FOREIGN, f"pid {claim.pid} belongs to another user")
    if env.get(INSTANCE_ENV) != claim.name or env.get(STATE_DIR_ENV) != claim.state_dir:
        return Verdict(Ownership.FOREIGN, f"pid {claim.pid} carries no llamactl tag for {claim.name!r}")
    if not is_server(exe):
        name = os.path.basename(exe) or "an unknown program"
        return Verdict(Ownership.FOREIGN, f"pid {claim.pid} runs {name[:60]!r}, not a llama.cpp server")
    leads = pgid == claim.pid and pgid > 1 and pgid != os.getpgrp()
    return Verdict(Ownership.OURS, leads_group=leads)


def environ_of(claim: Claim) -> dict[str, str] | None:
    """The environment of the claimed process when it is ours (None otherwise)."""
    if check(claim).ownership is not Ownership.OURS:
        return None
    assert isinstance(claim.pid, int)
    try:
        return psutil.Process(claim.pid).environ()
    except (psutil.Error, OSError):
        return None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (AttributeError, OSError):  # no pidfd (old kernel): fall back to the pid, checked just before
        return None


def send(claim: Claim, sig: signal.Signals) -> Verdict:
    """Signal the claimed instance if, and only if, it is ours; the verdict says what was done."""
    if not plausible_pid(claim.pid):
        return Verdict(Ownership.FOREIGN, f"pid {claim.pid!r} is not one llamactl could have started")
    assert isinstance(claim.pid, int)
    try:
        fd = _pidfd(claim.pid)
    except ProcessLookupError:
        return Verdict(Ownership.GONE, "exited")
    try:
        verdict = check(claim)  # after the pidfd is open: the fd pins the very process checked
        if verdict.ownership is not Ownership.OURS:
            return verdict
        try:
            if verdict.leads_group:
                # its group is the session llamactl created for it. The group is signalled by number, so first
                # make sure, through the pidfd, that the leader checked is still there: while it lives its
                # pid (the group's id) cannot be given to anyone else
                if fd is not None:
                    signal.pidfd_send_signal(fd, 0)
                os.killpg(claim.pid, sig)
            elif fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(claim.pid, sig)
        except ProcessLookupError:
            return Verdict(Ownership.GONE, "exited")
        except PermissionError:
            return Verdict(Ownership.FOREIGN, f"pid {claim.pid} belongs to another user")
        return verdict
    finally:
        if fd is not None:
            os.close(fd)


def reap(pid: int | None, wait_s: float = 0.0) -> None:
    """Collect the exit status of a child of this process (no <defunct> left); a no-op for anything else.

    `wait_s` covers a child seen exiting but not yet a zombie (its /proc entry goes unreadable first).
    """
    if not plausible_pid(pid):
        return
    assert isinstance(pid, int)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def stop(claim: Claim, grace_s: float) -> Verdict:
    """TERM, KILL after `grace_s`, wait (bounded) until gone; only ever a process that is ours.

    OURS: it ran and was stopped; GONE: nothing ran; FOREIGN: left alone (the reason says why).
    """
    first = send(claim, signal.SIGTERM)
    if first.ownership is not Ownership.OURS:
        reap(claim.pid)
        return first
    for sig, wait_s in ((signal.SIGKILL, grace_s), (None, KILL_WAIT_S)):
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if check(claim).ownership is not Ownership.OURS:  # exited: a zombie child of ours is reaped
                reap(claim.pid, wait_s=1.0)
                return first
            time.sleep(0.05)
        if sig is not None and send(claim, sig).ownership is not Ownership.OURS:
            break
    reap(claim.pid)
    return first


def leads_own_group(pid: int) -> bool:
    """True when `pid` leads a process group that is not ours (what start_new_session gives a child)."""
    try:
        return plausible_pid(pid) and os.getpgid(pid) == pid and pid != os.getpgrp()
    except ProcessLookupError:
        return False
