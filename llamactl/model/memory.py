"""The memory model, pure: model hyperparameters + resolved llama-server settings → bytes per device.

Mirrors llama.cpp's own allocations (see docs/memory.md and
../shared/design/MEMORY-MODEL.md): weights by llama.cpp's layer placement
(token_embd on the host, the output layer offloaded first, tied embeddings
copied to the output device, CPU_REPACK copies of quantized weights), the KV
cache by cells × per-layer row sizes, the output buffer, and the compute
buffer from the worst-case graph's live tensors with calibrated coefficients.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from llamactl.model import quants

from llamactl.model.gguf import TensorInfo
from llamactl.model.params import DELTA_NET_ARCHS, MODELLED_ARCHS, ModelParams, tensor_layer
from llamactl.model.settings import Resolved, pad
from llamactl.units import MiB

CPU_ALIGNMENT = 32  # TENSOR_ALIGNMENT of the CPU backend
GPU_ALIGNMENT = 128  # CUDA buffer alignment
F32 = 4

# The CUDA context, cuBLAS workspace and pool buffers llama.cpp does not count in its logs.
# Third-party reports say 140-160 MiB, tools assume 250-457 MiB; not yet measured on our GPUs,
# so the default sits on the safe side. Override with --gpu-overhead.
DEFAULT_GPU_OVERHEAD_BYTES = 400 * MiB

# The llama-server process itself beyond llama.cpp's buffers (binary, libraries, threads, the
# tokenizer's tables): RSS minus logged buffers measured at 16.4 MiB (512 tokens), 17.5 MiB (32k)
# and 22.7 MiB (152k tokens + merges) on the CPU build; see docs/benchmarks.md.
HOST_RUNTIME_BASE_BYTES = 16 * MiB
HOST_RUNTIME_PER_TOKEN_BYTES = 40

# With every layer on two or more GPUs (split by layer, KV offloaded, no tensor overrides, devices
# with async compute and events, as CUDA's), llama.cpp runs micro-batches in a pipeline and keeps
# GGML_SCHED_MAX_COPIES copies of every graph input and of every tensor crossing devices.
PIPELINE_COPIES = 4

# With some layers on the CPU, llama.cpp's GPU compute buffers grow 1.2-2.7x (MEMORY-MODEL.md);
# until measured on a GPU, partial plans reserve the upper middle of that range.
PARTIAL_COMPUTE_FACTOR = 2.0

# Types the CPU backend repacks for SIMD kernels on x86 (ggml-cpu/repack.cpp), by CPU feature.
REPACK_TYPES_BY_FEATURE: dict[str, frozenset[str]] = {
    "avx2": frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}),
    "avx512f": frozenset({"Q2_K"}),
}

# Compute-buffer calibration: the reserved graph's peak is the live tensors of its largest phase.
# Check against the real binary: `python bench/accuracy.py --realistic` (docs/benchmarks.md).
COMPUTE_CALIBRATION = {
    "fixed_bytes": 32 * 1024,  # token ids, positions, KV indices, output ids
    "ffn_embd": 5,  # residual, norm and input activations alive beside gate/up/product
    "attn_embd": 3,
    "moe_router": 2,  # router logits and probabilities, per expert
}
# Gated delta-net layers (qwen35/qwen3next; a least-squares fit over 9 generated shapes): per token, f32,
# the conv (q, k, v) and value (gate, output) rows and the residual stream; plus copies of the state.
DELTA_NET_CALIBRATION = {"conv": 1.5, "value": 1.25, "embd": 4.1, "state": 4.0}
# Mamba-2 layers (a least-squares fit over 15 shapes × settings, worst ±7 %; bench/estimate_accuracy.py):
# per token, f32: in_proj output, conv input (xBC), scan output, residual stream; plus the states.
MAMBA2_CALIBRATION = {"in_proj": 1.6, "xbc": 0.66, "inner": 0.9, "embd": 5.0, "state": 1.5, "fixed_bytes": 160 * 1024}


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device holds for one llama-server instance."""

    device: str  # "CPU" for the host, "GPU0", "GPU1", ... for GPUs in inventory order
    weights_bytes: int = 0
    kv_bytes: int = 0
    recurrent_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0
    overhead_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.compute_bytes
                + self.output_bytes + self.overhead_bytes)


