"""What wide JSON bodies cost the proxy: /health latency while N bodies of `[{},{},...]` arrive, against
/health on the idle proxy in the same run (the ratio), and the proxy's RSS growth against the bytes sent.

    python bench/wide_body.py --mib 60 --bodies 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.test_proxy import Proxy  # noqa: E402


def health_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        httpx.get(f"{url}/health", timeout=60)
        out.append(time.monotonic() - start)
        stop.wait(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=60)
    parser.add_argument("--bodies", type=int, default=4)
    args = parser.parse_args()
    body = b'{"model": "nosuch", "x": [' + b"{}," * (args.mib * 2**20 // 3) + b'{}]}'
    with tempfile.TemporaryDirectory() as tmp_name:
        proxy = Proxy(Path(tmp_name), {"alpha": []}, 'max_body = "256MiB"')
        me = psutil.Process(proxy.proc.pid)
        idle: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=health_latencies, args=(proxy.url, stop, idle))
        sampler.start()
        time.sleep(3)
        stop.set()
        sampler.join()
        before = me.memory_info().rss
        loaded: list[float] = []
        peak = [before]
        stop = threading.Event()
        sampler = threading.Thread(target=health_latencies, args=(proxy.url, stop, loaded))
        rss = threading.Thread(target=lambda: [peak.append(me.memory_info().rss) or stop.wait(0.02)
                                               for _ in iter(lambda: stop.is_set(), True)])
        sampler.start()
        rss.start()
        statuses: list[int] = []
        senders = [threading.Thread(target=lambda: statuses.append(httpx.post(
            f"{proxy.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
            timeout=300).status_code)) for _ in range(args.bodies)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        stop.set()
        sampler.join()
        rss.join()
        proxy.stop()
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(len(xs) * p))]  # noqa: E731
    print(json.dumps({
        "bodies": args.bodies, "body_mib": round(len(body) / 2**20, 1), "statuses": statuses,
        "health_idle_p50_ms": round(statistics.median(idle) * 1000, 2),
        "health_loaded_p50_ms": round(statistics.median(loaded) * 1000, 2),
        "health_loaded_max_ms": round(max(loaded) * 1000, 2),
        "health_max_over_idle_p50": round(max(loaded) / statistics.median(idle), 1),
        "rss_growth_mib": round((max(peak) - before) / 2**20, 1),
        "rss_growth_per_byte_sent": round((max(peak) - before) / (len(body) * args.bodies), 2)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
