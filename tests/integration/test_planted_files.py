"""Planted files in the state dir: a FIFO, a symlink or a directory at state.json, state.lock or an
instance's log never hangs a command (least of all while it holds the state lock), never makes instances
unstoppable, and is never read through. Each case runs the real CLI with a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_instances import Env, env  # noqa: F401  (the fixture: fake llama-server, temp state)

KINDS = ("fifo", "symlink", "directory")


def plant(path: Path, kind: str, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: an open without O_NONBLOCK waits forever
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.mkdir()


def run(env: Env, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    out = env.run(*argv, timeout=timeout)
    assert time.monotonic() - start < timeout, argv
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr, out.stderr
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_state_file_is_moved_aside_and_instances_stay_stoppable(env: Env, kind: str) -> None:  # noqa: F811
    launched = env.launch("a")
    assert launched.returncode == 0, launched.stderr
    state = env.state / "state.json"
    state.unlink()
    secret = env.state.parent / "secret"
    secret.write_text('{"version": 1, "instances": {}}')
    plant(state, kind, secret)
    out = run(env, "ps", "--json")
    assert out.returncode == 0 and "moved aside" in out.stderr and str(state) in out.stderr, out.stderr
    # the running instance is adopted again from its process's tags, and can be stopped
    assert [i["name"] for i in json.loads(out.stdout)] == ["a"]
    evicted = run(env, "evict", "--all")
    assert evicted.returncode == 0 and "a" in evicted.stdout, evicted.stderr
    assert secret.read_text() == '{"version": 1, "instances": {}}'  # a link target is never written


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_lock_never_hangs(env: Env, kind: str) -> None:  # noqa: F811
    plant(env.state / "state.lock", kind, env.state.parent / "elsewhere")
    for argv in (("ps",), ("evict", "--all")):
        out = run(env, *argv)
        assert out.returncode == 0, out.stderr
    assert (env.state / "state.lock").is_file() and not (env.state / "state.lock").is_symlink()
    assert not (env.state.parent / "elsewhere").exists()  # no file created through the link


@pytest.mark.parametrize("kind", KINDS + ("device",))
def test_a_planted_log_is_refused_by_launch_and_logs(env: Env, kind: str) -> None:  # noqa: F811
    log = env.state / "logs" / "a.log"
    secret = env.state.parent / "secret"
    secret.write_text("root:secret-hash\n")
    if kind == "device":
        log.parent.mkdir(parents=True, exist_ok=True)
        log.symlink_to("/dev/zero")
    else:
        plant(log, kind, secret)
    out = env.launch("a")
    assert "Traceback" not in out.stderr
    assert out.returncode == 1 and str(log) in out.stderr and "not a regular file" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    shown = run(env, "logs", "a", "-n", "5")
    assert shown.returncode != 0 and "not a regular file" in shown.stderr and "secret-hash" not in shown.stdout
    assert run(env, "ps", "--json").stdout.strip() == "[]"  # nothing left running or recorded


def test_a_world_writable_state_dir_draws_a_warning(env: Env) -> None:  # noqa: F811
    env.state.mkdir(parents=True, exist_ok=True)
    os.chmod(env.state, 0o777)
    out = run(env, "ps")
    assert out.returncode == 0 and "writable by every user" in out.stderr and "chmod o-w" in out.stderr
    os.chmod(env.state, 0o700)
    assert "writable by every user" not in run(env, "ps").stderr


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_calibration_store_is_refused_at_once(env: Env, kind: str) -> None:  # noqa: F811
    plant(env.state / "calibration.db", kind, env.state.parent / "elsewhere")
    out = run(env, "calibration")
    assert out.returncode == 1 and "calibration.db" in out.stderr and "not a regular file" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (env.state.parent / "elsewhere").exists()
    # a launch plans with the formula alone and goes on
    assert env.launch("a").returncode == 0
    assert run(env, "evict", "--all").returncode == 0
