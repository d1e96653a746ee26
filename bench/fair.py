"""Swaps and latency when agents fan out over more models than fit: FIFO against batching with min_resident.

Three models that fit two at a time (max_instances = 2), each taking `--load` seconds to load (the fake
llama-server's --fake-ready-after) and about 0.1 s to answer; `--agents` agents each send `--requests`
requests, one after another, to a model picked at random (the same seeds in both runs). Run 1 wakes waiting
requests in arrival order with no anti-thrash bound (`batching = false`); run 2 is the proxy's scheduler:
the model with the most requests waiting gets a freed seat (within `max_wait`), and a model stays loaded for
`min_resident` once loaded. Both runs in this process, one after the other, on the same machine.

    python bench/fair.py --agents 8 --requests 25 --load 0.5 --min-resident 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.test_proxy import Proxy  # noqa: E402

MODELS = ("a", "b", "c")


def run(tmp: Path, label: str, config: str, defaults: str, args: argparse.Namespace) -> dict[str, object]:
    (tmp / label).mkdir()
    fake = ["--fake-ready-after", str(args.load), "--fake-chunk-delay", "0.02"]
    proxy = Proxy(tmp / label, {m: fake for m in MODELS},
                  f'max_instances = 2\nmax_queue = 1000\nload_timeout = "120s"\n{config}', defaults=defaults)
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def agent(seed: int) -> None:
        nonlocal failures
        rng = random.Random(seed)
        with httpx.Client(timeout=300) as client:
            for _ in range(args.requests):
                started = time.monotonic()
                reply = client.post(f"{proxy.url}/v1/chat/completions",
                                    json={"model": rng.choice(MODELS), "messages": [], "max_tokens": 5, "stream": True})
                with lock:
                    if reply.status_code == 200:
                        latencies.append(time.monotonic() - started)
                    else:
                        failures += 1

    started = time.monotonic()
    threads = [threading.Thread(target=agent, args=(seed,)) for seed in range(args.agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    launches = sum(proxy.metric("llamactl_launches_total", model=m, result="ok") for m in MODELS)
    proxy.stop()
    latencies.sort()
    n = len(latencies)
    return {"run": label, "requests": n + failures, "failures": failures, "loads": int(launches),
            "swaps_per_100": round(100 * max(launches - 2, 0) / max(n + failures, 1), 1),
            "p50_s": round(statistics.median(latencies), 3), "p99_s": round(latencies[min(n - 1, int(0.99 * n))], 3),
            "wall_s": round(wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per agent")
    parser.add_argument("--load", type=float, default=0.5, help="seconds each model takes to load")
    parser.add_argument("--min-resident", type=float, default=2.0)
    parser.add_argument("--max-wait", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        fifo = run(tmp, "fifo", "batching = false", "", args)
        batched = run(tmp, "batched", f'batching = true\nmax_wait = "{args.max_wait}s"',
                      f'min_resident = "{args.min_resident}s"', args)
    print(json.dumps([fifo, batched], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