@dataclass(frozen=True)
class HostWeights:
    """How the host's weights split between the mapped file and real copies."""

    mapped_bytes: int  # CPU_Mapped: page cache of the file (0 with --no-mmap)
    repack_bytes: int  # CPU_REPACK: anonymous copies in SIMD layout
    copy_bytes: int  # CPU: anonymous copies (with --no-mmap)
    adapter_bytes: int = 0  # CPU: LoRA adapters of host layers (always copies)


@dataclass(frozen=True)
class MemoryEstimate:
    resolved: Resolved
    devices: tuple[DeviceMemory, ...]  # the host first, then GPUs
    host_weights: HostWeights
    layer_devices: tuple[str, ...]  # device of each repeating layer, then of the output layer
    approximate: tuple[str, ...] = field(default=())  # terms that are not exact, and why
    pipeline_copies: int = 1  # graph-input copies llama.cpp keeps (4 under pipeline parallelism)
    calibration: tuple[str, ...] = field(default=())  # what was learned from earlier launches and used (learn/)
    draft: "MemoryEstimate | None" = None  # the draft model's share (-md), already included in `devices`
    projector: DeviceMemory | None = None  # the vision projector's share (--mmproj), already included

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices)

    def device(self, name: str) -> DeviceMemory:
        for dev in self.devices:
            if dev.device == name:
                return dev
        raise KeyError(name)


@dataclass(frozen=True)
class Placement:
    """Where llama.cpp puts things: GPU count, split, overheads, and the host's repack types."""

    n_gpus: int = 0
    tensor_split: tuple[float, ...] = ()  # per GPU; empty = even (callers pass llama.cpp's free-memory split)
    gpu_overhead_bytes: int = DEFAULT_GPU_OVERHEAD_BYTES
    cpu_repack_types: frozenset[str] = frozenset()


def row_bytes(type_name: str, n_elements: int) -> int:
    block, size = quants.sizes(quants.by_name(type_name))
    return n_elements // block * size


def layer_devices(params: ModelParams, resolved: Resolved, placement: Placement) -> tuple[str, ...]:
    """Device of layers 0..n_layer-1 and of the output layer (index n_layer), as llama_model::load_tensors."""
    n_all = params.n_layer + 1
    ngl = resolved.n_gpu_layers if placement.n_gpus else 0
    i_gpu_start = max(n_all - ngl, 0)
    act = min(ngl, n_all)
    split = placement.tensor_split or (1.0,) * placement.n_gpus
    total = sum(split) or 1.0
    cumulative, running = [], 0.0
    for share in split:
        running += share
        cumulative.append(running / total)
    out = []
    for il in range(n_all):
        if act == 0 or il < i_gpu_start or il - i_gpu_start >= act:
            out.append("CPU")
        else:
            idx = bisect.bisect_right(cumulative, (il - i_gpu_start) / act)
            out.append(f"GPU{min(idx, placement.n_gpus - 1)}")
    return tuple(out)


def _is_matmul_weight(info: TensorInfo) -> bool:
    # 2D weight matrices feed MUL_MAT and 3D expert stacks MUL_MAT_ID; token_embd feeds GET_ROWS,
    # norms and biases are 1D.
    if info.name.startswith("token_embd") or len(info.shape) < 2 or info.shape[1] <= 1:
        return False
    return len(info.shape) == 2 or (len(info.shape) == 3 and "_exps" in info.name)


def _repackable(info: TensorInfo, types: frozenset[str]) -> bool:
    return (info.ggml_type.name in types and _is_matmul_weight(info)
            and info.shape[0] % 8 == 0 and info.shape[1] % 8 == 0)


# --n-cpu-moe N overrides the buffer type of blk.<i> tensors matching this for i < N (common/common.h)
_EXPERT_TENSOR_RE = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")


def _override(name: str, resolved: Resolved) -> str | None:
    """The device an -ot pattern (first match, in order, as llama.cpp) or --n-cpu-moe sends a tensor to."""
    for pattern, target in resolved.tensor_overrides:
        if re.search(pattern, name):
            return "CPU" if target == "CPU" else f"GPU{target.removeprefix('CUDA')}"
    layer = tensor_layer(name)
    if layer is not None and layer < resolved.n_cpu_moe and _EXPERT_TENSOR_RE.search(name):
        return "CPU"
    return None


