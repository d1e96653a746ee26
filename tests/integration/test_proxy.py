"""The proxy against fake llama-servers: single flight, queueing, errors, streaming, eviction, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from llamactl.servers.buffers import free_port
from llamactl.servers.client import wait_healthy
from tests.fakes.procs import tagged_instances
from tests.fakes.binary import fake_server_binary
from tests.synth import ModelSpec, write_model

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_llama_server.py"


def wait_for(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class Proxy:
    def __init__(self, tmp: Path, models: dict[str, list[str]], extra_config: str = "", *, keep: bool = False,
                 poll: str = "0.3s", gpus: str = "none", defaults: str = "", flags: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        wrapper = fake_server_binary()  # an executable named llama-server
        model = write_model(tmp / "tiny.gguf", ModelSpec(n_vocab=300))
        self.port = free_port()
        lines = [f"port = {self.port}", f"port_start = {free_port()}", f'poll_interval = "{poll}"', extra_config,
                 "[defaults]", "ctx_size = 256", defaults]
        for name, args in models.items():
            lines += [f"[models.{name}]", f'path = "{model}"', f"args = {json.dumps(args)}"]
        self.config = tmp / "config.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.env = {**os.environ, "LLAMACTL_STATE_DIR": str(self.state), "LLAMACTL_GPUS": gpus,
                    "LLAMACTL_CACHE_DIR": str(tmp / "cache"), "LLAMA_SERVER": str(wrapper)}
        self.argv = [sys.executable, "-m", "llamactl", "--config", str(self.config), "proxy", "--grace", "5s", *flags]
        if keep:
            self.argv.append("--keep-instances")
        # appended: the proxy writes at the end whatever offset our reads (seek(0)) left in the shared file
        self.log = open(tmp / "proxy.log", "a+")
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        """(Re)start the proxy on the same config and state dir."""
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_healthy(self.url, 20, alive=lambda: self.proc.poll() is None, interval_s=0.1):
            raise AssertionError("proxy did not start: " + self.logs())

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def post(self, model: str, timeout: float = 30, **body) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json={"model": model, "messages": [], **body},
                          timeout=timeout)

    def instances(self) -> list[dict]:
        return json.loads(httpx.get(f"{self.url}/status", timeout=10).text)["instances"]

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            got = dict(pair.split("=", 1) for pair in line[len(name) + 1:line.index("}")].split(","))
            if {k: v.strip('"') for k, v in got.items()} == labels:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def tagged(self) -> list[psutil.Process]:
        return tagged_instances(self.state)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def make_proxy(tmp_path: Path):
    started: list[Proxy] = []

    def make(models: dict[str, list[str]], extra: str = "", keep: bool = False, poll: str = "0.3s",
             gpus: str = "none", defaults: str = "", flags: tuple[str, ...] = ()) -> Proxy:
        (tmp_path / f"p{len(started)}").mkdir()
        proxy = Proxy(tmp_path / f"p{len(started)}", models, extra, keep=keep, poll=poll, gpus=gpus, defaults=defaults,
                      flags=flags)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
        leftovers = proxy.tagged()
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"instances left running: {[p.pid for p in leftovers]}\n{proxy.logs()}"


def test_routes_models_health_and_unknown(make_proxy) -> None:
    proxy = make_proxy({"alpha": [], "beta": []})
    models = httpx.get(f"{proxy.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["alpha", "beta"] and models["data"][0]["status"] == "stopped"
    reply = proxy.post("alpha", max_tokens=3)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "fake fake fake "
    missing = proxy.post("gamma")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and "alpha, beta" in error["message"]
    bad = httpx.post(f"{proxy.url}/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert wait_for(lambda: proxy.metric("llamactl_requests_total", model="alpha", status="200") == 1)


def test_concurrent_cold_requests_launch_once(make_proxy) -> None:
    proxy = make_proxy({"alpha": ["--fake-ready-after", "1"]})

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            replies = await asyncio.gather(*(client.post(f"{proxy.url}/v1/chat/completions",
                                                         json={"model": "alpha", "messages": []}) for _ in range(12)))
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * 12
    assert proxy.metric("llamactl_launches_total", model="alpha", result="ok") == 1
    assert len(proxy.tagged()) == 1


def test_queue_full_is_429_with_retry_after(make_proxy) -> None:
    proxy = make_proxy({"slow": ["--fake-ready-after", "2"]}, "max_queue = 2")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{proxy.url}/v1/chat/completions",
                                                      json={"model": "slow", "messages": []}) for _ in range(6)))

    replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) == 2 and codes.count(429) == 4
    limited = next(r for r in replies if r.status_code == 429)
    assert limited.headers["Retry-After"] and limited.json()["error"]["code"] == "queue_full"


def test_load_failures_map_by_type_timeout_504_exit_502_oom_503(make_proxy) -> None:
    proxy = make_proxy({"stuck": ["--fake-ready-after", "60"], "broken": ["--fake-exit-at-once", "9"],
                        "huge": ["--fake-oom"]}, 'load_timeout = "1s"')
    start = time.monotonic()
    stuck = proxy.post("stuck")
    assert stuck.status_code == 504 and stuck.json()["error"]["code"] == "load_timeout"
    broken = proxy.post("broken")
    assert broken.status_code == 502 and "exited with code 9" in broken.json()["error"]["message"]
    huge = proxy.post("huge")  # out of memory at load: the model is unavailable, not the upstream broken
    assert huge.status_code == 503 and huge.json()["error"]["code"] == "model_unavailable"
    assert "out of memory while loading" in huge.json()["error"]["message"]
    assert time.monotonic() - start < 20
    for model, result in (("stuck", "timeout"), ("broken", "failed"), ("huge", "oom")):
        assert proxy.metric("llamactl_launches_total", model=model, result=result) == 1, model
    assert not proxy.tagged()


def test_streams_are_byte_identical_to_direct(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    body = {"model": "alpha", "messages": [], "stream": True, "max_tokens": 50}
    via = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=30)
    assert via.status_code == 200 and via.headers["X-Accel-Buffering"] == "no"
    (inst,) = proxy.instances()
    direct = httpx.post(f"http://127.0.0.1:{inst['port']}/v1/chat/completions", json=body, timeout=30)
    assert via.content == direct.content and via.content.endswith(b"data: [DONE]\n\n")
    # counted once the handler returns, which can be just after the client saw the last byte
    assert wait_for(lambda: proxy.metric("llamactl_tokens_total", model="alpha", kind="completion") == 50)


def test_upstream_crash_mid_stream_ends_with_error_then_relaunches(make_proxy) -> None:
    proxy = make_proxy({"flaky": ["--fake-crash-mid-stream", "5"]})
    reply = httpx.post(f"{proxy.url}/v1/chat/completions",
                       json={"model": "flaky", "messages": [], "stream": True, "max_tokens": 20}, timeout=30)
    events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 6 and "upstream_error" in events[-1]
    # the client read to the end: an upstream error, logged and counted as such (it used to be a 499)
    assert wait_for(lambda: proxy.metric("llamactl_requests_total", model="flaky", status="502") == 1)
    assert proxy.metric("llamactl_requests_total", model="flaky", status="499") == 0
    assert "model=flaky status=502" in proxy.logs()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proxy.instances()[0]["state"] != "stopped":
        time.sleep(0.1)
    assert proxy.instances()[0]["state"] == "stopped"
    again = proxy.post("flaky", max_tokens=2)  # non-streaming: no crash; a new process serves it
    assert again.status_code == 200
    assert proxy.metric("llamactl_launches_total", model="flaky", result="ok") == 2


def test_idle_ttl_evicts_but_never_a_busy_instance(make_proxy) -> None:
    proxy = make_proxy({"quick": [], "busy": ["--fake-chunk-delay", "0.1"]}, 'idle_ttl = "1s"')
    assert proxy.post("quick").status_code == 200
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{proxy.url}/v1/chat/completions",
                           json={"model": "busy", "messages": [], "stream": True, "max_tokens": 40}) as stream:
            chunks = sum(1 for _ in stream.iter_lines())  # 4 s of streaming, TTL 1 s
    assert chunks > 40
    states = {i["model"]: i["state"] for i in proxy.instances()}
    assert states["quick"] == "stopped"  # idle past its TTL
    assert proxy.metric("llamactl_launches_total", model="busy", result="ok") == 1  # never evicted mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {i["state"] for i in proxy.instances()} != {"stopped"}:
        time.sleep(0.2)
    assert {i["state"] for i in proxy.instances()} == {"stopped"}
    assert proxy.metric("llamactl_evictions_total", reason="ttl") == 2


def test_max_instances_evicts_the_lru_idle_one(make_proxy) -> None:
    proxy = make_proxy({"a": [], "b": []}, "max_instances = 1")
    assert proxy.post("a").status_code == 200
    assert proxy.post("b").status_code == 200
    states = {i["model"]: i["state"] for i in proxy.instances()}
    assert states == {"a": "stopped", "b": "ready"}
    assert proxy.metric("llamactl_evictions_total", reason="max_instances") == 1


def test_api_keys(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'api_keys = ["sekret"]')
    assert httpx.get(f"{proxy.url}/health").status_code == 200
    denied = httpx.get(f"{proxy.url}/v1/models")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(f"{proxy.url}/v1/models", headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200


def test_body_cap(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'max_body = "1KiB"')
    reply = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "alpha", "messages": [], "pad": "x" * 5000})
    assert reply.status_code == 413 and "too large" in reply.json()["error"]["message"]


def test_sigterm_stops_started_instances_and_exits_0(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    assert proxy.post("alpha").status_code == 200
    assert len(proxy.tagged()) == 1
    assert proxy.stop(signal.SIGTERM) == 0
    assert not proxy.tagged()


def test_keep_instances(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, keep=True)
    assert proxy.post("alpha").status_code == 200
    assert proxy.stop(signal.SIGTERM) == 0
    kept = proxy.tagged()
    assert len(kept) == 1
    out = subprocess.run([sys.executable, "-m", "llamactl", "evict", "--all"], env=proxy.env, capture_output=True, text=True)
    assert out.returncode == 0 and not proxy.tagged()


def test_sighup_reloads_the_config(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    proxy.config.write_text(proxy.config.read_text() + f'[models.gamma]\npath = "{proxy.tmp / "tiny.gguf"}"\n')
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ids = [m["id"] for m in httpx.get(f"{proxy.url}/v1/models").json()["data"]]
        if "gamma" in ids:
            break
        time.sleep(0.1)
    assert ids == ["alpha", "gamma"]
    assert proxy.post("gamma").status_code == 200


def test_hand_started_instance_is_routed_to_not_evicted(make_proxy, tmp_path: Path) -> None:
    proxy = make_proxy({"alpha": []}, 'idle_ttl = "1s"')
    out = subprocess.run([sys.executable, "-m", "llamactl", "launch", str(proxy.tmp / "tiny.gguf"), "--name", "alpha",
                          "--port-start", str(free_port()), "-c", "256"], env=proxy.env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pid = json.loads(subprocess.run([sys.executable, "-m", "llamactl", "ps", "--json"], env=proxy.env,
                                    capture_output=True, text=True).stdout)[0]["pid"]
    assert proxy.post("alpha").status_code == 200
    assert proxy.metric("llamactl_launches_total", model="alpha", result="ok") == 0  # routed, not launched
    # idle for twice its TTL, with several polls meanwhile (a condition on the proxy's own clock, not a sleep)
    assert wait_for(lambda: (next(i for i in proxy.instances() if i["name"] == "alpha")["idle_s"] or 0) >= 2.0, 15)
    assert psutil.pid_exists(pid)  # adopt = false: the TTL does not apply to it
    assert proxy.stop() == 0 and psutil.pid_exists(pid)  # and shutdown leaves it alone
    subprocess.run([sys.executable, "-m", "llamactl", "evict", "--all"], env=proxy.env, capture_output=True)


def test_instance_api_keys_stay_private(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, "instance_api_keys = true")
    assert proxy.post("alpha").status_code == 200  # the proxy sends the key the instance was given
    (inst,) = proxy.instances()
    pid, port = inst["pid"], inst["port"]
    key = psutil.Process(pid).environ()["LLAMA_API_KEY"]  # llama-server reads --api-key from LLAMA_API_KEY
    assert len(key) >= 24
    # the instance really demands it: without the key a direct request is refused
    assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": []}).status_code == 401
    # never on argv (readable by every user in /proc), in ps output, in a log, or in the state file
    assert key not in open(f"/proc/{pid}/cmdline", "rb").read().decode()
    assert key not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    log_dir = proxy.state / "logs"
    assert key not in (log_dir / "alpha.log").read_text() and key not in proxy.logs()
    assert key not in (proxy.state / "state.json").read_text()
    assert log_dir.stat().st_mode & 0o777 == 0o700 and (log_dir / "alpha.log").stat().st_mode & 0o777 == 0o600
    assert (proxy.state / "state.json").stat().st_mode & 0o777 == 0o600


def test_a_ttl_stop_leaves_no_defunct_child(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'idle_ttl = "1s"')
    assert proxy.post("alpha").status_code == 200
    (inst,) = proxy.instances()
    pid = inst["pid"]
    assert wait_for(lambda: proxy.instances()[0]["state"] == "stopped", 15)

    def reaped() -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and psutil.Process(pid).ppid() != proxy.proc.pid
        except psutil.NoSuchProcess:
            return True

    assert wait_for(reaped, 5), "the stopped llama-server is left <defunct> under the proxy"


def test_a_restarted_proxy_adopts_what_the_killed_one_started(make_proxy) -> None:
    """kill -9 the proxy: the next one routes to, counts, expires and stops the instances it finds."""
    proxy = make_proxy({"alpha": [], "beta": []}, "max_instances = 1\ninstance_api_keys = true")
    assert proxy.post("alpha").status_code == 200
    alpha_pid = proxy.instances()[0]["pid"]
    assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
    assert psutil.pid_exists(alpha_pid)  # the instance outlives the proxy
    proxy.start()
    seen = {i["model"]: i for i in proxy.instances()}
    assert seen["alpha"]["state"] == "ready" and seen["alpha"]["pid"] == alpha_pid and seen["alpha"]["started_by_proxy"]
    models = {m["id"]: m["status"] for m in httpx.get(f"{proxy.url}/v1/models").json()["data"]}
    assert models == {"alpha": "ready", "beta": "stopped"}
    assert proxy.post("alpha").status_code == 200  # routed with the key read back from the instance
    assert proxy.metric("llamactl_launches_total", model="alpha", result="ok") == 0
    assert proxy.post("beta").status_code == 200  # max_instances = 1: the adopted alpha counts and is evicted
    assert wait_for(lambda: not psutil.pid_exists(alpha_pid) or psutil.Process(alpha_pid).status() == psutil.STATUS_ZOMBIE)
    beta_pid = {i["model"]: i for i in proxy.instances()}["beta"]["pid"]
    assert proxy.stop(signal.SIGKILL) == -signal.SIGKILL
    proxy.start()
    assert proxy.stop() == 0  # SIGTERM: the adopted beta is stopped like the proxy's own
    assert wait_for(lambda: not psutil.pid_exists(beta_pid) or psutil.Process(beta_pid).status() == psutil.STATUS_ZOMBIE)
    assert not proxy.tagged()


def test_an_adopted_instance_gets_its_ttl(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'idle_ttl = "2s"')
    assert proxy.post("alpha").status_code == 200
    pid = proxy.instances()[0]["pid"]
    proxy.stop(signal.SIGKILL)
    proxy.start()  # (the TTL may run out at the first poll: the log, written before serving, says it adopted)
    assert f"routing to running instance (pid {pid}" in proxy.logs()
    assert wait_for(lambda: not proxy.tagged(), 15), "the adopted instance outlived its TTL"


def test_a_second_proxy_on_a_busy_port_is_one_line_and_touches_nothing(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    assert proxy.post("alpha").status_code == 200
    pid = proxy.instances()[0]["pid"]
    out = subprocess.run(proxy.argv, env=proxy.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"llamactl: error: cannot listen on 127.0.0.1:{proxy.port}: ")
    assert "internal error" not in out.stderr
    assert psutil.pid_exists(pid) and proxy.post("alpha").status_code == 200  # the first proxy's instance runs on


def test_bearer_scheme_is_case_insensitive_and_keys_are_checked(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'api_keys = ["s3cret"]')
    url = f"{proxy.url}/v1/models"
    for header in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):
        assert httpx.get(url, headers={"Authorization": header}).status_code == 200, header
    for header in ("Bearer wrong", "Basic s3cret", "s3cret", ""):
        reply = httpx.get(url, headers={"Authorization": header})
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", header


def test_unknown_routes_are_openai_shaped_and_logged(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    reply = httpx.get(f"{proxy.url}/v1/nothing-here")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "invalid_request_error"
    assert httpx.delete(f"{proxy.url}/v1/models").status_code == 405
    assert wait_for(lambda: "GET /v1/nothing-here model=- status=404" in proxy.logs())


def test_deeply_nested_json_is_a_400_not_a_500(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    body = b'{"model": "alpha", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = httpx.post(f"{proxy.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]["message"]
    assert httpx.get(f"{proxy.url}/health").status_code == 200


def test_a_missing_model_file_is_a_503_naming_the_model_not_the_path(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    (proxy.tmp / "tiny.gguf").unlink()  # gone after the config was read
    reply = proxy.post("alpha")
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_unavailable"
    message = reply.json()["error"]["message"]
    assert message.startswith("alpha: ") and str(proxy.tmp) not in message
    assert str(proxy.tmp / "tiny.gguf") in proxy.logs()  # the operator sees the path


def test_a_state_dir_it_cannot_use_is_a_5xx_never_the_clients_400(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    (proxy.state / "state.json").write_text('{"version": 99, "instances": {}}')  # a newer llamactl's: a StateError
    for reply in (proxy.post("alpha"),
                  httpx.post(f"{proxy.url}/models/alpha/load", json={}, timeout=30)):
        assert 500 <= reply.status_code < 600, reply.text
        error = reply.json()["error"]
        assert error["type"] == "server_error" and "newer llamactl" in error["message"]
    assert not proxy.tagged()


def test_an_instance_evicted_from_another_shell_is_relaunched_not_a_502(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, poll="1h")  # the poller would notice too: keep it out of the way
    assert proxy.post("alpha").status_code == 200
    out = subprocess.run([sys.executable, "-m", "llamactl", "evict", "alpha"], env=proxy.env, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "stopped alpha" in out.stdout
    reply = proxy.post("alpha")
    assert reply.status_code == 200, reply.text
    assert proxy.metric("llamactl_launches_total", model="alpha", result="ok") == 2


# --- slow and vanishing clients, dying upstreams, signals (issue 11) --------------------------------------

def _raw(proxy: Proxy, data: bytes):
    import socket

    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(data)
    return sock


def _read_until_closed(sock, timeout_s: float) -> tuple[bytes, float]:
    started = time.monotonic()
    sock.settimeout(timeout_s)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError:
        pass
    return got, time.monotonic() - started


def test_a_client_that_never_finishes_its_headers_is_cut(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'header_timeout = "1s"')
    sock = _raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
    got, waited = _read_until_closed(sock, 10)
    assert got == b"" and waited < 8, (got, waited)  # closed by the proxy, not by our timeout
    assert httpx.get(f"{proxy.url}/health").status_code == 200


def test_a_body_that_never_arrives_is_a_408(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'body_timeout = "1s"')
    sock = _raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"model\": ")
    got, waited = _read_until_closed(sock, 10)
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got and waited < 8, (got, waited)
    assert wait_for(lambda: "status=408" in proxy.logs())


def test_every_request_is_logged_and_counted_aborted_streams_too(make_proxy) -> None:
    # the instance holds each stream open a while after its [DONE], as a busy server may: a client that
    # hangs up in that gap has its whole answer, whichever of the proxy's steps its close then meets
    proxy = make_proxy({"slow": ["--fake-chunk-delay", "0.2", "--fake-done-delay", "0.5"]})
    assert proxy.post("slow", max_tokens=1).status_code == 200  # loaded
    def request(max_tokens: int) -> bytes:
        body = json.dumps({"model": "slow", "messages": [], "stream": True, "max_tokens": max_tokens}).encode()
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    for _ in range(12):  # read the first chunk, then hang up mid-stream
        sock = _raw(proxy, request(50))
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()
    done = 0
    for _ in range(3):  # read to [DONE], then hang up at once: a whole answer, so a 200
        sock = _raw(proxy, request(2))
        got = b""
        sock.settimeout(10)
        while b"[DONE]" not in got:
            got += sock.recv(4096)
        sock.close()
        done += 1
    assert wait_for(lambda: proxy.logs().count("model=slow status=499") == 12, 10), proxy.logs()[-3000:]
    assert proxy.metric("llamactl_requests_total", model="slow", status="499") == 12
    assert wait_for(lambda: proxy.metric("llamactl_requests_total", model="slow", status="200") == 1 + done, 5)


def test_a_stream_whose_instance_dies_is_followed_by_a_relaunch_every_time(make_proxy) -> None:
    proxy = make_proxy({"flaky": ["--fake-crash-mid-stream", "3"]})
    for round_ in range(5):
        reply = httpx.post(f"{proxy.url}/v1/chat/completions",
                           json={"model": "flaky", "messages": [], "stream": True, "max_tokens": 20}, timeout=30)
        assert reply.status_code == 200 and "upstream_error" in reply.text, round_
        again = proxy.post("flaky", max_tokens=2)  # at once: no waiting for the poller
        assert again.status_code == 200, (round_, again.text)
    assert proxy.metric("llamactl_launches_total", model="flaky", result="ok") == 6


def test_sigterm_gives_streams_exactly_the_grace(make_proxy) -> None:
    proxy = make_proxy({"slow": ["--fake-chunk-delay", "0.25"]})
    proxy.stop()
    proxy.argv[proxy.argv.index("--grace") + 1] = "2s"
    proxy.start()
    assert proxy.post("slow", max_tokens=1).status_code == 200
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60,
                      json={"model": "slow", "messages": [], "stream": True, "max_tokens": 400}) as stream:
        pieces = stream.iter_raw()
        next(pieces)
        proxy.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            for _ in pieces:
                pass
        except httpx.HTTPError:
            pass
        cut_after = time.monotonic() - signalled
    assert 1.8 <= cut_after <= 3.5, cut_after  # was ~2x the grace (aiohttp waits, then cancels and waits again)
    assert proxy.proc.wait(timeout=30) == 0 and not proxy.tagged()
    assert "model=slow status=503" in proxy.logs()


def test_sighup_applies_max_body_and_restarts_a_changed_model(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'max_body = "1KiB"')
    pad = "x" * 4000
    assert proxy.post("alpha", pad=pad).status_code == 413
    assert proxy.post("alpha").status_code == 200
    (before,) = [i["pid"] for i in proxy.instances()]
    text = proxy.config.read_text().replace('max_body = "1KiB"', 'max_body = "1MiB"').replace("ctx_size = 256", "ctx_size = 512")
    proxy.config.write_text(text)
    proxy.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: proxy.post("alpha", pad=pad).status_code == 200, 10)
    # idle, the old instance is stopped by the poller (the request above may already have started the new one)
    assert wait_for(lambda: proxy.instances()[0]["state"] == "stopped" or proxy.instances()[0]["pid"] not in (before, None), 10)
    assert proxy.post("alpha").status_code == 200  # and started again, with the new settings
    assert proxy.instances()[0]["pid"] != before
    (inst,) = proxy.tagged()
    assert "512" in inst.cmdline()[inst.cmdline().index("--ctx-size") + 1]
    assert "config changed" in proxy.logs()


def test_what_clients_send_cannot_forge_log_lines(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    reply = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "x\nGET /forged status=200 " + "y" * 500})
    assert reply.status_code == 404
    line = next(line for line in proxy.logs().splitlines() if "/v1/chat/completions" in line and "model=x" in line)
    assert "\\n" in line and "forged" in line and len(line) < 400
    assert not any(line.startswith("GET /forged") for line in proxy.logs().splitlines())


def test_status_carries_each_instances_slots_and_speed(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    assert proxy.post("alpha", max_tokens=4).status_code == 200
    seen: list[dict] = []

    def polled() -> bool:  # one snapshot holds all three (a poll that timed out leaves them None a second)
        seen[:] = proxy.instances()
        return seen[0].get("slots_total") == 4 and seen[0]["slots_busy"] == 0 and seen[0]["tokens_per_s"] is not None
    assert wait_for(polled, 10), seen  # what `top --url` shows
