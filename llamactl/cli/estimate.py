"""`llamactl estimate MODEL.gguf...`: memory per device for given llama-server flags."""

from __future__ import annotations

from typing import Optional

import typer

from llamactl import render
from llamactl.cli.common import wants_json
from llamactl.errors import UsageError
from llamactl.estimate import EstimateResult, estimate_files, host_repack_types, parse_tensor_split
from llamactl.gpu import inventory
from llamactl.model.memory import DEFAULT_GPU_OVERHEAD_BYTES
from llamactl.model.settings import LLAMACTL_DEFAULT_CTX, ServerSettings
from llamactl.units import format_bytes, format_count, parse_size

_ON_OFF = {"on": True, "off": False}


def _result_json(result: EstimateResult) -> dict[str, object]:
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
            "kv_heads": list(model.n_head_kv) if len(set(model.n_head_kv)) > 1 else model.n_head_kv[0],
            "head_size_k": model.n_embd_head_k,
            "head_size_v": model.n_embd_head_v,
            "embedding_length": model.n_embd,
            "vocab_size": model.n_vocab,
            "context_length": model.n_ctx_train,
            "tied_output": model.tied_output,
        },
        "settings": {
            "ctx_size": res.n_ctx,
            "ctx_size_per_slot": res.n_ctx_seq,
            "parallel": res.n_seq_max,
            "kv_unified": res.kv_unified,
            "n_gpu_layers": res.n_gpu_layers,
            "tensor_split": _shares(result.tensor_split),
            "flash_attn": "on" if res.flash_attn else "off",
            "cache_type_k": res.cache_type_k,
            "cache_type_v": res.cache_type_v,
            "batch_size": res.n_batch,
            "ubatch_size": res.n_ubatch,
            "swa_full": res.swa_full,
            "kv_offload": res.kv_offload,
            "mmap": res.mmap,
            "repack": res.repack,
        },
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
        },
        "layers": _layer_summary(est.layer_devices),
        "approximate": list(est.approximate),
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


def _print_human(result: EstimateResult, note: str | None) -> None:
    model, est, res = result.params, result.estimate, result.estimate.resolved
    kv_heads = model.n_head_kv[0] if len(set(model.n_head_kv)) == 1 else f"{min(model.n_head_kv)}-{max(model.n_head_kv)} (per layer)"
    head = model.n_embd_head_k if model.n_embd_head_k == model.n_embd_head_v else f"{model.n_embd_head_k}/{model.n_embd_head_v}"
    print(f"{result.path}")
    print(f"  {model.arch} · {format_count(model.n_params)} params · {model.file_type or '?'} · {format_bytes(model.file_bytes)}")
    print(f"  layers {model.n_layer} · heads {max(model.n_head)} · kv heads {kv_heads} · head size {head} · "
          f"vocab {model.n_vocab} · trained ctx {model.n_ctx_train}{' · tied output' if model.tied_output else ''}")
    slots = f"{res.n_seq_max} slots, {'unified' if res.kv_unified else f'{res.n_ctx_seq} cells each'}"
    print(f"  -c {res.n_ctx} ({slots}) · -ngl {res.n_gpu_layers} · -fa {'on' if res.flash_attn else 'off'} · "
          f"-ctk {res.cache_type_k} -ctv {res.cache_type_v} · -b {res.n_batch} -ub {res.n_ubatch}")
    if note:
        print(f"  note: {note}")
    print()
    rows = [
        [d.device, format_bytes(d.weights_bytes), format_bytes(d.kv_bytes), format_bytes(d.compute_bytes),
         format_bytes(d.output_bytes), format_bytes(d.overhead_bytes), format_bytes(d.total_bytes)]
        for d in est.devices
    ]
    if any(d.recurrent_bytes for d in est.devices):
        for row, d in zip(rows, est.devices):
            row.insert(3, format_bytes(d.recurrent_bytes))
        headers = ["DEVICE", "WEIGHTS", "KV", "RECURRENT", "COMPUTE", "OUTPUT", "OVERHEAD", "TOTAL"]
    else:
        headers = ["DEVICE", "WEIGHTS", "KV", "COMPUTE", "OUTPUT", "OVERHEAD", "TOTAL"]
    print(render.table(rows, headers))
    hw = est.host_weights
    parts = []
    if hw.mapped_bytes:
        parts.append(f"{format_bytes(hw.mapped_bytes)} mapped from the file (page cache)")
    if hw.repack_bytes:
        parts.append(f"{format_bytes(hw.repack_bytes)} repacked copies")
    if hw.copy_bytes:
        parts.append(f"{format_bytes(hw.copy_bytes)} loaded copies (--no-mmap)")
    if parts:
        print(f"\nhost weights: {', '.join(parts)}")
    print(f"total: {format_bytes(est.total_bytes)}")
    for text in est.approximate:
        print(f"approximate: {text}")


