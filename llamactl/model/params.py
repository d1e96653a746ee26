"""From a GGUF header to the hyperparameters llama.cpp sizes its buffers by.

Keys are read as llama.cpp reads them (`{arch}.block_count`,
`{arch}.attention.head_count_kv` scalar or per-layer array, key/value length
defaulting to n_embd / n_head, ...). Missing required keys raise
UnsupportedModelError naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamactl.model.quants import file_type_name

from llamactl.errors import UnsupportedModelError
from llamactl.model.gguf import GGUFArray, GGUFHeader, TensorInfo

if TYPE_CHECKING:
    from llamactl.model.projector import ProjectorParams

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")

# Architectures whose memory this version models term by term and has checked against llama-server.
MODELLED_ARCHS = frozenset({
    "llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "mamba2", "bert", "deepseek2", "granite", "internlm2",
    "granitehybrid", "deci", "lfm2", "qwen35", "qwen3next",
    "stablelm", "starcoder2", "olmo", "olmo2", "exaone", "smollm3",
})

# Which layers use a sliding window is set per architecture in llama.cpp's loaders (src/models/*.cpp:
# load_swa_pattern(ml, n_pattern, dense_first)); a GGUF may override it with
# `{arch}.attention.sliding_window_pattern` (a number, or one bool per layer). Layer l is SWA when
# l % n < n - 1 (or, dense first, when l % n != 0). Some set a default window when the GGUF has none.
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False), "gemma3n": (5, False),
    "cohere2": (4, False), "cohere2moe": (4, True), "exaone4": (4, False), "exaone-moe": (4, False),
    "olmo2": (4, False), "gpt-oss": (2, False), "afmoe": (4, False), "mellum": (4, False),
    "plamo3": (8, False), "smallthinker": (4, True), "modern-bert": (3, True),
}
SWA_DEFAULT_WINDOW = {"gemma2": 4096}
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv7", "arwkv7", "rwkv6qwen2"})
HYBRID_ARCHS = frozenset({"jamba", "granitehybrid", "falcon-h1", "nemotron_h", "lfm2", "plamo2"})
# gated delta-net hybrids: which layers are recurrent is a key (or an interval), not 0 KV heads
DELTA_NET_ARCHS = frozenset({"qwen3next", "qwen35", "qwen35moe"})


@dataclass(frozen=True)
class ModelParams:
    """What the memory model needs to know about a model, per layer where it varies."""

    arch: str
    name: str | None
    file_type: str | None
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer; 0 = no KV for that layer
    n_embd_head_k: int
    n_embd_head_v: int
    n_ff: tuple[int, ...]  # per layer
    n_expert: int
    n_expert_used: int
    n_ff_exp: int  # one expert's FFN width (0 = dense)
    n_ff_shexp: int  # the shared experts' FFN width beside a MoE (0 = none)
    n_swa: int  # sliding window, 0 = none
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window
    recurrent_layers: tuple[bool, ...]  # per layer: holds recurrent state (mamba, rwkv, hybrids)
    n_embd_r: int  # recurrent conv state per sequence and layer (f32 elements)
    n_embd_s: int  # recurrent ssm state per sequence and layer (f32 elements)
    ssm_d_inner: int
    ssm_d_state: int
    ssm_n_group: int
    ssm_dt_rank: int
    causal: bool  # False: an encoder (bert & co.) that keeps no KV cache
    mla: bool  # multi-head latent attention (deepseek2 & co.): the cache holds the compressed K only
    ffn_gated: bool  # the FFN has a gate (SwiGLU/GeGLU) beside up
    ffn_dense: bool  # some layer has a dense FFN (all of a dense model's; a MoE's leading dense layers)
    q_gated: bool  # attention's Q projection also yields an output gate (qwen3next/qwen35: twice as wide)
    n_params: int
    tied_output: bool
    tensors: tuple[TensorInfo, ...]
    file_bytes: int
    # LoRA tensors (`<base tensor>.lora_a` / `.lora_b`) of the adapters loaded with the model (--lora)
    adapters: tuple[TensorInfo, ...] = ()
    draft: "ModelParams | None" = None  # the draft model loaded beside it (-md), if any
    projector: "ProjectorParams | None" = None  # the vision projector loaded beside it (--mmproj), if any

    def n_embd_k_gqa(self, layer: int) -> int:
        return self.n_embd_head_k * self.n_head_kv[layer]

    def n_embd_v_gqa(self, layer: int) -> int:
        return self.n_embd_head_v * self.n_head_kv[layer]


def tensor_layer(name: str) -> int | None:
    """The block index of a tensor (`blk.N.`), or None for token_embd/output/norms."""
    match = _LAYER_RE.match(name)
    return int(match[1]) if match else None


def _int(header: GGUFHeader, key: str, default: int | None = None) -> int:
    value = header.get(key)
    if isinstance(value, GGUFArray):
        raise UnsupportedModelError(f"{header.path}: {key} is an array where a number was expected")
    if value is None or isinstance(value, (str, bool)):
        if default is not None:
            return default
        raise UnsupportedModelError(f"{header.path}: missing or invalid metadata key {key}")
    if isinstance(value, float) or value < 0 or value > 2**40:
        raise UnsupportedModelError(f"{header.path}: {key} must be a non-negative integer, got {value!r}")
    return int(value)


def _per_layer(header: GGUFHeader, key: str, n_layer: int, default: int | None = None) -> tuple[int, ...]:
    value = header.get(key)
    if isinstance(value, GGUFArray):
        if value.values is None or value.length != n_layer:
            raise UnsupportedModelError(f"{header.path}: {key} has {value.length} entries for {n_layer} layers")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**31 for v in value.values):
            raise UnsupportedModelError(f"{header.path}: {key} must hold non-negative integers")
        return tuple(int(v) for v in value.values)
    return (_int(header, key, default),) * n_layer


def _n_vocab(header: GGUFHeader, arch: str) -> int:
    value = header.get(f"{arch}.vocab_size")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GGUFArray):
        return tokens.length
    for info in header.tensors:
        if info.name == "token_embd.weight" and len(info.shape) >= 2:
            return info.shape[1]
    raise UnsupportedModelError(f"{header.path}: cannot tell the vocabulary size (no tokenizer.ggml.tokens)")


def _conv_state(header: GGUFHeader, arch: str, n_embd: int, d_conv: int, d_inner: int, n_group: int,
                d_state: int) -> int:
    """Conv state per sequence and layer, f32 elements (llama_hparams::n_embd_r)."""
    l_cache = _int(header, f"{arch}.shortconv.l_cache", 0)
    if l_cache:  # lfm2's short convolution keeps its last L - 1 inputs
        return n_embd * (l_cache - 1)
    return max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)


def _tensor_dim(header: GGUFHeader, suffix: str, dim: int) -> int:
    """ggml dimension `dim` of the first block tensor named *suffix, or 0."""
    for info in header.tensors:
        if info.name.startswith("blk.") and info.name.endswith(suffix) and len(info.shape) > dim:
            return info.shape[dim]
    return 0


def _file_type(header: GGUFHeader) -> str | None:
    value = header.get("general.file_type")
    if not isinstance(value, int):
        return None
    try:
        return file_type_name(value).removeprefix("MOSTLY_")
    except ValueError:
        return f"type {value}"


def _swa_layers(header: GGUFHeader, arch: str, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    if n_swa <= 0 or arch not in SWA_PATTERNS:
        return (False,) * n_layer
    n_pattern, dense_first = SWA_PATTERNS[arch]
    override = header.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(override, GGUFArray) and override.values is not None and override.length == n_layer:
        return tuple(bool(v) for v in override.values)
    if isinstance(override, int) and not isinstance(override, bool):
        n_pattern = override
    if n_pattern == 0:
        return (True,) * n_layer
    if dense_first:
        return tuple(il % n_pattern != 0 for il in range(n_layer))
    return tuple(il % n_pattern < n_pattern - 1 for il in range(n_layer))


def _recurrent_layers(header: GGUFHeader, arch: str, n_head_kv: tuple[int, ...], n_layer: int) -> tuple[bool, ...]:
    if arch in RECURRENT_ARCHS:
        return (True,) * n_layer
    if arch in DELTA_NET_ARCHS:
        # `attention.recurrent_layers` (one bool per layer), else every full_attention_interval-th
        # layer is full attention (default 4), as llama.cpp's qwen3next/qwen35 loaders decide
        marks = header.get(f"{arch}.attention.recurrent_layers")
        if isinstance(marks, GGUFArray) and marks.values is not None and marks.length >= n_layer:
            return tuple(bool(v) for v in marks.values[:n_layer])
        interval = _int(header, f"{arch}.full_attention_interval", 4) or 4
        return tuple((il + 1) % interval != 0 for il in range(n_layer))
    if arch in HYBRID_ARCHS:
        return tuple(kv == 0 for kv in n_head_kv)  # hybrids mark their recurrent layers with 0 KV heads
    return (False,) * n_layer


def lora_tensors(adapter: GGUFHeader, model: ModelParams) -> tuple[TensorInfo, ...]:
    """The tensors of a LoRA adapter for `model`, checked as llama.cpp's adapter loader checks them."""
    where = f"--lora {adapter.path}"
    if adapter.get("general.type") != "adapter" or adapter.get("adapter.type") != "lora":
        raise UnsupportedModelError(f"{where}: not a LoRA adapter (general.type {adapter.get('general.type')!r}, "
                                    f"adapter.type {adapter.get('adapter.type')!r})")
    if adapter.architecture != model.arch:
        raise UnsupportedModelError(f"{where}: an adapter for {adapter.architecture!r}, the model is {model.arch!r}")
    base = {t.name: t for t in model.tensors}
    pairs: dict[str, set[str]] = {}
    for info in adapter.tensors:
        name, _, suffix = info.name.rpartition(".")
        if suffix not in ("lora_a", "lora_b"):
            raise UnsupportedModelError(f"{where}: tensor {info.name} is neither lora_a nor lora_b")
        if name not in base:
            raise UnsupportedModelError(f"{where}: {name} is not in the model (an adapter for another base model?)")
        pairs.setdefault(name, set()).add(suffix)
    missing = [name for name, parts in pairs.items() if len(parts) != 2]
    if missing:
        raise UnsupportedModelError(f"{where}: {missing[0]} lacks its lora_a or lora_b")
    return adapter.tensors


