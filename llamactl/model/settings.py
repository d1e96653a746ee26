"""How llama-server resolves its settings' defaults.

`ServerSettings` (declared by the registry, model/registry.py) holds what the user asked for, in
llama-server's own terms (None = the server's default). `resolve()` turns it into `Resolved`: the exact
values llama-server will run with (padded context, slots, unified cache, flash
attention on or off), which is what both the estimate and the argv use.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamactl.model import quants

from llamactl.errors import UsageError
from llamactl.model.params import ModelParams
from llamactl.model.registry import (FLASH_ATTN_MODES, KV_CACHE_TYPES, LLAMACTL_DEFAULT_CTX, MAX_CTX,  # noqa: F401
                                     MAX_LAYERS, MAX_SEQ, ServerSettings, parse_tensor_overrides, parse_tensor_split)

SERVER_AUTO_SLOTS = 4  # llama-server with -np unset: 4 slots sharing one unified KV cache
CTX_PAD = 256


@dataclass(frozen=True)
class Resolved:
    """What llama-server will actually run with, for one model on one set of devices."""

    ctx_size: int  # -c as llama-server will be given it (0 resolved to the trained context)
    n_ctx: int  # total cells over all streams, after padding
    n_ctx_seq: int  # cells per stream
    n_seq_max: int  # slots
    n_stream: int  # KV streams: 1 if unified, else n_seq_max
    kv_unified: bool
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    n_gpu_layers: int  # integer, clamped to n_layer + 1
    cache_type_k: str
    cache_type_v: str
    swa_full: bool
    kv_offload: bool
    mmap: bool
    repack: bool
    embedding: bool
    reranking: bool = False
    n_cpu_moe: int = 0  # layers whose expert tensors stay on the host (only with GPU layers)
    lora: tuple[str, ...] = ()
    tensor_overrides: tuple[tuple[str, str], ...] = ()  # as given: (regex, "CPU" | "CUDA<i>")
    draft_model: str | None = None  # -md: a second model and context, sized like the main one
    draft_n_gpu_layers: int = 0  # -ngld, resolved
    draft_cache_type_k: str = "f16"
    draft_cache_type_v: str = "f16"
    mmproj: str | None = None
    mmproj_offload: bool = True


def pad(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def resolve(settings: ServerSettings, model: ModelParams, n_gpus: int) -> Resolved:
    """Resolve defaults exactly as llama-server does (server.cpp, llama-context.cpp)."""
    if settings.ctx_size < 0:
        raise UsageError(f"-c/--ctx-size must be >= 0, got {settings.ctx_size}")
    if settings.parallel is not None and not 1 <= settings.parallel <= MAX_SEQ:
        raise UsageError(f"-np/--parallel must be 1..{MAX_SEQ} (llama.cpp's limit), got {settings.parallel}")
    if settings.ctx_size > MAX_CTX:
        raise UsageError(f"-c/--ctx-size {settings.ctx_size} is too large (llama-server takes at most {MAX_CTX})")
    if settings.batch_size < 1 or settings.ubatch_size < 1:
        raise UsageError("-b/--batch-size and -ub/--ubatch-size must be >= 1")
    for flag, value in (("-ctk/--cache-type-k", settings.cache_type_k), ("-ctv/--cache-type-v", settings.cache_type_v),
                        ("-ctkd/--cache-type-k-draft", settings.draft_cache_type_k),
                        ("-ctvd/--cache-type-v-draft", settings.draft_cache_type_v)):
        if value not in KV_CACHE_TYPES:
            raise UsageError(f"{flag}: unknown cache type {value!r} (allowed: {', '.join(KV_CACHE_TYPES)})")
    if settings.flash_attn not in FLASH_ATTN_MODES:
        raise UsageError(f"-fa/--flash-attn must be on, off or auto, got {settings.flash_attn!r}")

    if settings.parallel is None:  # server "auto": 4 slots, unified, whatever -kvu says
        n_seq_max, unified = SERVER_AUTO_SLOTS, True
    else:
        n_seq_max, unified = settings.parallel, bool(settings.kv_unified)
    ctx_size = settings.ctx_size or model.n_ctx_train
    if ctx_size <= 0:
        raise UsageError("-c 0 asks for the trained context, but the model does not state one; give -c N")
    n_ctx = pad(ctx_size, CTX_PAD)
    if unified:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = pad(n_ctx // n_seq_max, CTX_PAD)
        if n_ctx_seq == 0:
            raise UsageError(f"-c {ctx_size} is too small for {n_seq_max} slots: each would get no cells")
        n_ctx = n_ctx_seq * n_seq_max
    batch = settings.batch_size
    if settings.embedding or settings.reranking:  # all of an input in one ubatch: the server caps the batch to the ubatch
        batch = min(batch, settings.ubatch_size)
    # llama.cpp takes min(n_ctx, n_batch) before padding the context (causal models only)
    n_batch = min(ctx_size, batch) if model.causal else batch
    n_ubatch = min(n_batch, settings.ubatch_size)

    # `auto` enables flash attention when every attention op can run on its layer's device;
    # the CPU and CUDA backends support it for the cache types llama-server accepts.
    flash_attn = settings.flash_attn != "off"
    if settings.cache_type_v not in ("f32", "f16", "bf16") and not flash_attn:
        raise UsageError("quantized V cache (-ctv) requires flash attention: use -fa on")
    if model.mla and settings.cache_type_k != settings.cache_type_v:
        raise UsageError(f"MLA models do not support different K ({settings.cache_type_k}) and V "
                         f"({settings.cache_type_v}) cache types (llama.cpp refuses it); give -ctk and -ctv the same type")
    if flash_attn:  # llama_init_from_model refuses quantized cache blocks that do not divide a head
        for flag, kind, head in (("-ctk", settings.cache_type_k, model.n_embd_head_k),
                                 ("-ctv", settings.cache_type_v, model.n_embd_head_v)):
            block = quants.sizes(quants.by_name(kind))[0]
            if block > 1 and head and head % block:
                raise UsageError(f"{flag} {kind}: its block of {block} does not divide this model's head size {head} "
                                 "(llama.cpp refuses it); use f16 or -fa off")

    max_layers = model.n_layer + 1  # the output layer counts as one
    ngl = max_layers if settings.n_gpu_layers is None or settings.n_gpu_layers < 0 else min(settings.n_gpu_layers, max_layers)
    if n_gpus == 0:
        ngl = 0
    if settings.n_cpu_moe is not None and settings.n_cpu_moe < 0:
        raise UsageError(f"--n-cpu-moe must be >= 0, got {settings.n_cpu_moe}")
    for pattern, target in settings.tensor_overrides:
        gpu = target.removeprefix("CUDA")
        if target != "CPU" and not (gpu.isdigit() and int(gpu) < max(n_gpus, 0)):
            where = f"{n_gpus} GPU(s)" if n_gpus else "no GPU"
            raise UsageError(f"-ot {pattern}={target}: buffer type {target!r} does not exist with {where} "
                             "(use CPU or CUDA0..CUDA<n-1>)")
    # experts matter only where layers would otherwise be on a GPU, and only for a MoE
    n_cpu_moe = min(settings.n_cpu_moe or 0, model.n_layer) if ngl and model.n_expert else 0
    draft_ngl = 0
    if settings.draft_model is not None:
        if settings.draft_cache_type_v not in ("f32", "f16", "bf16") and not flash_attn:
            raise UsageError("quantized draft V cache (-ctvd) requires flash attention: use -fa on")
        draft_layers = (model.draft.n_layer + 1) if model.draft is not None else max_layers
        if n_gpus == 0:
            draft_ngl = 0
        elif settings.draft_n_gpu_layers is None or settings.draft_n_gpu_layers < 0:
            draft_ngl = draft_layers if ngl == max_layers and not n_cpu_moe else 0  # small: all of it, or none
        else:
            draft_ngl = min(settings.draft_n_gpu_layers, draft_layers)
    return Resolved(
        ctx_size=ctx_size, n_ctx=n_ctx, n_ctx_seq=n_ctx_seq, n_seq_max=n_seq_max, n_stream=1 if unified else n_seq_max,
        kv_unified=unified, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn,
        n_gpu_layers=ngl, cache_type_k=settings.cache_type_k, cache_type_v=settings.cache_type_v,
        swa_full=settings.swa_full and model.n_swa > 0, kv_offload=settings.kv_offload,
        mmap=settings.mmap, repack=settings.repack, embedding=settings.embedding or settings.reranking,
        reranking=settings.reranking, n_cpu_moe=n_cpu_moe,
        lora=settings.lora, tensor_overrides=settings.tensor_overrides,
        draft_model=settings.draft_model, draft_n_gpu_layers=draft_ngl,
        draft_cache_type_k=settings.draft_cache_type_k, draft_cache_type_v=settings.draft_cache_type_v,
        mmproj=settings.mmproj, mmproj_offload=settings.mmproj_offload,
    )