def command(
    ctx: typer.Context,
    models: list[str] = typer.Argument(..., metavar="MODEL.gguf...", help="GGUF files (any shard of a split model)."),
    ctx_size: int = typer.Option(LLAMACTL_DEFAULT_CTX, "-c", "--ctx-size", help="Context size; 0 = the model's trained context."),
    n_gpu_layers: Optional[str] = typer.Option(None, "-ngl", "--n-gpu-layers", "--gpu-layers", help="Layers on GPU: N, all (default with GPUs)."),
    tensor_split: Optional[str] = typer.Option(None, "-ts", "--tensor-split", help="Split across GPUs, e.g. 3,1."),
    cache_type_k: str = typer.Option("f16", "-ctk", "--cache-type-k", help="KV cache type for K."),
    cache_type_v: str = typer.Option("f16", "-ctv", "--cache-type-v", help="KV cache type for V."),
    flash_attn: str = typer.Option("auto", "-fa", "--flash-attn", help="on, off or auto (resolved as the server would)."),
    parallel: Optional[int] = typer.Option(None, "-np", "--parallel", help="Slots; unset = 4 sharing one unified cache."),
    kv_unified: Optional[bool] = typer.Option(None, "-kvu/-no-kvu", "--kv-unified/--no-kv-unified", help="One KV cache shared by all slots."),
    batch_size: int = typer.Option(2048, "-b", "--batch-size", help="Logical batch size."),
    ubatch_size: int = typer.Option(512, "-ub", "--ubatch-size", help="Physical batch size."),
    swa_full: bool = typer.Option(False, "--swa-full", help="Full-size cache for sliding-window layers."),
    no_kv_offload: bool = typer.Option(False, "-nkvo", "--no-kv-offload", help="Keep the KV cache on the host."),
    no_mmap: bool = typer.Option(False, "--no-mmap", help="Load weights into RAM (llama-server --load-mode none)."),
    no_repack: bool = typer.Option(False, "-nr", "--no-repack", help="No CPU_REPACK copies of quantized weights."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Simulated GPUs: none, 24GiB,24GiB, 2x80GiB."),
    gpus_file: Optional[str] = typer.Option(None, "--gpus-file", help="Inventory file as printed by `gpus --json`."),
    gpu_overhead: str = typer.Option(f"{DEFAULT_GPU_OVERHEAD_BYTES // 2**20}MiB", "--gpu-overhead", help="Per-GPU CUDA context and pools."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """Predict a model's memory per device from its GGUF header and llama-server flags."""
    ngl = _parse_ngl(n_gpu_layers)
    settings = ServerSettings(
        ctx_size=ctx_size, n_gpu_layers=ngl, tensor_split=parse_tensor_split(tensor_split),
        cache_type_k=cache_type_k.lower(), cache_type_v=cache_type_v.lower(), flash_attn=flash_attn.lower(),
        parallel=parallel, kv_unified=kv_unified, batch_size=batch_size, ubatch_size=ubatch_size,
        swa_full=swa_full, kv_offload=not no_kv_offload, mmap=not no_mmap, repack=not no_repack,
    )
    inv = inventory.resolve(gpus, gpus_file)
    overhead = parse_size(gpu_overhead, what="--gpu-overhead")
    results = estimate_files(models, settings, inv, gpu_overhead_bytes=overhead, repack_types=host_repack_types())
    if wants_json(ctx, json_output):
        payload = [_result_json(r) for r in results]
        render.emit_json(payload[0] if len(payload) == 1 else payload)
        return
    for index, result in enumerate(results):
        if index:
            print()
        _print_human(result, inv.note)


def _parse_ngl(text: str | None) -> int | None:
    if text is None or text.lower() in ("all", "auto", "-1", "-2"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"-ngl/--n-gpu-layers must be a number, 'all' or 'auto', got {text!r}") from None
    if value < 0:
        raise UsageError(f"-ngl/--n-gpu-layers must be >= 0, got {value}")
    return value


def register(app: typer.Typer) -> None:
    app.command("estimate")(command)
