"""The state file is input: planted or broken entries never make llamactl signal, read or write what is not its own.

Anything that could signal a process it should not runs inside a fresh PID namespace, so a regression
kills only the namespace, never the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llamactl.servers import procs
from llamactl.servers.buffers import free_port
from llamactl.servers.state import INSTANCE_ENV, STATE_DIR_ENV, Instance, StateStore, Status
from tests.integration.test_instances import Env, env  # noqa: F401  (the fixture)

PLANTED = Path(__file__).resolve().parents[1] / "fakes" / "planted_state.py"
REPO = Path(__file__).resolve().parents[2]


def in_pid_namespace(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        raise AssertionError("these tests need util-linux's `unshare` (a PID namespace keeps a broken kill contained)")
    out = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", *argv], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0 and "Operation not permitted" in out.stderr:
        raise AssertionError(f"cannot create a PID namespace here (run as root or allow user namespaces): {out.stderr}")
    return out


@pytest.mark.parametrize("planted", ["plausible", "all"])
def test_planted_entries_never_get_a_signal(tmp_path: Path, planted: str) -> None:
    """pid 1, our own pid, null create times, copied create times, a tag for another dir: all left alone."""
    out = in_pid_namespace([sys.executable, str(PLANTED), str(tmp_path / "state"), planted])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["alive"] == {"leader": True, "member": True, "other-dir": True}, report
    assert report["evict"]["rc"] == 0, report["evict"]
    assert "stopped" not in report["evict"]["stdout"]  # nothing was ours to stop
    warnings = report["evict"]["stderr"]
    assert "not ours, left alone" in warnings
    assert "bad entries dropped: 'init': pid 1 is not an integer > 1" in warnings  # refused at load already
    assert "Traceback" not in warnings
    # every planted entry is gone from the state: none can be tried again by the next cron run
    assert report["ps_rc"] == 0 and json.loads(report["ps"]) == []


def test_a_process_that_does_not_lead_its_group_is_signalled_alone(env: Env) -> None:  # noqa: F811
    """An adopted llama-server sharing our process group is stopped by pid, and our group survives."""
    port = free_port()
    proc = subprocess.Popen([str(env.wrapper), "--model", str(env.model), "--port", str(port)],
                            env={**env.env, INSTANCE_ENV: "stray", STATE_DIR_ENV: str(env.state.resolve())})
    try:
        assert os.getpgid(proc.pid) == os.getpgrp()  # it shares the test's group: killpg would hit us
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(i["name"] == "stray" for i in env.ps()):
            time.sleep(0.1)
        out = env.run("evict", "stray", "--grace", "2s")
        assert out.returncode == 0 and "stopped stray" in out.stdout, out.stderr
        assert proc.wait(timeout=10) is not None  # really stopped (it used to survive while evict said "stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _entry(name: str, **fields) -> dict:
    base = {"name": name, "model": "/m.gguf", "port": 9100, "pid": None, "create_time": None, "argv": [],
            "env": {}, "gpu_ids": [], "estimated_bytes": {}, "started_at": time.time(), "last_used": time.time(),
            "started_by": "cli", "status": "dead", "activity": 0, "host": "127.0.0.1"}
    return {**base, **fields}


BAD_ENTRIES = {
    "pid-string": {"pid": "123", "create_time": 1.0, "status": "ready"},
    "pid-negative": {"pid": -1, "create_time": 1.0, "status": "ready"},
    "pid-one": {"pid": 1, "create_time": 1.0, "status": "ready"},
    "pid-bool": {"pid": True, "create_time": 1.0, "status": "ready"},
    "ct-string": {"pid": 4242, "create_time": "x", "status": "ready"},
    "ct-null": {"pid": 4242, "create_time": None, "status": "ready"},
    "started-nan": {"started_at": float("nan")},
    "used-inf": {"last_used": float("inf")},
    "port-zero": {"port": 0},
    "port-big": {"port": 70000},
    "status-odd": {"status": "zombie"},
    "host-remote": {"host": "evil.example.com"},
    "argv-odd": {"argv": [1, 2]},
    "gpu-odd": {"gpu_ids": ["0"]},
}


def test_bad_entries_are_dropped_good_ones_kept(env: Env) -> None:  # noqa: F811
    assert env.launch("good").returncode == 0
    state = json.loads((env.state / "state.json").read_text())
    for name, fields in BAD_ENTRIES.items():
        state["instances"][name] = _entry(name, **fields)
    state["instances"]["key-mismatch"] = _entry("other")
    state["instances"]["../../etc"] = _entry("../../etc")
    state["instances"]["not-an-object"] = [1, 2]
    (env.state / "state.json").write_text(json.dumps(state))
    out = env.run("ps", "--json")
    assert out.returncode == 0, out.stderr
    assert [i["name"] for i in json.loads(out.stdout)] == ["good"]
    assert "bad entries dropped" in out.stderr and "moved aside" in out.stderr and "Traceback" not in out.stderr
    (aside,) = env.state.glob("state.json.bad-*")
    assert aside.read_text() == json.dumps(state)  # the evidence is kept, byte for byte
    assert sorted(json.loads((env.state / "state.json").read_text())["instances"]) == ["good"]
    out = env.run("evict", "--all")
    assert out.returncode == 0 and "stopped good" in out.stdout and not env.tagged()


@pytest.mark.parametrize("content", [b"\xff\xfe{not utf-8", b'{"version": 1, "instances": {"a": ' * 20000 + b"}"])
def test_undecodable_state_is_moved_aside(env: Env, content: bytes) -> None:  # noqa: F811
    env.state.mkdir(parents=True)
    (env.state / "state.json").write_bytes(content)
    for cmd in (("ps", "--json"), ("evict", "--all")):
        out = env.run(*cmd)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and "internal error" not in out.stderr
    (aside,) = env.state.glob("state.json.bad-*")
    assert aside.read_bytes() == content


def test_log_path_comes_from_the_name_never_the_file(env: Env) -> None:  # noqa: F811
    env.state.mkdir(parents=True)
    entry = _entry("x", log_path="/etc/passwd")
    (env.state / "state.json").write_text(json.dumps({"version": 1, "instances": {"x": entry}}))
    out = env.run("logs", "x")
    assert out.returncode == 2 and "root:" not in out.stdout
    assert out.stderr.strip() == f"llamactl: error: no log for 'x' (looked in {env.state / 'logs' / 'x.log'})"


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "", "x" * 129, "sp ace"])
def test_bad_instance_names_are_refused(env: Env, name: str) -> None:  # noqa: F811
    out = env.launch(name)
    assert out.returncode == 2 and "not a valid instance name" in out.stderr, out.stderr
    assert not env.tagged() and not (env.state / "state.json").exists()
    assert env.run("logs", name).returncode == 2


def test_planted_symlinks_redirect_no_write(env: Env, tmp_path: Path) -> None:  # noqa: F811
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (env.state / "logs").mkdir(parents=True)
    (env.state / "logs" / "lnk.log").symlink_to(target)
    out = env.launch("lnk")
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "cannot open the log" in out.stderr
    assert target.read_text() == "keep me\n" and not env.tagged()
    # the lock file and the state file themselves
    for planted in ("state.lock", "state.json"):
        (env.state / planted).unlink(missing_ok=True)
        (env.state / planted).symlink_to(target)
        out = env.run("ps")  # moved aside (never followed), and ps goes on
        assert out.returncode == 0 and "moved aside" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert target.read_text() == "keep me\n"
        (env.state / planted).unlink(missing_ok=True)
    assert env.run("ps").returncode == 0


def test_temp_files_are_exclusive_and_random(tmp_path: Path) -> None:
    """A predictable temp name planted as a symlink is never followed (mkstemp: O_EXCL | O_NOFOLLOW)."""
    store = StateStore(tmp_path / "s")
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (tmp_path / "s").mkdir()
    for guess in (f".state.json.{os.getpid()}.tmp", ".state.json.tmp"):
        (tmp_path / "s" / guess).symlink_to(target)
    with store.edit() as instances:
        instances["a"] = Instance(name="a", model="m", port=9000, status=Status.DEAD)
    assert target.read_text() == "keep me\n"
    assert "a" in json.loads((tmp_path / "s" / "state.json").read_text())["instances"]
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o755  # an existing dir keeps its mode ...
    fresh = StateStore(tmp_path / "new" / "state")
    with fresh.edit() as instances:
        instances["b"] = Instance(name="b", model="m", port=9000, status=Status.DEAD)
    assert (tmp_path / "new" / "state").stat().st_mode & 0o777 == 0o700  # ... one we create is private
    assert (tmp_path / "new" / "state" / "state.json").stat().st_mode & 0o777 == 0o600


def test_a_group_shared_dir_gets_group_writable_files(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, -1, 65534)  # a group that is not ours (root's cron job rewriting a group's files)
    os.chmod(shared, 0o2770)
    store = StateStore(shared)
    with store.edit() as instances:
        instances["a"] = Instance(name="a", model="m", port=9000, status=Status.DEAD)
    for name in ("state.json", "state.lock"):
        st = (shared / name).stat()
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == shared.stat().st_gid, name


def test_launch_whose_state_write_fails_stops_what_it_started(tmp_path: Path, monkeypatch) -> None:
    """No llama-server runs without an entry: a failed write after the spawn stops the child."""
    from llamactl.gpu.inventory import resolve
    from llamactl.model.settings import ServerSettings
    from llamactl.placement import Policy
    from llamactl.servers import launcher
    from llamactl.servers.probe import probe
    from llamactl.servers.state import StateError
    from tests.fakes.procs import tagged_instances

    e = Env(tmp_path)
    store = StateStore(e.state)
    spawned: list[int] = []
    real_spawn = launcher.runner.spawn

    def spawn(*a, **k):
        child = real_spawn(*a, **k)
        spawned.append(child.pid)
        return child

    def broken_write(self, instances):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(launcher.runner, "spawn", spawn)
    monkeypatch.setattr(StateStore, "_write", broken_write)
    monkeypatch.setenv("LLAMACTL_CACHE_DIR", str(tmp_path / "cache"))
    req = launcher.LaunchRequest(model=e.model, name="w", settings=ServerSettings(ctx_size=256), policy=Policy(),
                                 port_start=e.port_start)
    inv = resolve("none", None)
    with pytest.raises(StateError, match="No space left on device; the llama-server just started was stopped"):
        launcher.launch(store, req, str(e.wrapper), probe(e.wrapper), lambda: inv)
    assert len(spawned) == 1 and not psutil.pid_exists(spawned[0])
    assert not tagged_instances(e.state)


def test_ctrl_c_during_launch_stops_what_it_started(env: Env) -> None:  # noqa: F811
    cmd = [sys.executable, "-m", "llamactl", "launch", str(env.model), "--name", "slow", "--port-start",
           str(env.port_start), "-c", "256", "--", "--fake-ready-after", "60"]
    # a background test run (`cmd &`) inherits SIGINT ignored, and Python then keeps it ignored: restore it
    proc = subprocess.Popen(cmd, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not env.tagged():
        time.sleep(0.05)
    assert env.tagged(), "the instance never started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("llamactl: error: interrupted: stopped slow (pid ")
    assert not env.tagged() and env.ps() == []


def test_check_refuses_implausible_claims() -> None:
    """The ownership check itself, on claims that must never pass whatever runs."""
    me = psutil.Process()
    here = procs.Claim(os.getpid(), me.create_time(), "x", "/nowhere")
    assert procs.check(here).ownership is procs.Ownership.FOREIGN  # ourselves
    for pid in (0, 1, -1, True, "5", None, 2**40):
        assert procs.check(procs.Claim(pid, 1.0, "x", "/nowhere")).ownership is procs.Ownership.FOREIGN
        assert procs.send(procs.Claim(pid, 1.0, "x", "/nowhere"), signal.SIGTERM).ownership is not procs.Ownership.OURS
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ct = psutil.Process(sleeper.pid).create_time()
        for bad_ct in (None, float("nan"), "x", ct + 1):
            verdict = procs.send(procs.Claim(sleeper.pid, bad_ct, "x", "/nowhere"), signal.SIGTERM)
            assert verdict.ownership is not procs.Ownership.OURS
        # the right create time but no tag: still not ours
        assert procs.send(procs.Claim(sleeper.pid, ct, "x", "/nowhere"), signal.SIGTERM).ownership is procs.Ownership.FOREIGN
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


IMPOSTOR = r'''
import json, os, subprocess, sys, time
import psutil
from llamactl.servers.state import Instance, StateStore, Status
state = sys.argv[1]
store = StateStore(__import__("pathlib").Path(state))
tags = {**os.environ, "LLAMACTL_INSTANCE": "x", "LLAMACTL_STATE_DIR": str(store.dir.resolve()) if store.dir.exists()
        else (os.makedirs(state) or str(store.dir.resolve()))}
leader = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 301"], env=tags, start_new_session=True)
time.sleep(0.3)
with store.edit() as instances:  # a plausible planted entry: pid and create time copied, the tags it carries
    instances["x"] = Instance(name="x", model="/m.gguf", port=9000, pid=leader.pid, status=Status.READY,
                              create_time=psutil.Process(leader.pid).create_time())
env = {**os.environ, "LLAMACTL_STATE_DIR": state}
ps = subprocess.run([sys.executable, "-m", "llamactl", "ps", "--json"], capture_output=True, text=True, env=env)
ev = subprocess.run([sys.executable, "-m", "llamactl", "evict", "--all"], capture_output=True, text=True, env=env)
group = [p for p in psutil.process_iter() if p.pid != os.getpid() and os.getpgid(p.pid) == leader.pid]
print(json.dumps({"ps": ps.stdout, "ps_err": ps.stderr, "evict_rc": ev.returncode, "evict_err": ev.stderr,
                  "leader_alive": leader.poll() is None, "group": len(group)}))
'''


def test_an_impostor_with_the_tags_but_another_executable_is_not_ours(tmp_path: Path) -> None:
    """`env LLAMACTL_INSTANCE=x LLAMACTL_STATE_DIR=... setsid bash -c 'sleep 300 & sleep 301'` with a planted
    entry: not shown as an instance, never signalled (it used to be a ready instance whose group evict
    killed). Run in a PID namespace: a regression kills only the namespace."""
    out = in_pid_namespace([sys.executable, "-c", IMPOSTOR, str(tmp_path / "state")])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert json.loads(report["ps"]) == [], report
    assert "not a llama.cpp server" in report["ps_err"] and "bash" in report["ps_err"]
    assert report["evict_rc"] == 0 and report["leader_alive"] and report["group"] >= 2, report
