"""Start llama-server detached, observe readiness with a deadline, stop it TERM → KILL.

Children run in their own session (they outlive the CLI), log to a file, are
started from an argv list, and are tagged in their environment with the
instance name and state dir so a reconcile can find them. Readiness is
observed, never assumed: /health must say 200 *and* /props must name our
model (another program may hold the port), and an early exit is noticed
within a poll interval, not at the deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import ExitedEarly, KilledWhileLoading, LaunchError, NotReadyInTime, OutOfMemoryAtLoad, exited_early  # noqa: F401  (re-exported)
from llamactl.errors import PlantedFileError
from llamactl.servers import client, files, procs

POLL_INTERVAL_S = 0.1
DEFAULT_GRACE_S = 10.0
SECRET_FLAGS = ("--api-key",)  # their values go to the environment (LLAMA_API_KEY), never argv or a log
API_KEY_ENV = "LLAMA_API_KEY"  # llama.cpp common/arg.cpp: --api-key ... set_env("LLAMA_API_KEY")
LOG_MODE = 0o600
LOG_MAX_BYTES = 64 * 2**20  # a log past this is cut to its last LOG_KEEP_BYTES (launch, the proxy's poller)
LOG_KEEP_BYTES = 8 * 2**20
LOG_DIR_MODE = 0o700


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    pid: int
    create_time: float | None
    log_path: Path


def open_log(log_path: Path, *, shared: bool = False) -> int:
    """An append-only fd on `log_path`, never through a planted symlink: 0600 in a 0700 dir (0660 in 0770
    when the state dir is shared by a group)."""
    file_mode, dir_mode = (0o660, 0o770) if shared else (LOG_MODE, LOG_DIR_MODE)
    try:
        if not log_path.parent.is_dir():
            log_path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
            os.chmod(log_path.parent, dir_mode | (0o2000 if shared else 0))  # past the umask
        fd = files.open_regular(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode)
    except PlantedFileError as exc:
        raise LaunchError(f"cannot open the log {exc}") from None
    except OSError as exc:
        raise LaunchError(f"cannot open the log {log_path}: {exc.strerror or exc}") from None
    if shared:
        try:
            os.fchmod(fd, file_mode)
        except OSError:
            pass
    return fd


def redact(argv: list[str] | tuple[str, ...]) -> list[str]:
    """argv with every secret flag's value replaced by '***' (for logs and messages)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in SECRET_FLAGS and i + 1 < len(out):
            out[i + 1] = "***"
        for flag in SECRET_FLAGS:
            if arg.startswith(flag + "="):
                out[i] = flag + "=***"
    return out


def spawn(argv: list[str], env_overrides: dict[str, str], log_path: Path, *, shared: bool = False) -> Child:
    """Start `argv` in a new session, stdout/stderr appended to `log_path` (LLAMA_ARG_* left out of its env)."""
    fd = open_log(log_path, shared=shared)
    try:
        os.write(fd, f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} llamactl starts: {' '.join(redact(argv))}\n".encode())
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                    env=child_env(env_overrides), start_new_session=True, close_fds=True)
        except OSError as exc:
            raise LaunchError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return Child(proc, proc.pid, procs.create_time_of(proc.pid), log_path)


def run_capture(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a short command to completion: (exit code, stdout, stderr). TimeoutError / OSError on failure."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout_s,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{argv[0]} did not finish within {timeout_s:g} s") from None
    return proc.returncode, proc.stdout, proc.stderr


def run_lines(argv: list[str], *, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a long command, yielding its output (stdout and stderr) line by line; OSError if it fails."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    yield from proc.stdout
    code = proc.wait()
    if code != 0:
        raise OSError(f"{argv[0]} exited with code {code}")


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """Our environment minus llama-server's LLAMA_ARG_* settings and key (they would override what we planned)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_") and k != API_KEY_ENV}
    env.update(overrides)
    return env


def trim_log(log_path: Path, max_bytes: int = LOG_MAX_BYTES, keep_bytes: int = LOG_KEEP_BYTES) -> bool:
    """Cut a log over `max_bytes` to its last `keep_bytes` (whole lines), in place; True if it was cut.

    The llama-server writing it opened it O_APPEND, so its next line lands at the new end; a line it
    writes during the cut may come before the kept tail.
    """
    try:
        fd = files.open_regular(log_path, os.O_RDWR | os.O_APPEND)
    except (OSError, PlantedFileError):  # missing, or not a file of ours: nothing to cut
        return False
    try:
        size = os.fstat(fd).st_size
        if size <= max_bytes:
            return False
        kept = os.pread(fd, keep_bytes, size - keep_bytes)
        kept = kept[kept.find(b"\n") + 1:]
        os.ftruncate(fd, 0)
        os.write(fd, f"--- llamactl: cut {size - len(kept)} bytes from the start of this log ---\n".encode() + kept)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def tail(log_path: Path, lines: int = 12) -> str:
    """The last lines of a log file (bounded read: logs can be large)."""
    try:
        text = files.read_tail(log_path, 64 * 1024).decode("utf-8", "replace")
    except (OSError, PlantedFileError):
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _phase(log_path: Path) -> str:
    last = tail(log_path, 1).strip()
    # drop llama.cpp's "0.01.234.567 I " timestamp prefix
    parts = last.split(" ", 2)
    if len(parts) == 3 and parts[1] in ("I", "W", "E", "D", "T"):
        last = parts[2]
    return last[:70]


def wait_ready(child: Child, port: int, model_arg: str, timeout_s: float, *, host: str = "127.0.0.1",
               progress: Callable[[float, str], None] | None = None) -> float:
    """Seconds until our server answers /health 200 for our model; LaunchError on exit or deadline."""
    start = time.monotonic()
    base = f"http://{host}:{port}"
    with client.session(timeout_s=2.0) as http:
        while True:
            elapsed = time.monotonic() - start
            code = child.proc.poll()
            if code == -signal.SIGKILL:  # nobody of ours killed it: the kernel's OOM killer, most likely
                raise KilledWhileLoading(elapsed, tail(child.log_path))
            if code is not None:
                raise exited_early(f"llama-server exited with code {code} after {elapsed:.1f} s", tail(child.log_path))
            if client.health(http, base) == 200 and client.model_path(http, base) in (model_arg, None):
                if child.proc.poll() is None:
                    return elapsed
            if elapsed > timeout_s:
                raise NotReadyInTime(f"llama-server was not ready after {timeout_s:g} s", tail(child.log_path))
            if progress is not None:
                progress(elapsed, _phase(child.log_path))
            # poll fast at first (small models are ready in tens of ms), then settle
            time.sleep(min(POLL_INTERVAL_S, 0.005 + elapsed / 20))


def stop_child(proc: subprocess.Popen[bytes], *, grace_s: float = DEFAULT_GRACE_S) -> None:
    """Stop a process this very process spawned (TERM, KILL after `grace_s`) and reap it.

    Ours by construction: we hold its Popen, so its pid cannot have been reused before it is reaped. Its
    group is signalled only when it leads one of its own (start_new_session), never ours.
    """
    if proc.poll() is not None:
        return
    leads = procs.leads_own_group(proc.pid)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, procs.KILL_WAIT_S)):
        try:
            if leads:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def is_terminal() -> bool:
    return sys.stderr.isatty()
