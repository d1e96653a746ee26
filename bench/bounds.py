"""The proxy's bounds under load, for a minute: sixteen clients streaming from three models on a simulated
GPU that holds two, max_instances = 2, a 1 s TTL. Samples the process table, the state file and /status
every 0.1 s and prints the worst of each, the swaps, and every request's outcome, as JSON.

    python bench/bounds.py --seconds 60 --clients 16
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.test_bounds import Sampler, _estimate, _stream  # noqa: E402
from tests.integration.test_proxy import Proxy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "probe").mkdir()
        probe = Proxy(tmp / "probe", {"a": []}, 'gpu_overhead = "0MiB"')
        each = _estimate(probe.config, {**probe.env, "LLAMACTL_GPUS": "none"}, "a")
        probe.stop()
        gpu = math.ceil(2.5 * each / 1024) * 1024
        (tmp / "run").mkdir()
        chunked = ["--fake-chunk-delay", "0.03"]
        proxy = Proxy(tmp / "run", {"a": chunked, "b": chunked, "c": chunked},
                      'max_instances = 2\nidle_ttl = "1s"\ngpu_overhead = "0MiB"\nmax_queue = 1000\nload_timeout = "60s"',
                      gpus=f"1x{gpu // 1024}KiB", defaults='margin = "0MiB"')
        sampler = Sampler(proxy.state, proxy.url)
        sampler.start()
        outcomes: Counter[str] = Counter()
        stop_at = time.monotonic() + args.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                status, body = _stream(proxy.url, rng.choice("abc"))
                ok = status == 200 and "data: [DONE]" in body and '"error"' not in body
                outcomes["whole stream" if ok else f"{status} cut or refused"] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sampler.done.set()
        sampler.join()
        log = proxy.logs()
        proxy.stop()
        print(json.dumps({
            "seconds": args.seconds, "clients": args.clients, "samples": len(sampler.processes),
            "max_processes": max(sampler.processes), "max_status_instances": max(sampler.listed or [0]),
            "max_claimed_bytes": max(sampler.claimed), "gpu_bytes": gpu, "model_bytes": each,
            "swaps": log.count("stopped ("), "outcomes": dict(outcomes)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
