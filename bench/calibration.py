"""How right `llamactl plan` is for a model this box has run before, against the real llama-server.

Usage: python bench/calibration.py [--server PATH] [--markdown]
Per case, in a fresh state dir, through the CLI as a user runs it: `plan` (the formula alone), `launch`
(observed: llama-server's buffer log per device) and `evict`, `plan` again (now calibrated), `launch`
again; then the worst per-device error of each plan against what the second launch logged (weights, KV,
recurrent state, compute and output; the overhead term is not logged). RPC devices (ggml-rpc-server)
stand in for GPUs: llama.cpp places layers on them by its CUDA code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rpc_devices import start_rpc  # noqa: E402
from llamactl.learn.calibrate import TERMS  # noqa: E402
from llamactl.learn.store import CalibrationStore  # noqa: E402
from llamactl.servers.buffers import free_port  # noqa: E402
from llamactl.servers.probe import find_server  # noqa: E402
from tests.e2e.test_rpc_devices import MODELS  # noqa: E402
from tests.synth import write_model  # noqa: E402

CASES = {  # model, flags, RPC devices
    "cpu llama": ("llama", ["--gpus", "none", "-c", "4096"], 0),
    "cpu moe": ("qwen3moe", ["--gpus", "none", "-c", "4096", "-np", "2"], 0),
    "cpu mamba2": ("mamba2", ["--gpus", "none", "-c", "4096", "-np", "2"], 0),
    "rpc one device": ("llama", ["--gpus", "8GiB", "-c", "4096"], 1),
    "rpc pipeline (2)": ("llama", ["--gpus", "2x8GiB", "-c", "4096", "-ts", "1,1"], 2),
    "rpc partial -ngl 3": ("llama", ["--gpus", "2x8GiB", "-c", "4096", "-np", "1", "-ngl", "3"], 2),
    "rpc --n-cpu-moe 2": ("qwen3moe", ["--gpus", "8GiB", "-c", "4096", "--n-cpu-moe", "2"], 1),
    "rpc hybrid pipeline": ("granitehybrid", ["--gpus", "2x8GiB", "-c", "4096", "-np", "2", "-ts", "1,1"], 2),
    "rpc uneven split 1,3": ("llama", ["--gpus", "2x8GiB", "-c", "8192", "-np", "2", "-ts", "1,3"], 2),
}


def cli(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)) -> str:
    out = subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode not in ok:
        sys.exit(f"{' '.join(args)}: exit {out.returncode}\n{out.stderr}")
    return out.stdout


def terms(plan: dict) -> dict[str, int]:
    return {d["device"]: sum(d[f"{t}_bytes"] for t in TERMS) for d in plan["devices"]}


def worst(ours: dict[str, int], logged: dict[str, int]) -> tuple[float, str]:
    return max(((ours[d] - logged[d]) / logged[d], d) for d in logged if logged[d]) if logged else (0.0, "-")


def worst_abs(ours: dict[str, int], logged: dict[str, int]) -> tuple[float, str]:
    return max(((abs(ours[d] - logged[d]) / logged[d]), d) for d in logged if logged[d])


def run_case(server: Path, endpoints: list[str], tmp: Path, name: str, model_key: str, flags: list[str],
             n_rpc: int) -> dict[str, object]:
    model = write_model(tmp / f"{model_key}.gguf", replace(MODELS[model_key]))
    state = tmp / f"state-{name.replace(' ', '_')}"
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(state), "LLAMA_SERVER": str(server)}
    env.pop("LLAMACTL_GPUS", None)
    extra = ["--", "--rpc", ",".join(endpoints[:n_rpc])] if n_rpc else []

    def plan() -> dict:
        return json.loads(cli(env, "plan", str(model), *flags, "--json", *extra, ok=(0, 3)))

    def launch() -> dict[str, int]:
        before = {o.uid for o in CalibrationStore(state).all()}
        cli(env, "launch", str(model), "--name", "b", "--port-start", str(free_port()), *flags, *extra)
        cli(env, "evict", "b")
        (obs,) = [o for o in CalibrationStore(state).all() if o.uid not in before]
        return {d.device: d.logged_total for d in obs.devices}

    formula = plan()
    launch()
    calibrated = plan()
    logged = launch()
    f_err, f_dev = worst_abs(terms(formula), logged)
    c_err, c_dev = worst_abs(terms(calibrated), logged)
    return {"case": name, "fit": calibrated["fit"], "devices": len(logged), "formula_err": f_err, "formula_dev": f_dev,
            "calibrated_err": c_err, "calibrated_dev": c_dev, "notes": calibrated["calibration"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    server = find_server(args.server)
    procs, endpoints = start_rpc(server)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [run_case(server, endpoints, Path(tmp), name, *case) for name, case in CASES.items()]
    finally:
        for proc in procs:
            proc.terminate()
    if args.markdown:
        print("| case | fit | devices | formula alone: worst device | after one launch: worst device |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['fit']} | {r['devices']} | {r['formula_err']:.2%} ({r['formula_dev']}) | "
                  f"{r['calibrated_err']:.3%} ({r['calibrated_dev']}) |")
    else:
        for r in rows:
            print(f"{r['case']:<22} {r['fit']:<8} formula {r['formula_err']:8.2%} ({r['formula_dev']})   "
                  f"calibrated {r['calibrated_err']:7.3%} ({r['calibrated_dev']})")
    print(f"\n{len(rows)} cases, worst calibrated error {max(r['calibrated_err'] for r in rows):.3%} "
          f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