def _tensor_device(info: TensorInfo, devices: tuple[str, ...], n_layer: int, resolved: Resolved | None = None) -> str:
    if info.name.startswith("token_embd"):
        return "CPU"  # llama.cpp never offloads the input layer (nor lets -ot move it)
    if resolved is not None and (forced := _override(info.name, resolved)) is not None:
        return forced
    layer = tensor_layer(info.name)
    if layer is not None:
        return devices[min(layer, n_layer - 1)]
    if info.name.startswith(("output", "cls", "output_norm")):
        return devices[n_layer]
    return "CPU"


def _weights(params: ModelParams, resolved: Resolved, placement: Placement,
             devices: tuple[str, ...]) -> tuple[dict[str, int], HostWeights]:
    per_device: dict[str, int] = {}
    # GPU builds try the GPU's pinned host buffer before CPU_REPACK, and with mmap fall back to plain
    # CPU: weights are repacked only where no GPU is visible.
    repack_types = placement.cpu_repack_types if resolved.repack and placement.n_gpus == 0 else frozenset()
    ranges: dict[int, tuple[int, int]] = {}  # shard → mapped [first, last) of the CPU context
    repack_bytes = copy_bytes = adapter_bytes = 0
    for info in params.tensors:
        dev = _tensor_device(info, devices, params.n_layer, resolved)
        if dev != "CPU":
            per_device[dev] = per_device.get(dev, 0) + pad(info.n_bytes, GPU_ALIGNMENT)
        elif _repackable(info, repack_types):
            repack_bytes += pad(info.n_bytes, CPU_ALIGNMENT)
        else:
            copy_bytes += pad(info.n_bytes, CPU_ALIGNMENT)
            first, last = ranges.get(info.shard, (info.offset, info.offset + info.n_bytes))
            ranges[info.shard] = (min(first, info.offset), max(last, info.offset + info.n_bytes))
    # LoRA tensors are copies on their base tensor's device (never in a repack buffer: plain CPU there)
    for info in params.adapters:
        base = info.name.rpartition(".")[0]
        dev = _tensor_device(TensorInfo(base, info.shape, info.ggml_type, 0, 0), devices, params.n_layer, resolved)
        if dev != "CPU":
            per_device[dev] = per_device.get(dev, 0) + pad(info.n_bytes, GPU_ALIGNMENT)
        else:
            adapter_bytes += pad(info.n_bytes, CPU_ALIGNMENT)
    if params.tied_output:
        embd = next((t for t in params.tensors if t.name == "token_embd.weight"), None)
        out_dev = devices[params.n_layer]
        if embd is not None and out_dev != "CPU":
            per_device[out_dev] = per_device.get(out_dev, 0) + pad(embd.n_bytes, GPU_ALIGNMENT)
        elif embd is not None and embd.ggml_type.name in repack_types and embd.shape[1] % 8 == 0:
            repack_bytes += pad(embd.n_bytes, CPU_ALIGNMENT)  # the output's MUL_MAT copy, repacked
    mapped = sum(last - first for first, last in ranges.values())
    if resolved.mmap:
        host = HostWeights(mapped_bytes=mapped, repack_bytes=repack_bytes, copy_bytes=0, adapter_bytes=adapter_bytes)
    else:
        host = HostWeights(mapped_bytes=0, repack_bytes=repack_bytes, copy_bytes=copy_bytes, adapter_bytes=adapter_bytes)
    per_device["CPU"] = host.mapped_bytes + host.repack_bytes + host.copy_bytes + host.adapter_bytes
    return per_device, host


def swa_cells(params: ModelParams, resolved: Resolved) -> int:
    """Cells per stream of the sliding-window cache (llama-kv-cache-iswa.cpp)."""
    if resolved.swa_full:
        return resolved.n_ctx_seq
    window = params.n_swa * (resolved.n_seq_max if resolved.kv_unified else 1) + resolved.n_ubatch
    return pad(min(resolved.n_ctx_seq, window), 256)


