"""What the calibration store costs a shell one-liner: `llamactl plan` with a store of N observations vs
`--no-calibration`, in the same run (ratios; this machine is noisy).

Usage: python bench/calibration_cost.py [--rows 20000] [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamactl.learn.calibrate import DeviceObservation, Observation  # noqa: E402
from llamactl.learn.store import CalibrationStore  # noqa: E402
from tests.synth import ModelSpec, write_model  # noqa: E402


def fill(state: Path, rows: int) -> None:
    """Observations of other models on GPUs (the rows a plan must read for the per-GPU overhead)."""
    dev = DeviceObservation("GPU0", formula={"weights": 2**30, "compute": 2**28}, logged={"weights": 2**30, "compute": 2**28},
                            buffers=("CUDA0",), nvml_bytes=2**30 + 2**28 + 300 * 2**20, gpu_name="NVIDIA H200")
    cpu = DeviceObservation("CPU", formula={"weights": 2**20}, logged={"weights": 2**20}, buffers=("CPU",))
    base = Observation(model_key="x", model_path="/m/x.gguf", arch="llama", backend="CUDA", settings_key="s",
                       settings={"ctx_size": 4096, "layer_devices": ["GPU0"] * 33}, partial=False, devices=(cpu, dev),
                       build="b", driver="580.65.06")
    store = CalibrationStore(state)
    for start in range(0, rows, 1000):
        store.add([replace(base, model_key=f"{i}:k", uid=str(i), at=float(i)) for i in range(start, min(rows, start + 1000))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        model = write_model(Path(tmp) / "m.gguf", ModelSpec(n_vocab=4096))
        fill(state, args.rows)
        env = {**os.environ, "LLAMACTL_STATE_DIR": str(state)}
        times: dict[str, list[float]] = {"--no-calibration": [], "calibrated": []}
        for _ in range(args.runs):
            for label in times:
                flags = ["--no-calibration"] if label == "--no-calibration" else []
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "llamactl", "plan", str(model), "--gpus", "24GiB", *flags],
                               env=env, capture_output=True, check=False)
                times[label].append(time.perf_counter() - t)
        base = statistics.median(times["--no-calibration"])
        cal = statistics.median(times["calibrated"])
        print(f"{args.rows} observations: plan {base * 1000:.0f} ms without calibration, {cal * 1000:.0f} ms with "
              f"(ratio {cal / base:.2f}, median of {args.runs})")


if __name__ == "__main__":
    main()
