"""Option groups shared by subcommands (llama-server flags, inventory flags), declared once.

`with_options(...)` adds a group's parameters to a Typer command's signature and
hands the command one frozen value per group, so `estimate`, `plan` and
`launch` take the same flags with the same meaning.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import typer

from llamactl.errors import UsageError
from llamactl.estimate import host_repack_types, parse_tensor_split
from llamactl.gpu import inventory
from llamactl.gpu.inventory import Inventory
from llamactl.placement import DEFAULT_MARGIN_BYTES, DEFAULT_MEM_THRESHOLD, DEFAULT_UTIL_THRESHOLD, Policy, Strategy
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


def parse_ngl(text: Optional[str]) -> Optional[int]:
    if text is None or text.lower() in ("all", "auto", "-1", "-2"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"-ngl/--n-gpu-layers must be a number, 'all' or 'auto', got {text!r}") from None
    if value < 0:
        raise UsageError(f"-ngl/--n-gpu-layers must be >= 0, got {value}")
    return value


def _server_settings(ctx_size, n_gpu_layers, tensor_split, cache_type_k, cache_type_v, flash_attn, parallel,
                     kv_unified, batch_size, ubatch_size, swa_full, no_kv_offload, no_mmap, no_repack,
                     embedding, reranking, n_cpu_moe, cpu_moe, lora, override_tensor) -> ServerSettings:
    if n_cpu_moe is not None and n_cpu_moe < 0:
        raise UsageError(f"--n-cpu-moe must be >= 0, got {n_cpu_moe}")
    if cpu_moe:
        n_cpu_moe = MAX_LAYERS  # every layer's experts (resolve() clamps to the model's layers)
    return ServerSettings(
        n_cpu_moe=n_cpu_moe, lora=tuple(lora or ()),
        tensor_overrides=tuple(o for value in override_tensor or () for o in parse_tensor_overrides(value)),
        ctx_size=ctx_size, n_gpu_layers=parse_ngl(n_gpu_layers), tensor_split=parse_tensor_split(tensor_split),
        cache_type_k=cache_type_k.lower(), cache_type_v=cache_type_v.lower(), flash_attn=flash_attn.lower(),
        parallel=parallel, kv_unified=kv_unified, batch_size=batch_size, ubatch_size=ubatch_size,
        swa_full=swa_full, kv_offload=not no_kv_offload, mmap=not no_mmap, repack=not no_repack,
        embedding=embedding, reranking=reranking,
    )


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
), _server_settings)


@dataclass(frozen=True)
class InventoryOptions:
    inventory: inventory.Inventory
    gpu_overhead_bytes: int


def _inventory(gpus, gpus_file, gpu_overhead) -> InventoryOptions:
    return InventoryOptions(inventory.resolve(gpus, gpus_file), parse_size(gpu_overhead, what="--gpu-overhead"))


INVENTORY = OptionGroup("inv", (
    _opt("gpus", Optional[str], typer.Option(None, "--gpus", help="Simulated GPUs: none, 24GiB,24GiB, 2x80GiB (env LLAMACTL_GPUS).")),
    _opt("gpus_file", Optional[str], typer.Option(None, "--gpus-file", help="Inventory file as printed by `gpus --json`.")),
    _opt("gpu_overhead", str, typer.Option(f"{DEFAULT_GPU_OVERHEAD_BYTES // 2**20}MiB", "--gpu-overhead", help="Per-GPU CUDA context and pools.")),
), _inventory)


@dataclass(frozen=True)
class PolicyOptions:
    """Placement flags as given; `policy()` checks them against the inventory."""

    strategy: Strategy
    max_gpus: Optional[int]
    no_partial: bool
    margin: str
    util_threshold: int
    mem_threshold: float
    gpu_ids: Optional[str]
    host_mem: Optional[str]

    def policy(self, inv: InventoryOptions, allowed_gpus: tuple[int, ...] | None = None,
               max_gpus: int | None = None) -> Policy:
        """The placement Policy; a config model's `gpus` and `max_gpus` apply where the flags are not given."""
        if not 0 < self.mem_threshold <= 1:
            raise UsageError(f"--gpu-mem-threshold must be in (0, 1], got {self.mem_threshold}")
        ids = _parse_ids(self.gpu_ids, inv.inventory)
        return Policy(
            strategy=self.strategy, max_gpus=self.max_gpus if self.max_gpus is not None else max_gpus,
            allow_partial=not self.no_partial,
            margin_bytes=parse_size(self.margin, what="--margin"), gpu_overhead_bytes=inv.gpu_overhead_bytes,
            util_threshold=self.util_threshold, mem_threshold=self.mem_threshold,
            allowed_gpus=ids if ids is not None else allowed_gpus,
            host_memory_bytes=host_memory(inv.inventory, self.host_mem), cpu_repack_types=host_repack_types(),
        )


POLICY = OptionGroup("placement", (
    _opt("strategy", Strategy, typer.Option(Strategy.SPREAD, "--strategy", help="One GPU: spread (most free) or pack (smallest that fits).")),
    _opt("max_gpus", Optional[int], typer.Option(None, "--max-gpus", min=1, help="Split over at most this many GPUs.")),
    _opt("no_partial", bool, typer.Option(False, "--no-partial", help="Refuse partial offload (GPU or CPU only).")),
    _opt("margin", str, typer.Option(f"{DEFAULT_MARGIN_BYTES // 2**20}MiB", "--margin", help="Headroom left free on each GPU.")),
    _opt("util_threshold", int, typer.Option(DEFAULT_UTIL_THRESHOLD, "--gpu-util-threshold", help="Skip GPUs at least this busy (%).")),
    _opt("mem_threshold", float, typer.Option(DEFAULT_MEM_THRESHOLD, "--gpu-mem-threshold", help="Skip GPUs other programs use this fraction of.")),
    _opt("gpu_ids", Optional[str], typer.Option(None, "--gpu-ids", help="Allow-list of GPU indices, e.g. 0,2.")),
    _opt("host_mem", Optional[str], typer.Option(None, "--host-memory", help="RAM available for CPU layers (default: this machine's, for live GPUs).")),
), PolicyOptions)


def host_memory(inv: Inventory, given: str | None) -> int | None:
    """RAM a CPU or partial plan may use: --host-memory, else this machine's available RAM when the
    GPUs are live (a simulated inventory describes another machine, whose RAM is unknown)."""
    if given is not None:
        return parse_size(given, what="--host-memory")
    if inv.source == "nvml":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def _parse_ids(text: str | None, inv: Inventory) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--gpu-ids {text!r}: expected GPU indices separated by commas") from None
    if not ids:
        raise UsageError("--gpu-ids needs at least one GPU index")
    known = {g.index for g in inv.gpus}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UsageError(f"--gpu-ids: no GPU {unknown[0]} in the inventory (GPUs: {sorted(known) or 'none'})")
    return ids


def with_options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace each group's keyword parameter by the group's options; call with the built value."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)  # the command module may use string annotations
        own = [p for p in sig.parameters.values() if p.name not in {g.name for g in groups}]
        added = [p for g in groups for p in g.params]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            for group in groups:
                values = {p.name: kwargs.pop(p.name) for p in group.params}
                kwargs[group.name] = group.build(**values)
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}  # typer must read the signature's real types, not fn's strings
        return wrapper

    return decorate