def _kv(params: ModelParams, resolved: Resolved, devices: tuple[str, ...]) -> dict[str, int]:
    full_cells = resolved.n_ctx_seq * resolved.n_stream
    window_cells = swa_cells(params, resolved) * resolved.n_stream if any(params.swa_layers) else 0
    # without flash attention V is stored transposed, every layer sized for the widest one
    v_width_max = max((params.n_embd_v_gqa(il) for il in range(params.n_layer)), default=0)
    per_device: dict[str, int] = {}
    if not params.causal:
        return per_device  # encoders attend within the batch and keep no cache
    for il in range(params.n_layer):
        if params.recurrent_layers[il]:
            continue  # the recurrent memory's, not the KV cache's
        if params.n_head_kv[il] == 0 and resolved.flash_attn:
            continue  # no KV heads (deci's linear or attention-free layers): empty K and V
        # without flash attention even a layer without KV heads gets a V of the widest layer's width
        cells = window_cells if params.swa_layers[il] else full_cells
        v_width = params.n_embd_v_gqa(il) if resolved.flash_attn else v_width_max
        v_bytes = 0 if params.mla else row_bytes(resolved.cache_type_v, v_width)  # MLA: V is read from K
        layer_bytes = (row_bytes(resolved.cache_type_k, params.n_embd_k_gqa(il)) + v_bytes) * cells
        dev = devices[il] if resolved.kv_offload else "CPU"
        per_device[dev] = per_device.get(dev, 0) + layer_bytes
    return per_device


def _recurrent(params: ModelParams, resolved: Resolved, devices: tuple[str, ...]) -> dict[str, int]:
    """Conv and SSM state per recurrent layer, f32, one row per sequence (llama-memory-recurrent.cpp)."""
    rows = max(1, resolved.n_seq_max)
    per_device: dict[str, int] = {}
    for il in range(params.n_layer):
        if params.recurrent_layers[il]:
            dev = devices[il] if resolved.kv_offload else "CPU"
            per_device[dev] = per_device.get(dev, 0) + F32 * (params.n_embd_r + params.n_embd_s) * rows
    return per_device


def compute_graph_bytes(params: ModelParams, resolved: Resolved) -> int:
    """Peak of the reserved worst-case graph (n_ubatch tokens, full KV) on one backend.

    The graph allocator frees a tensor after its last use, so the buffer is the largest
    set of tensors alive at once: the inputs (KQ mask) plus the biggest of the FFN phase
    (gate, up and their product), the attention phase (KQ scores without flash attention)
    and the output head. Coefficients in units of one [n_embd, n_tokens] f32 activation
    were read off llama-server's logs over the grid in bench/accuracy.py.
    """
    cal = COMPUTE_CALIBRATION
    if all(params.recurrent_layers):
        return _recurrent_graph_bytes(params, resolved)
    n_tokens = pad(resolved.n_ubatch, resolved.n_seq_max)
    n_outputs = min(resolved.n_ubatch, resolved.n_seq_max)  # llama-server reserves n_parallel outputs
    n_kv = resolved.n_ctx_seq if params.causal else n_tokens  # encoders: attention within the ubatch
    n_head = max(params.n_head)
    q_width = n_head * params.n_embd_head_k
    kv_width = max(params.n_head_kv) * (params.n_embd_head_k + params.n_embd_head_v)
    act = F32 * n_tokens  # bytes per activation row element
    mask = _mask_bytes(params, resolved)
    ffn = _moe_ffn_bytes(params, resolved)
    if params.ffn_dense or not params.n_expert:
        # gate, up and their product; an ungated FFN (bert's GELU) only up, activated in place
        dense = act * ((3 if params.ffn_gated else 1) * max(params.n_ff) + cal["ffn_embd"] * params.n_embd)
        ffn = max(ffn, dense)
    attention = act * (q_width + kv_width + cal["attn_embd"] * params.n_embd)
    if params.q_gated:  # the gate half of Q stays alive beside the attention
        attention += act * n_head * params.n_embd_head_v
    if resolved.flash_attn:
        attention += act * n_head * params.n_embd_head_v  # the fused kernel's output
    else:
        # KQ scores (softmax runs in place), then KQV and its contiguous copy
        attention += F32 * n_kv * n_tokens * n_head + act * 2 * n_head * params.n_embd_head_v
    head = F32 * params.n_vocab * n_outputs + act * 2 * params.n_embd
    # hybrids (granitehybrid & co.): their recurrent layers are one more phase of the same graph
    if not any(params.recurrent_layers):
        mixer = 0
    elif params.arch in DELTA_NET_ARCHS:
        mixer = _delta_net_mixer_bytes(params, resolved)
    else:
        mixer = _mamba2_mixer_bytes(params, resolved)
    return cal["fixed_bytes"] + mask + max(ffn, attention, head, mixer)