# no real model comes near these; past them a header is hostile or corrupt, and its estimate would be
# 0 B or hundreds of TiB rather than an error
_MAX_EMBD = 2**20
_MAX_HEADS = 2**16
_MAX_HEAD_DIM = 2**16


def _check_plausible(header: GGUFHeader, arch: str, n_layer: int, n_embd: int, n_head: tuple[int, ...],
                     n_head_kv: tuple[int, ...], head_k: int, head_v: int, recurrent: tuple[bool, ...]) -> None:
    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{header.path}: {what}; not a real model (a corrupt or hostile header?)")

    if not 0 < n_embd <= _MAX_EMBD:
        raise refuse(f"{arch}.embedding_length is {n_embd}")
    if any(h > _MAX_HEADS for h in (*n_head, *n_head_kv)):
        raise refuse(f"{arch}.attention.head_count(_kv) above {_MAX_HEADS}")
    if head_k > _MAX_HEAD_DIM or head_v > _MAX_HEAD_DIM:
        raise refuse(f"an attention head of {max(head_k, head_v)} dimensions")
    attention = [i for i in range(n_layer) if not recurrent[i] and n_head[i] > 0]
    if not attention and not any(recurrent):
        raise refuse(f"{arch}.attention.head_count is 0 on every layer, and no layer is recurrent")
    if attention and all(n_head_kv[i] == 0 for i in attention):
        raise refuse(f"{arch}.attention.head_count_kv is 0 although layers have attention heads")
    if attention and (head_k == 0 or head_v == 0):
        raise refuse("attention heads of 0 dimensions")


