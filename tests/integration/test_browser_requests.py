"""A page the user visits is not a client: the proxy (default config, no keys) refuses what a browser sends
for a cross-site page or a DNS-rebound name, with a real browser's request shape, and still serves its own
page, curl and the openai client."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.integration.test_proxy import make_proxy  # noqa: F401  (the fixture: a real proxy over fake servers)

CROSS_SITE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}


def test_a_cross_site_simple_request_cannot_load_a_model(make_proxy) -> None:
    proxy = make_proxy({"alpha": [], "beta": []})
    # a form or no-cors fetch: text/plain, an Origin of another site
    reply = httpx.post(f"{proxy.url}/models/beta/load", content=b"{}",
                       headers={**CROSS_SITE, "Content-Type": "text/plain"}, timeout=10)
    assert reply.status_code == 403 and "allowed_origins" in reply.json()["error"]["message"]
    assert "access-control-allow-origin" not in reply.headers
    chat = httpx.post(f"{proxy.url}/v1/chat/completions", content=b'{"model": "alpha", "messages": []}',
                      headers={**CROSS_SITE, "Content-Type": "text/plain"}, timeout=10)
    assert chat.status_code == 403
    # without an Origin (a browser that leaves it out, or an old one) the content type still stops it
    plain = httpx.post(f"{proxy.url}/models/beta/load", content=b"{}", headers={"Content-Type": "text/plain"},
                       timeout=10)
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    form = httpx.post(f"{proxy.url}/v1/chat/completions", data={"model": "alpha"}, timeout=10)
    assert form.status_code == 415
    assert all(i["state"] == "stopped" for i in proxy.instances()), "a refused request started a model"
    assert not proxy.tagged()
    # a preflight from that page gets no CORS grant
    pre = httpx.options(f"{proxy.url}/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"}, timeout=10)
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers
    # the proxy's own clients go on: curl/openai (no Origin, JSON) and the page's own origin
    assert proxy.post("alpha", max_tokens=2).status_code == 200
    same = httpx.post(f"{proxy.url}/models/beta/load", json={}, timeout=30,
                      headers={"Origin": proxy.url, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200 and same.json()["state"] == "ready"


def test_a_rebound_name_is_refused_everywhere(make_proxy) -> None:
    """DNS rebinding: the attacker's name resolves to 127.0.0.1, so the browser sends `Host: evil.example`."""
    proxy = make_proxy({"alpha": []})
    rebound = {"Host": f"evil.example:{proxy.port}"}
    for method, path in (("GET", "/status"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/"),
                         ("GET", "/status/stream")):
        reply = httpx.request(method, f"{proxy.url}{path}", headers=rebound, timeout=10)
        assert reply.status_code == 403, (path, reply.status_code)
        assert "allowed_hosts" in reply.json()["error"]["message"]
    chat = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "alpha", "messages": []},
                      headers=rebound, timeout=10)
    assert chat.status_code == 403
    assert proxy.instances()[0]["state"] == "stopped"
    assert httpx.get(f"{proxy.url}/health", headers={"Host": f"localhost:{proxy.port}"}, timeout=10).status_code == 200
    # refused requests are logged like every other
    assert f"GET /status model=- status=403" in proxy.logs()


def test_allowed_hosts_and_origins_open_what_the_operator_names(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'allowed_hosts = ["gpu-box.lan"]\nallowed_origins = ["http://localhost:3000"]')
    assert httpx.get(f"{proxy.url}/v1/models", headers={"Host": "gpu-box.lan:80"}, timeout=10).status_code == 200
    assert httpx.get(f"{proxy.url}/v1/models", headers={"Host": "other.lan"}, timeout=10).status_code == 403
    pre = httpx.options(f"{proxy.url}/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"}, timeout=10)
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "Content-Type" in pre.headers["access-control-allow-headers"]
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=30, headers={"Origin": "http://localhost:3000"},
                      json={"model": "alpha", "messages": [], "stream": True, "max_tokens": 2}) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == "http://localhost:3000"  # streams carry it too
        stream.read()


