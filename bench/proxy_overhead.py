"""What the proxy costs: through `llamactl proxy` vs straight to the instance, alternated in one run.

Usage: python bench/proxy_overhead.py [--rounds 3] [--quick]
Backend: bench/fake_sse_server.py (aiohttp), started by the proxy as its "llama-server".
Load: an aiohttp client (cheap per chunk). Reports:
 (a) unthrottled streams, 16 and 64 concurrent: throughput ratio proxy/direct, proxy CPU ms per relayed MB
 (b) 64 streams paced at 50 chunks/s: added p50/p99 chunk latency, proxy CPU s per 1000 chunks
 (c) small non-streamed requests: added median latency, against a bare aiohttp relay's in the same run
 (d) cold start: time to first byte for an unloaded model minus the instance's own time to ready
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamactl.servers.buffers import free_port  # noqa: E402
from llamactl.servers.client import wait_healthy  # noqa: E402
from tests.fakes.binary import fake_server_binary  # noqa: E402
from tests.synth import ModelSpec, write_model  # noqa: E402


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


PAD = {"pad": 64}  # bytes of content per chunk (~110 bytes per SSE event); --chunk-bytes changes it


async def stream(session: aiohttp.ClientSession, url: str, n: int, pace: float = 0.0,
                 latencies: list[float] | None = None) -> int:
    body = {"model": "hot", "messages": [], "stream": True, "max_tokens": n, "pace": pace, **PAD}
    total = 0
    async with session.post(url, json=body) as resp:
        buf = b""
        async for piece in resp.content.iter_any():
            total += len(piece)
            if latencies is not None:
                now = time.time()
                buf += piece
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        latencies.append(now - json.loads(event[6:])["t"])
    return total


async def concurrent_streams(url: str, conc: int, n: int, pace: float = 0.0,
                             latencies: list[float] | None = None) -> tuple[float, int]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        sizes = await asyncio.gather(*(stream(session, url, n, pace, latencies) for _ in range(conc)))
        return time.perf_counter() - start, sum(sizes)


async def small_requests(url: str, count: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            start = time.perf_counter()
            async with session.post(url, json={"model": "hot", "messages": []}) as resp:
                await resp.read()
            times.append(time.perf_counter() - start)
    return times


async def ttfb(url: str, model: str) -> float:
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        async with session.post(url, json={"model": model, "messages": [], "stream": True, "max_tokens": 4}) as resp:
            await resp.content.readany()
            elapsed = time.perf_counter() - start
            await resp.read()
    return elapsed


def own_ready_s(wrapper: Path, model: Path) -> float:
    import httpx

    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([str(wrapper), "--model", str(model), "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller loads (a smoke test of the bench)")
    parser.add_argument("--chunk-bytes", type=int, default=64, help="content bytes per streamed chunk")
    parser.add_argument("--only-a", action="store_true", help="only the unthrottled-stream part")
    parser.add_argument("--only-c", action="store_true", help="only the small-request part")
    parser.add_argument("--features", action="store_true",
                        help="the hot model with request defaults, priority, pin, min_resident and a queue bound; "
                             "allowed_origins on")
    args = parser.parse_args()
    PAD["pad"] = args.chunk_bytes
    n_chunks = 300 if args.quick else 2000
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # an executable named llama-server (llamactl checks the name) running the aiohttp fake
        wrapper = fake_server_binary(ROOT / "bench" / "fake_sse_server.py")
        model = write_model(tmp / "tiny.gguf", ModelSpec(n_vocab=300))
        port = free_port()
        colds_n = args.rounds + 2
        features = 'allowed_origins = ["http://localhost:3000"]\n' if args.features else ""
        hot = ('priority = 5\npin = true\nmin_resident = "1m"\nmax_queue = 100\nqueue_timeout = "30s"\n'
               '[models.hot.request]\ndefaults = { temperature = 0.5, top_p = 0.9 }\nstrip = ["seed"]\n'
               if args.features else "")
        (tmp / "config.toml").write_text(f'port = {port}\nport_start = {free_port()}\npoll_interval = "5s"\n{features}'
                                         f'[models.hot]\npath = "{model}"\n{hot}'
                                         + "".join(f'[models.cold{i}]\npath = "{model}"\n' for i in range(colds_n)))
        env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp / "state"), "LLAMACTL_GPUS": "none",
               "LLAMA_SERVER": str(wrapper), "LLAMACTL_CACHE_DIR": str(tmp / "cache"),
               "PYTHONPATH": sysconfig.get_paths()["purelib"]}  # the fake's aiohttp, for the embedded Python
        proxy = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(tmp / "config.toml"), "proxy"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            if not wait_healthy(base, 15, alive=lambda: proxy.poll() is None):
                raise SystemExit("llamactl proxy did not start")
            first = httpx.post(f"{base}/v1/chat/completions", json={"model": "hot", "messages": []}, timeout=30)
            if first.status_code != 200:
                raise SystemExit(f"the first request failed: {first.status_code} {first.text[:300]}")
            hot_port = next(i["port"] for i in httpx.get(f"{base}/status").json()["instances"] if i["model"] == "hot")
            via, direct = f"{base}/v1/chat/completions", f"http://127.0.0.1:{hot_port}/v1/chat/completions"
            pproc = psutil.Process(proxy.pid)
            print(f"backend: fake SSE server (aiohttp); {n_chunks} chunks of ~{args.chunk_bytes + 46} bytes per stream; "
                  f"{args.rounds} rounds")

            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(bare_port), direct],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(100):
                try:
                    httpx.get(f"http://127.0.0.1:{bare_port}/", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.05)
            bare_url, bproc = f"http://127.0.0.1:{bare_port}/v1/chat/completions", psutil.Process(bare.pid)
            for conc in (() if args.only_c else (16, 64)):
                rates: dict[str, list[float]] = {"direct": [], "proxy": [], "bare": []}
                cpu_per_mb: dict[str, list[float]] = {"proxy": [], "bare": []}
                for _ in range(args.rounds):
                    for mode, url, proc in (("direct", direct, None), ("proxy", via, pproc), ("bare", bare_url, bproc)):
                        before = cpu_s(proc) if proc else 0.0
                        seconds, size = asyncio.run(concurrent_streams(url, conc, n_chunks))
                        rates[mode].append(size / seconds)
                        if proc is not None:
                            cpu_per_mb[mode].append((cpu_s(proc) - before) / (size / 2**20) * 1000)
                med = {k: statistics.median(v) for k, v in rates.items()}
                print(f"(a) {conc} unthrottled streams: direct {med['direct'] / 2**20:.1f} MB/s, proxy "
                      f"{med['proxy'] / 2**20:.1f} MB/s, ratio {med['proxy'] / med['direct']:.2f}; proxy CPU "
                      f"{statistics.median(cpu_per_mb['proxy']):.1f} ms per relayed MB, a bare aiohttp relay "
                      f"{statistics.median(cpu_per_mb['bare']):.1f} ms (ratio {med['bare'] / med['direct']:.2f})")
            if args.only_a:
                return 0

            paced_chunks = 0 if args.only_c else 50 if args.quick else 100
            lat = {"direct": [], "proxy": []}
            cpu_per_k = []
            for _ in range(args.rounds if paced_chunks else 0):
                for mode, url in (("direct", direct), ("proxy", via)):
                    before = cpu_s(pproc)
                    asyncio.run(concurrent_streams(url, 64, paced_chunks, pace=50.0, latencies=lat[mode]))
                    if mode == "proxy":
                        cpu_per_k.append((cpu_s(pproc) - before) / (64 * paced_chunks) * 1000)
            if paced_chunks:
                print(f"(b) 64 streams at 50 chunks/s: added p50 {(pct(lat['proxy'], .5) - pct(lat['direct'], .5)) * 1000:.2f} ms, "
                      f"added p99 {(pct(lat['proxy'], .99) - pct(lat['direct'], .99)) * 1000:.2f} ms "
                      f"(direct p50 {pct(lat['direct'], .5) * 1000:.2f} ms, p99 {pct(lat['direct'], .99) * 1000:.2f} ms), "
                      f"proxy CPU {statistics.median(cpu_per_k):.3f} s per 1000 chunks")

            small: dict[str, list[float]] = {"direct": [], "proxy": [], "bare": []}
            for _ in range(args.rounds * 2):
                for mode, url in (("direct", direct), ("proxy", via), ("bare", bare_url)):
                    small[mode] += asyncio.run(small_requests(url, 50))
            median = {k: statistics.median(v) for k, v in small.items()}
            added, bare_added = median["proxy"] - median["direct"], median["bare"] - median["direct"]
            print(f"(c) small requests: direct median {median['direct'] * 1000:.2f} ms, proxy "
                  f"{median['proxy'] * 1000:.2f} ms (adds {added * 1000:.2f} ms), a bare aiohttp relay "
                  f"{median['bare'] * 1000:.2f} ms (adds {bare_added * 1000:.2f} ms): the proxy over the bare relay "
                  f"{(added - bare_added) * 1000:.2f} ms")
            if args.only_c:
                return 0

            colds, readies = [], []
            for i in range(colds_n):  # a model never started before, each time
                readies.append(own_ready_s(wrapper, model))
                colds.append(asyncio.run(ttfb(via, f"cold{i}")))
            print(f"(d) cold start: time to first byte {statistics.median(colds) * 1000:.0f} ms, instance's own time to "
                  f"ready {statistics.median(readies) * 1000:.0f} ms, proxy adds {(statistics.median(colds) - statistics.median(readies)) * 1000:.0f} ms")
        finally:
            if "bare" in locals():
                bare.terminate()
                bare.wait()
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
