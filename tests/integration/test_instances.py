"""launch / ps / evict / logs against a fake llama-server that misbehaves on request."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psutil
import pytest

from llamactl.servers.buffers import free_port
from llamactl.servers.state import INSTANCE_ENV, STATE_DIR_ENV
from tests.fakes.procs import tagged_instances
from tests.fakes.binary import fake_server_binary
from tests.synth import ModelSpec, write_model

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_llama_server.py"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.wrapper = fake_server_binary()  # an executable named llama-server
        self.model = write_model(tmp / "tiny.gguf", ModelSpec(n_vocab=300))
        self.port_start = free_port()
        self.env = {**os.environ, "LLAMACTL_STATE_DIR": str(self.state), "LLAMACTL_GPUS": "none",
                    "LLAMACTL_CACHE_DIR": str(tmp / "cache"), "LLAMA_SERVER": str(self.wrapper)}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def launch(self, name: str, *extra: str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        cmd = ["launch", str(self.model), "--name", name, "--port-start", str(self.port_start), "-c", "256", *args]
        if extra:
            cmd += ["--", *extra]
        return self.run(*cmd)

    def ps(self) -> list[dict]:
        out = self.run("ps", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def tagged(self) -> list[psutil.Process]:
        return tagged_instances(self.state)


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path)
    yield e
    leftovers = e.tagged()
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"processes left running: {[p.pid for p in leftovers]}"


def test_launch_ps_evict(env: Env) -> None:
    out = env.launch("a")
    assert out.returncode == 0, out.stderr
    assert "a ready in" in out.stdout
    (inst,) = env.ps()
    assert inst["status"] == "ready" and env.port_start <= inst["port"] < env.port_start + 20 and inst["slots_total"] == 4
    assert inst["estimated_bytes"] > 0 and inst["actual_bytes"] > 0  # CPU instance: RSS
    proc = psutil.Process(inst["pid"])
    assert proc.environ()[INSTANCE_ENV] == "a"
    assert os.getpgid(inst["pid"]) == inst["pid"]  # own process group, survives the CLI
    out = env.run("evict", "a")
    assert out.returncode == 0 and "stopped a" in out.stdout
    assert env.ps() == [] and not env.tagged()


def test_slow_readiness_misses_the_deadline(env: Env) -> None:
    start = time.monotonic()
    out = env.launch("slow", "--fake-ready-after", "30", args=("--timeout", "3s"))
    assert out.returncode == 1
    assert time.monotonic() - start < 15
    assert "not ready after 3 s" in out.stderr and "fake: listening" in out.stderr  # the log's tail
    (inst,) = env.ps()
    assert inst["status"] == "failed"
    assert not env.tagged()


def test_out_of_memory_at_load_is_the_no_fit_exit_code(env: Env) -> None:
    out = env.launch("huge", "--fake-oom")
    assert out.returncode == 4, out.stderr
    assert "out of memory while loading" in out.stderr and "cudaMalloc failed" in out.stderr  # and the log's tail
    assert not env.tagged()


def test_exit_at_once_fails_fast_not_at_the_deadline(env: Env) -> None:
    start = time.monotonic()
    out = env.launch("broken", "--fake-exit-at-once", "7", args=("--timeout", "120s"))
    assert out.returncode == 1
    assert time.monotonic() - start < 15
    assert "exited with code 7" in out.stderr and "failing at once" in out.stderr
    assert env.ps()[0]["status"] == "failed"


def test_sigterm_ignored_is_killed_after_grace(env: Env) -> None:
    assert env.launch("stubborn", "--fake-ignore-sigterm").returncode == 0
    start = time.monotonic()
    out = env.run("evict", "stubborn", "--grace", "1s")
    assert out.returncode == 0
    assert time.monotonic() - start >= 1.0
    assert not env.tagged()


def test_crash_later_shows_dead_then_prune(env: Env) -> None:
    assert env.launch("flaky", "--fake-crash-after", "2").returncode == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and env.ps()[0]["status"] != "dead":
        time.sleep(0.2)
    assert env.ps()[0]["status"] == "dead"
    assert env.run("ps", "--prune").returncode == 0
    assert env.ps() == []


def test_name_conflict_and_replace(env: Env) -> None:
    assert env.launch("m").returncode == 0
    first = env.ps()[0]["pid"]
    out = env.launch("m")
    assert out.returncode == 2 and "already ready" in out.stderr
    out = env.launch("m", args=("--replace",))
    assert out.returncode == 0, out.stderr
    (inst,) = env.ps()
    assert inst["pid"] != first and not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    env.run("evict", "--all")


def test_busy_port_is_skipped(env: Env) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", env.port_start))
        holder.listen()
        out = env.launch("p")
        assert out.returncode == 0, out.stderr
        assert env.ps()[0]["port"] > env.port_start
    env.run("evict", "--all")


def test_a_foreign_server_on_the_port_is_not_mistaken_for_ours(env: Env) -> None:
    class Foreign(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"status": "ok"} if self.path == "/health" else {"model_path": "someone-else.gguf"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    port = free_port()
    server = HTTPServer(("127.0.0.1", port), Foreign)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = env.launch("clash", args=("--port", str(port), "--timeout", "20s"))
        # refused before anything starts: one line, usage exit code, nothing recorded or running
        assert out.returncode == 2, out.stdout
        assert out.stderr.strip().splitlines() == [f"llamactl: error: port {port} is already in use on 127.0.0.1 by another program"]
        assert env.ps() == [] and not env.tagged()
    finally:
        server.shutdown()


def test_many_launches_at_once_get_distinct_ports(env: Env) -> None:
    n = 20
    procs = [subprocess.Popen([sys.executable, "-m", "llamactl", "launch", str(env.model), "--name", f"m{i}",
                               "--port-start", str(env.port_start), "-c", "256"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.env) for i in range(n)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results if r[1]]
    listed = env.ps()
    assert sorted(i["name"] for i in listed) == sorted(f"m{i}" for i in range(n))
    assert all(i["status"] == "ready" for i in listed)
    assert len({i["port"] for i in listed}) == n
    evicts = [subprocess.Popen([sys.executable, "-m", "llamactl", "evict", f"m{i}", f"m{(i + 1) % n}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env.env) for i in range(n)]
    for p in evicts:
        p.communicate(timeout=120)
        assert p.returncode == 0
    assert env.ps() == [] and not env.tagged()


def test_kill_9_mid_write_leaves_a_readable_state(env: Env, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from llamactl.servers.state import StateStore, Instance, Status\n"
        "store = StateStore(Path(sys.argv[1]))\n"
        "i = 0\n"
        "while True:\n"
        "    with store.edit() as s:\n"
        "        for k in range(50):\n"
        "            s[f'x{k}'] = Instance(name=f'x{k}', model='m'*200, port=1 + i % 60000, status=Status.DEAD, started_at=i)\n"
        "    i += 1\n")
    for _ in range(5):
        writer = subprocess.Popen([sys.executable, str(script), str(env.state)], env=env.env)
        deadline = time.monotonic() + 20  # the first writer's first write, however slow its start
        while not (env.state / "state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        data = json.loads((env.state / "state.json").read_text())
        assert data["version"] == 1 and len(data["instances"]) == 50
    assert not list(env.state.glob("state.json.bad-*"))
    assert len(list(env.state.glob(".state.json.*.tmp"))) <= 1  # the last killed writer's; earlier ones cleaned


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 0, "instances": {}}), "[]",
                                     json.dumps({"version": 1, "instances": []}),
                                     json.dumps({"version": 1, "instances": {"a": {"name": "a", "port": "x"}}})])
def test_unreadable_state_is_moved_aside_with_a_warning(env: Env, content: str) -> None:
    env.state.mkdir(parents=True)
    (env.state / "state.json").write_text(content)
    out = env.run("ps", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []
    assert "moved aside" in out.stderr
    (aside,) = env.state.glob("state.json.bad-*")
    assert aside.read_text() == content


def test_newer_state_is_refused_not_moved(env: Env) -> None:
    env.state.mkdir(parents=True)
    content = json.dumps({"version": 99, "instances": {}})
    (env.state / "state.json").write_text(content)
    out = env.run("ps")
    assert out.returncode == 1 and "newer llamactl" in out.stderr
    assert (env.state / "state.json").read_text() == content


def test_untracked_child_is_adopted(env: Env) -> None:
    port = free_port()
    proc = subprocess.Popen([str(env.wrapper), "--model", str(env.model), "--port", str(port)],
                            env={**env.env, INSTANCE_ENV: "orphan", STATE_DIR_ENV: str(env.state.resolve())},
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10  # until its environment is readable (the exec is done) and ps adopts it
        while time.monotonic() < deadline and not env.ps():
            time.sleep(0.05)
        (inst,) = env.ps()
        assert (inst["name"], inst["pid"], inst["port"], inst["started_by"]) == ("orphan", proc.pid, port, "adopted")
        assert env.run("evict", "orphan", "--grace", "2s").returncode == 0
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_evict_idle_and_lru(env: Env) -> None:
    import httpx

    from dataclasses import replace

    from llamactl.servers.state import StateStore

    for name in ("old", "new", "newest"):
        assert env.launch(name).returncode == 0
    with StateStore(env.state).edit() as instances:  # all three last used an hour ago: no race with the clock
        for name, inst in instances.items():
            instances[name] = replace(inst, last_used=time.time() - 3600)
    ports = {i["name"]: i["port"] for i in env.ps()}
    for name in ("new", "newest"):
        httpx.post(f"http://127.0.0.1:{ports[name]}/completion", json={"prompt": "x", "n_predict": 2})
        time.sleep(0.1 if name == "new" else 0)
        env.ps()  # a poll notices the token counters moved: last_used = now
    out = env.run("evict", "--idle", "30m", "--json")  # the two the polls saw working are not idle
    assert json.loads(out.stdout)["evicted"] == ["old"]
    out = env.run("evict", "--lru", "1", "--json")
    assert json.loads(out.stdout)["evicted"] == ["new"]
    assert [i["name"] for i in env.ps()] == ["newest"]
    env.run("evict", "--all")


def test_evict_is_cron_friendly(env: Env) -> None:
    out = env.run("evict", "nobody")
    assert out.returncode == 0 and "already gone" in out.stderr
    assert env.run("evict", "--idle", "30m").returncode == 0
    assert env.run("evict").returncode == 2
    assert env.run("evict", "--all", "--lru", "1").returncode == 2


def test_dry_run_starts_nothing(env: Env) -> None:
    out = env.run("launch", str(env.model), "--dry-run", "--port", "9999")
    assert out.returncode == 0 and "--port 9999" in out.stdout and "--fit off" in out.stdout
    assert env.ps() == [] and not env.tagged()


def test_not_a_gguf_fails_before_starting(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("nope" * 100)
    out = env.run("launch", str(bad))
    assert out.returncode == 2 and "not a GGUF file" in out.stderr
    assert env.ps() == []


def test_logs(env: Env) -> None:
    assert env.launch("l").returncode == 0
    out = env.run("logs", "l", "-n", "1")
    assert out.returncode == 0 and "fake: listening" in out.stdout
    assert "llamactl starts" in env.run("logs", "l").stdout
    assert env.run("logs", "nobody").returncode == 2
    env.run("evict", "--all")


def test_launch_by_config_name(env: Env, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'port_start = {env.port_start}\n[models.chat]\npath = "{env.model}"\nctx_size = 512\n'
                   'aliases = ["gpt-4o-mini"]\nargs = ["--fake-model", "x"]\n')
    out = env.run("--config", str(cfg), "launch", "gpt-4o-mini", "--dry-run")
    assert out.returncode == 0 and "--ctx-size 512" in out.stdout and "--fake-model x" in out.stdout
    out = env.run("--config", str(cfg), "launch", "chat", "--timeout", "3s")
    # the fake reports model "x": not our model, so readiness is never confirmed
    assert out.returncode == 1 and "not ready" in out.stderr
    assert env.run("--config", str(tmp_path / "missing.toml"), "launch", "chat").returncode == 2