def test_the_page_cannot_be_framed_and_has_a_strict_policy(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    page = httpx.get(f"{proxy.url}/ui", timeout=10)
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert httpx.get(f"{proxy.url}/ui/app.js", timeout=10).headers["x-content-type-options"] == "nosniff"


def test_listening_beyond_loopback_without_keys_is_refused(tmp_path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('host = "0.0.0.0"\n')
    env_argv = [sys.executable, "-m", "llamactl", "--config", str(config), "proxy", "--check"]
    from tests.fakes.binary import fake_server_binary

    env = {**__import__("os").environ, "LLAMA_SERVER": str(fake_server_binary())}
    out = subprocess.run(env_argv, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "without api_keys" in out.stderr and "--insecure-no-auth" in out.stderr
    assert "Traceback" not in out.stderr
    config.write_text('host = "0.0.0.0"\napi_keys = ["k1"]\n')
    assert subprocess.run(env_argv, capture_output=True, text=True, timeout=60, env=env).returncode == 0
    config.write_text('host = "0.0.0.0"\n')
    ok = subprocess.run(env_argv + ["--insecure-no-auth"], capture_output=True, text=True, timeout=60, env=env)
    assert ok.returncode == 0 and "anyone who reaches it" in ok.stderr


def test_requests_refused_before_forwarding_are_counted(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, 'max_body = "2KiB"')
    url = f"{proxy.url}/v1/chat/completions"
    assert httpx.post(url, json={"model": "nosuch", "messages": []}, timeout=10).status_code == 404
    assert httpx.post(url, content=b"{nope", headers={"Content-Type": "application/json"}, timeout=10).status_code == 400
    assert httpx.post(url, content=b"{}", headers={"Content-Type": "text/plain"}, timeout=10).status_code == 415
    assert httpx.post(url, json={"model": "alpha"}, headers={"Origin": "http://evil.example"}, timeout=10).status_code == 403
    assert httpx.post(url, json={"model": "alpha", "x": "y" * 4096}, timeout=10).status_code == 413
    for status, n in (("404", 1), ("400", 1), ("415", 1), ("403", 1), ("413", 1)):
        assert proxy.metric("llamactl_requests_total", model="-", status=status) == n, status
    assert proxy.post("alpha", max_tokens=1).status_code == 200
    assert proxy.metric("llamactl_requests_total", model="alpha", status="200") == 1  # counted once, not twice


def test_a_wide_body_is_refused_unparsed_and_the_loop_keeps_answering(make_proxy) -> None:
    """Four 60 MiB bodies of `[{},{},...]` (20 million values each) at once: each is a 413 naming the limit;
    meanwhile /health keeps answering and the proxy's RSS grows by less than 4x the bytes received (it used
    to stall /health for seconds and reach 1.9 GB for four bodies: 8x)."""
    import threading
    import time

    import psutil

    from llamactl.proxy.bodies import MAX_VALUES

    proxy = make_proxy({"alpha": []})
    body = b'{"model": "nosuch", "x": [' + b"{}," * (20 * 2**20) + b'{}]}'
    me = psutil.Process(proxy.proc.pid)
    assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200
    before = me.memory_info().rss
    peak, latencies, replies = [before], [], []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(me.memory_info().rss)
            start = time.monotonic()
            httpx.get(f"{proxy.url}/health", timeout=30)
            latencies.append(time.monotonic() - start)
            done.wait(0.02)

    def send() -> None:
        replies.append(httpx.post(f"{proxy.url}/v1/chat/completions", content=body, timeout=120,
                                  headers={"Content-Type": "application/json"}))

    sampler = threading.Thread(target=sample)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(180)
    done.set()
    sampler.join(30)
    assert [r.status_code for r in replies] == [413] * 4
    assert str(MAX_VALUES) in replies[0].json()["error"]["message"]
    grown = max(peak) - before
    assert grown < 4 * 4 * len(body), f"RSS grew by {grown / 2**20:.0f} MiB for 4 x {len(body) / 2**20:.0f} MiB"
    # the median, which a busy 2-core box's spikes do not move (bench/wide_body.py measures the rest): a parse on
    # the proxy's interpreter held /health for 0.76 s at the median and 3.1 s at most
    median = sorted(latencies)[len(latencies) // 2]
    assert median < 0.3, f"/health took {median:.2f} s at the median, {max(latencies):.2f} s at most"
    assert proxy.post("alpha", max_tokens=1).status_code == 200  # and a normal request goes on


def test_metrics_follow_prometheus_conventions(make_proxy) -> None:
    """Counters end in _total, no _created series, units in the names of timings and sizes; lint on the
    real exposition after traffic (a launch, a request, a refused one)."""
    from prometheus_client.parser import text_string_to_metric_families

    proxy = make_proxy({"alpha": []})
    assert proxy.post("alpha", max_tokens=1).status_code == 200
    assert proxy.post("nosuch").status_code == 404
    text = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert not [line for line in text.splitlines() if "_created" in line.split(" ")[0]]
    for family in families.values():
        assert family.name.startswith("llamactl_")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
    assert {"llamactl_requests", "llamactl_launches", "llamactl_evictions", "llamactl_tokens"} <= {
        n for n, f in families.items() if f.type == "counter"}
    assert proxy.metric("llamactl_launches_total", model="alpha", result="ok") == 1


def test_proxy_check_catches_a_missing_binary_and_suggests_the_nearest_key(tmp_path) -> None:
    import os

    config = tmp_path / "c.toml"
    config.write_text("")
    env = {**os.environ, "LLAMA_SERVER": str(tmp_path / "nothing-here"), "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "llamactl", "--config", str(config), "proxy", "--check"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "llama-server" in out.stderr, out.stderr
    config.write_text('idle_tl = "5m"\n')
    typo = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert typo.returncode == 2 and "did you mean `idle_ttl`?" in typo.stderr, typo.stderr
