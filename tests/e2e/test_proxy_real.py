"""The proxy with the real llama-server, driven by the official openai client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from llamactl.model.demo_model import write_demo_model
from llamactl.servers.buffers import free_port
from tests.e2e.proxyproc import running_proxy
from tests.synth import ModelSpec, write_model


@pytest.fixture(scope="module")
def proxy(server_binary: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("proxy")
    demo = write_demo_model(tmp / "demo.gguf")
    small = write_model(tmp / "small.gguf", ModelSpec(n_vocab=2048, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256))
    config = (f'port_start = {free_port()}\npoll_interval = "0.5s"\napi_keys = ["test-key"]\n'
              f'[defaults]\nctx_size = 1024\n'
              f'[models.demo]\npath = "{demo}"\naliases = ["gpt-4o-mini"]\n'
              f'[models.small]\npath = "{small}"\nparallel = 2\n')
    with running_proxy(tmp, config, server_binary) as (url, env):
        yield url, env
    out = subprocess.run([sys.executable, "-m", "llamactl", "ps", "--json"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"  # the proxy stopped what it started


def client(url: str, key: str = "test-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_list(proxy) -> None:
    url, _ = proxy
    ids = [m.id for m in client(url).models.list().data]
    assert ids == ["demo", "small"]


def test_chat_plain_and_streamed(proxy) -> None:
    url, _ = proxy
    c = client(url)
    reply = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                   extra_body={"ignore_eos": True})  # a random model may sample its end early
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens == 8
    assert reply.model == "demo"  # the configured name (llama-server's --alias), not the file's path
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              c.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                        stream=True, extra_body={"ignore_eos": True}) if chunk.choices]
    assert len(pieces) >= 2 and "".join(pieces)


def test_errors_map_to_client_exceptions(proxy) -> None:
    url, _ = proxy
    with pytest.raises(openai.NotFoundError) as info:
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "known models: demo, small" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()


def test_status_shows_gpus_and_instances(proxy) -> None:
    url, env = proxy
    client(url).chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    status = httpx.get(f"{url}/status", headers={"Authorization": "Bearer test-key"}).json()
    assert status["gpus"] == []
    demo = next(i for i in status["instances"] if i["model"] == "demo")
    assert demo["state"] == "ready" and demo["pid"] and demo["started_by_proxy"]
    out = subprocess.run([sys.executable, "-m", "llamactl", "ps", "--json"], env=env, capture_output=True, text=True)
    assert "demo" in out.stdout  # `llamactl ps` in another shell sees what the proxy started


def test_llama_server_routes_pass_through(proxy) -> None:
    """/tokenize, /detokenize and Anthropic's /v1/messages reach the real llama-server by the body's model;
    /props by ?model=; a keep_alive is taken out before llama-server sees the body."""
    url, _ = proxy
    key = {"Authorization": "Bearer test-key"}
    tokens = httpx.post(f"{url}/tokenize", json={"model": "small", "content": "hello world"}, headers=key, timeout=120)
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    text = httpx.post(f"{url}/detokenize", json={"model": "small", "tokens": ids}, headers=key, timeout=60)
    assert text.status_code == 200 and isinstance(text.json()["content"], str)
    message = httpx.post(f"{url}/v1/messages", headers=key, timeout=120, json={
        "model": "gpt-4o-mini", "max_tokens": 4, "keep_alive": "10m",
        "messages": [{"role": "user", "content": "hi"}]})
    assert message.status_code == 200, message.text
    body = message.json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["content"][0]["type"] == "text"
    assert 1 <= body["usage"]["output_tokens"] <= 4
    props = httpx.get(f"{url}/props?model=demo", headers=key, timeout=30)
    assert props.status_code == 200 and props.json()["model_path"].endswith("demo.gguf")
    running = httpx.get(f"{url}/running", headers=key, timeout=30).json()["running"]
    assert next(r for r in running if r["name"] == "demo")["ttl_s"] == 600  # the request's keep_alive
