"""One launch through the CLI, then the plan for the same settings: it must use what that launch logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llamactl.servers.buffers import free_port
from tests.fakes.procs import tagged_instances


def launch_then_plan(server_binary: Path, state: Path, model: Path, flags: list[str], argv_flag: str) -> str:
    """Launch `model` with `flags`, stop it, plan it again; assert the plan is calibrated, carries `argv_flag`,
    and matches the launch's logged host buffers within 0.5 %. Returns the instance's log."""
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(state), "LLAMA_SERVER": str(server_binary)}
    env.pop("LLAMACTL_GPUS", None)

    def cli(*args: str, ok: tuple[int, ...] = (0,)) -> str:
        out = subprocess.run([sys.executable, "-m", "llamactl", *args], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode in ok, out.stderr
        return out.stdout

    try:
        cli("launch", str(model), "--name", "m", "--port-start", str(free_port()), *flags)
        log = (state / "logs" / "m.log").read_text()
        cli("evict", "m")
        plan = json.loads(cli("plan", str(model), *flags, "--json", ok=(0, 3)))
        assert plan["calibration"] and argv_flag in plan["argv"]
        (row,) = json.loads(cli("calibration", "--json"))["models"]
        (cpu,) = row["devices"]
        planned = next(d for d in plan["devices"] if d["device"] == "CPU")
        ours = planned["total_bytes"] - planned["overhead_bytes"]
        assert abs(ours - cpu["logged_bytes"]) <= 0.005 * cpu["logged_bytes"], (ours, cpu)
        return log
    finally:
        for proc in tagged_instances(state):
            proc.kill()
