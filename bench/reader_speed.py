"""Whole-process time of `llamactl estimate --json` vs a process that opens the file with gguf.GGUFReader.

Usage: python bench/reader_speed.py [--runs 5]
The model: a generated GGUF with a 152k-token vocabulary and 150k merges (the
shape of Qwen2.5's tokenizer). Both sides run as fresh processes, interleaved,
in the same run; the figure is the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.synth import ModelSpec, write_model  # noqa: E402

SPEC = ModelSpec(arch="qwen2", n_vocab=152064, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                 tokenizer="gpt2", n_merges=150_000)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "vocab152k.gguf", SPEC)
        ours_argv = [sys.executable, "-m", "llamactl", "estimate", str(path), "--gpus", "none", "--json"]
        theirs_argv = [sys.executable, "-c", f"import gguf; r = gguf.GGUFReader({str(path)!r}); print(len(r.fields))"]
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(timed(ours_argv))
            theirs.append(timed(theirs_argv))
    o, t = statistics.median(ours), statistics.median(theirs)
    print("file: 152064-token vocabulary, 150000 merges")
    print(f"llamactl estimate --json: median {o * 1000:.0f} ms over {args.runs} runs")
    print(f"gguf.GGUFReader process:  median {t * 1000:.0f} ms over {args.runs} runs")
    print(f"speed-up: {t / o:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
