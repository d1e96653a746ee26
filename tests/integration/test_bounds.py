"""The proxy's and the CLI's bounds under concurrency, sampled while they run: never more llama-server
processes than `max_instances`, never more estimated memory on a simulated GPU than it has, no stream cut
by a TTL stop or a reload, no instance of another llamactl stopped. Fake llama-servers, real processes,
real HTTP, a real state file."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.procs import tagged_instances
from tests.integration.test_proxy import FAKE, make_proxy, wait_for  # noqa: F401  (make_proxy: the fixture)
from tests.fakes.binary import fake_server_binary
from tests.synth import ModelSpec, write_model

LIVE = ("starting", "ready", "busy", "stopping")


def _estimate(config: Path, env: dict[str, str], name: str) -> int:
    """The GPU bytes llamactl's own estimate gives one model of the config (what the plan claims)."""
    out = subprocess.run([sys.executable, "-m", "llamactl", "--config", str(config), "estimate", name,
                          "--gpus", "1x1GiB", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return next(d["total_bytes"] for d in json.loads(out.stdout)["devices"] if d["device"] == "GPU0")


def _claimed(state: Path) -> int:
    """The estimated GPU 0 bytes of every live entry in the state file (starting and stopping included)."""
    try:
        data = json.loads((state / "state.json").read_text())
    except (OSError, ValueError):
        return 0
    total = 0
    for inst in data.get("instances", {}).values():
        if inst.get("status") in LIVE and 0 in inst.get("gpu_ids", []):
            total += int(inst.get("estimated_bytes", {}).get(f"GPU{inst['gpu_ids'].index(0)}", 0))
    return total


class Sampler(threading.Thread):
    """Samples the process table, the state file and /status every 0.1 s while the clients run."""

    def __init__(self, state: Path, url: str | None = None) -> None:
        super().__init__(daemon=True)
        self.state, self.url = state, url
        self.done = threading.Event()
        self.processes: list[int] = []
        self.claimed: list[int] = []
        self.listed: list[int] = []

    def run(self) -> None:
        while not self.done.is_set():
            self.processes.append(len(tagged_instances(self.state)))
            self.claimed.append(_claimed(self.state))
            if self.url:
                try:
                    snap = httpx.get(f"{self.url}/status", timeout=5).json()
                    self.listed.append(sum(1 for i in snap["instances"] if i["pid"] is not None))
                except httpx.HTTPError:
                    pass
            self.done.wait(0.1)


def _stream(url: str, model: str) -> tuple[int, str]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": [], "stream": True, "max_tokens": 6}) as reply:
        return reply.status_code, reply.read().decode()


def test_sixteen_clients_never_exceed_seats_or_memory_and_no_stream_is_cut(make_proxy) -> None:  # noqa: F811
    """Three models, a simulated GPU that holds two of them, max_instances = 2, a 1 s TTL: sixteen clients
    asking for a random model. Sampled all along: ≤ 2 llama-server processes, ≤ 2 instances in /status,
    the claimed estimates ≤ the GPU; every stream ends with [DONE] and no error event."""
    probe = make_proxy({"a": []}, 'gpu_overhead = "0MiB"')  # only to learn the estimate with the same settings
    each = _estimate(probe.config, {**probe.env, "LLAMACTL_GPUS": "none"}, "a")
    probe.stop()
    gpu_kib = math.ceil(2.5 * each / 1024)  # two of the three models fit, not three
    chunked = ["--fake-chunk-delay", "0.03"]
    proxy = make_proxy({"a": chunked, "b": chunked, "c": chunked},
                       'max_instances = 2\nidle_ttl = "1s"\ngpu_overhead = "0MiB"\nmax_queue = 1000\n'
                       'load_timeout = "60s"', gpus=f"1x{gpu_kib}KiB", defaults='margin = "0MiB"')
    sampler = Sampler(proxy.state, proxy.url)
    sampler.start()
    results: list[tuple[str, int, str]] = []
    stop_at = time.monotonic() + 12

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            model = rng.choice("abc")
            status, body = _stream(proxy.url, model)
            results.append((model, status, body))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=180)
    sampler.done.set()
    sampler.join()
    gpu = gpu_kib * 1024
    assert results and len(sampler.processes) > 20
    assert max(sampler.processes) <= 2, f"processes sampled: {sampler.processes}"
    assert max(sampler.listed) <= 2, f"/status instances with a process: {sampler.listed}"
    assert max(sampler.claimed) <= gpu, f"claimed {max(sampler.claimed)} of {gpu} bytes"
    assert max(sampler.claimed) >= 2 * each * 0.99, sampler.claimed  # the GPU held two at times: memory was in play
    bad = [(m, s, b[-300:]) for m, s, b in results if s != 200 or "data: [DONE]" not in b or '"error"' in b]
    assert not bad, bad[:3]
    assert {m for m, _, _ in results} == {"a", "b", "c"}
    log = proxy.logs()
    assert "stopped (" in log  # swaps did happen: the bounds were exercised, not avoided


def test_a_ttl_stop_in_progress_never_cuts_a_request_for_another_model(make_proxy) -> None:  # noqa: F811
    """a and b run out of their TTL in the same poll; a ignores SIGTERM (its stop takes the 10 s grace). A
    stream for b that arrives during a's stop is never cut by b's stop: b's stop was claimed in the same step
    as a's, so the stream waits for it and starts b again (it used to be admitted, then cut)."""
    slow = ["--fake-ignore-sigterm"]
    proxy = make_proxy({"a": slow, "b": ["--fake-chunk-delay", "0.3"]}, 'idle_ttl = "1s"', poll="1s")
    both = [threading.Thread(target=proxy.post, args=(m,), kwargs={"max_tokens": 1}) for m in "ab"]
    for t in both:
        t.start()
    for t in both:
        t.join(30)
    assert wait_for(lambda: any(i["name"] == "a" and i["state"] == "stopping" for i in proxy.instances()), 15)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=120,
                      json={"model": "b", "messages": [], "stream": True, "max_tokens": 40}) as reply:
        body = reply.read().decode()
    assert reply.status_code == 200 and "data: [DONE]" in body and '"error"' not in body, body[-300:]
    assert '"completion_tokens": 40' in body  # the whole answer


