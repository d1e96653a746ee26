"""One door context: `plan NAME`, `launch NAME --dry-run` and the proxy run the same llama-server argv (all but
the port), and `estimate NAME` reports the per-device figures `plan NAME` uses, before and after a launch
has left a calibration store: with the real llama-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llamactl.servers.buffers import free_port
from llamactl.servers.client import wait_healthy
from llamactl.servers.state import StateStore
from tests.synth import ModelSpec, write_model


def _without_port(argv: list[str]) -> list[str]:
    i = argv.index("--port")
    return argv[:i] + argv[i + 2:]


class Doors:
    def __init__(self, tmp: Path, server_binary: Path) -> None:
        model = write_model(tmp / "small.gguf", ModelSpec(n_vocab=2048, n_embd=128, n_layer=2, n_head=4, n_head_kv=2,
                                                          n_ff=256))
        self.port = free_port()
        self.config = tmp / "config.toml"
        self.config.write_text(f'port = {self.port}\nport_start = {free_port()}\npoll_interval = "0.5s"\n'
                               f'[defaults]\nctx_size = 1024\n[models.small]\npath = "{model}"\nparallel = 2\n'
                               'cache_type_k = "q8_0"\naliases = ["tiny"]\n')
        self.state = tmp / "state"
        self.env = {**os.environ, "LLAMACTL_STATE_DIR": str(self.state), "LLAMACTL_GPUS": "1x8GiB",
                    "LLAMA_SERVER": str(server_binary), "LLAMACTL_CACHE_DIR": str(tmp / "cache")}

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llamactl", "--config", str(self.config), *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=120)

    def json(self, *args: str, env: dict[str, str] | None = None) -> dict:
        out = self.run(*args, "--json", env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def proxy_argv(self) -> list[str]:
        """The argv the proxy runs for `small`, started on demand by a request for its alias."""
        proc = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(self.config), "proxy"], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{self.port}"
            assert wait_healthy(url, 30, alive=lambda: proc.poll() is None), "llamactl proxy did not start"
            reply = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1},
                               timeout=120)
            assert reply.status_code == 200, reply.text
            return list(StateStore(self.state).snapshot()["small"].argv)  # as recorded at its spawn
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0


@pytest.fixture
def doors(tmp_path: Path, server_binary: Path) -> Doors:
    return Doors(tmp_path, server_binary)


def test_plan_launch_and_the_proxy_run_one_argv(doors: Doors) -> None:
    for phase in ("no calibration store", "after a launch measured it"):
        planned = doors.json("plan", "small")
        assumed = doors.json("plan", "small", env={"LLAMA_SERVER": "/nonexistent"})  # a current build assumed
        dry = doors.json("launch", "tiny", "--dry-run")
        estimated = doors.json("estimate", "small")
        ran = doors.proxy_argv()
        assert _without_port(planned["argv"]) == _without_port(dry["argv"]) == _without_port(ran), phase
        assert _without_port(assumed["argv"])[1:] == _without_port(ran)[1:], phase
        assert ["--alias", "small"] == ran[ran.index("--alias"):ran.index("--alias") + 2]
        assert ran[ran.index("--cache-type-k") + 1] == "q8_0" and ran[ran.index("--parallel") + 1] == "2"
        # estimate reports what plan places, device by device (calibrated alike once a store exists)
        assert {d["device"]: d["total_bytes"] for d in estimated["devices"]} == \
               {d["device"]: d["total_bytes"] for d in planned["devices"]}, phase
        assert estimated["calibration"] == planned["calibration"], phase
    assert (doors.state / "calibration.db").exists()
    assert planned["calibration"], "the second plan used what the first launch measured"
