"""Remote models and upstreams: a front proxy relaying to a back proxy on loopback, both real processes with fake
llama-servers behind the back one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.integration.test_proxy import make_proxy, wait_for  # noqa: F401 - the fixture

BACK_KEY = "back-key-0c4f7e"


def _front_config(back_url: str) -> str:
    return (f'[models.alpha]\nurl = "{back_url}"\napi_key = "{BACK_KEY}"\n'
            f'[upstreams.back]\nurl = "{back_url}"\napi_key = "{BACK_KEY}"\n')


def _models(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def _rows(url: str) -> dict[str, dict]:
    return {i["name"]: i for i in httpx.get(f"{url}/status", timeout=10).json()["instances"]}


def test_a_front_proxy_serves_the_back_ones_models_then_503_naming_it_then_recovers(make_proxy) -> None:
    back = make_proxy({"alpha": [], "beta": []}, f'api_keys = ["{BACK_KEY}"]')
    front = make_proxy({}, _front_config(back.url))
    # alpha is the front's own url model; beta is imported from the back's /v1/models (alpha is not: configured)
    assert wait_for(lambda: set(_models(front.url)) == {"alpha", "beta"}, 10), _models(front.url)
    listed = _models(front.url)
    assert listed["alpha"]["upstreams"] == ["alpha"] and listed["beta"]["upstreams"] == ["back"]
    assert listed["beta"]["status"] == "ready"

    reply = front.post("beta", max_tokens=3)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "fake fake fake "
    auth = {"Authorization": f"Bearer {BACK_KEY}"}
    back_rows = {i["name"]: i for i in httpx.get(f"{back.url}/status", headers=auth, timeout=10).json()["instances"]}
    assert back_rows["beta"]["state"] == "ready" and back_rows["alpha"]["state"] == "stopped"

    body = {"model": "alpha", "messages": [], "stream": True, "max_tokens": 40}
    via = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=30)
    direct = httpx.post(f"{back.url}/v1/chat/completions", json=body, headers=auth, timeout=30)
    assert via.status_code == direct.status_code == 200
    assert via.content == direct.content and via.content.endswith(b"data: [DONE]\n\n")

    assert wait_for(lambda: front.metric("llamactl_requests_total", model="beta", status="200") == 1)
    assert wait_for(lambda: front.metric("llamactl_tokens_total", model="alpha", kind="completion") == 40)
    assert front.metric("llamactl_upstream_up", upstream="back") == 1
    rows = _rows(front.url)
    assert rows["beta@back"]["state"] == "ready" and rows["beta@back"]["latency_ms"] is not None
    assert rows["alpha"]["upstream"] == "alpha" and rows["alpha"]["url"] == back.url

    back.stop()
    down = front.post("beta")
    assert down.status_code == 503, down.text
    assert f"upstream back ({back.url})" in down.json()["error"]["message"]
    assert wait_for(lambda: _rows(front.url)["beta@back"]["state"] == "unreachable", 10)
    assert _models(front.url)["beta"]["status"] == "unreachable"
    assert front.metric("llamactl_upstream_up", upstream="back") == 0
    alpha = front.post("alpha")
    assert alpha.status_code == 503 and f"upstream alpha ({back.url})" in alpha.json()["error"]["message"]

    back.start()
    assert wait_for(lambda: front.post("beta", max_tokens=2).status_code == 200, 15), front.logs()
    assert wait_for(lambda: front.post("alpha", max_tokens=2).status_code == 200, 15)
    assert _rows(front.url)["beta@back"]["state"] == "ready"

    # the back's key went to it (it answers nothing without one) and shows nowhere on the front
    assert BACK_KEY not in front.logs()
    assert BACK_KEY not in httpx.get(f"{front.url}/status", timeout=10).text
    assert BACK_KEY not in httpx.get(f"{front.url}/running", timeout=10).text
    assert "upstream back is unreachable" in front.logs() and "upstream back is reachable again" in front.logs()


def test_a_wrong_key_leaves_the_upstream_unreachable_and_its_models_unlisted(make_proxy) -> None:
    back = make_proxy({"alpha": []}, f'api_keys = ["{BACK_KEY}"]')
    front = make_proxy({}, f'[upstreams.back]\nurl = "{back.url}"\napi_key = "not-the-key"\n')
    assert wait_for(lambda: 'llamactl_upstream_up{upstream="back"} 0.0' in httpx.get(f"{front.url}/metrics").text, 10)
    assert _models(front.url) == {}
    assert front.post("alpha").status_code == 404


def test_a_model_on_two_upstreams_goes_to_the_one_with_a_free_slot(make_proxy) -> None:
    one = make_proxy({"alpha": ["--fake-chunk-delay", "0.1"]})
    two = make_proxy({"alpha": []})
    front = make_proxy({}, f'[upstreams.one]\nurl = "{one.url}"\n[upstreams.two]\nurl = "{two.url}"\n')
    assert wait_for(lambda: _models(front.url).get("alpha", {}).get("upstreams") == ["one", "two"], 10)

    def served(proxy) -> float:
        return proxy.metric("llamactl_requests_total", model="alpha", status="200")

    # loaded on both (a stopped model has no free slot), one first: whichever poll the front saw, one is free
    for box in (one, two):
        assert box.post("alpha", max_tokens=2).status_code == 200
    assert wait_for(lambda: _rows(front.url)["alpha@two"]["slots_total"] == 4, 10)
    assert front.post("alpha", max_tokens=2).status_code == 200
    assert wait_for(lambda: served(one) == 2) and served(two) == 1  # both free: the first

    # one's four slots (the fake's) taken by slow streams sent to it directly: its /running shows none free
    with ThreadPoolExecutor(4) as pool:
        body = {"model": "alpha", "messages": [], "stream": True, "max_tokens": 100}
        slow = [pool.submit(httpx.post, f"{one.url}/v1/chat/completions", json=body, timeout=60) for _ in range(4)]
        assert wait_for(lambda: _rows(front.url)["alpha@one"]["slots_busy"] == 4, 10)  # the front's poll saw it
        assert front.post("alpha", max_tokens=2).status_code == 200
        assert wait_for(lambda: served(two) == 2) and served(one) == 2
        assert all(not s.done() for s in slow)  # one was full all along
        assert all(s.result().status_code == 200 for s in slow)


def _running(url: str) -> dict[str, dict]:
    return {i["name"]: i for i in httpx.get(f"{url}/running", timeout=10).json()["running"]}
