"""The proxy's management routes and llama-server's passthrough routes, against fake llama-servers: with and
without keys, `/running`, unload of every model (waiting, forced), `/v1/models/{id}`, keep_alive, per-model
env, and `llamactl ctl` acting on a running proxy."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.integration.test_proxy import make_proxy, wait_for  # noqa: F401  (the fixture)

KEY = {"Authorization": "Bearer sekret"}
ENV_TABLE = '[models.alpha.env]\nFAKE_ENV_GREETING = "hello there"'


def test_management_and_passthrough_routes_need_the_key(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'api_keys = ["sekret"]')
    gets = ["/running", "/v1/models/alpha", "/props?model=alpha", "/slots?model=alpha", "/status"]
    posts = ["/models/unload", "/models/alpha/load", "/tokenize", "/v1/messages"]
    for path in gets:
        assert httpx.get(proxy.url + path, timeout=10).status_code == 401, path
    for path in posts:
        reply = httpx.post(proxy.url + path, json={"model": "alpha", "content": "x"}, timeout=10)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{proxy.url}/running", timeout=10, headers=KEY).json() == {"running": []}  # nothing started
    assert httpx.post(f"{proxy.url}/tokenize", json={"model": "alpha", "content": "x"}, headers=KEY,
                      timeout=30).status_code == 200
    assert httpx.get(f"{proxy.url}/props?model=alpha", headers=KEY, timeout=10).status_code == 200
    assert httpx.post(f"{proxy.url}/models/unload", json={}, headers=KEY, timeout=30).json()["stopped"] == ["alpha"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/tokenize",
                                  "/detokenize", "/apply-template", "/v1/rerank", "/infill"])
def test_llama_server_routes_are_routed_by_the_body_s_model(make_proxy, path: str) -> None:
    proxy = make_proxy({"alpha": [], "beta": []})
    reply = httpx.post(proxy.url + path, json={"model": "beta", "content": "hi", "max_tokens": 2}, timeout=30)
    assert reply.status_code == 200 and reply.json()["path"] == path
    assert {i["model"]: i["state"] for i in proxy.instances()} == {"alpha": "stopped", "beta": "ready"}
    assert wait_for(lambda: proxy.metric("llamactl_requests_total", model="beta", status="200") == 1)


def test_a_look_at_props_or_slots_never_starts_a_model(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, defaults=ENV_TABLE)
    for path in ("/props?model=alpha", "/slots?model=alpha"):
        refused = httpx.get(proxy.url + path, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_running"
    assert proxy.instances()[0]["state"] == "stopped"
    assert httpx.get(f"{proxy.url}/props", timeout=10).status_code == 400  # which model?
    assert proxy.post("alpha").status_code == 200
    props = httpx.get(f"{proxy.url}/props?model=alpha&fail_on_no_slot=1", timeout=10).json()
    # the model's env reached its llama-server; the query went on without `model`
    assert props["env"] == {"FAKE_ENV_GREETING": "hello there"} and props["query"] == "fail_on_no_slot=1"
    assert len(httpx.get(f"{proxy.url}/slots?model=alpha", timeout=10).json()) == 4
    for method, path in (("POST", "/slots?model=alpha&action=erase"), ("POST", "/props?model=alpha")):
        assert httpx.request(method, proxy.url + path, json={}, timeout=10).status_code == 405
    unknown = httpx.get(f"{proxy.url}/v1/nothing", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"


def test_a_model_by_its_name_or_alias_with_its_state(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    proxy.config.write_text(proxy.config.read_text().replace("[models.alpha]\n", '[models.alpha]\naliases = ["org/chat-model"]\n'))
    proxy.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "config reloaded" in proxy.logs())
    by_alias = httpx.get(f"{proxy.url}/v1/models/org/chat-model", timeout=10).json()
    assert by_alias == {"id": "alpha", "object": "model", "created": 0, "owned_by": "llamactl",
                        "aliases": ["org/chat-model"], "status": "stopped"}
    proxy.post("org/chat-model")
    assert httpx.get(f"{proxy.url}/v1/models/alpha", timeout=10).json()["status"] == "ready"
    missing = httpx.get(f"{proxy.url}/v1/models/gamma", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_keep_alive_is_stripped_and_sets_the_ttl(make_proxy) -> None:
    proxy = make_proxy({"alpha": [], "beta": []}, 'idle_ttl = "1h"')
    reply = proxy.post("alpha", keep_alive=0)
    assert reply.status_code == 200 and "keep_alive" not in reply.json()["fields"]  # llama-server never sees it
    assert wait_for(lambda: proxy.instances()[0]["state"] == "stopped")
    assert proxy.metric("llamactl_evictions_total", reason="keep_alive") == 1
    proxy.post("beta", keep_alive="-1")
    beta = next(i for i in httpx.get(f"{proxy.url}/running", timeout=10).json()["running"] if i["name"] == "beta")
    assert beta["ttl_s"] is None and beta["ttl_left_s"] is None  # negative: kept loaded
    proxy.post("beta", keep_alive="90s")
    beta = httpx.get(f"{proxy.url}/running", timeout=10).json()["running"][0]
    assert beta["ttl_s"] == 90 and 0 < beta["ttl_left_s"] <= 90
    bad = proxy.post("beta", keep_alive="soon")
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]["message"]


def test_running_says_what_runs(make_proxy) -> None:
    proxy = make_proxy({"alpha": [], "beta": []}, 'idle_ttl = "10m"', gpus="24GiB")
    proxy.post("beta")
    (beta,) = httpx.get(f"{proxy.url}/running", timeout=10).json()["running"]
    assert beta["name"] == "beta" and beta["state"] == "ready" and beta["gpu_ids"] == [0]
    assert beta["estimated_bytes"] > 0 and beta["in_flight"] == 0 and beta["idle_s"] >= 0
    assert beta["ttl_s"] == 600 and 0 < beta["ttl_left_s"] <= 600 and beta["pid"]


def _stream(proxy, model: str, out: list) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60,
                              json={"model": model, "messages": [], "stream": True, "max_tokens": 40}) as reply:
                out.append(b"".join(reply.iter_raw()))
        except httpx.HTTPError as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_unload_all_waits_for_requests_or_cuts_them_with_force(make_proxy) -> None:
    proxy = make_proxy({"alpha": ["--fake-chunk-delay", "0.25"], "beta": []})
    proxy.post("beta")
    out: list = []
    thread = _stream(proxy, "alpha", out)
    assert wait_for(lambda: any(i["in_flight"] for i in proxy.instances()), 20)
    waited = httpx.post(f"{proxy.url}/models/unload?wait=0.5s", json={}, timeout=30)
    assert waited.status_code == 503 and "alpha (ready, 1 in flight" in waited.json()["error"]["message"]
    assert {i["model"]: i["state"] for i in proxy.instances()} == {"alpha": "ready", "beta": "stopped"}
    forced = httpx.post(f"{proxy.url}/models/unload?force=true", json={}, timeout=30)
    assert forced.status_code == 200 and forced.json() == {"stopped": ["alpha"], "not_ours": []}
    thread.join(30)
    assert out and (isinstance(out[0], Exception) or b"[DONE]" not in out[0])  # cut mid-stream
    assert {i["state"] for i in proxy.instances()} == {"stopped"}
    assert wait_for(lambda: "POST /v1/chat/completions model=alpha status=503" in proxy.logs())
    assert httpx.post(f"{proxy.url}/models/unload?wait=soon", json={}, timeout=10).status_code == 400


def _ctl(proxy, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "llamactl", "--config", str(proxy.config), "ctl", *args]
    return subprocess.run(argv, env=env or proxy.env, capture_output=True, text=True, timeout=120)


def test_ctl_loads_lists_and_unloads_on_a_running_proxy(make_proxy, tmp_path: Path) -> None:
    proxy = make_proxy({"alpha": [], "beta": []}, 'api_keys = ["sekret"]')
    env = {k: v for k, v in proxy.env.items() if k != "LLAMACTL_API_KEY"}
    loaded = _ctl(proxy, "load", "alpha", env=env)  # the config's own key, for the config's own proxy
    assert loaded.returncode == 0 and loaded.stdout.strip() == "alpha: ready", loaded.stderr
    listed = _ctl(proxy, "running", "--json", env=env)
    assert [r["name"] for r in json.loads(listed.stdout)] == ["alpha"]
    table = _ctl(proxy, "running", env=env).stdout
    assert table.splitlines()[0].split()[:2] == ["MODEL", "STATE"] and "alpha" in table
    wrong = _ctl(proxy, "running", "--url", proxy.url, env={**env, "LLAMACTL_API_KEY": "nope"})
    assert wrong.returncode == 1 and "refused the API key" in wrong.stderr
    keyless = _ctl(proxy, "running", "--url", proxy.url, env=env)  # another proxy: the config's key is not sent
    assert keyless.returncode == 1 and "wants an API key" in keyless.stderr
    key_file = tmp_path / "key"
    key_file.write_text("sekret\n")
    one = _ctl(proxy, "unload", "alpha", "--url", proxy.url, "--api-key-file", str(key_file), env=env)
    assert one.returncode == 0 and one.stdout.strip() == "alpha: stopped", one.stderr
    _ctl(proxy, "load", "beta", env=env)
    every = _ctl(proxy, "unload", "--all", "--json", env=env)
    assert every.returncode == 0 and json.loads(every.stdout)["stopped"] == ["beta"]
    unknown = _ctl(proxy, "load", "gamma", env=env)
    assert unknown.returncode == 1 and "model 'gamma' not found" in unknown.stderr
    assert _ctl(proxy, "unload", env=env).returncode == 2  # NAME or --all
