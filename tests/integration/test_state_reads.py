"""Views that only look read the state without the lock and without scanning every process."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import psutil

from llamactl.servers.procs import INSTANCE_ENV, STATE_DIR_ENV
from llamactl.servers.state import Instance, StateStore, Status
from tests.fakes.binary import server_named_sleep


def test_snapshot_takes_no_lock_writes_nothing_adopts_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    tag = {INSTANCE_ENV: "stray", STATE_DIR_ENV: str(store.dir.resolve())}
    sleeper = str(server_named_sleep(tmp_path))  # llamactl only counts a llama.cpp server's executable
    recorded = subprocess.Popen([sleeper, "60"], start_new_session=True,
                                env={**os.environ, **tag, INSTANCE_ENV: "known"})
    stray = None
    try:
        _until_tagged(recorded.pid)
        with store.edit() as instances:
            instances["known"] = Instance(name="known", model="m", port=9000, pid=recorded.pid, status=Status.READY,
                                          create_time=psutil.Process(recorded.pid).create_time())
            instances["gone"] = Instance(name="gone", model="m", port=9001, pid=recorded.pid, status=Status.READY,
                                         create_time=1.0)  # its process is long gone (pid reused)
        stray = subprocess.Popen([sleeper, "60"], start_new_session=True, env={**os.environ, **tag})
        _until_tagged(stray.pid)
        before = (store.path.stat().st_mtime_ns, store.path.read_bytes())
        fd = os.open(store.lock_path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another command holds the lock
        try:
            got: dict = {}
            reader = threading.Thread(target=lambda: got.update(store.snapshot()))
            reader.start()
            reader.join(5)
            assert not reader.is_alive(), "snapshot() waited for the lock"
        finally:
            os.close(fd)
        assert {n: i.status for n, i in got.items()} == {"known": Status.READY, "gone": Status.DEAD}
        assert (store.path.stat().st_mtime_ns, store.path.read_bytes()) == before  # nothing written
        assert "stray" in store.instances()  # the acting read adopts the untracked child
    finally:
        for proc in (recorded, stray):
            if proc is None:
                continue
            proc.kill()
            proc.wait()


def _until_tagged(pid: int, timeout_s: float = 10.0) -> None:
    """Until the child has exec'd with its environment (what a scan reads), not a fixed pause."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if INSTANCE_ENV in psutil.Process(pid).environ():
                return
        except psutil.Error:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never showed its tags")
