"""The normal path with the real llama-server: launch → ready → a real completion → ps → evict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from llamactl.model.demo_model import write_demo_model
from llamactl.servers.buffers import free_port


def test_launch_real_server(server_binary: Path, tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "demo.gguf")
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp_path / "state"), "LLAMACTL_GPUS": "none",
           "LLAMA_SERVER": str(server_binary), "LLAMACTL_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True,
                              timeout=120, env=env)

    out = run("launch", str(model), "-c", "1024", "--port-start", str(free_port()), "--json")
    assert out.returncode == 0, out.stderr
    launched = json.loads(out.stdout)
    assert launched["status"] == "ready" and launched["fit"] == "cpu"
    reply = httpx.post(f"{launched['url']}/completion", json={"prompt": "hello", "n_predict": 6, "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200 and reply.json()["tokens_predicted"] == 6
    (inst,) = json.loads(run("ps", "--json").stdout)
    assert inst["name"] == "demo" and inst["status"] == "ready" and inst["slots_total"] == 4
    # the estimate (buffers + the process's own runtime) against the real RSS of a CPU instance
    assert abs(inst["actual_bytes"] - inst["estimated_bytes"]) < max(0.15 * inst["actual_bytes"], 8 * 2**20), inst
    proc = psutil.Process(inst["pid"])
    assert "--fit" in proc.cmdline() and "--metrics" in proc.cmdline()
    out = run("evict", "demo")
    assert out.returncode == 0
    assert not psutil.pid_exists(inst["pid"]) or psutil.Process(inst["pid"]).status() == psutil.STATUS_ZOMBIE
    assert json.loads(run("ps", "--json").stdout) == []
