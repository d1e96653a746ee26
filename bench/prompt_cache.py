"""The first request after a restart, with and without keep_cache: prompt tokens evaluated and time to first token.

Usage: python bench/prompt_cache.py [--runs 3] [--words 300] [--server PATH]
A real `llamactl proxy` serves one generated model twice: `cached` (keep_cache = true) and `plain` (the same file
and settings without it). Each run, for each: a streamed request with a long prompt, an unload (the proxy saves
`cached`'s slot), a load (the proxy restores it; the time is reported apart), then the same request again. The
second request's `timings` say how many prompt tokens were evaluated and how many came from the cache; the time
to first token is from sending it to its first streamed piece. `plain` is the in-run baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from llamactl.servers.buffers import free_port  # noqa: E402
from llamactl.servers.probe import find_server  # noqa: E402
from tests.e2e.proxyproc import running_proxy  # noqa: E402
from tests.synth import ModelSpec, write_model  # noqa: E402

AUTH = {"Authorization": "Bearer bench"}
# big enough that evaluating a prompt costs what a small real model's does on a CPU
SPEC = ModelSpec(n_vocab=4096, n_embd=1024, n_layer=12, n_head=16, n_head_kv=4, n_ff=2816)


def streamed(url: str, model: str, prompt: str) -> tuple[float, dict]:
    """(seconds to the first streamed piece, the final timings) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    sent = time.monotonic()
    first: float | None = None
    timings: dict = {}
    with httpx.Client(timeout=600) as http, http.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as reply:
        if reply.status_code != 200:
            reply.read()
            raise SystemExit(f"{model}: {reply.status_code} {reply.text[:200]}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.monotonic() - sent
            timings = event.get("timings") or timings
    assert first is not None, f"{model}: no text streamed"
    return first, timings


def admin(url: str, model: str, action: str) -> float:
    started = time.monotonic()
    reply = httpx.post(f"{url}/models/{model}/{action}", headers=AUTH, json={}, timeout=600)
    if reply.status_code != 200:
        raise SystemExit(f"{action} {model}: {reply.status_code} {reply.text[:200]}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--words", type=int, default=300, help="words of prompt (a few tokens each)")
    parser.add_argument("--server", default=None)
    args = parser.parse_args()
    binary = find_server(args.server)
    prompt = " ".join(f"item{i % 97} of list {i % 13}" for i in range(args.words))
    results: dict[str, list[tuple[float, dict, float]]] = {"cached": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "bench.gguf", SPEC)
        config = (f'port_start = {free_port()}\napi_keys = ["bench"]\nmax_instances = 1\n'
                  f'[defaults]\nctx_size = 8192\nparallel = 1\n'
                  f'[models.cached]\npath = "{model}"\nkeep_cache = true\n[models.plain]\npath = "{model}"\n')
        with running_proxy(Path(tmp), config, binary) as (url, _):
            for _ in range(args.runs):
                for name in ("cached", "plain"):
                    streamed(url, name, prompt)  # fills the slot
                    admin(url, name, "unload")  # cached: its slot saved
                    load_s = admin(url, name, "load")  # cached: its slot restored before it is ready
                    ttft, timings = streamed(url, name, prompt)
                    results[name].append((ttft, timings, load_s))
                    admin(url, name, "unload")  # max_instances = 1: the other starts on an empty machine
            saved = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
            cache_bytes = next(float(line.rsplit(" ", 1)[1]) for line in saved.splitlines()
                               if line.startswith('llamactl_cache_bytes{model="cached"}'))
    print(f"{args.runs} runs, {results['plain'][0][1].get('prompt_n')} prompt tokens, model {SPEC.n_layer} layers "
          f"x {SPEC.n_embd}, CPU, 1 slot; the saved cache on disk: {cache_bytes / 2**20:.1f} MiB")
    print("| | prompt tokens evaluated | from the cache | prompt eval | time to first token | load (start + restore) |")
    print("|---|---|---|---|---|---|")
    for name, label in (("cached", "keep_cache = true (restored)"), ("plain", "keep_cache = false")):
        runs = results[name]
        med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
        print(f"| {label} | {med(lambda r: r[1]['prompt_n']):.0f} | {med(lambda r: r[1]['cache_n']):.0f} "
              f"| {med(lambda r: r[1]['prompt_ms']):.0f} ms | {med(lambda r: r[0]) * 1000:.0f} ms "
              f"| {med(lambda r: r[2]) * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
