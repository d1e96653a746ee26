"""Chaos: the proxy under load while instances and the proxy itself are killed with SIGKILL at random.

Usage: python bench/chaos.py [--seconds 60] [--clients 8] [--seed 1]
Fake llama-servers (tests/fakes) behind a real `llamactl proxy`, in a temporary state dir; clients send
streamed and plain requests to three models (max_instances 2, so evictions happen too); a chaos loop
SIGKILLs a random instance, or the proxy (then starts a new one on the same config and state dir).
Only processes this run started are ever signalled: the proxy it spawned and llama-servers carrying
its state dir's tag. At the end: unanswered requests (a client that waited out its timeout), orphans
(instances still running after the last proxy's SIGTERM), state entries left, ports still held.
tests/integration/test_chaos.py runs a short round and asserts zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamactl.servers.buffers import free_port  # noqa: E402
from llamactl.servers.client import wait_healthy  # noqa: E402
from tests.fakes.procs import tagged_instances  # noqa: E402
from tests.fakes.binary import fake_server_binary  # noqa: E402
from tests.synth import ModelSpec, write_model  # noqa: E402

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
MODELS = ("alpha", "beta", "gamma")
CLIENT_TIMEOUT_S = 30.0


class Run:
    def __init__(self, tmp: Path, seed: int) -> None:
        # the clients' draws depend on how fast they are answered: the chaos has its own generator, so a seed
        # fixes its schedule
        self.tmp, self.rng, self.chaos_rng = tmp, random.Random(seed), random.Random(seed)
        self.state = tmp / "state"
        wrapper = fake_server_binary()  # an executable named llama-server
        model = write_model(tmp / "tiny.gguf", ModelSpec(n_vocab=300))
        self.port, self.port_start = free_port(), free_port()
        lines = [f"port = {self.port}", f"port_start = {self.port_start}", 'poll_interval = "0.3s"', "max_instances = 2",
                 'load_timeout = "20s"', "[defaults]", "ctx_size = 256"]
        for name in MODELS:
            lines += [f"[models.{name}]", f'path = "{model}"', 'args = ["--fake-chunk-delay", "0.02"]']
        self.config = tmp / "config.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.env = {**os.environ, "LLAMACTL_STATE_DIR": str(self.state), "LLAMACTL_GPUS": "none",
                    "LLAMACTL_CACHE_DIR": str(tmp / "cache"), "LLAMA_SERVER": str(wrapper)}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "proxy.log", "a")
        self.proxy: subprocess.Popen[bytes] | None = None
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.kills: Counter[str] = Counter()
        self.ports_seen: set[int] = set()
        self.stop = threading.Event()
        self.enough = threading.Event()  # the minimum kills asked for have happened

    def start_proxy(self) -> None:
        self.proxy = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(self.config), "proxy",
                                       "--grace", "5s"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_healthy(self.url, 30, alive=lambda: self.proxy is not None and self.proxy.poll() is None,
                            interval_s=0.05):
            raise RuntimeError("proxy did not start; see " + str(self.tmp / "proxy.log"))

    def client(self) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
            while not self.stop.is_set():
                model = self.rng.choice(MODELS)
                stream = self.rng.random() < 0.5
                body = {"model": model, "messages": [], "max_tokens": 8, "stream": stream}
                try:
                    reply = http.post(f"{self.url}/v1/chat/completions", json=body)
                    kind = str(reply.status_code)
                    if stream and reply.status_code == 200 and "upstream_error" in reply.text:
                        kind = "200+stream-error"
                    elif stream and reply.status_code == 200 and "[DONE]" not in reply.text:
                        kind = "200-truncated"
                except httpx.TimeoutException:
                    kind = "unanswered"
                except httpx.ConnectError:
                    kind = "refused (proxy down)"
                    time.sleep(0.05)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    kind = "reset (proxy killed)"
                with self.lock:
                    self.outcomes[kind] += 1

    def chaos(self, every_s: float, minimum: dict[str, int]) -> None:
        actions = 0
        while not self.stop.wait(self.chaos_rng.uniform(0.5, 1.5) * every_s):
            actions += 1
            instances = tagged_instances(self.state)
            for proc in instances:
                try:
                    self.ports_seen.update(c.laddr.port for c in proc.net_connections() if c.status == "LISTEN")
                except Exception:
                    pass
            owed_proxy = self.kills["proxy"] < minimum.get("proxy", 0) and actions % 4 == 0
            if instances and not owed_proxy and self.chaos_rng.random() < 0.7:
                victim = self.chaos_rng.choice(instances)
                try:
                    victim.send_signal(signal.SIGKILL)  # tagged with our state dir: ours
                    self.kills["instance"] += 1
                except Exception:
                    pass
            elif self.proxy is not None:
                self.proxy.send_signal(signal.SIGKILL)
                self.proxy.wait()
                self.kills["proxy"] += 1
                time.sleep(0.3)
                self.start_proxy()
            if all(self.kills[kind] >= n for kind, n in minimum.items()):
                self.enough.set()

    def finish(self) -> dict[str, object]:
        assert self.proxy is not None
        # the last proxy adopted what the killed ones left; all of it goes at its SIGTERM
        time.sleep(1.0)
        self.proxy.send_signal(signal.SIGTERM)
        code = self.proxy.wait(timeout=60)
        time.sleep(0.5)
        orphans = tagged_instances(self.state)
        for proc in orphans:
            proc.kill()
        try:
            entries = json.loads((self.state / "state.json").read_text()).get("instances", {})
        except (OSError, ValueError):
            entries = {}
        live_entries = [n for n, e in entries.items() if e.get("status") in ("starting", "ready", "busy", "stopping")]
        held = [p for p in sorted(self.ports_seen) if not _free(p)]
        return {"requests": sum(self.outcomes.values()), "outcomes": dict(sorted(self.outcomes.items())),
                "kills": dict(self.kills), "unanswered": self.outcomes["unanswered"], "orphans": len(orphans),
                "live_entries_left": len(live_entries), "ports_held": held, "proxy_exit": code}


def _free(port: int) -> bool:
    """Whether a new server can listen there (as llama-server does: SO_REUSEADDR, so TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def run(tmp: Path, *, seconds: float, clients: int, seed: int, every_s: float = 1.0,
        minimum: dict[str, int] | None = None) -> dict[str, object]:
    """`seconds` of load and kills; longer (up to a minute more) until the `minimum` kills of each kind happened."""
    r = Run(tmp, seed)
    r.start_proxy()
    threads = [threading.Thread(target=r.client, daemon=True) for _ in range(clients)]
    chaos = threading.Thread(target=r.chaos, args=(every_s, minimum or {}), daemon=True)
    for t in threads:
        t.start()
    chaos.start()
    time.sleep(seconds)
    if minimum:
        r.enough.wait(60)
    r.stop.set()
    chaos.join(timeout=60)
    for t in threads:
        t.join(timeout=CLIENT_TIMEOUT_S + 5)
    result = r.finish()
    result["seconds"] = seconds
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), seconds=args.seconds, clients=args.clients, seed=args.seed), indent=1))


if __name__ == "__main__":
    main()
