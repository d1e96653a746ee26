"""`llamactl estimate MODEL.gguf...`: memory per device for given llama-server flags."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import typer

from llamactl import render
from llamactl.cli.common import load_config, state_store, wants_json
from llamactl.cli.complete import model_names
from llamactl.cli.options import INVENTORY, SERVER, InventoryOptions, SettingsFlags, with_options
from llamactl.estimate import EstimateResult, estimate_door
from llamactl.resolve import Overrides, open_door
from llamactl.servers.probe import locate
from llamactl.model import registry
from llamactl.model.memory import MemoryEstimate
from llamactl.model.params import ModelParams
from llamactl.model.settings import Resolved
from llamactl.units import format_bytes, format_count


def result_json(result: EstimateResult) -> dict[str, object]:
    est, model, res = result.estimate, result.params, result.estimate.resolved
    return {
        "path": str(result.path),
        "model": {
            "architecture": model.arch,
            "name": model.name,
            "file_type": model.file_type,
            "parameters": model.n_params,
            "file_bytes": model.file_bytes,
            "layers": model.n_layer,
            "heads": max(model.n_head),
            "kv_heads": max(model.n_head_kv),
            "kv_heads_per_layer": list(model.n_head_kv),
            "head_size_k": model.n_embd_head_k,
            "head_size_v": model.n_embd_head_v,
            "embedding_length": model.n_embd,
            "vocab_size": model.n_vocab,
            "context_length": model.n_ctx_train,
            "tied_output": model.tied_output,
        },
        "settings": {**registry.resolved_json(res), "tensor_split": _shares(result.tensor_split)},
        "devices": [
            {
                "device": d.device,
                "weights_bytes": d.weights_bytes,
                "kv_bytes": d.kv_bytes,
                "recurrent_bytes": d.recurrent_bytes,
                "compute_bytes": d.compute_bytes,
                "output_bytes": d.output_bytes,
                "overhead_bytes": d.overhead_bytes,
                "total_bytes": d.total_bytes,
            }
            for d in est.devices
        ],
        "host_weights": {
            "mapped_bytes": est.host_weights.mapped_bytes,
            "repack_bytes": est.host_weights.repack_bytes,
            "copy_bytes": est.host_weights.copy_bytes,
            "adapter_bytes": est.host_weights.adapter_bytes,
        },
        "layers": _layer_summary(est.layer_devices),
        "pipeline_copies": est.pipeline_copies,
        "approximate": list(est.approximate),
        "calibration": list(est.calibration),
        "projector": None if est.projector is None else {
            "path": res.mmproj, "device": est.projector.device, "weights_bytes": est.projector.weights_bytes,
            "compute_bytes": est.projector.compute_bytes, "offload": res.mmproj_offload,
        },
        "draft": None if est.draft is None else {
            "model": res.draft_model, "n_gpu_layers": res.draft_n_gpu_layers,
            "cache_type_k": res.draft_cache_type_k, "cache_type_v": res.draft_cache_type_v,
            "devices": [{"device": d.device, "total_bytes": d.total_bytes} for d in est.draft.devices],
            "total_bytes": est.draft.total_bytes,
        },
        "total_bytes": est.total_bytes,
    }


def _shares(split: tuple[float, ...]) -> list[float] | None:
    """-ts as fractions of 1 (the default split is in bytes of free memory)."""
    total = sum(split)
    return [round(share / total, 4) for share in split] if split and total else None


def _layer_summary(devices: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for dev in devices:
        counts[dev] = counts.get(dev, 0) + 1
    return counts


@dataclass(frozen=True)
class Estimates:
    """estimate's result: one estimate per model asked for, and the inventory's note."""

    results: tuple[EstimateResult, ...]
    note: str | None = None

    def to_json(self) -> object:
        payload = [result_json(r) for r in self.results]
        return payload[0] if len(payload) == 1 else payload

    def text(self) -> Iterator[str]:
        for index, result in enumerate(self.results):
            if index:
                yield ""
            yield from summary_lines(result.path, result.params, result.estimate.resolved, self.note)
            yield ""
            yield from device_lines(result.estimate)


def summary_lines(path: Path | str, model: ModelParams, res: Resolved, note: str | None) -> Iterator[str]:
    """The model in two lines and the effective llama-server settings in one."""
    kv_heads = (model.n_head_kv[0] if len(set(model.n_head_kv)) == 1
                else f"{min(model.n_head_kv)}-{max(model.n_head_kv)} (per layer)")
    head = model.n_embd_head_k if model.n_embd_head_k == model.n_embd_head_v else f"{model.n_embd_head_k}/{model.n_embd_head_v}"
    yield f"{path}"
    yield f"  {model.arch} · {format_count(model.n_params)} params · {model.file_type or '?'} · {format_bytes(model.file_bytes)}"
    yield (f"  layers {model.n_layer} · heads {max(model.n_head)} · kv heads {kv_heads} · head size {head} · "
           f"vocab {model.n_vocab} · trained ctx {model.n_ctx_train}{' · tied output' if model.tied_output else ''}")
    if model.adapters:
        yield (f"  + LoRA: {', '.join(res.lora)} ({len(model.adapters)} tensors, "
               f"{format_bytes(sum(t.n_bytes for t in model.adapters))})")
    slots = f"{res.n_seq_max} slots, {'unified' if res.kv_unified else f'{res.n_ctx_seq} cells each'}"
    yield (f"  -c {res.n_ctx} ({slots}) · -ngl {res.n_gpu_layers} · -fa {'on' if res.flash_attn else 'off'} · "
           f"-ctk {res.cache_type_k} -ctv {res.cache_type_v} · -b {res.n_batch} -ub {res.n_ubatch}")
    if note:
        yield f"  note: {note}"


def device_lines(est: MemoryEstimate, capacity: dict[str, int] | None = None) -> Iterator[str]:
    """The per-device table (with capacity and headroom when planning), host weights and caveats."""
    recurrent = any(d.recurrent_bytes for d in est.devices)
    headers = ["DEVICE", "WEIGHTS", "KV"] + (["RECURRENT"] if recurrent else []) + [
        "COMPUTE", "OUTPUT", "OVERHEAD", "TOTAL"] + (["CAPACITY", "HEADROOM"] if capacity is not None else [])
    rows = []
    for d in est.devices:
        row = [d.device, format_bytes(d.weights_bytes), format_bytes(d.kv_bytes)]
        if recurrent:
            row.append(format_bytes(d.recurrent_bytes))
        row += [format_bytes(d.compute_bytes), format_bytes(d.output_bytes), format_bytes(d.overhead_bytes),
                format_bytes(d.total_bytes)]
        if capacity is not None:
            cap = capacity.get(d.device)
            row += [format_bytes(cap), "-" if cap is None else format_bytes(cap - d.total_bytes)]
        rows.append(row)
    yield render.table(rows, headers)
    hw = est.host_weights
    parts = []
    if hw.mapped_bytes:
        parts.append(f"{format_bytes(hw.mapped_bytes)} mapped from the file (page cache)")
    if hw.repack_bytes:
        parts.append(f"{format_bytes(hw.repack_bytes)} repacked copies")
    if hw.copy_bytes:
        parts.append(f"{format_bytes(hw.copy_bytes)} loaded copies (--no-mmap)")
    if hw.adapter_bytes:
        parts.append(f"{format_bytes(hw.adapter_bytes)} LoRA adapters")
    if parts:
        yield f"\nhost weights: {', '.join(parts)}"
    if est.pipeline_copies > 1:
        yield f"pipeline parallelism: llama.cpp keeps {est.pipeline_copies} copies of the graph inputs on each device"
    if est.draft is not None:
        where = ", ".join(f"{d.device} {format_bytes(d.total_bytes)}" for d in est.draft.devices if d.total_bytes)
        yield (f"draft model {est.resolved.draft_model} (-ngld {est.resolved.draft_n_gpu_layers}): "
               f"{format_bytes(est.draft.total_bytes)} of it ({where})")
    if est.projector is not None:
        yield (f"vision projector {est.resolved.mmproj}: {format_bytes(est.projector.weights_bytes)} weights and "
               f"{format_bytes(est.projector.compute_bytes)} compute on {est.projector.device}")
    yield f"total: {format_bytes(est.total_bytes)}"
    for text in est.calibration:
        yield f"calibrated: {text}"
    if not est.calibration:
        for text in est.approximate:
            yield f"approximate: {text}"


@with_options(SERVER, INVENTORY)
def command(
    ctx: typer.Context,
    models: list[str] = typer.Argument(..., metavar="MODEL", autocompletion=model_names,
                                       help="GGUF files (any shard of a split model) or model names from the config."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
    *,
    settings: SettingsFlags,
    inv: InventoryOptions,
) -> None:
    """Predict a model's memory per device from its GGUF header and llama-server flags.

    A configured model name runs with its config settings; the flags given here override them.
    """
    cfg = load_config(ctx)
    inv = inv.with_workers(cfg)
    given = Overrides(settings=settings.given, placement=inv.given)
    state_dir = state_store(ctx).dir
    doors = [open_door(cfg, model, given, inv.inventory, state_dir, lambda: locate(None, cfg.server_bin, required=False),
                       need_server=False) for model in models]
    results = tuple(estimate_door(door, inv.inventory) for door in doors)
    render.result(wants_json(ctx, json_output), Estimates(results, inv.inventory.note))


def register(app: typer.Typer) -> None:
    app.command("estimate")(command)