def test_lowering_max_instances_by_sighup_stops_idle_ones(make_proxy) -> None:  # noqa: F811
    proxy = make_proxy({"a": [], "b": [], "c": []}, "max_instances = 3", poll="0.2s")
    for name in "abc":
        assert proxy.post(name, max_tokens=1).status_code == 200
    assert len(proxy.tagged()) == 3
    text = proxy.config.read_text().replace("max_instances = 3", "max_instances = 1")
    proxy.config.write_text(text)
    proxy.proc.send_signal(1)
    # (the log line follows the process's end: wait for both)
    assert wait_for(lambda: len(proxy.tagged()) == 1 and proxy.logs().count("stopped (max_instances)") == 2, 20), \
        proxy.logs()


def test_the_proxy_waits_for_an_instance_a_cli_launch_is_loading(make_proxy) -> None:  # noqa: F811
    """`llamactl launch a` still loading when a request for a arrives: the proxy routes to it once ready,
    never stops it (it used to replace it, and the CLI's launch failed with code -15)."""
    proxy = make_proxy({"a": []})
    cli = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(proxy.config), "launch", "a",
                            "--", "--fake-ready-after", "3"], env=proxy.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: any(i.get("status") == "starting" for i in
                                    json.loads((proxy.state / "state.json").read_text()).get("instances", {}).values())
                        if (proxy.state / "state.json").exists() else False, 20)
        pid = proxy.tagged()[0].pid
        reply = proxy.post("a", max_tokens=1)
        assert reply.status_code == 200
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        assert [p.pid for p in proxy.tagged()] == [pid]  # the CLI's instance, routed to
        assert "routing to running instance" in proxy.logs()
    finally:
        if cli.poll() is None:
            cli.kill()
    subprocess.run([sys.executable, "-m", "llamactl", "evict", "--all"], env=proxy.env, capture_output=True, timeout=60)


def test_unloading_a_starting_model_says_it_could_not(make_proxy) -> None:  # noqa: F811
    proxy = make_proxy({"a": ["--fake-ready-after", "2"]})
    waiting = threading.Thread(target=proxy.post, args=("a",), kwargs={"max_tokens": 1})
    waiting.start()
    assert wait_for(lambda: proxy.instances()[0]["state"] == "starting", 10)
    reply = httpx.post(f"{proxy.url}/models/a/unload", json={}, timeout=10)
    assert reply.status_code == 503 and "still starting" in reply.json()["error"]["message"]
    waiting.join(30)


def _write_models(tmp: Path, names: str) -> tuple[Path, dict[str, str]]:
    model = write_model(tmp / "tiny.gguf", ModelSpec(n_vocab=300))
    wrapper = fake_server_binary()  # an executable named llama-server
    config = tmp / "config.toml"
    lines = ['gpu_overhead = "0MiB"', "[defaults]", "ctx_size = 256", 'margin = "0MiB"']
    for name in names:
        lines += [f"[models.{name}]", f'path = "{model}"']
    config.write_text("\n".join(lines) + "\n")
    import os
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp / "state"), "LLAMACTL_CACHE_DIR": str(tmp / "cache"),
           "LLAMA_SERVER": str(wrapper), "LLAMACTL_GPUS": "none"}
    return config, env


def test_six_concurrent_launches_never_over_commit_a_gpu(tmp_path: Path) -> None:
    """Six `llamactl launch` of different models at the same moment on a GPU that holds two of them (all
    still starting): the claims recorded never exceed it; the others run partially or on the CPU."""
    config, env = _write_models(tmp_path, "abcdef")
    each = _estimate(config, env, "a")
    gpu_kib = math.ceil(2.5 * each / 1024)
    env["LLAMACTL_GPUS"] = f"1x{gpu_kib}KiB"
    sampler = Sampler(tmp_path / "state")
    sampler.start()
    launches = [subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(config), "launch", name,
                                  "--json", "--", "--fake-ready-after", "1"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for name in "abcdef"]
    try:
        outs = [p.communicate(timeout=120) for p in launches]
    finally:
        sampler.done.set()
        sampler.join()
        subprocess.run([sys.executable, "-m", "llamactl", "evict", "--all"], env=env, capture_output=True, timeout=60)
    assert all(p.returncode == 0 for p in launches), [o[1] for o in outs]
    on_gpu = [json.loads(o[0])["gpu_ids"] for o in outs]
    assert max(sampler.claimed) <= gpu_kib * 1024, f"claimed {max(sampler.claimed)} of {gpu_kib * 1024}"
    assert sum(1 for ids in on_gpu if ids) >= 2  # the GPU was used, not avoided


