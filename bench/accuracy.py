"""Compare `llamactl estimate --gpus none` with the buffers the real llama-server logs.

Usage: python bench/accuracy.py [--server PATH] [--quick] [--realistic] [--markdown]
Writes a table of estimated vs logged MiB per term (weights, KV, compute, output)
over a grid of generated models and settings. The same comparison, with bounds,
runs in tests/e2e/test_estimate_vs_server.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamactl.estimate import host_repack_types  # noqa: E402
from llamactl.model.gguf import read_header  # noqa: E402
from llamactl.model.memory import Placement, estimate  # noqa: E402
from llamactl.model.params import ModelParams, model_params  # noqa: E402
from llamactl.model.settings import ServerSettings, resolve  # noqa: E402
from llamactl.servers.buffers import free_port, measure  # noqa: E402
from llamactl.servers.command import build_command  # noqa: E402
from llamactl.servers.probe import find_server, probe  # noqa: E402
from llamactl.units import MiB  # noqa: E402
from tests.synth import REALISTIC, ModelSpec, write_model  # noqa: E402

TERMS = ("weights", "kv", "compute", "output")


@dataclass(frozen=True)
class Case:
    label: str
    spec: ModelSpec
    settings: ServerSettings
    sparse: bool = False


def tiny_cases() -> list[Case]:
    # the same grid the end-to-end tests hold to bounds
    from tests.e2e.test_estimate_vs_server import MODELS, SETTINGS

    return [Case(f"{name} {describe(s)}", spec, s) for name, spec in MODELS.items() for s in SETTINGS.values()]


def realistic_cases() -> list[Case]:
    out = []
    for key, wtype in (("llama3-8b", "Q4_0"), ("qwen2.5-7b", "Q8_0"), ("qwen2.5-0.5b", "F16"), ("llama3.2-1b", "Q4_0")):
        spec = replace(REALISTIC[key], weight_type=wtype)
        out.append(Case(f"{key} {wtype} -c 8192", spec, ServerSettings(ctx_size=8192), sparse=True))
    out.append(Case("llama3-8b Q4_0 -c 16384 -fa off", replace(REALISTIC["llama3-8b"], weight_type="Q4_0"),
                    ServerSettings(ctx_size=16384, flash_attn="off"), sparse=True))
    return out


def describe(s: ServerSettings) -> str:
    parts = [f"-c {s.ctx_size}", f"-fa {s.flash_attn}"]
    if s.parallel:
        parts.append(f"-np {s.parallel}" + (" -kvu" if s.kv_unified else ""))
    if (s.cache_type_k, s.cache_type_v) != ("f16", "f16"):
        parts.append(f"-ctk {s.cache_type_k} -ctv {s.cache_type_v}")
    if s.ubatch_size != 512:
        parts.append(f"-b {s.batch_size} -ub {s.ubatch_size}")
    if not s.mmap:
        parts.append("--no-mmap")
    if not s.repack:
        parts.append("-nr")
    return " ".join(parts)


ALL_TERMS = ("weights", "kv", "recurrent", "compute", "output")


def measure_case(spec: ModelSpec, sparse: bool, settings: ServerSettings, binary: Path,
                 workdir: Path) -> tuple[ModelParams, dict[str, int], dict[str, int]]:
    """Write the model (once per shape), estimate it for the CPU, load it in llama-server: (params, ours, logged)."""
    path = workdir / f"{abs(hash((spec, sparse)))}.gguf"
    if not path.exists():
        write_model(path, spec, sparse=sparse)
    params = model_params(read_header(path))
    resolved = resolve(settings, params, 0)
    est = estimate(params, resolved, Placement(cpu_repack_types=host_repack_types())).device("CPU")
    port = free_port()
    cmd = build_command(binary, path, resolved, probe(binary), port=port, verbose_buffers=True)
    got = measure(list(cmd.argv), cmd.env, port, timeout_s=300).buffers
    ours = {"weights": est.weights_bytes, "kv": est.kv_bytes, "recurrent": est.recurrent_bytes,
            "compute": est.compute_bytes, "output": est.output_bytes}
    return params, ours, {term: got.term(term) for term in ALL_TERMS}


def run_case(case: Case, binary: Path, workdir: Path) -> dict[str, tuple[int, int]]:
    _, ours, logged = measure_case(case.spec, case.sparse, case.settings, binary, workdir)
    return {term: (ours[term], logged[term]) for term in TERMS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=None)
    parser.add_argument("--realistic", action="store_true", help="also load realistic-shape sparse models (slow)")
    parser.add_argument("--only-realistic", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    binary = find_server(args.server)
    cases = [] if args.only_realistic else tiny_cases()
    if args.realistic or args.only_realistic:
        cases += realistic_cases()
    worst = {t: 0.0 for t in TERMS}
    sep = " | " if args.markdown else "  "
    header = ["case"] + [f"{t} est/log MiB (err%)" for t in TERMS] + ["total err%"]
    print(("| " if args.markdown else "") + sep.join(header) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            row = run_case(case, binary, Path(tmp))
            cells = [case.label]
            for term in TERMS:
                est, got = row[term]
                err = 100.0 * (est - got) / got if got else 0.0
                worst[term] = max(worst[term], abs(err))
                cells.append(f"{est / MiB:.2f}/{got / MiB:.2f} ({err:+.1f})")
            tot_est, tot_got = sum(v[0] for v in row.values()), sum(v[1] for v in row.values())
            cells.append(f"{100.0 * (tot_est - tot_got) / tot_got:+.2f}")
            print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""), flush=True)
    print("worst |error| per term: " + ", ".join(f"{t} {v:.1f}%" for t, v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
