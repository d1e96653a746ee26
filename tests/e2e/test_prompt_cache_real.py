"""keep_cache with the real llama-server: a long prompt's cache survives an unload, so the same prompt after the
next start evaluates only its last tokens; the same file without keep_cache evaluates all of them again."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from llamactl.model.demo_model import write_demo_model
from llamactl.servers.buffers import free_port
from tests.e2e.proxyproc import running_proxy

pytestmark = pytest.mark.timeout(300)

PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 50)  # ~500 tokens with the demo's vocabulary
AUTH = {"Authorization": "Bearer test-key"}


@pytest.fixture(scope="module")
def proxy(server_binary: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cache")
    demo = write_demo_model(tmp / "demo.gguf")
    config = (f'port_start = {free_port()}\npoll_interval = "0.5s"\napi_keys = ["test-key"]\n'
              f'instance_api_keys = true\n'  # the slot API is called with the instance's own key
              f'[defaults]\nctx_size = 4096\n'  # llamactl's default slots: 4 sharing one unified cache
              f'[models.cached]\npath = "{demo}"\nkeep_cache = true\n'
              f'[models.plain]\npath = "{demo}"\n')
    with running_proxy(tmp, config, server_binary) as (url, _):
        yield url, tmp / "state"


def ask(url: str, model: str) -> dict:
    reply = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=120,
                       json={"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["timings"]


def unload(url: str, model: str) -> None:
    reply = httpx.post(f"{url}/models/{model}/unload", headers=AUTH, json={}, timeout=60)
    assert reply.status_code == 200, reply.text


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("model", ["cached", "plain"])
def test_the_prompt_cache_survives_an_unload_only_with_keep_cache(proxy, model: str) -> None:
    url, state = proxy
    first = ask(url, model)
    assert first["prompt_n"] > 400 and first["cache_n"] == 0
    unload(url, model)
    again = ask(url, model)  # a new instance: a restored slot, or nothing
    if model == "cached":
        assert again["cache_n"] >= first["prompt_n"] - 8 and again["prompt_n"] <= 8, again
        directory = state / "slot-cache" / "cached"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert len(list(directory.glob("*.bin"))) == 1  # the one slot that held a prompt
        assert metric(url, "llamactl_cache_saves_total", model="cached", result="ok") == 1
        assert metric(url, "llamactl_cache_restores_total", model="cached", result="ok") == 1
        assert metric(url, "llamactl_cache_bytes", model="cached") > 0
    else:
        assert again["prompt_n"] == first["prompt_n"] and again["cache_n"] == 0
        assert not (state / "slot-cache" / "plain").exists()


def test_a_damaged_file_is_logged_and_ignored_and_stale_ones_go(proxy) -> None:
    url, state = proxy
    directory = state / "slot-cache" / "cached"
    ask(url, "cached")
    unload(url, "cached")
    (saved,) = directory.glob("*.bin")
    with open(saved, "r+b") as damaged:
        damaged.truncate(100)
    stale = directory / "0123456789abcdef-0.bin"  # a launch with other settings
    stale.write_bytes(b"x" * 1000)
    failed = metric(url, "llamactl_cache_restores_total", model="cached", result="failed")
    again = ask(url, "cached")  # the start goes on: the request is answered, evaluating the whole prompt
    assert again["cache_n"] == 0 and again["prompt_n"] > 400
    assert metric(url, "llamactl_cache_restores_total", model="cached", result="failed") == failed + 1
    assert list(directory.iterdir()) == []  # the damaged file and the stale one removed