def test_plan_counts_what_runs_on_a_simulated_gpu(tmp_path: Path) -> None:
    config, env = _write_models(tmp_path, "abc")
    each = _estimate(config, env, "a")
    env["LLAMACTL_GPUS"] = f"1x{math.ceil(2.5 * each / 1024)}KiB"
    run = lambda *argv: subprocess.run([sys.executable, "-m", "llamactl", "--config", str(config), *argv],  # noqa: E731
                                       env=env, capture_output=True, text=True, timeout=120)
    try:
        for name in "ab":
            assert run("launch", name).returncode == 0
        planned = run("plan", "c", "--json")
        result = json.loads(planned.stdout)
        assert planned.returncode == 3 and result["fit"] != "gpu", planned.stdout  # a and b hold the GPU
        assert result["evict"] == ["a"]  # the least recently used idle one would make room
        # a --gpus-file is another box as it was measured: the instances running here do not count there
        (tmp_path / "other.json").write_text(run("gpus", "--json").stdout)
        other_box = run("plan", "c", "--json", "--gpus-file", str(tmp_path / "other.json"))
        assert json.loads(other_box.stdout)["fit"] == "gpu", other_box.stdout
    finally:
        run("evict", "--all")


def test_a_launch_evicted_while_it_loads_says_so(tmp_path: Path) -> None:
    config, env = _write_models(tmp_path, "a")
    run = lambda *argv: subprocess.run([sys.executable, "-m", "llamactl", "--config", str(config), *argv],  # noqa: E731
                                       env=env, capture_output=True, text=True, timeout=120)
    launch = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(config), "launch", "a", "--",
                               "--fake-ready-after", "30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert wait_for(lambda: len(tagged_instances(tmp_path / "state")) == 1, 30)
        assert run("evict", "a").returncode == 0
        _, err = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 1
    assert "its state entry was removed while it loaded" in err and "code -15" not in err, err


def test_a_model_that_fits_once_a_busy_one_is_done_waits_for_the_gpu(make_proxy) -> None:  # noqa: F811
    """A GPU that holds one of two models; a is busy streaming when b is asked for: b waits for a's stream to
    end, then a goes (memory) and b runs wholly on the GPU — not partially or on the CPU beside it."""
    probe = make_proxy({"a": []}, 'gpu_overhead = "0MiB"')
    each = _estimate(probe.config, {**probe.env, "LLAMACTL_GPUS": "none"}, "a")
    probe.stop()
    proxy = make_proxy({"a": ["--fake-chunk-delay", "0.2"], "b": []}, 'gpu_overhead = "0MiB"',
                       gpus=f"1x{math.ceil(1.5 * each / 1024)}KiB", defaults='margin = "0MiB"')
    result: dict[str, object] = {}
    streaming = threading.Thread(target=lambda: result.update(a=_stream_n(proxy.url, "a", 15)))
    streaming.start()
    assert wait_for(lambda: any(i["name"] == "a" and i["in_flight"] for i in proxy.instances()), 20)
    reply = proxy.post("b", max_tokens=1)
    streaming.join(60)
    assert reply.status_code == 200
    status, body = result["a"]  # type: ignore[misc]
    assert status == 200 and "data: [DONE]" in body and '"error"' not in body  # a's stream was not cut
    b = next(i for i in proxy.instances() if i["name"] == "b")
    # the whole model on the GPU (not partially), once a's memory was free
    assert b["gpu_ids"] == [0] and b["devices"]["GPU0"]["estimated_bytes"] >= 0.99 * each, (b, proxy.logs())
    assert "a: stopped (memory)" in proxy.logs(), proxy.logs()


def _stream_n(url: str, model: str, tokens: int) -> tuple[int, str]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": [], "stream": True, "max_tokens": tokens}) as reply:
        return reply.status_code, reply.read().decode()


def test_launch_dry_run_prints_the_port_a_launch_would_take(tmp_path: Path) -> None:
    import socket

    config, env = _write_models(tmp_path, "a")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "llamactl", "--config", str(config), "launch", "a", "--dry-run",
                              "--port-start", str(port), "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)["argv"]
    assert int(argv[argv.index("--port") + 1]) != port


def test_launch_dry_run_works_without_a_llama_server(tmp_path: Path) -> None:
    config, env = _write_models(tmp_path, "a")
    env = {**env, "LLAMA_SERVER": str(tmp_path / "missing"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "llamactl", "--config", str(config), "launch", "a", "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "llama-server --model" in out.stdout and "note:" in out.stderr