def _mask_bytes(params: ModelParams, resolved: Resolved, layers: range | list[int] | None = None) -> int:
    """The KQ mask(s) `layers` read, a graph input: f16 with flash attention, f32 without.

    Full-attention and sliding-window layers each read a mask of their own cache's size; recurrent
    layers none.
    """
    attn = [il for il in (range(params.n_layer) if layers is None else layers) if not params.recurrent_layers[il]]
    if not attn:
        return 0
    n_tokens = pad(resolved.n_ubatch, resolved.n_seq_max)
    n_kv = resolved.n_ctx_seq if params.causal else n_tokens
    mask_elem = 2 if resolved.flash_attn else F32
    swa = params.causal and any(params.swa_layers[il] for il in attn)
    full = not params.causal or any(not params.swa_layers[il] for il in attn)
    return mask_elem * n_tokens * ((n_kv if full else 0) + (swa_cells(params, resolved) if swa else 0))


def _input_bytes(params: ModelParams, resolved: Resolved, layers: range | list[int] | None = None) -> int:
    """Graph inputs that grow with the batch: the masks, and without flash attention the transposed
    V cache's row indices (int64 per token and V element)."""
    inputs = _mask_bytes(params, resolved, layers)
    if inputs and not resolved.flash_attn and params.causal:
        attn = [il for il in (range(params.n_layer) if layers is None else layers) if params.n_head_kv[il]
                and not params.recurrent_layers[il]]
        v_width = max((params.n_embd_v_gqa(il) for il in range(params.n_layer)), default=0)
        kinds = {params.swa_layers[il] for il in attn}  # one index tensor per cache
        inputs += 8 * pad(resolved.n_ubatch, resolved.n_seq_max) * v_width * len(kinds)
    return inputs


def _moe_ffn_bytes(params: ModelParams, resolved: Resolved) -> int:
    """Live tensors of a MoE FFN: only the used experts' FFNs run per token."""
    if not (params.n_expert and params.n_ff_exp):
        return 0
    cal = COMPUTE_CALIBRATION
    act = F32 * pad(resolved.n_ubatch, resolved.n_seq_max)
    ff_used = params.n_ff_exp * params.n_expert_used
    down = params.n_embd * params.n_expert_used
    # the experts' down outputs reuse the freed gate+up block when they fit in it, else they stack on top;
    # a shared expert's activations stay alive beside them
    return act * (3 * ff_used + (down if down > 2 * ff_used else 0) + cal["ffn_embd"] * params.n_embd
                  + cal["moe_router"] * params.n_expert + params.n_ff_shexp)


def _delta_net_mixer_bytes(params: ModelParams, resolved: Resolved) -> int:
    """Live tensors of one gated delta-net layer (qwen35 & co.): per token its q/k/v (conv) and gate/output
    (value) rows and the residual stream, plus copies of the per-head state. A least-squares fit over 9
    generated shapes (head size 32-128, 2-4 key and 4-16 value heads, n_embd 256-512; worst -21 %/+9 % on
    those, up to +17 % over the test grid's settings)."""
    cal = DELTA_NET_CALIBRATION
    act = F32 * pad(resolved.n_ubatch, resolved.n_seq_max)
    key_dim = params.ssm_d_state * params.ssm_n_group
    conv = 2 * key_dim + params.ssm_d_inner
    state = F32 * params.ssm_d_state * params.ssm_d_inner * resolved.n_seq_max
    return int(act * (cal["conv"] * conv + cal["value"] * params.ssm_d_inner + cal["embd"] * params.n_embd)
               + cal["state"] * state)


def _mamba2_mixer_bytes(params: ModelParams, resolved: Resolved) -> int:
    """Live tensors of one Mamba-2 mixer: its per-token activations and the states it reads and writes."""
    cal = MAMBA2_CALIBRATION
    n_tokens = pad(resolved.n_ubatch, resolved.n_seq_max)
    xbc = params.ssm_d_inner + 2 * params.ssm_n_group * params.ssm_d_state
    in_proj = xbc + params.ssm_d_inner + params.ssm_dt_rank
    per_token = (cal["in_proj"] * in_proj + cal["xbc"] * xbc + cal["inner"] * params.ssm_d_inner
                 + cal["embd"] * params.n_embd)
    states = cal["state"] * F32 * params.n_embd_s * resolved.n_seq_max
    return int(F32 * n_tokens * per_token + states)


def _recurrent_graph_bytes(params: ModelParams, resolved: Resolved) -> int:
    head = F32 * params.n_vocab * min(resolved.n_ubatch, resolved.n_seq_max)
    return _mamba2_mixer_bytes(params, resolved) + MAMBA2_CALIBRATION["fixed_bytes"] + head


