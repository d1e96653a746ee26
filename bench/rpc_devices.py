"""Per-device estimate vs llama-server's buffer logs, with ggml-rpc-server processes as the GPUs.

Usage: python bench/rpc_devices.py [--server PATH] [--markdown]
Runs the cases of tests/e2e/test_rpc_devices.py (the same comparisons, with bounds) and prints, per
case and device, estimated/logged MiB of weights, KV (+ recurrent state) and compute; then, for
realistic layouts, ours against llama.cpp's own estimator (`llama-fit-params --fit-print on`). llama-server
places layers, KV, the output layer, -ts shares, --n-cpu-moe and pipeline copies on RPC devices by
the code it uses for CUDA devices; the compute kernels are the CPU backend's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamactl.model.gguf import read_header  # noqa: E402
from llamactl.model.memory import Placement, estimate  # noqa: E402
from llamactl.model.params import model_params  # noqa: E402
from llamactl.model.settings import resolve  # noqa: E402
from llamactl.servers.buffers import free_port, measure  # noqa: E402
from llamactl.servers.command import build_command  # noqa: E402
from llamactl.servers.probe import find_server, probe  # noqa: E402
from llamactl.units import MiB  # noqa: E402
from tests.e2e.test_rpc_devices import CASES, FIT_CASES, MODELS, N_DEVICES, RPC_NAMES, _fit_args, _port_open  # noqa: E402
from tests.synth import REALISTIC, write_model  # noqa: E402


def start_rpc(binary: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    rpc = next((binary.parent / n for n in RPC_NAMES if (binary.parent / n).is_file()), None)
    if rpc is None:
        sys.exit(f"no ggml-rpc-server next to {binary} (build llama.cpp with -DGGML_RPC=ON)")
    procs, endpoints = [], []
    for _ in range(N_DEVICES):
        port = free_port()
        procs.append(subprocess.Popen([str(rpc), "--port", str(port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        endpoints.append(f"127.0.0.1:{port}")
        while not _port_open(port):
            time.sleep(0.05)
    return procs, endpoints


def fit_params(binary: Path, endpoints: list[str], markdown: bool) -> None:
    from dataclasses import replace

    print("\n| case (llama-fit-params) | device | weights ours/theirs | KV + state | compute |\n|---|---|---|---|---|"
          if markdown else "\nllama-fit-params")
    with tempfile.TemporaryDirectory() as tmp:
        for case, (key, wtype, n_gpus, settings, split) in FIT_CASES.items():
            path = write_model(Path(tmp) / f"{key}.gguf", replace(REALISTIC[key], weight_type=wtype), sparse=True)
            params = model_params(read_header(path))
            resolved = resolve(settings, params, n_gpus)
            est = estimate(params, resolved, Placement(n_gpus=n_gpus, tensor_split=split or (), gpu_overhead_bytes=0))
            out = subprocess.run([str(binary.parent / "llama-fit-params"), "-m", str(path), "--rpc",
                                  ",".join(endpoints[:n_gpus]), "--fit-print", "on", *_fit_args(resolved, split)],
                                 capture_output=True, text=True, timeout=300).stdout
            for line in (ln.split() for ln in out.splitlines() if ln.strip()):
                dev = est.device("CPU" if line[0] == "Host" else f"GPU{line[0].removeprefix('RPC')}")
                cells = [f"{ours / MiB:.0f}/{theirs}" for ours, theirs in (
                    (dev.weights_bytes, line[1]), (dev.kv_bytes + dev.recurrent_bytes, line[2]),
                    (dev.compute_bytes, line[3]))]
                if dev.device == "CPU":
                    cells[0] = f"{dev.weights_bytes / MiB:.0f} (mapped)/{line[1]}"
                row = [f"{case} ({key} {wtype}, {n_gpus} GPU)", dev.device, *cells]
                print(("| " + " | ".join(row) + " |") if markdown else "  ".join(row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", type=Path)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    binary = args.server or find_server()
    caps = probe(binary)
    procs, endpoints = start_rpc(binary)
    sep = " | " if args.markdown else "  "
    if args.markdown:
        print("| case | device | weights | KV + state | compute |\n|---|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {name: write_model(Path(tmp) / f"{name}.gguf", spec) for name, spec in MODELS.items()}
            for case, (model, n_gpus, settings, split) in CASES.items():
                params = model_params(read_header(paths[model]))
                resolved = resolve(settings, params, n_gpus)
                est = estimate(params, resolved, Placement(n_gpus=n_gpus, tensor_split=split or (),
                                                           gpu_overhead_bytes=0))
                port = free_port()
                cmd = build_command(binary, paths[model], resolved, caps, port=port, tensor_split=split,
                                    verbose_buffers=True, extra=["--rpc", ",".join(endpoints[:n_gpus])])
                got = measure(list(cmd.argv), cmd.env, port, timeout_s=120)
                copies = re.search(r"sched copies = (\d+)", got.log)
                label = f"{case} ({model}, {n_gpus} GPU, copies {copies[1] if copies else '?'})"
                names = {"CPU": "CPU", **{f"GPU{i}": f"RPC0[{ep}]" for i, ep in enumerate(endpoints[:n_gpus])}}
                for ours_name, logged_name in names.items():
                    d = est.device(ours_name)
                    cells = []
                    for ours, terms in ((d.weights_bytes, ("weights",)), (d.kv_bytes + d.recurrent_bytes, ("kv", "recurrent")),
                                        (d.compute_bytes, ("compute",))):
                        logged = sum(got.buffers.term(t, device=logged_name) for t in terms)
                        err = f" ({(ours - logged) / logged * 100:+.1f}%)" if logged else ""
                        cells.append(f"{ours / MiB:.2f}/{logged / MiB:.2f}{err}")
                    row = [label, ours_name, *cells]
                    print(("| " + sep.join(row) + " |") if args.markdown else sep.join(row))
        fit_params(binary, endpoints, args.markdown)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
