"""Start-up of light commands as whole processes, against `python -c pass` in the same run.

Usage: python bench/startup.py [--runs 15] [--compare CHECKOUT] [--mdl PATH-TO-mdl]
Each command runs as a fresh process, interleaved with the baseline (the interpreter alone), so a noisy
machine slows both alike; the figure is each median minus the baseline's. With --compare, the same commands
also run from another checkout of llamactl (e.g. `git worktree add /tmp/before HEAD~1`), interleaved too.
Bytecode is cached (in a temporary PYTHONPYCACHEPREFIX, even under PYTHONDONTWRITEBYTECODE) and one untimed
round runs first, as for an installed tool. `estimate` is compared, on the same file, with a header walk
in plain `struct` (`--walk FILE`: every key, value and tensor info, strings skipped; a fresh process) and,
with --mdl, llama-mdl's `mdl fit inspect FILE`.
"""

from __future__ import annotations

import mmap
import struct
import sys

# only what the struct walk needs is imported at the top: that baseline runs this file as its process

QWEN = dict(arch="qwen2", n_vocab=152064, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
            tokenizer="gpt2", n_merges=150_000)
# Gemma 3 270M's header: its 262,144-token SentencePiece vocabulary (tokens, scores, types), 18 layers,
# 4 heads of 256, one KV head, a 512-token window; matrices narrowed (the header read is the same)
GEMMA = dict(arch="gemma3", n_vocab=262144, n_embd=64, n_layer=18, n_head=4, n_head_kv=1, head_dim=256, n_ff=128,
             n_swa=512, n_ctx_train=32768, tied_output=True, rope_freq_base=1000000.0, name="gemma-3-270m-shape")

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def walk(path: str) -> int:
    """Read a GGUF header with struct alone: the floor for what any estimate must do."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def value(vtype: int, pos: int) -> int:
            if vtype == 8:
                return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
            if vtype == 9:
                item, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item in (8, 9):
                    for _ in range(count):
                        pos = value(item, pos)
                    return pos
                return pos + count * struct.calcsize(_SCALARS[item])
            struct.unpack_from("<" + _SCALARS[vtype], buf, pos)
            return pos + struct.calcsize(_SCALARS[vtype])

        for _ in range(n_kv):
            pos = value(8, pos)  # the key
            pos = value(struct.unpack_from("<I", buf, pos)[0], pos + 4)
        for _ in range(n_tensors):
            pos = value(8, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            struct.unpack_from(f"<{n_dims}QIQ", buf, pos + 4)
            pos += 4 + 8 * n_dims + 12
        return 0 if pos <= len(buf) else 1


def timed(argv: list[str], env: dict[str, str], cwd: str) -> float:
    import subprocess
    import time

    start = time.perf_counter()  # (cwd: `python -m` puts it first on sys.path, before PYTHONPATH)
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    import argparse
    import os
    import statistics
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--compare", type=Path, help="another llamactl checkout to run the same commands from")
    parser.add_argument("--mdl", type=Path, help="llama-mdl's `mdl` executable, to time `mdl fit inspect FILE`")
    args = parser.parse_args()
    from tests.synth import ModelSpec, write_model

    with tempfile.TemporaryDirectory() as tmp:
        qwen = write_model(Path(tmp) / "vocab152k.gguf", ModelSpec(**QWEN))
        gemma = write_model(Path(tmp) / "gemma-3-270m-shape.gguf", ModelSpec(**GEMMA))
        base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base_env |= {"LLAMACTL_STATE_DIR": str(Path(tmp) / "state"), "LLAMA_SERVER": "/nonexistent",
                     "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pycache")}
        commands = {
            "--version": (["--version"], {}),
            "ps (nothing running)": (["ps"], {}),
            "gpus --gpus none": (["gpus", "--gpus", "none"], {}),
            "completion (Tab)": ([], {"_LLAMACTL_COMPLETE": "complete_bash", "COMP_WORDS": "llamactl ev",
                                      "COMP_CWORD": "1"}),
            "estimate 152k vocab": (["estimate", str(qwen), "--gpus", "none", "--json"], {}),
            "estimate gemma-3-270m": (["estimate", str(gemma), "--gpus", "none", "--json"], {}),
        }
        others = {"baseline": [sys.executable, "-c", "pass"],
                  "struct walk gemma-3-270m": [sys.executable, __file__, "--walk", str(gemma)]}
        if args.mdl:
            others["llama-mdl fit inspect gemma-3-270m"] = [str(args.mdl), "fit", "inspect", str(gemma)]
        trees = {"this": root} | ({"compare": args.compare.resolve()} if args.compare else {})
        times: dict[str, list[float]] = {}
        for run in range(args.runs + 1):  # round 0 writes the bytecode and is not counted
            for name, argv in others.items():
                times.setdefault(name, []).append(timed(argv, base_env, tmp))
            for tree_name, tree in trees.items():
                env = {**base_env, "PYTHONPATH": str(tree)}
                for name, (argv, extra) in commands.items():
                    times.setdefault(f"{tree_name}: {name}", []).append(
                        timed([sys.executable, "-m", "llamactl", *argv], {**env, **extra}, tmp))
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    base = medians.pop("baseline")
    print(f"baseline `python -c pass`: median {base * 1000:.0f} ms over {args.runs} runs")
    for name, med in medians.items():
        print(f"{name:<40} median {med * 1000:4.0f} ms  (+{(med - base) * 1000:.0f} ms over the baseline)")
    for other in (n for n in others if n != "baseline"):
        for tree_name in trees:
            ratio = medians[f"{tree_name}: estimate gemma-3-270m"] / medians[other]
            print(f"{tree_name}: estimate gemma-3-270m / {other}: {ratio:.2f}")
    if args.compare:
        for name in commands:
            this, other = medians[f"this: {name}"], medians[f"compare: {name}"]
            print(f"{name:<40} this / compare: {this / other:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(walk(sys.argv[2]) if sys.argv[1:2] == ["--walk"] else main())