def pipeline_parallel(resolved: Resolved, n_gpus: int, devices: tuple[str, ...]) -> bool:
    """llama_context's condition: several GPUs, every layer on them, split by layer, KV offloaded, no overrides."""
    return (n_gpus > 1 and "CPU" not in devices and resolved.kv_offload and not resolved.n_cpu_moe
            and not resolved.tensor_overrides)


def _host_compute(params: ModelParams, resolved: Resolved, graph: int, copies: int, layers_on_cpu: bool) -> int:
    """The host's compute buffer: the whole graph when it runs layers, else the graph inputs it keeps.

    Graph inputs (the KQ masks, token embeddings) live on the host and are copied to the GPUs; with
    every layer offloaded the host holds them and the token_embd lookup, `copies` times under
    pipeline parallelism (read off llama-server's logs with RPC devices, tests/e2e/test_rpc_devices.py).
    """
    if layers_on_cpu:
        return graph
    embd = F32 * params.n_embd * resolved.n_ubatch
    inputs = copies * (_input_bytes(params, resolved) + 2 * embd) + 2 * embd
    if resolved.n_cpu_moe:  # the host runs the experts it keeps: its input, gate/up and down outputs
        inputs += F32 * pad(resolved.n_ubatch, resolved.n_seq_max) * (
            2 * params.n_ff_exp * params.n_expert_used + params.n_embd * (params.n_expert_used + 1))
    return inputs


def _gpu_compute(params: ModelParams, resolved: Resolved, graph: int, copies: int, partial: bool,
                 layers: list[int]) -> int:
    if not layers:  # the output layer alone: the logits of the reserved outputs
        n_outputs = min(resolved.n_ubatch, resolved.n_seq_max)
        return F32 * (params.n_vocab + 2 * params.n_embd) * n_outputs
    own = int(graph * PARTIAL_COMPUTE_FACTOR) if partial else graph
    # a device receives only the inputs its layers read (a stage of sliding-window layers: not the full mask)
    inputs = _input_bytes(params, resolved, layers)
    own -= _input_bytes(params, resolved) - inputs
    embd = F32 * params.n_embd * resolved.n_ubatch
    if all(params.recurrent_layers):  # fitted on RPC logs (mamba2): each stage also copies ~4 states per slot
        per_copy = inputs + 4 * embd + 4 * F32 * (params.n_embd_r + params.n_embd_s) * resolved.n_seq_max
    elif layers[0] == 0:  # the first stage also receives the token embeddings and their companions
        per_copy = inputs + 4 * embd
    else:  # a later stage: the residual stream from upstream (2 activations: llama-fit-params on Gemma-3-27B)
        per_copy = inputs + 2 * embd
    # pipeline copies of those inputs and of the activations from upstream
    return own + (copies - 1) * per_copy


def _approximations(params: ModelParams, placement: Placement, partial: bool) -> tuple[str, ...]:
    notes = []
    if params.arch not in MODELLED_ARCHS:
        notes.append(f"architecture {params.arch!r} has not been checked against llama-server: weights and "
                     "KV follow the GGUF, the compute buffer is the dense-attention model's")
    if placement.n_gpus:
        notes.append("GPU compute buffers are calibrated on the CPU backend; CUDA's may differ (placement, "
                     "weights, KV and pipeline copies per device are checked against llama.cpp with RPC devices)")
        if partial:
            notes.append(f"partial offload: GPU compute buffers taken as {PARTIAL_COMPUTE_FACTOR:g}x the full-offload "
                         "size (llama.cpp's grow 1.2-2.7x)")
    return tuple(notes)


