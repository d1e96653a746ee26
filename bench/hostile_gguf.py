"""Time and peak memory of `llamactl estimate` on hostile GGUF headers, against a normal tiny model in the
same run (the baseline: interpreter start-up and imports dominate both).

Usage: python bench/hostile_gguf.py [--scale 1.0] [--runs 3]
The files: tests/ggufbytes.hostile_files (the issue's four shapes at full size with --scale 1, and the same
shapes just within the reader's limits). Each run is a fresh process; figures are medians, and the ratio is
against the baseline's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ggufbytes import hostile_files  # noqa: E402
from tests.synth import ModelSpec, write_model  # noqa: E402

PEAK = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
        "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")


def measure(path: Path) -> tuple[float, int, int]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "llamactl", "estimate", str(path),
                          "--gpus", "none"], capture_output=True, text=True, check=True)
    code, peak_kib = json.loads(out.stdout)
    return time.perf_counter() - start, peak_kib // 1024, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"baseline (a valid tiny model)": write_model(Path(tmp) / "tiny.gguf", ModelSpec(n_vocab=300))}
        files.update(hostile_files(Path(tmp), scale=args.scale))
        rows = []
        for name, path in files.items():
            runs = [measure(path) for _ in range(args.runs)]
            rows.append((name, path.stat().st_size, statistics.median(r[0] for r in runs), max(r[1] for r in runs),
                         runs[0][2]))
    base = rows[0][2]
    print(f"{'file':32} {'size':>9} {'median s':>9} {'x base':>7} {'peak MB':>8} {'exit':>5}")
    for name, size, seconds, peak, code in rows:
        print(f"{name:32} {size / 2**20:8.1f}M {seconds:9.2f} {seconds / base:7.2f} {peak:8d} {code:5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
