"""Start-up of light commands as whole processes, against `python -c pass` in the same run.

Usage: python bench/startup.py [--runs 15] [--compare CHECKOUT]
Each command runs as a fresh process, interleaved with the baseline (the interpreter alone), so a noisy
machine slows both alike; the figure is each median minus the baseline's. With --compare, the same commands
also run from another checkout of llamactl (e.g. `git worktree add /tmp/before HEAD~1`), interleaved too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.synth import ModelSpec, write_model  # noqa: E402

SPEC = ModelSpec(arch="qwen2", n_vocab=152064, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                 tokenizer="gpt2", n_merges=150_000)


def timed(argv: list[str], env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()  # (cwd: `python -m` puts it first on sys.path, before PYTHONPATH)
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--compare", type=Path, help="another llamactl checkout to run the same commands from")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "vocab152k.gguf", SPEC)
        base_env = {**os.environ, "LLAMACTL_STATE_DIR": str(Path(tmp) / "state"), "LLAMA_SERVER": "/nonexistent"}
        commands = {
            "--version": (["--version"], {}),
            "ps (nothing running)": (["ps"], {}),
            "gpus --gpus none": (["gpus", "--gpus", "none"], {}),
            "completion (Tab)": ([], {"_LLAMACTL_COMPLETE": "complete_bash", "COMP_WORDS": "llamactl ev",
                                      "COMP_CWORD": "1"}),
            "estimate 152k vocab": (["estimate", str(model), "--gpus", "none", "--json"], {}),
        }
        trees = {"this": ROOT} | ({"compare": args.compare.resolve()} if args.compare else {})
        times: dict[str, list[float]] = {"baseline": []}
        for _ in range(args.runs):
            times["baseline"].append(timed([sys.executable, "-c", "pass"], base_env, tmp))
            for tree_name, tree in trees.items():
                env = {**base_env, "PYTHONPATH": str(tree)}
                for name, (argv, extra) in commands.items():
                    times.setdefault(f"{tree_name}: {name}", []).append(
                        timed([sys.executable, "-m", "llamactl", *argv], {**env, **extra}, tmp))
    base = statistics.median(times.pop("baseline"))
    print(f"baseline `python -c pass`: median {base * 1000:.0f} ms over {args.runs} runs")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<36} median {med * 1000:4.0f} ms  (+{(med - base) * 1000:.0f} ms over the baseline)")
    if args.compare:
        for name in commands:
            this, other = statistics.median(times[f"this: {name}"]), statistics.median(times[f"compare: {name}"])
            print(f"{name:<36} this / compare: {this / other:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
