"""Models bigger than one host: `llamactl worker` on loopback, CPU-backed ggml-rpc-servers, the real llama-server.

Two workers each lend a CPU device smaller than the model; the planning host (no GPU of its own) places it
across both, launches it with `--rpc`, and llama-server's per-device buffers must match the plan's, device
by device (as tests/e2e/test_rpc_devices.py checks the memory model). Then the failures: a wrong key is a
401 and that worker's devices are not used; a worker that goes away takes its devices out of the inventory
and out of the next plan, and stops its rpc-servers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llamactl.servers.buffers import free_port, parse_buffer_log
from llamactl.units import MiB
from tests.synth import ModelSpec, write_model

MODEL = ModelSpec(n_vocab=4096, n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=1536)  # 56 MiB of F16 weights
DEVICE_SIZE = "48MiB"  # one device cannot hold the model, two can
SETTINGS = ["-c", "512", "-np", "1", "-ub", "128", "-b", "128", "--margin", "0", "--gpu-overhead", "0MiB"]


def _cli(env: dict[str, str], *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s)


class Worker:
    """A real `llamactl worker` process with its own state dir, as on another host."""

    def __init__(self, root: Path, name: str, env: dict[str, str], key: str, reserved: set[int]) -> None:
        self.name, self.key, self.port = name, key, free_port()
        # its rpc-server takes the next port: free now, and not one another worker of this test chose
        while _taken(self.port + 1) or {self.port, self.port + 1} & reserved:
            self.port = free_port()
        reserved.update({self.port, self.port + 1})
        self.state = root / f"worker-{name}"
        key_file = root / f"{name}.key"
        key_file.write_text(key + "\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llamactl", "--state-dir", str(self.state), "worker", "--host", "127.0.0.1",
             "--port", str(self.port), "--api-key-file", str(key_file), "--cpu-memory", DEVICE_SIZE],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def inventory(self, key: str | None = None) -> httpx.Response:
        return httpx.get(f"{self.url}/inventory", headers={"Authorization": f"Bearer {key or self.key}"}, timeout=5)

    def wait_ready(self, deadline_s: float = 60) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if self.inventory().status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"worker {self.name} did not serve /inventory in {deadline_s} s")

    def rpc_pids(self) -> list[int]:
        entries = json.loads((self.state / "state.json").read_text())["instances"]
        return [e["pid"] for e in entries.values() if e.get("kind") == "rpc"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _taken(port: int) -> bool:
    """Something listens there, or it cannot be bound now (a connection of an earlier test in TIME_WAIT:
    rpc-server binds without SO_REUSEADDR)."""
    import socket

    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            return True
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].startswith("Z")
    except OSError:
        return True


def _wait_for(condition, deadline_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {deadline_s} s: {what}")
        time.sleep(0.1)


@pytest.fixture()
def cluster(server_binary: Path, tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, Worker], Path]]:
    env = {**os.environ, "LLAMA_SERVER": str(server_binary), "LLAMACTL_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    env.pop("LLAMACTL_WORKER_KEY", None)
    reserved: set[int] = set()
    workers = {name: Worker(tmp_path, name, env, f"key-{name}-{os.urandom(4).hex()}", reserved) for name in ("a", "b")}
    try:
        for worker in workers.values():
            worker.wait_ready()
        config = tmp_path / "llamactl.toml"
        config.write_text("".join(f'[workers.{w.name}]\nurl = "{w.url}"\napi_key_file = "{w.name}.key"\n\n'
                                  for w in workers.values()))
        planning = {**env, "LLAMACTL_STATE_DIR": str(tmp_path / "state"), "LLAMACTL_GPUS": "none",
                    "LLAMACTL_CONFIG": str(config)}
        yield planning, workers, write_model(tmp_path / "model.gguf", MODEL)
    finally:
        _cli({**env, "LLAMACTL_STATE_DIR": str(tmp_path / "state")}, "evict", "--all", timeout_s=60)
        for worker in workers.values():
            worker.stop()


def _plan(env: dict[str, str], model: Path) -> tuple[dict, str]:
    out = _cli(env, "--config", env["LLAMACTL_CONFIG"], "plan", str(model), *SETTINGS, "--json")
    assert out.returncode in (0, 3), out.stderr
    return json.loads(out.stdout), out.stderr


def _endpoints(plan: dict) -> list[str]:
    argv = plan["argv"]
    return argv[argv.index("--rpc") + 1].split(",") if "--rpc" in argv else []


def test_a_model_too_big_for_either_worker_runs_across_both(cluster) -> None:
    env, workers, model = cluster
    plan, _ = _plan(env, model)
    assert plan["fit"] == "gpu", plan["reasons"]
    served = {w.inventory().json()["gpus"][0]["endpoint"] for w in workers.values()}
    assert set(_endpoints(plan)) == served and len(plan["gpu_ids"]) == 2
    assert any("other host(s) (a, b)" in r for r in plan["reasons"]), plan["reasons"]

    out = _cli(env, "--config", env["LLAMACTL_CONFIG"], "launch", str(model), *SETTINGS, "--port-start",
               str(free_port()), "--json")
    assert out.returncode == 0, out.stderr
    launched = json.loads(out.stdout)
    reply = httpx.post(f"{launched['url']}/completion", json={"prompt": "hi", "n_predict": 4, "ignore_eos": True},
                       timeout=120)
    assert reply.status_code == 200 and reply.json()["tokens_predicted"] == 4
    log = parse_buffer_log(Path(launched["log_path"]).read_text())
    # GPU<k> of the plan is the k-th --rpc endpoint, which llama-server names RPC0[endpoint]
    for k, endpoint in enumerate(_endpoints(plan)):
        ours = next(d for d in plan["devices"] if d["device"] == f"GPU{k}")
        for term, key in (("weights", "weights_bytes"), ("kv", "kv_bytes")):
            logged = log.term(term, device=f"RPC0[{endpoint}]")
            assert logged > 0 and abs(ours[key] - logged) <= max(0.005 * logged, 0.02 * MiB), \
                f"GPU{k} {term}: ours {ours[key] / MiB:.2f}, logged {logged / MiB:.2f} MiB"
        compute = log.term("compute", device=f"RPC0[{endpoint}]")
        assert ours["compute_bytes"] >= compute * 0.95, f"GPU{k} compute under: {ours['compute_bytes']} < {compute}"


def test_a_wrong_key_is_refused_and_that_workers_devices_are_not_used(cluster, tmp_path: Path) -> None:
    env, workers, model = cluster
    assert workers["a"].inventory(key="not-the-key").status_code == 401
    assert httpx.get(f"{workers['a'].url}/inventory", timeout=5).status_code == 401
    (tmp_path / "a.key").write_text("not-the-key\n")
    plan, stderr = _plan(env, model)
    assert "worker a" in stderr and "401" in stderr, stderr
    served_a = workers["a"].inventory().json()["gpus"][0]["endpoint"]
    assert served_a not in _endpoints(plan) and plan["fit"] != "gpu"


def test_a_worker_that_goes_away_leaves_the_inventory_and_the_next_plan(cluster) -> None:
    env, workers, model = cluster
    out = _cli(env, "--config", env["LLAMACTL_CONFIG"], "launch", str(model), *SETTINGS, "--port-start",
               str(free_port()), "--json")
    assert out.returncode == 0, out.stderr
    launched = json.loads(out.stdout)
    gone = workers["b"]
    endpoint_b = gone.inventory().json()["gpus"][0]["endpoint"]
    rpc_pids = gone.rpc_pids()
    assert rpc_pids
    gone.stop()
    assert gone.proc.returncode == 0
    _wait_for(lambda: all(_gone(pid) for pid in rpc_pids), 30, "the worker's rpc-servers stopped")
    # the instance that used it cannot compute any more: it fails its next request and is reported dead
    try:
        httpx.post(f"{launched['url']}/completion", json={"prompt": "hi", "n_predict": 4}, timeout=30)
    except httpx.HTTPError:
        pass
    _wait_for(lambda: json.loads(_cli(env, "ps", "--json").stdout)[0]["status"] == "dead", 60,
              "the instance on the lost worker reported dead")
    plan, stderr = _plan(env, model)
    assert "worker b" in stderr and "left out" in stderr, stderr
    assert endpoint_b not in _endpoints(plan) and plan["fit"] != "gpu"
    devices = json.loads(_cli(env, "--config", env["LLAMACTL_CONFIG"], "gpus", "--json").stdout)
    assert [d["worker"] for d in devices] == ["a"]
