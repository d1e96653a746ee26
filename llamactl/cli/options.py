"""Option groups shared by subcommands (llama-server flags, inventory flags), declared once.

`with_options(...)` adds a group's parameters to a Typer command's signature and
hands the command one frozen value per group, so `estimate`, `plan` and
`launch` take the same flags with the same meaning. Each value also says which
flags were given on the command line (`given`): those, and only those, override
the config in resolve.py.
"""

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import typer

from llamactl.errors import UsageError
from llamactl.model.settings import parse_tensor_split
from llamactl.gpu import inventory
from llamactl.placement import DEFAULT_MARGIN_BYTES, DEFAULT_MEM_THRESHOLD, DEFAULT_UTIL_THRESHOLD, Strategy
from llamactl.model.memory import DEFAULT_GPU_OVERHEAD_BYTES
from llamactl.model.settings import LLAMACTL_DEFAULT_CTX, MAX_LAYERS, ServerSettings, parse_tensor_overrides
from llamactl.units import parse_size


@dataclass(frozen=True)
class OptionGroup:
    name: str  # the keyword the command receives
    params: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def _opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def parse_ngl(text: Optional[str], flag: str = "-ngl/--n-gpu-layers") -> Optional[int]:
    if text is None or text.lower() in ("all", "auto", "-1", "-2"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be a number, 'all' or 'auto', got {text!r}") from None
    if value < 0:
        raise UsageError(f"{flag} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class SettingsFlags:
    """llama-server flags: all of them (defaults filled in), and the ServerSettings fields given."""

    settings: ServerSettings
    given: dict[str, Any]


# option name → the ServerSettings field it sets
_SETTING_FIELD = {"no_kv_offload": "kv_offload", "no_mmap": "mmap", "no_repack": "repack", "cpu_moe": "n_cpu_moe",
                  "override_tensor": "tensor_overrides", "model_draft": "draft_model",
                  "n_gpu_layers_draft": "draft_n_gpu_layers", "cache_type_k_draft": "draft_cache_type_k",
                  "cache_type_v_draft": "draft_cache_type_v", "no_mmproj_offload": "mmproj_offload"}


def _server_settings(ctx_size, n_gpu_layers, tensor_split, cache_type_k, cache_type_v, flash_attn, parallel,
                     kv_unified, batch_size, ubatch_size, swa_full, no_kv_offload, no_mmap, no_repack,
                     embedding, reranking, n_cpu_moe, cpu_moe, lora, override_tensor, model_draft=None,
                     n_gpu_layers_draft=None, cache_type_k_draft="f16", cache_type_v_draft="f16", mmproj=None,
                     no_mmproj_offload=False, given: frozenset[str] = frozenset()) -> SettingsFlags:
    if n_cpu_moe is not None and n_cpu_moe < 0:
        raise UsageError(f"--n-cpu-moe must be >= 0, got {n_cpu_moe}")
    if cpu_moe:
        n_cpu_moe = MAX_LAYERS  # every layer's experts (resolve() clamps to the model's layers)
    settings = ServerSettings(
        n_cpu_moe=n_cpu_moe, lora=tuple(lora or ()),
        tensor_overrides=tuple(o for value in override_tensor or () for o in parse_tensor_overrides(value)),
        ctx_size=ctx_size, n_gpu_layers=parse_ngl(n_gpu_layers), tensor_split=parse_tensor_split(tensor_split),
        cache_type_k=cache_type_k.lower(), cache_type_v=cache_type_v.lower(), flash_attn=flash_attn.lower(),
        parallel=parallel, kv_unified=kv_unified, batch_size=batch_size, ubatch_size=ubatch_size,
        swa_full=swa_full, kv_offload=not no_kv_offload, mmap=not no_mmap, repack=not no_repack,
        embedding=embedding, reranking=reranking, draft_model=model_draft,
        draft_n_gpu_layers=parse_ngl(n_gpu_layers_draft, "-ngld/--n-gpu-layers-draft"),
        draft_cache_type_k=cache_type_k_draft.lower(), draft_cache_type_v=cache_type_v_draft.lower(),
        mmproj=mmproj, mmproj_offload=not no_mmproj_offload,
    )
    if "cpu_moe" in given and not cpu_moe:
        given = given - {"cpu_moe"}
    fields_given = {_SETTING_FIELD.get(name, name) for name in given}
    return SettingsFlags(settings, {f: getattr(settings, f) for f in fields_given})


SERVER = OptionGroup("settings", (
    _opt("ctx_size", int, typer.Option(LLAMACTL_DEFAULT_CTX, "-c", "--ctx-size", help="Context size; 0 = the model's trained context.")),
    _opt("n_gpu_layers", Optional[str], typer.Option(None, "-ngl", "--n-gpu-layers", "--gpu-layers", help="Layers on GPU: N or all (default: all)."),),
    _opt("tensor_split", Optional[str], typer.Option(None, "-ts", "--tensor-split", help="Split across GPUs, e.g. 3,1.")),
    _opt("cache_type_k", str, typer.Option("f16", "-ctk", "--cache-type-k", help="KV cache type for K.")),
    _opt("cache_type_v", str, typer.Option("f16", "-ctv", "--cache-type-v", help="KV cache type for V.")),
    _opt("flash_attn", str, typer.Option("auto", "-fa", "--flash-attn", help="on, off or auto (resolved as the server would).")),
    _opt("parallel", Optional[int], typer.Option(None, "-np", "--parallel", help="Slots; unset = 4 sharing one unified cache.")),
    _opt("kv_unified", Optional[bool], typer.Option(None, "-kvu/-no-kvu", "--kv-unified/--no-kv-unified", help="One KV cache shared by all slots.")),
    _opt("batch_size", int, typer.Option(2048, "-b", "--batch-size", help="Logical batch size.")),
    _opt("ubatch_size", int, typer.Option(512, "-ub", "--ubatch-size", help="Physical batch size.")),
    _opt("swa_full", bool, typer.Option(False, "--swa-full", help="Full-size cache for sliding-window layers.")),
    _opt("no_kv_offload", bool, typer.Option(False, "-nkvo", "--no-kv-offload", help="Keep the KV cache on the host.")),
    _opt("no_mmap", bool, typer.Option(False, "--no-mmap", help="Load weights into RAM (llama-server --load-mode none).")),
    _opt("no_repack", bool, typer.Option(False, "-nr", "--no-repack", help="No CPU_REPACK copies of quantized weights.")),
    _opt("embedding", bool, typer.Option(False, "--embedding", "--embeddings", help="An embeddings server (llama-server --embedding).")),
    _opt("reranking", bool, typer.Option(False, "--reranking", "--rerank", help="A reranker (llama-server --reranking: /v1/rerank).")),
    _opt("n_cpu_moe", Optional[int], typer.Option(None, "-ncmoe", "--n-cpu-moe", help="MoE: keep the experts of the first N layers on the CPU (plan picks N when unset).")),
    _opt("cpu_moe", bool, typer.Option(False, "-cmoe", "--cpu-moe", help="MoE: keep every layer's experts on the CPU.")),
    _opt("override_tensor", Optional[list[str]], typer.Option(None, "-ot", "--override-tensor", metavar="REGEX=BUFFER,...", help="Tensors matching REGEX on BUFFER: CPU or CUDA<i> (repeatable).")),
    _opt("lora", Optional[list[str]], typer.Option(None, "--lora", metavar="FILE", help="LoRA adapter loaded with the model (repeatable).")),
    _opt("model_draft", Optional[str], typer.Option(None, "-md", "--model-draft", metavar="FILE", help="Draft model for speculative decoding (same vocabulary).")),
    _opt("n_gpu_layers_draft", Optional[str], typer.Option(None, "-ngld", "--n-gpu-layers-draft", help="Draft layers on GPU: N or all (default: all when the model is wholly on GPUs, else 0).")),
    _opt("cache_type_k_draft", str, typer.Option("f16", "-ctkd", "--cache-type-k-draft", help="Draft KV cache type for K.")),
    _opt("cache_type_v_draft", str, typer.Option("f16", "-ctvd", "--cache-type-v-draft", help="Draft KV cache type for V.")),
    _opt("mmproj", Optional[str], typer.Option(None, "-mm", "--mmproj", metavar="FILE", help="Vision projector (multimodal models).")),
    _opt("no_mmproj_offload", bool, typer.Option(False, "--no-mmproj-offload", help="Keep the vision projector on the host.")),
), _server_settings)


@dataclass(frozen=True)
class InventoryOptions:
    inventory: inventory.Inventory
    given: dict[str, Any]  # PlacementSpec fields given (gpu_overhead_bytes)


def _inventory(gpus, gpus_file, gpu_overhead, no_calibration, given: frozenset[str] = frozenset()) -> InventoryOptions:
    overhead = parse_size(gpu_overhead, what="--gpu-overhead")
    placement: dict[str, Any] = {"gpu_overhead_bytes": overhead} if "gpu_overhead" in given else {}
    if no_calibration:
        placement["calibration"] = False
    return InventoryOptions(inventory.resolve(gpus, gpus_file), placement)


INVENTORY = OptionGroup("inv", (
    _opt("gpus", Optional[str], typer.Option(None, "--gpus", help="Simulated GPUs: none, 24GiB,24GiB, 2x80GiB (env LLAMACTL_GPUS).")),
    _opt("gpus_file", Optional[str], typer.Option(None, "--gpus-file", help="Inventory file as printed by `gpus --json`.")),
    _opt("gpu_overhead", str, typer.Option(f"{DEFAULT_GPU_OVERHEAD_BYTES // 2**20}MiB", "--gpu-overhead", help="Per-GPU CUDA context and pools (default: learned from earlier launches, else 400MiB).")),
    _opt("no_calibration", bool, typer.Option(False, "--no-calibration", help="The formula alone: ignore what earlier launches measured.")),
), _inventory)


def _policy(strategy, max_gpus, no_partial, margin, util_threshold, mem_threshold, gpu_ids, host_mem,
            given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The PlacementSpec fields given on the command line, checked."""
    if not (math.isfinite(mem_threshold) and 0 < mem_threshold <= 1):
        raise UsageError(f"--gpu-mem-threshold must be in (0, 1], got {mem_threshold}")
    if not 0 <= util_threshold <= 100:
        raise UsageError(f"--gpu-util-threshold must be in 0..100 (%), got {util_threshold}")
    values = {
        "strategy": ("strategy", strategy), "max_gpus": ("max_gpus", max_gpus),
        "no_partial": ("allow_partial", not no_partial),
        "margin": ("margin_bytes", parse_size(margin, what="--margin")),
        "util_threshold": ("util_threshold", util_threshold), "mem_threshold": ("mem_threshold", mem_threshold),
        "gpu_ids": ("allowed_gpus", _parse_ids(gpu_ids)),
        "host_mem": ("host_memory_bytes", parse_size(host_mem, what="--host-memory") if host_mem is not None else None),
    }
    return dict(values[name] for name in given if name in values)


POLICY = OptionGroup("placement", (
    _opt("strategy", Strategy, typer.Option(Strategy.SPREAD, "--strategy", help="One GPU: spread (most free) or pack (smallest that fits).")),
    _opt("max_gpus", Optional[int], typer.Option(None, "--max-gpus", min=1, help="Split over at most this many GPUs.")),
    _opt("no_partial", bool, typer.Option(False, "--no-partial", help="Refuse partial offload (GPU or CPU only).")),
    _opt("margin", str, typer.Option(f"{DEFAULT_MARGIN_BYTES // 2**20}MiB", "--margin", help="Headroom left free on each GPU.")),
    _opt("util_threshold", int, typer.Option(DEFAULT_UTIL_THRESHOLD, "--gpu-util-threshold", help="Skip GPUs at least this busy (%).")),
    _opt("mem_threshold", float, typer.Option(DEFAULT_MEM_THRESHOLD, "--gpu-mem-threshold", help="Skip GPUs other programs use this fraction of.")),
    _opt("gpu_ids", Optional[str], typer.Option(None, "--gpu-ids", help="Allow-list of GPU indices, e.g. 0,2.")),
    _opt("host_mem", Optional[str], typer.Option(None, "--host-memory", help="RAM available for CPU layers (default: this machine's, for live GPUs).")),
), _policy)


def _parse_ids(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--gpu-ids {text!r}: expected GPU indices separated by commas") from None
    if not ids or any(i < 0 for i in ids):
        raise UsageError(f"--gpu-ids {text!r}: expected GPU indices (>= 0) separated by commas")
    return ids


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"  # COMMANDLINE or ENVIRONMENT


def with_options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace each group's keyword parameter by the group's options; call with the built value."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)  # the command module may use string annotations
        own = [p for p in sig.parameters.values() if p.name not in {g.name for g in groups}]
        added = [p for g in groups for p in g.params]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            ctx = kwargs.get("ctx")  # every such command takes the (click) context: it knows each value's source
            for group in groups:
                values = {p.name: kwargs.pop(p.name) for p in group.params}
                given = frozenset(name for name in values if ctx is not None and _given(ctx, name))
                kwargs[group.name] = group.build(given=given, **values)
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}  # typer must read the signature's real types, not fn's strings
        return wrapper

    return decorate