def estimate(params: ModelParams, resolved: Resolved, placement: Placement = Placement()) -> MemoryEstimate:
    """Bytes per device for `params` run with `resolved` settings on `placement`'s devices."""
    devices = layer_devices(params, resolved, placement)
    weights, host = _weights(params, resolved, placement, devices)
    kv = _kv(params, resolved, devices)
    state = _recurrent(params, resolved, devices)
    graph = compute_graph_bytes(params, resolved)
    layers_on_cpu = "CPU" in devices
    # some weights of the offloaded layers stay on the host: their GPUs compute as under partial offload
    overridden_to_host = any(target == "CPU" for _, target in resolved.tensor_overrides)
    partial = placement.n_gpus > 0 and (layers_on_cpu or resolved.n_cpu_moe > 0 or overridden_to_host)
    copies = PIPELINE_COPIES if pipeline_parallel(resolved, placement.n_gpus, devices) else 1
    gpu_names = [f"GPU{i}" for i in range(placement.n_gpus)]
    rows = [DeviceMemory(
        device="CPU",
        weights_bytes=weights.get("CPU", 0),
        kv_bytes=kv.get("CPU", 0),
        recurrent_bytes=state.get("CPU", 0),
        # tensors an -ot sends to the host are computed there: the whole graph, conservatively
        compute_bytes=_host_compute(params, resolved, graph, copies, layers_on_cpu or overridden_to_host),
        # logits (reserved even by encoders) and, for an embeddings server, one embedding per slot
        output_bytes=F32 * (params.n_vocab + (params.n_embd if resolved.embedding else 0)) * resolved.n_seq_max,
        overhead_bytes=HOST_RUNTIME_BASE_BYTES + HOST_RUNTIME_PER_TOKEN_BYTES * params.n_vocab,
    )]
    for name in gpu_names:
        used = name in devices
        rows.append(DeviceMemory(
            device=name,
            weights_bytes=weights.get(name, 0),
            kv_bytes=kv.get(name, 0),
            recurrent_bytes=state.get(name, 0),
            compute_bytes=_gpu_compute(params, resolved, graph, copies, partial,
                                       [il for il in range(params.n_layer) if devices[il] == name]) if used else 0,
            overhead_bytes=placement.gpu_overhead_bytes if used else 0,
        ))
    draft = None
    if resolved.draft_model is not None and params.draft is not None:
        draft = _draft(params.draft, resolved, placement)
        rows = [_plus(row, draft.device(row.device)) for row in rows]
    projector = None
    notes = _approximations(params, placement, partial)
    if resolved.mmproj is not None and params.projector is not None:
        from llamactl.model.projector import CHECKED_TYPES, compute_bytes

        where = "GPU0" if placement.n_gpus and resolved.mmproj_offload else "CPU"
        projector = DeviceMemory(device=where, weights_bytes=params.projector.weights_bytes,
                                 compute_bytes=compute_bytes(params.projector, resolved.flash_attn))
        rows = [_plus(row, projector) if row.device == where else row for row in rows]
        if params.projector.proj_type not in CHECKED_TYPES:
            notes += (f"vision projector type {params.projector.proj_type!r}: its weights are exact, its compute "
                      "buffer is the SigLIP encoder's (checked for gemma3 projectors)",)
    return MemoryEstimate(resolved=resolved, devices=tuple(rows), host_weights=host,
                          layer_devices=devices, approximate=notes,
                          pipeline_copies=copies, draft=draft, projector=projector)


def _draft(draft: ModelParams, resolved: Resolved, placement: Placement) -> MemoryEstimate:
    """The draft model (-md): llama-server loads it with a context of its own sized like the main one (the
    same cells, slots, batch and flash attention; read off its logs), on its own layers (-ngld) and cache
    types (-ctkd/-ctvd). Its overhead on a GPU is the process's, already counted; on the host, its tokenizer."""
    from dataclasses import replace

    own = replace(resolved, n_gpu_layers=resolved.draft_n_gpu_layers, cache_type_k=resolved.draft_cache_type_k,
                  cache_type_v=resolved.draft_cache_type_v, n_cpu_moe=0, lora=(), tensor_overrides=(),
                  draft_model=None, swa_full=resolved.swa_full and draft.n_swa > 0)
    est = estimate(draft, own, replace(placement, gpu_overhead_bytes=0))
    host = est.device("CPU")
    rows = [replace(host, overhead_bytes=HOST_RUNTIME_PER_TOKEN_BYTES * draft.n_vocab)]
    rows += [replace(d, overhead_bytes=0) for d in est.devices if d.device != "CPU"]
    return replace(est, devices=tuple(rows))


def _plus(a: DeviceMemory, b: DeviceMemory) -> DeviceMemory:
    return DeviceMemory(device=a.device, weights_bytes=a.weights_bytes + b.weights_bytes, kv_bytes=a.kv_bytes + b.kv_bytes,
                        recurrent_bytes=a.recurrent_bytes + b.recurrent_bytes,
                        compute_bytes=a.compute_bytes + b.compute_bytes, output_bytes=a.output_bytes + b.output_bytes,
                        overhead_bytes=a.overhead_bytes + b.overhead_bytes)