def model_params(header: GGUFHeader) -> ModelParams:
    """Hyperparameters as llama.cpp derives them from the header."""
    arch = header.architecture
    if arch == "unknown":
        raise UnsupportedModelError(f"{header.path}: no general.architecture in the GGUF metadata")
    n_layer = _int(header, f"{arch}.block_count")
    if n_layer <= 0 or n_layer > 100_000:
        raise UnsupportedModelError(f"{header.path}: {arch}.block_count is {n_layer}")
    n_embd = _int(header, f"{arch}.embedding_length")
    n_head = _per_layer(header, f"{arch}.attention.head_count", n_layer, 0)
    n_head_kv = _per_layer(header, f"{arch}.attention.head_count_kv", n_layer, max(n_head) if n_head else 0)
    # llama.cpp divides by layer 0's head count (hparams.n_head()); pure recurrent models have none
    head_ref = n_head[0] if n_head and n_head[0] else (max(n_head) if n_head else 0)
    default_head = n_embd // head_ref if head_ref else 0
    n_embd_head_k = _int(header, f"{arch}.attention.key_length", default_head)
    n_embd_head_v = _int(header, f"{arch}.attention.value_length", default_head)
    names = {t.name for t in header.tensors}
    name = header.get("general.name")
    n_swa = _int(header, f"{arch}.attention.sliding_window", SWA_DEFAULT_WINDOW.get(arch, 0))
    recurrent = _recurrent_layers(header, arch, n_head_kv, n_layer)
    d_conv = _int(header, f"{arch}.ssm.conv_kernel", 0)
    d_inner = _int(header, f"{arch}.ssm.inner_size", 0)
    d_state = _int(header, f"{arch}.ssm.state_size", 0)
    n_group = _int(header, f"{arch}.ssm.group_count", 0)
    _check_plausible(header, arch, n_layer, n_embd, n_head, n_head_kv, n_embd_head_k, n_embd_head_v, recurrent)
    return ModelParams(
        arch=arch,
        name=name if isinstance(name, str) else None,
        file_type=_file_type(header),
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=_n_vocab(header, arch),
        n_ctx_train=_int(header, f"{arch}.context_length", 0),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_embd_head_k=n_embd_head_k,
        n_embd_head_v=n_embd_head_v,
        n_ff=_per_layer(header, f"{arch}.feed_forward_length", n_layer, 0),
        n_expert=_int(header, f"{arch}.expert_count", 0),
        n_expert_used=_int(header, f"{arch}.expert_used_count", 0),
        # mixtral and granite write the experts' width as feed_forward_length: the tensor tells
        n_ff_exp=_int(header, f"{arch}.expert_feed_forward_length", 0) or _tensor_dim(header, ".ffn_up_exps.weight", 1),
        n_ff_shexp=_tensor_dim(header, ".ffn_up_shexp.weight", 1),
        n_swa=n_swa,
        swa_layers=_swa_layers(header, arch, n_layer, n_swa),
        recurrent_layers=recurrent,
        n_embd_r=_conv_state(header, arch, n_embd, d_conv, d_inner, n_group, d_state) if any(recurrent) else 0,
        n_embd_s=d_state * d_inner if any(recurrent) else 0,
        ssm_d_inner=d_inner, ssm_d_state=d_state, ssm_n_group=n_group,
        ssm_dt_rank=_int(header, f"{arch}.ssm.time_step_rank", 0),
        causal=header.get(f"{arch}.attention.causal", True) is not False,
        # llama.cpp's is_mla(): both MLA head sizes present (files converted before that store K and V)
        mla=bool(_int(header, f"{arch}.attention.key_length_mla", 0) and _int(header, f"{arch}.attention.value_length_mla", 0)),
        ffn_gated=any(t.name.startswith("blk.") and ".ffn_gate" in t.name for t in header.tensors),
        ffn_dense=any(t.name.startswith("blk.") and t.name.endswith(".ffn_up.weight") for t in header.tensors),
        q_gated=any(t.name.endswith(".attn_q.weight") and len(t.shape) == 2 and n_head
                    and t.shape[1] == 2 * max(n_head) * n_embd_head_k for t in header.tensors),
        n_params=sum(t.n_elements for t in header.tensors),
        tied_output="output.weight" not in names,
        tensors=header.tensors,
        file_bytes=header.file_bytes,
    )
