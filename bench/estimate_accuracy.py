"""Accuracy report per architecture: llamactl's estimate vs llama-server's logged buffers, and how two
simple public formulas do on the same cases.

Usage: python bench/estimate_accuracy.py [--server PATH] [--realistic] [--markdown]

For each case the real llama-server (CPU) loads the model at `--verbosity 4`; the truth is the sum of
its model, KV, recurrent-state, compute and output buffers. Compared:
  llamactl  — `llamactl estimate --gpus none`, buffers only (the host runtime overhead is left out)
  rule      — a rule of thumb found in early llama.cpp wrappers, with every layer on the GPU:
              (file MiB + 650 + n_kv_heads·ctx·n_embd·2/MiB · n_layers) · 1.2 + 577
  naive     — file size + 2·n_layers·ctx·n_kv_heads·head_dim·2 bytes (the usual back-of-envelope)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import measure_case  # noqa: E402

from llamactl.errors import UsageError  # noqa: E402
from llamactl.model.params import ModelParams  # noqa: E402
from llamactl.model.settings import ServerSettings, resolve  # noqa: E402
from llamactl.servers.probe import find_server  # noqa: E402
from llamactl.units import MiB  # noqa: E402
from tests.synth import REALISTIC, ModelSpec  # noqa: E402

TERMS = ("weights", "kv", "recurrent", "compute", "output")


@dataclass(frozen=True)
class Case:
    arch: str
    label: str
    spec: ModelSpec
    settings: ServerSettings
    sparse: bool = False


def cases(realistic: bool) -> list[Case]:
    base = ModelSpec(n_vocab=4096, n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=768)
    archs: dict[str, ModelSpec] = {"llama": base, "qwen2": replace(base, arch="qwen2")}
    extra = {  # architectures the generator may know (see tests/synth.py)
        "qwen3": dict(arch="qwen3", head_dim=64),
        "gemma3": dict(arch="gemma3", head_dim=64, n_swa=128, tied_output=True, n_layer=6),
        "qwen3moe": dict(arch="qwen3moe", head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=256),
        "mamba2": dict(arch="mamba2", n_head=0, n_head_kv=0, ssm_d_conv=4, ssm_d_inner=512, ssm_d_state=64,
                       ssm_n_group=1, ssm_dt_rank=8),
        "deepseek2": dict(arch="deepseek2", n_head_kv=1, n_ff=1536, head_dim=32, n_rot=16, kv_lora_rank=64,
                          n_dense_lead=1, n_expert=8, n_expert_used=2, n_ff_exp=64, n_shared_expert=1),
        "deci": dict(arch="deci", n_layer=6, n_head=(8, 8, 8, 0, 8, 8), n_head_kv=(4, 2, 0, 0, 8, 1),
                     n_ff=(768, 512, 0, 768, 1024, 768)),
        "qwen35": dict(arch="qwen35", head_dim=64, full_attention_interval=4, ssm_d_conv=4, ssm_d_state=32,
                       ssm_n_group=2, ssm_dt_rank=4, ssm_d_inner=128),
        "qwen3next": dict(arch="qwen3next", head_dim=64, full_attention_interval=4, ssm_d_conv=4, ssm_d_state=32,
                          ssm_n_group=2, ssm_dt_rank=4, ssm_d_inner=128, n_expert=8, n_expert_used=2, n_ff_exp=256,
                          n_ff_shexp=256),
        "lfm2": dict(arch="lfm2", n_layer=6, n_head_kv=(0, 0, 4, 0, 4, 0), shortconv_l_cache=3, tied_output=True),
        "granitehybrid": dict(arch="granitehybrid", n_head_kv=(0, 4, 0, 4), ssm_d_conv=4, ssm_d_inner=512,
                              ssm_d_state=64, ssm_n_group=1, ssm_dt_rank=8, n_expert=8, n_expert_used=2,
                              n_ff_exp=256, n_ff_shexp=512),
    }
    for arch, fields in extra.items():
        try:
            archs[arch] = replace(base, **fields)
        except TypeError:
            continue  # this generator does not know the architecture yet
    grid = {
        "-c 4096": ServerSettings(ctx_size=4096),
        "-c 16384 -fa off": ServerSettings(ctx_size=16384, flash_attn="off"),
        "-c 8192 -ctk q8_0 -ctv q8_0": ServerSettings(ctx_size=8192, cache_type_k="q8_0", cache_type_v="q8_0"),
        "-c 4096 -np 2": ServerSettings(ctx_size=4096, parallel=2),
    }
    out = [Case(arch, f"{arch} {label}", spec, s) for arch, spec in archs.items() for label, s in grid.items()]
    bert = ModelSpec(arch="bert", n_vocab=4096, n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=1024, n_ctx_train=2048)
    for label, s in (("--embedding -c 2048", ServerSettings(ctx_size=2048, embedding=True)),
                     ("--embedding -c 2048 -fa off", ServerSettings(ctx_size=2048, embedding=True, flash_attn="off")),
                     ("--embedding -ub 1024 -b 1024", ServerSettings(ctx_size=2048, embedding=True, ubatch_size=1024,
                                                                    batch_size=1024))):
        out.append(Case("bert", f"bert {label}", bert, s))
    if realistic:
        for key, wtype, arch in (("llama3-8b", "Q4_0", "llama"), ("qwen2.5-7b", "Q8_0", "qwen2"),
                                 ("qwen3-8b", "Q4_0", "qwen3"), ("gemma3-4b", "Q4_0", "gemma3"),
                                 ("qwen3-30b-a3b", "Q4_0", "qwen3moe"), ("deepseek-v2-lite", "Q4_0", "deepseek2"),
                                 ("granite-4.0-h-tiny", "Q4_0", "granitehybrid"), ("lfm2-1.2b", "Q8_0", "lfm2")):
            if key in REALISTIC:
                big = key in ("qwen3-30b-a3b", "deepseek-v2-lite")  # a repacked copy would not fit 24 GiB of RAM
                out.append(Case(arch, f"{key} {wtype} -c 8192" + (" -nr" if big else ""),
                                replace(REALISTIC[key], weight_type=wtype),
                                ServerSettings(ctx_size=8192, repack=not big), sparse=True))
    return out


def rule_of_thumb(params: ModelParams, ctx: int) -> int:
    size_mb = params.file_bytes / MiB
    kv_factor = max(params.n_head_kv) * ctx * params.n_embd * 2 / MiB
    return int(((size_mb + 650 + kv_factor * params.n_layer) * 1.2 + 577) * MiB)


def naive_formula(params: ModelParams, ctx: int) -> int:
    return params.file_bytes + 2 * params.n_layer * ctx * max(params.n_head_kv) * params.n_embd_head_k * 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=None)
    parser.add_argument("--realistic", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    binary = find_server(args.server)
    worst: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args.realistic):
            try:
                params, ours, truth = measure_case(case.spec, case.sparse, case.settings, binary, Path(tmp))
            except UsageError as exc:  # settings llama.cpp itself refuses for this model (tests check both refuse)
                print(f"{case.label}: refused: {exc}", flush=True)
                continue
            resolved = resolve(case.settings, params, 0)
            total_truth = sum(truth.values())
            row = [case.label]
            for term in TERMS:
                if truth[term] or ours[term]:
                    err = 100.0 * (ours[term] - truth[term]) / truth[term] if truth[term] else float("inf")
                    worst[term] = max(worst.get(term, 0.0), abs(err))
                    row.append(f"{ours[term] / MiB:.2f}/{truth[term] / MiB:.2f} ({err:+.1f}%)")
                else:
                    row.append("-")
            for name, value in (("llamactl", sum(ours.values())), ("rule of thumb", rule_of_thumb(params, resolved.n_ctx)),
                                ("naive", naive_formula(params, resolved.n_ctx))):
                err = 100.0 * (value - total_truth) / total_truth
                worst[f"total {name}"] = max(worst.get(f"total {name}", 0.0), abs(err))
                row.append(f"{err:+.1f}%")
            rows.append(row)
            print(" | ".join(row) if not args.markdown else "| " + " | ".join(row) + " |", flush=True)
    header = ["case"] + [f"{t} est/log MiB" for t in TERMS] + ["total: llamactl", "rule of thumb", "naive"]
    if args.markdown:
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    print("worst |error|: " + ", ".join(f"{k} {v:.1f}%" for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
