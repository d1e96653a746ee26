"""Write synthetic GGUF model files that a real llama-server can load.

This module has one job: produce GGUF files with a chosen architecture
layout (random weights, or a "sparse" file with no tensor data at all) so
tests and benchmarks do not need to download real models. It is not part
of the package: the demo's one model is llamactl/model/demo_model.py, whose
SentencePiece vocabulary and random-tensor writing this module shares.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGUFWriter
from gguf.constants import (
    GGML_QUANT_SIZES,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    MODEL_TENSORS,
    TENSOR_NAMES,
    GGMLQuantizationType,
    LlamaFileType,
    PoolingType,
    TokenType,
)
from gguf.quants import quant_shape_to_byte_shape, quantize

from llamactl.model.demo_model import (
    MIN_VOCAB,
    RMS_EPS,
    TensorPlan,
    add_spm_vocab,
    random_tensor,
    write_random_tensors,
)

__all__ = ["ModelSpec", "REALISTIC", "draft_spec", "write_lora", "write_model", "write_projector"]

_QUANT_VERSION = 2
# gpt2 vocabulary: byte tokens fill ids 0..255, then end-of-text, then filler.
_GPT2_EOT = 256
_GPT2_BASE = 257
# Merges beyond the filler tokens join into strings outside the vocabulary;
# llama.cpp accepts that (it falls back to byte tokens), so real merge counts
# larger than the vocabulary (llama 3: 280147) can be reproduced.
_MAX_MERGES = 256 * 256 * 257

_ARCHES = {
    "llama": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
    "qwen3moe": MODEL_ARCH.QWEN3MOE,
    "gemma3": MODEL_ARCH.GEMMA3,
    "mamba2": MODEL_ARCH.MAMBA2,
    "bert": MODEL_ARCH.BERT,
    "deepseek2": MODEL_ARCH.DEEPSEEK2,
    "granitehybrid": MODEL_ARCH.GRANITE_HYBRID,
    "deci": MODEL_ARCH.DECI,
    "lfm2": MODEL_ARCH.LFM2,
    "qwen35": MODEL_ARCH.QWEN35,
    "qwen3next": MODEL_ARCH.QWEN3NEXT,
}
_BIASED_ARCHES = {MODEL_ARCH.QWEN2}  # q/k/v biases on a llama-style block
# Per-head RMS norms on Q and K; these files always write key/value_length.
_QK_NORM_ARCHES = {MODEL_ARCH.QWEN3, MODEL_ARCH.QWEN3MOE, MODEL_ARCH.GEMMA3}
_MOE_ARCHES = {MODEL_ARCH.QWEN3MOE}
_SSM_ARCHES = {MODEL_ARCH.MAMBA2}
_SWA_ARCHES = {MODEL_ARCH.GEMMA3}
_SANDWICH_NORM_ARCHES = {MODEL_ARCH.GEMMA3}  # post_attention_norm / post_ffw_norm
_ENCODER_ARCHES = {MODEL_ARCH.BERT}
# Multi-head Latent Attention (DeepSeek-V2 layout, src/models/deepseek2.cpp):
# low-rank KV (and optionally Q) projections, written as the HF converter
# does (MQA form plus split attn_k_b / attn_v_b), with a MoE FFN after
# n_dense_lead dense layers.
_MLA_ARCHES = {MODEL_ARCH.DEEPSEEK2}
# Mamba-2 layers interleaved with attention layers (src/models/granite-hybrid.cpp): a layer is
# recurrent iff its head_count_kv entry is 0; every layer has an FFN, dense or MoE.
_HYBRID_ARCHES = {MODEL_ARCH.GRANITE_HYBRID}
# Per-layer heads and FFN widths (Llama-3.1-Nemotron, src/models/deci.cpp): a layer with query heads
# but no KV heads is a "linear attention" (attn_output only); no heads: attention-free; n_ff 0: no FFN.
_PER_LAYER_ARCHES = {MODEL_ARCH.DECI}
# LFM2 (src/models/lfm2.cpp): gated short-convolution layers (n_head_kv 0) between GQA attention layers
# with QK norms; every layer has a dense SwiGLU FFN; the output norm is named token_embd_norm.
_SHORTCONV_ARCHES = {MODEL_ARCH.LFM2}
# Qwen3.5 (src/models/qwen35.cpp): gated delta-net ("linear attention") layers with every
# full_attention_interval-th layer a gated full-attention layer (Q projection twice as wide: query and
# gate, QK norms); post-attention norms; a dense SwiGLU FFN everywhere. Delta-net heads use the ssm_*
# fields: ssm_d_state = head size, ssm_n_group = key heads, ssm_dt_rank = value heads.
_DELTA_NET_ARCHES = {MODEL_ARCH.QWEN35, MODEL_ARCH.QWEN3NEXT}
# qwen3next: qwen35's layers with a MoE FFN (plus a gated shared expert) and a combined beta/alpha projection
_SHARED_EXPERT_ARCHES = {MODEL_ARCH.GRANITE_HYBRID, MODEL_ARCH.QWEN3NEXT}
# llama.cpp's LLAMA_MAX_EXPERTS (src/llama-hparams.h).
_MAX_EXPERTS = 1024
_LAYER_NORM_EPS = 1e-12  # bert's LayerNorm epsilon
_N_TOKEN_TYPES = 2  # bert: sentence A / sentence B

# general.file_type for a file whose matrices all use one type. The K types
# have no pure-K file type; the *_M variants are what real files report.
_FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    GGMLQuantizationType.Q3_K: LlamaFileType.MOSTLY_Q3_K_M,
    GGMLQuantizationType.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    GGMLQuantizationType.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    GGMLQuantizationType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a synthetic model; validated by write_model.

    Architectures (`arch`):

    - "llama": RMSNorm, SwiGLU FFN, GQA attention.
    - "qwen2": llama plus q/k/v biases.
    - "qwen3": llama plus per-head RMS norms on Q and K (attn_q_norm /
      attn_k_norm, head_dim wide). Always writes key_length/value_length, so
      head_dim may differ from n_embd // n_head.
    - "qwen3moe": qwen3 attention; every layer's FFN is a mixture of experts
      (n_expert, n_expert_used, n_ff_exp; ffn_gate_inp router kept F32).
      n_ff is written as feed_forward_length but no dense FFN exists.
    - "gemma3": qwen3-style attention plus post_attention_norm/post_ffw_norm,
      GELU FFN. n_swa > 0 writes attention.sliding_window and llama.cpp then
      uses an interleaved SWA cache. Without a sliding_window_pattern key
      (never written here) llama.cpp's gemma3 loader applies period 6 with
      dense_first=false (src/models/gemma3.cpp:7 -> load_swa_pattern(ml, 6);
      src/llama-hparams.cpp:8-17): layer il is SWA iff il % 6 < 5, i.e.
      layers 5, 11, 17, ... use full attention, all others the window. A
      model with fewer than 6 layers is therefore all-SWA. n_swa = 0 writes
      no window key: every layer is full attention.
    - "mamba2": recurrent SSM, no attention. Uses ssm_* fields (all > 0)
      and ignores n_head, n_head_kv, n_ff, head_dim and rope_freq_base
      (head_count and feed_forward_length are written as 0, as the HF
      converter does). The SSM head count is ssm_dt_rank.
    - "bert": encoder for embeddings (llama-server --embedding): LayerNorm
      with biases, learned position embeddings (n_ctx_train rows), token type
      embeddings, mean pooling, non-causal. No output tensor (tied_output is
      ignored); head_dim must be None.
    - "deepseek2": Multi-head Latent Attention (DeepSeek-V2). Needs
      kv_lora_rank, n_rot (qk_rope_head_dim) and head_dim, which is both the
      non-rope ("nope") part of each query/key head and the value head size;
      a key head is head_dim + n_rot wide. q_lora_rank = 0 writes a plain
      attn_q (as DeepSeek-V2-Lite), > 0 a compressed attn_q_a/attn_q_b.
      Metadata follows the HF converter: head_count_kv 1 (n_head_kv is
      ignored), key_length kv_lora_rank + n_rot, value_length kv_lora_rank,
      key_length_mla head_dim + n_rot, value_length_mla head_dim. The first
      n_dense_lead layers use a dense FFN (n_ff); the rest a MoE FFN
      (n_expert, n_expert_used, n_ff_exp, all required) plus
      n_shared_expert (>= 1) shared experts of width n_ff_exp each.
    - "granitehybrid": Granite 4.0 H. n_head_kv is a per-layer tuple whose 0
      entries mark Mamba-2 layers (ssm_* fields required, ssm_d_inner must be
      2 * n_embd as llama.cpp asserts); the others are attention layers. Every
      layer has an FFN: dense (n_ff) or, with n_expert > 0, a mixture of
      n_expert experts of width n_ff_exp (written as feed_forward_length, as
      the HF converter does; n_ff is then unused) plus an optional shared
      expert of width n_ff_shexp.
    - "deci": Llama-3.1-Nemotron (DeciLM). n_head, n_head_kv and n_ff may each
      be a per-layer tuple, written as an array: n_head > 0 with n_head_kv 0 is
      a "linear attention" layer (attn_output only), n_head 0 an
      attention-free layer, n_ff 0 a layer without FFN. Layer 0 must have
      heads (llama.cpp's head size is n_embd / n_head of layer 0).
    - "lfm2": LFM2. n_head_kv is a per-layer tuple whose 0 entries mark
      short-convolution layers (shortconv_l_cache, required: the conv width);
      the others are attention layers with QK norms. head_dim must be None.
    - "qwen35": Qwen3.5 (dense). Layer il is full attention iff (il + 1) is
      a multiple of full_attention_interval, else a gated delta-net layer
      with ssm_n_group key heads and ssm_dt_rank value heads of ssm_d_state
      each (ssm_d_inner must be ssm_d_state * ssm_dt_rank) and a causal conv
      of width ssm_d_conv. head_dim is required (the attention head size).
    - "qwen3next": Qwen3-Next, qwen35's layers with a MoE FFN everywhere
      (n_expert, n_expert_used, n_ff_exp required; n_ff_shexp > 0 adds the
      gated shared expert) and ssm_ba instead of ssm_beta/ssm_alpha.
    """

    arch: str = "llama"  # see the class docstring
    n_vocab: int = 512
    n_embd: int = 64
    n_layer: int = 2
    n_head: int | tuple[int, ...] = 4  # a tuple (per layer) for deci only
    # A tuple is written as a per-layer array. llama-server's llama/qwen2
    # loaders size every layer's K/V like layer 0, so unequal entries give a
    # valid GGUF that the server refuses ("wrong shape"): reader tests only.
    n_head_kv: int | tuple[int, ...] = 2
    n_ff: int | tuple[int, ...] = 128  # a tuple (per layer) for deci only
    head_dim: int | None = None  # None: n_embd // n_head, and no key/value_length keys (llama/qwen2)
    n_ctx_train: int = 4096
    tied_output: bool = False  # True: no output.weight; llama.cpp reuses token_embd
    weight_type: str = "F16"  # ggml type of 2D/3D matrices; norms, biases, router, conv stay F32
    tokenizer: str = "llama"  # "llama" (SentencePiece byte fallback) or "gpt2" (byte-level BPE)
    n_merges: int = 0  # gpt2 only, and required there (>= 1)
    name: str = "tiny"
    rope_freq_base: float = 10000.0
    # gemma3 only: sliding window size (attention.sliding_window); 0 = none.
    n_swa: int = 0
    # qwen3moe only (required there): experts per layer, experts routed per
    # token, and each expert's FFN width.
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    # mamba2 only (all required there): conv kernel width, inner size
    # (expand * n_embd), state size, B/C group count, and SSM head count.
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_n_group: int = 0
    ssm_dt_rank: int = 0
    # deepseek2 only: KV compression rank (required), Q compression rank
    # (0 = plain attn_q), rope part of each key head (required), leading
    # dense-FFN layers, and shared experts per MoE layer (required).
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    n_rot: int = 0
    n_dense_lead: int = 0
    n_shared_expert: int = 0
    # granitehybrid only: the shared expert's FFN width beside a MoE (0 = none).
    n_ff_shexp: int = 0
    # lfm2 only (required there): the short convolution's width (L_cache).
    shortconv_l_cache: int = 0
    # qwen35 only: every this many layers one is full attention (llama.cpp's default 4).
    full_attention_interval: int = 0
    # bert only: a reranker's classification head with this many outputs (0 = an embedding model).
    n_cls_out: int = 0

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.heads(0)

    def heads(self, layer: int) -> int:
        return self.n_head if isinstance(self.n_head, int) else self.n_head[layer]

    def ffn(self, layer: int) -> int:
        return self.n_ff if isinstance(self.n_ff, int) else self.n_ff[layer]

    def kv_heads(self, layer: int) -> int:
        if isinstance(self.n_head_kv, int):
            return self.n_head_kv
        return self.n_head_kv[layer]

    @property
    def ssm_conv_dim(self) -> int:
        """mamba2: channels through the causal conv (x, B and C)."""
        return self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state

    @property
    def ssm_in_rows(self) -> int:
        """mamba2: output width of ssm_in (z, x, B, C and dt)."""
        return self.ssm_d_inner + self.ssm_conv_dim + self.ssm_dt_rank


def write_model(
    path: str | os.PathLike[str], spec: ModelSpec, *, sparse: bool = False, seed: int = 0
) -> pathlib.Path:
    """Write `spec` as a GGUF file at `path` and return the path.

    sparse=True writes only header, metadata and tensor infos, then extends the
    file to its full logical size, so a multi-GB model costs a few MiB of disk
    (its weights read back as zeros). Otherwise weights are seeded random values.
    """
    qtype = _weight_qtype(spec.weight_type, sparse)
    _validate(spec, qtype)
    out = pathlib.Path(path)
    writer = GGUFWriter(out, spec.arch)
    _add_hparams(writer, spec, qtype)
    _add_vocab(writer, spec)
    plan = list(_tensor_plan(spec, qtype))
    try:
        if sparse:
            _write_sparse(writer, out, plan)
        else:
            write_random_tensors(writer, plan, np.random.default_rng(seed), values=_random_tensor)
    finally:
        writer.close()
    return out


# --- validation -------------------------------------------------------------


def _weight_qtype(name: str, sparse: bool) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml weight type {name!r}") from None
    if qtype not in _FILE_TYPES:
        raise ValueError(f"weight type {qtype.name} is not supported (no model file type for it)")
    # Sparse files never hold data, so any type with a known block layout works.
    if not sparse and not _can_quantize(qtype):
        raise ValueError(f"weight type {qtype.name} cannot be quantized by the gguf package")
    return qtype


@functools.cache
def _can_quantize(qtype: GGMLQuantizationType) -> bool:
    # Probe rather than hard-code: the set grows with gguf releases.
    block_size = GGML_QUANT_SIZES[qtype][0]
    try:
        quantize(np.zeros((1, block_size), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def _validate(spec: ModelSpec, qtype: GGMLQuantizationType) -> None:
    if spec.arch not in _ARCHES:
        raise ValueError(f"arch {spec.arch!r} not supported; use one of {sorted(_ARCHES)}")
    arch = _ARCHES[spec.arch]
    if spec.tokenizer not in ("llama", "gpt2"):
        raise ValueError(f"tokenizer {spec.tokenizer!r} not supported; use 'llama' or 'gpt2'")
    if spec.n_vocab < MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {MIN_VOCAB} (specials + 256 byte tokens), got {spec.n_vocab}")
    if min(spec.n_embd, spec.n_layer, spec.n_ctx_train) <= 0:
        raise ValueError("n_embd, n_layer and n_ctx_train must be positive")
    if arch in _PER_LAYER_ARCHES:
        _validate_per_layer(spec)
    elif isinstance(spec.n_head, tuple) or isinstance(spec.n_ff, tuple):
        raise ValueError(f"per-layer n_head and n_ff only apply to {_arch_list(_PER_LAYER_ARCHES)}")
    elif arch not in _SSM_ARCHES:
        _validate_attention(spec, arch)
    _validate_hybrid(spec, arch)
    _validate_shortconv(spec, arch)
    _validate_delta_net(spec, arch)
    if not _applies(arch, _ENCODER_ARCHES, "n_cls_out", spec.n_cls_out) and spec.n_cls_out < 0:
        raise ValueError("n_cls_out must be >= 0")
    _validate_swa(spec, arch)
    _validate_moe(spec, arch)
    _validate_mla(spec, arch)
    _validate_ssm(spec, arch)
    _validate_merges(spec)
    _validate_rows(spec, arch, qtype)


def _validate_attention(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    if min(spec.n_head, spec.n_ff) <= 0:
        raise ValueError("n_head and n_ff must be positive")
    if spec.head_dim is None and spec.n_embd % spec.n_head:
        raise ValueError(f"n_embd {spec.n_embd} is not divisible by n_head {spec.n_head}; set head_dim")
    if spec.head_size <= 0:
        raise ValueError("head_dim must be positive")
    if arch in _ENCODER_ARCHES and spec.head_dim is not None:
        # bert's Q/K/V/O are n_embd x n_embd in llama.cpp.
        raise ValueError(f"{spec.arch} needs head_dim=None (head size n_embd // n_head)")
    _validate_kv_heads(spec, allow_zero=arch in _HYBRID_ARCHES | _SHORTCONV_ARCHES)


def _validate_per_layer(spec: ModelSpec) -> None:
    for field_name in ("n_head", "n_head_kv", "n_ff"):
        value = getattr(spec, field_name)
        if isinstance(value, tuple) and len(value) != spec.n_layer:
            raise ValueError(f"{field_name} has {len(value)} entries for {spec.n_layer} layers")
    if spec.heads(0) <= 0:
        raise ValueError("layer 0 needs attention heads (llama.cpp derives the head size from it)")
    if spec.head_dim is None and spec.n_embd % spec.heads(0):
        raise ValueError(f"n_embd {spec.n_embd} is not divisible by layer 0's n_head {spec.heads(0)}")
    for il in range(spec.n_layer):
        heads, kv, ff = spec.heads(il), spec.kv_heads(il), spec.ffn(il)
        if min(heads, kv, ff) < 0:
            raise ValueError(f"layer {il}: head counts and n_ff must be >= 0")
        if kv and (not heads or heads % kv):
            raise ValueError(f"layer {il}: n_head {heads} is not a multiple of n_head_kv {kv}")
        if heads and not kv and heads * spec.head_size != spec.n_embd:
            raise ValueError(f"layer {il}: a linear-attention layer needs n_head x head size == n_embd")


def _applies(arch: MODEL_ARCH, arches: set[MODEL_ARCH], name: str, value: int) -> bool:
    """Whether an architecture-specific field applies; set on another architecture it is an error."""
    if arch in arches:
        return True
    if value:
        raise ValueError(f"{name} only applies to {_arch_list(arches)}")
    return False


def _validate_delta_net(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    if not _applies(arch, _DELTA_NET_ARCHES, "full_attention_interval", spec.full_attention_interval):
        return
    if spec.full_attention_interval < 1:
        raise ValueError(f"{spec.arch} needs full_attention_interval >= 1, got {spec.full_attention_interval}")
    if spec.head_dim is None:
        raise ValueError(f"{spec.arch} needs head_dim (the full-attention head size)")
    if spec.ssm_d_inner != spec.ssm_d_state * spec.ssm_dt_rank:
        raise ValueError(f"{spec.arch} needs ssm_d_inner == ssm_d_state * ssm_dt_rank "
                         f"({spec.ssm_d_state * spec.ssm_dt_rank}), got {spec.ssm_d_inner}")
    if spec.ssm_dt_rank % spec.ssm_n_group:
        raise ValueError(f"ssm_dt_rank (value heads) {spec.ssm_dt_rank} is not a multiple of ssm_n_group (key heads)")


def _validate_shortconv(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    if not _applies(arch, _SHORTCONV_ARCHES, "shortconv_l_cache", spec.shortconv_l_cache):
        return
    if spec.shortconv_l_cache < 2:
        raise ValueError(f"{spec.arch} needs shortconv_l_cache >= 2, got {spec.shortconv_l_cache}")
    if spec.head_dim is not None:
        raise ValueError(f"{spec.arch} needs head_dim=None (its Q and output projections are n_embd wide)")


def _validate_hybrid(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    if not _applies(arch, _SHARED_EXPERT_ARCHES, "n_ff_shexp", spec.n_ff_shexp):
        return
    if spec.n_ff_shexp < 0 or (spec.n_ff_shexp and not spec.n_expert):
        raise ValueError("n_ff_shexp needs n_expert > 0 (a shared expert sits beside a MoE)")
    if arch not in _HYBRID_ARCHES:
        return
    if spec.ssm_d_inner != 2 * spec.n_embd:
        # GGML_ASSERT(2 * n_embd == d_inner) in llama_model_granite_hybrid::load_arch_tensors
        raise ValueError(f"{spec.arch} needs ssm_d_inner == 2 * n_embd ({2 * spec.n_embd}), got {spec.ssm_d_inner}")


def _validate_swa(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    if spec.n_swa < 0:
        raise ValueError(f"n_swa must be >= 0, got {spec.n_swa}")
    if spec.n_swa and arch not in _SWA_ARCHES:
        raise ValueError(f"n_swa only applies to {_arch_list(_SWA_ARCHES)}")


def _validate_moe(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    fields = {"n_expert": spec.n_expert, "n_expert_used": spec.n_expert_used, "n_ff_exp": spec.n_ff_exp}
    allowed = _MOE_ARCHES | _MLA_ARCHES | _HYBRID_ARCHES | {MODEL_ARCH.QWEN3NEXT}
    if arch not in allowed:
        if any(fields.values()):
            raise ValueError(f"{', '.join(fields)} only apply to {_arch_list(allowed)}")
        return
    if arch in _HYBRID_ARCHES and not any(fields.values()):
        return  # a dense hybrid
    if min(fields.values()) <= 0:
        raise ValueError(f"{spec.arch} needs n_expert, n_expert_used and n_ff_exp > 0, got {fields}")
    if spec.n_expert > _MAX_EXPERTS:
        raise ValueError(f"n_expert {spec.n_expert} exceeds llama.cpp's limit of {_MAX_EXPERTS}")
    if spec.n_expert_used > spec.n_expert:
        raise ValueError(f"n_expert_used {spec.n_expert_used} exceeds n_expert {spec.n_expert}")


def _validate_mla(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    fields = {
        "kv_lora_rank": spec.kv_lora_rank, "q_lora_rank": spec.q_lora_rank, "n_rot": spec.n_rot,
        "n_dense_lead": spec.n_dense_lead, "n_shared_expert": spec.n_shared_expert,
    }
    if arch not in _MLA_ARCHES:
        if any(fields.values()):
            raise ValueError(f"{', '.join(fields)} only apply to {_arch_list(_MLA_ARCHES)}")
        return
    if spec.head_dim is None:
        raise ValueError(f"{spec.arch} needs head_dim (the non-rope key head and value head size)")
    if min(spec.kv_lora_rank, spec.n_rot, spec.n_shared_expert) <= 0:
        raise ValueError(f"{spec.arch} needs kv_lora_rank, n_rot and n_shared_expert > 0, got {fields}")
    if spec.n_rot % 2:
        raise ValueError(f"n_rot must be even (rotary pairs), got {spec.n_rot}")
    if spec.q_lora_rank < 0:
        raise ValueError(f"q_lora_rank must be >= 0, got {spec.q_lora_rank}")
    if not 0 <= spec.n_dense_lead <= spec.n_layer:
        raise ValueError(f"n_dense_lead must be in 0..n_layer ({spec.n_layer}), got {spec.n_dense_lead}")


def _validate_ssm(spec: ModelSpec, arch: MODEL_ARCH) -> None:
    fields = {
        "ssm_d_conv": spec.ssm_d_conv, "ssm_d_inner": spec.ssm_d_inner, "ssm_d_state": spec.ssm_d_state,
        "ssm_n_group": spec.ssm_n_group, "ssm_dt_rank": spec.ssm_dt_rank,
    }
    if arch not in _SSM_ARCHES | _HYBRID_ARCHES | _DELTA_NET_ARCHES:
        if any(fields.values()):
            raise ValueError(f"ssm_* fields only apply to {_arch_list(_SSM_ARCHES | _HYBRID_ARCHES | _DELTA_NET_ARCHES)}")
        return
    if arch in _DELTA_NET_ARCHES:
        if min(fields.values()) <= 0:
            raise ValueError(f"{spec.arch} needs every ssm_* field > 0, got {fields}")
        return
    if min(fields.values()) <= 0:
        raise ValueError(f"{spec.arch} needs every ssm_* field > 0, got {fields}")
    # llama.cpp's mamba2 graph asserts both (src/models/mamba-base.cpp).
    if spec.ssm_d_inner % spec.ssm_dt_rank:
        raise ValueError(
            f"ssm_d_inner {spec.ssm_d_inner} is not divisible by ssm_dt_rank (SSM heads) {spec.ssm_dt_rank}"
        )
    if spec.ssm_d_inner % spec.ssm_n_group:
        raise ValueError(f"ssm_d_inner {spec.ssm_d_inner} is not divisible by ssm_n_group {spec.ssm_n_group}")


def _arch_list(arches: set[MODEL_ARCH]) -> str:
    return ", ".join(sorted(MODEL_ARCH_NAMES[a] for a in arches))


def _validate_kv_heads(spec: ModelSpec, allow_zero: bool = False) -> None:
    if isinstance(spec.n_head_kv, tuple) and len(spec.n_head_kv) != spec.n_layer:
        raise ValueError(f"n_head_kv has {len(spec.n_head_kv)} entries for {spec.n_layer} layers")
    counts = [spec.kv_heads(layer) for layer in range(spec.n_layer)]
    if allow_zero:
        if any(n < 0 for n in counts):
            raise ValueError("n_head_kv entries must be >= 0 (0 marks a recurrent layer)")
    elif any(n <= 0 for n in counts):
        raise ValueError("every n_head_kv entry must be > 0")


def _validate_merges(spec: ModelSpec) -> None:
    if spec.tokenizer == "llama" and spec.n_merges:
        raise ValueError("n_merges only applies to the gpt2 tokenizer")
    # llama.cpp refuses a BPE vocabulary without a merges array, and the gguf
    # writer cannot write an empty one.
    if spec.tokenizer == "gpt2" and not 1 <= spec.n_merges <= _MAX_MERGES:
        raise ValueError(f"the gpt2 tokenizer needs 1 <= n_merges <= {_MAX_MERGES}, got {spec.n_merges}")


def _validate_rows(spec: ModelSpec, arch: MODEL_ARCH, qtype: GGMLQuantizationType) -> None:
    block_size = GGML_QUANT_SIZES[qtype][0]
    # The row (ggml ne[0]) lengths of the matrices written in `qtype`.
    if arch in _SSM_ARCHES:
        rows = {spec.n_embd, spec.ssm_d_inner}
    elif arch in _MLA_ARCHES:
        # attn_k_b rows are head_dim, attn_v_b rows kv_lora_rank, shexp down n_ff_exp * n_shared.
        rows = {spec.n_embd, spec.n_ff_exp, spec.head_size, spec.kv_lora_rank, spec.n_head * spec.head_size}
        rows |= {spec.n_ff} if spec.n_dense_lead else set()
        rows |= {spec.q_lora_rank} if spec.q_lora_rank else set()
    elif arch in _MOE_ARCHES:
        rows = {spec.n_embd, spec.n_ff_exp, spec.n_head * spec.head_size}
    elif arch in _PER_LAYER_ARCHES:
        rows = {spec.n_embd} | {spec.ffn(il) for il in range(spec.n_layer) if spec.ffn(il)}
        rows |= {spec.heads(il) * spec.head_size for il in range(spec.n_layer) if spec.heads(il)}
    elif arch in _HYBRID_ARCHES:
        rows = {spec.n_embd, spec.ssm_d_inner, spec.n_head * spec.head_size}
        rows |= {spec.n_ff_exp} if spec.n_expert else {spec.n_ff}
        rows |= {spec.n_ff_shexp} if spec.n_ff_shexp else set()
    elif arch in _DELTA_NET_ARCHES:
        rows = {spec.n_embd, spec.n_head * spec.head_size, spec.ssm_d_inner}
        rows |= {spec.n_ff_exp} if spec.n_expert else {spec.n_ff}
        rows |= {spec.n_ff_shexp} if spec.n_ff_shexp else set()
    else:
        rows = {spec.n_embd, spec.n_ff, spec.n_head * spec.head_size}
    for row in sorted(rows):
        if row % block_size:
            raise ValueError(f"row size {row} is not a multiple of the {qtype.name} block size {block_size}")


# --- metadata ---------------------------------------------------------------


def _add_hparams(writer: GGUFWriter, spec: ModelSpec, qtype: GGMLQuantizationType) -> None:
    arch = _ARCHES[spec.arch]
    writer.add_name(spec.name)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    if arch in _SSM_ARCHES:
        _add_ssm_hparams(writer, spec)
    elif arch in _PER_LAYER_ARCHES:  # per-layer tuples become arrays, as convert_hf_to_gguf writes DeciLM
        _add_decoder_hparams(writer, spec)
    elif arch in _SHORTCONV_ARCHES:
        _add_decoder_hparams(writer, spec)
        writer.add_shortconv_l_cache(spec.shortconv_l_cache)
    elif arch in _DELTA_NET_ARCHES:
        _add_decoder_hparams(writer, spec)
        writer.add_key_length(spec.head_size)
        writer.add_value_length(spec.head_size)
        if arch == MODEL_ARCH.QWEN35:
            writer.add_rope_dimension_sections([spec.head_size // 2, 0, 0, 0])
        _add_ssm_sizes(writer, spec)
        writer.add_full_attention_interval(spec.full_attention_interval)
        if spec.n_expert:
            writer.add_expert_count(spec.n_expert)
            writer.add_expert_used_count(spec.n_expert_used)
            writer.add_expert_feed_forward_length(spec.n_ff_exp)
        if spec.n_ff_shexp:
            writer.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
    elif arch in _HYBRID_ARCHES:
        _add_hybrid_hparams(writer, spec)
    elif arch in _ENCODER_ARCHES:
        _add_encoder_hparams(writer, spec)
    elif arch in _MLA_ARCHES:
        _add_mla_hparams(writer, spec)
    else:
        _add_decoder_hparams(writer, spec)
    writer.add_vocab_size(spec.n_vocab)
    if arch in _MLA_ARCHES:
        _add_mla_extras(writer, spec)
    elif arch not in (_SSM_ARCHES | _ENCODER_ARCHES | _HYBRID_ARCHES | _PER_LAYER_ARCHES | _SHORTCONV_ARCHES
                      | _DELTA_NET_ARCHES):
        _add_decoder_extras(writer, spec, arch)
    writer.add_file_type(_FILE_TYPES[qtype])
    if qtype not in _FLOAT_TYPES:
        writer.add_quantization_version(_QUANT_VERSION)


def _add_head_counts(writer: GGUFWriter, spec: ModelSpec) -> None:
    # a per-layer tuple is written as an array (llama.cpp reads either: get_key_or_arr)
    writer.add_feed_forward_length(spec.n_ff if isinstance(spec.n_ff, int) else list(spec.n_ff))
    writer.add_head_count(spec.n_head if isinstance(spec.n_head, int) else list(spec.n_head))
    writer.add_head_count_kv(spec.n_head_kv if isinstance(spec.n_head_kv, int) else list(spec.n_head_kv))


def _add_decoder_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    _add_head_counts(writer, spec)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(spec.head_size)
    writer.add_rope_freq_base(spec.rope_freq_base)


def _add_decoder_extras(writer: GGUFWriter, spec: ModelSpec, arch: MODEL_ARCH) -> None:
    if spec.head_dim is not None or arch in _QK_NORM_ARCHES:
        writer.add_key_length(spec.head_size)
        writer.add_value_length(spec.head_size)
    if spec.n_swa:
        writer.add_sliding_window(spec.n_swa)
    if arch in _MOE_ARCHES:
        writer.add_expert_count(spec.n_expert)
        writer.add_expert_used_count(spec.n_expert_used)
        writer.add_expert_feed_forward_length(spec.n_ff_exp)


def _add_mla_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    # MLA is stored as MQA: one KV "head" holding the compressed latent.
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(spec.n_rot)
    writer.add_rope_freq_base(spec.rope_freq_base)


def _add_mla_extras(writer: GGUFWriter, spec: ModelSpec) -> None:
    # Keys read by llama_model_deepseek2::load_arch_hparams. q_lora_rank is
    # required there unless n_layer is 26/27 (the "lite" heuristic), so it
    # is always written, 0 meaning a plain attn_q.
    writer.add_leading_dense_block_count(spec.n_dense_lead)
    writer.add_q_lora_rank(spec.q_lora_rank)
    writer.add_kv_lora_rank(spec.kv_lora_rank)
    writer.add_key_length(spec.kv_lora_rank + spec.n_rot)
    writer.add_value_length(spec.kv_lora_rank)
    writer.add_key_length_mla(spec.head_size + spec.n_rot)
    writer.add_value_length_mla(spec.head_size)
    writer.add_expert_feed_forward_length(spec.n_ff_exp)
    writer.add_expert_count(spec.n_expert)
    writer.add_expert_used_count(spec.n_expert_used)
    writer.add_expert_shared_count(spec.n_shared_expert)


def _add_ssm_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    # No attention and no dense FFN: zero counts, as the HF converter writes.
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    _add_ssm_sizes(writer, spec)


def _add_hybrid_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    # As convert_hf_to_gguf writes GraniteMoeHybrid: head_count_kv per layer (0 on Mamba layers),
    # the experts' width as feed_forward_length, no key_length, no rope (Granite 4.0 H is NoPE).
    writer.add_feed_forward_length(spec.n_ff_exp if spec.n_expert else spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv([spec.kv_heads(il) for il in range(spec.n_layer)])
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(spec.head_size)
    writer.add_rope_scaling_finetuned(False)
    _add_ssm_sizes(writer, spec)
    if spec.n_expert:
        writer.add_expert_count(spec.n_expert)
        writer.add_expert_used_count(spec.n_expert_used)
    if spec.n_ff_shexp:
        writer.add_expert_shared_feed_forward_length(spec.n_ff_shexp)


def _add_ssm_sizes(writer: GGUFWriter, spec: ModelSpec) -> None:
    writer.add_ssm_conv_kernel(spec.ssm_d_conv)
    writer.add_ssm_inner_size(spec.ssm_d_inner)
    writer.add_ssm_state_size(spec.ssm_d_state)
    writer.add_ssm_time_step_rank(spec.ssm_dt_rank)
    writer.add_ssm_group_count(spec.ssm_n_group)


def _add_encoder_hparams(writer: GGUFWriter, spec: ModelSpec) -> None:
    _add_head_counts(writer, spec)
    writer.add_layer_norm_eps(_LAYER_NORM_EPS)
    writer.add_causal_attention(False)
    if spec.n_cls_out:  # a reranker: rank pooling, one score per label
        writer.add_pooling_type(PoolingType.RANK)
        writer.add_classifier_output_labels([f"label{i}" for i in range(spec.n_cls_out)])
    else:
        writer.add_pooling_type(PoolingType.MEAN)


def _add_vocab(writer: GGUFWriter, spec: ModelSpec) -> None:
    if spec.tokenizer == "gpt2":
        tokens, types = _gpt2_vocab(spec.n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_merges(_gpt2_merges(spec.n_merges))
        writer.add_bos_token_id(_GPT2_EOT)
        writer.add_eos_token_id(_GPT2_EOT)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores([0.0] * spec.n_vocab)
    else:
        add_spm_vocab(writer, spec.n_vocab)
    if _ARCHES[spec.arch] in _ENCODER_ARCHES:
        writer.add_token_type_count(_N_TOKEN_TYPES)


_PRINTABLE_BYTES = (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))


@functools.cache
def _byte_chars() -> tuple[str, ...]:
    # GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for
    # themselves, the rest are shifted to 256+ so no token holds whitespace.
    shifted = iter(range(256, 512))
    return tuple(chr(b) if b in _PRINTABLE_BYTES else chr(next(shifted)) for b in range(256))


def _gpt2_pairs() -> Iterator[tuple[str, str]]:
    # Filler token k is left + right: all byte pairs, then pair + byte.
    # Each string is unique because it is a unique codepoint sequence, and
    # merge k ("left right") builds filler token k from two earlier tokens.
    # Printable bytes first, so the earliest merges build pieces of real text.
    table = _byte_chars()
    chars = [table[b] for b in _PRINTABLE_BYTES]
    chars += [c for c in table if c not in chars]
    pairs = [a + b for a in chars for b in chars]
    yield from ((a, b) for a in chars for b in chars)
    yield from ((p, c) for p in pairs for c in chars)


def _gpt2_vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    n_filler = n_vocab - _GPT2_BASE
    tokens = [*_byte_chars(), "<|endoftext|>"]
    tokens += (a + b for a, b in itertools.islice(_gpt2_pairs(), n_filler))
    types = [int(TokenType.NORMAL)] * n_vocab
    types[_GPT2_EOT] = int(TokenType.CONTROL)
    return tokens, types


def _gpt2_merges(n_merges: int) -> list[str]:
    return [f"{a} {b}" for a, b in itertools.islice(_gpt2_pairs(), n_merges)]


# --- tensors ----------------------------------------------------------------


def _tensor_name(arch: MODEL_ARCH, tensor: MODEL_TENSOR, suffix: str | None, bid: int | None = None) -> str:
    if tensor not in MODEL_TENSORS[arch]:
        raise ValueError(f"{MODEL_ARCH_NAMES[arch]} has no {tensor.name} tensor")
    base = TENSOR_NAMES[tensor]
    name = base.format(bid=bid) if bid is not None else base
    # A few tensors (mamba's ssm_a, ssm_d) carry no .weight suffix.
    return f"{name}.{suffix}" if suffix else name


def _tensor_plan(spec: ModelSpec, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes are numpy order (rows, cols): the reverse of ggml's ne.
    arch = _ARCHES[spec.arch]
    if arch in _ENCODER_ARCHES:
        yield from _encoder_plan(spec, arch, qtype)
        return
    f32 = GGMLQuantizationType.F32
    yield _tensor_name(arch, MODEL_TENSOR.TOKEN_EMBD, "weight"), (spec.n_vocab, spec.n_embd), qtype
    # lfm2's final norm is filed as token_embd_norm (llama.cpp's LLM_TENSOR_OUTPUT_NORM_LFM2)
    norm = MODEL_TENSOR.TOKEN_EMBD_NORM if arch in _SHORTCONV_ARCHES else MODEL_TENSOR.OUTPUT_NORM
    yield _tensor_name(arch, norm, "weight"), (spec.n_embd,), f32
    if not spec.tied_output:
        yield _tensor_name(arch, MODEL_TENSOR.OUTPUT, "weight"), (spec.n_vocab, spec.n_embd), qtype
    if arch in _SSM_ARCHES:
        block = _ssm_block_plan
    elif arch in _HYBRID_ARCHES:
        block = _hybrid_block_plan
    elif arch in _PER_LAYER_ARCHES:
        block = _per_layer_block_plan
    elif arch in _SHORTCONV_ARCHES:
        block = _shortconv_block_plan
    elif arch in _DELTA_NET_ARCHES:
        block = _delta_net_block_plan
    elif arch in _MLA_ARCHES:
        block = _mla_block_plan
    else:
        block = _block_plan
    for layer in range(spec.n_layer):
        yield from block(spec, arch, layer, qtype)


def _attention_matrices(spec: ModelSpec, bid: int) -> list[tuple[MODEL_TENSOR, tuple[int, int]]]:
    q_dim = spec.n_head * spec.head_size
    kv_dim = spec.kv_heads(bid) * spec.head_size
    return [
        (MODEL_TENSOR.ATTN_Q, (q_dim, spec.n_embd)),
        (MODEL_TENSOR.ATTN_K, (kv_dim, spec.n_embd)),
        (MODEL_TENSOR.ATTN_V, (kv_dim, spec.n_embd)),
        (MODEL_TENSOR.ATTN_OUT, (spec.n_embd, q_dim)),
    ]


def _block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    f32 = GGMLQuantizationType.F32
    attention = _attention_matrices(spec, bid)
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (spec.n_embd,), f32
    # gguf-py files gemma's pre-FFN norm as FFN_PRE_NORM; both are named blk.N.ffn_norm.
    ffn_norm = MODEL_TENSOR.FFN_PRE_NORM if arch in _SANDWICH_NORM_ARCHES else MODEL_TENSOR.FFN_NORM
    yield _tensor_name(arch, ffn_norm, "weight", bid), (spec.n_embd,), f32
    for tensor, shape in attention:
        yield _tensor_name(arch, tensor, "weight", bid), shape, qtype
    if arch in _MOE_ARCHES:
        yield from _moe_ffn_plan(spec, arch, bid, qtype)
    else:
        yield from _dense_ffn_plan(spec, arch, bid, qtype, spec.n_ff)
    if arch in _BIASED_ARCHES:
        for tensor, shape in attention[:3]:
            yield _tensor_name(arch, tensor, "bias", bid), shape[:1], f32
    if arch in _QK_NORM_ARCHES:
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_Q_NORM, "weight", bid), (spec.head_size,), f32
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_K_NORM, "weight", bid), (spec.head_size,), f32
    if arch in _SANDWICH_NORM_ARCHES:
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_POST_NORM, "weight", bid), (spec.n_embd,), f32
        yield _tensor_name(arch, MODEL_TENSOR.FFN_POST_NORM, "weight", bid), (spec.n_embd,), f32


def _moe_ffn_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # The router stays F32, as llama.cpp's converter and quantizer keep it.
    n_exp, n_ff_exp, n_embd = spec.n_expert, spec.n_ff_exp, spec.n_embd
    yield _tensor_name(arch, MODEL_TENSOR.FFN_GATE_INP, "weight", bid), (n_exp, n_embd), GGMLQuantizationType.F32
    yield _tensor_name(arch, MODEL_TENSOR.FFN_GATE_EXP, "weight", bid), (n_exp, n_ff_exp, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_UP_EXP, "weight", bid), (n_exp, n_ff_exp, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_DOWN_EXP, "weight", bid), (n_exp, n_embd, n_ff_exp), qtype


def _mla_block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes from llama_model_deepseek2::load_arch_tensors, reversed (MLA form:
    # split attn_k_b / attn_v_b, as current converters write).
    f32 = GGMLQuantizationType.F32
    n_embd, n_head, nope, rope = spec.n_embd, spec.n_head, spec.head_size, spec.n_rot
    q_rank, kv_rank, v_head = spec.q_lora_rank, spec.kv_lora_rank, spec.head_size
    q_dim = n_head * (nope + rope)
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (n_embd,), f32
    if q_rank:
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_Q_A_NORM, "weight", bid), (q_rank,), f32
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_Q_A, "weight", bid), (q_rank, n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_Q_B, "weight", bid), (q_dim, q_rank), qtype
    else:
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_Q, "weight", bid), (q_dim, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_KV_A_NORM, "weight", bid), (kv_rank,), f32
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_KV_A_MQA, "weight", bid), (kv_rank + rope, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_K_B, "weight", bid), (n_head, kv_rank, nope), qtype
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_V_B, "weight", bid), (n_head, v_head, kv_rank), qtype
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_OUT, "weight", bid), (n_embd, n_head * v_head), qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_NORM, "weight", bid), (n_embd,), f32
    if bid < spec.n_dense_lead:
        yield from _dense_ffn_plan(spec, arch, bid, qtype, spec.n_ff)
        return
    yield from _moe_ffn_plan(spec, arch, bid, qtype)
    n_ff_sh = spec.n_ff_exp * spec.n_shared_expert
    yield _tensor_name(arch, MODEL_TENSOR.FFN_GATE_SHEXP, "weight", bid), (n_ff_sh, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_UP_SHEXP, "weight", bid), (n_ff_sh, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_DOWN_SHEXP, "weight", bid), (n_embd, n_ff_sh), qtype


def _ssm_block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (spec.n_embd,), GGMLQuantizationType.F32
    yield from _mamba2_mixer_plan(spec, arch, bid, qtype)


def _delta_net_block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int,
                          qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes from llama_model_qwen35::load_arch_tensors, reversed.
    f32 = GGMLQuantizationType.F32
    n_embd, head = spec.n_embd, spec.head_size
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (n_embd,), f32
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_POST_NORM, "weight", bid), (n_embd,), f32
    if (bid + 1) % spec.full_attention_interval == 0:  # gated full attention: Q and its gate in one matrix
        kv_dim = spec.kv_heads(bid) * head
        for tensor, shape in ((MODEL_TENSOR.ATTN_Q, (2 * spec.n_head * head, n_embd)),
                              (MODEL_TENSOR.ATTN_K, (kv_dim, n_embd)), (MODEL_TENSOR.ATTN_V, (kv_dim, n_embd)),
                              (MODEL_TENSOR.ATTN_OUT, (n_embd, spec.n_head * head))):
            yield _tensor_name(arch, tensor, "weight", bid), shape, qtype
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_Q_NORM, "weight", bid), (head,), f32
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_K_NORM, "weight", bid), (head,), f32
    else:
        key_dim = spec.ssm_d_state * spec.ssm_n_group
        value_dim = spec.ssm_d_inner
        conv_dim = 2 * key_dim + value_dim
        n_v_heads = spec.ssm_dt_rank
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_QKV, "weight", bid), (conv_dim, n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_GATE, "weight", bid), (value_dim, n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.SSM_CONV1D, "weight", bid), (conv_dim, spec.ssm_d_conv), f32
        yield _tensor_name(arch, MODEL_TENSOR.SSM_DT, "bias", bid), (n_v_heads,), f32
        yield _tensor_name(arch, MODEL_TENSOR.SSM_A, None, bid), (n_v_heads,), f32
        if arch == MODEL_ARCH.QWEN3NEXT:  # beta and alpha in one projection
            yield _tensor_name(arch, MODEL_TENSOR.SSM_BETA_ALPHA, "weight", bid), (2 * n_v_heads, n_embd), qtype
        else:
            yield _tensor_name(arch, MODEL_TENSOR.SSM_BETA, "weight", bid), (n_v_heads, n_embd), qtype
            yield _tensor_name(arch, MODEL_TENSOR.SSM_ALPHA, "weight", bid), (n_v_heads, n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.SSM_NORM, "weight", bid), (spec.ssm_d_state,), f32
        yield _tensor_name(arch, MODEL_TENSOR.SSM_OUT, "weight", bid), (n_embd, value_dim), qtype
    if not spec.n_expert:
        yield from _dense_ffn_plan(spec, arch, bid, qtype, spec.n_ff)
        return
    yield from _moe_ffn_plan(spec, arch, bid, qtype)
    if spec.n_ff_shexp:  # the shared expert and its scalar gate
        n_sh = spec.n_ff_shexp
        yield _tensor_name(arch, MODEL_TENSOR.FFN_GATE_INP_SHEXP, "weight", bid), (n_embd,), f32
        yield _tensor_name(arch, MODEL_TENSOR.FFN_GATE_SHEXP, "weight", bid), (n_sh, n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.FFN_UP_SHEXP, "weight", bid), (n_sh, n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.FFN_DOWN_SHEXP, "weight", bid), (n_embd, n_sh), qtype


def _shortconv_block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int,
                          qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes from llama_model_lfm2::load_arch_tensors, reversed.
    f32 = GGMLQuantizationType.F32
    n_embd = spec.n_embd
    yield _tensor_name(arch, MODEL_TENSOR.FFN_NORM, "weight", bid), (n_embd,), f32
    yield from _dense_ffn_plan(spec, arch, bid, qtype, spec.n_ff)
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (n_embd,), f32
    if spec.kv_heads(bid):
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_Q_NORM, "weight", bid), (spec.head_size,), f32
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_K_NORM, "weight", bid), (spec.head_size,), f32
        for tensor, shape in _attention_matrices(spec, bid):
            yield _tensor_name(arch, tensor, "weight", bid), shape, qtype
        return
    # the conv kernel stays F32, as llama.cpp's converter keeps 1D/2D norms and convs
    yield _tensor_name(arch, MODEL_TENSOR.SHORTCONV_CONV, "weight", bid), (n_embd, spec.shortconv_l_cache), f32
    yield _tensor_name(arch, MODEL_TENSOR.SHORTCONV_INPROJ, "weight", bid), (3 * n_embd, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.SHORTCONV_OUTPROJ, "weight", bid), (n_embd, n_embd), qtype


def _per_layer_block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int,
                          qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes from llama_model_deci::load_arch_tensors, reversed.
    f32 = GGMLQuantizationType.F32
    heads, kv, ff = spec.heads(bid), spec.kv_heads(bid), spec.ffn(bid)
    if heads:
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (spec.n_embd,), f32
    if heads and not kv:  # linear attention: one n_embd x n_embd projection
        yield _tensor_name(arch, MODEL_TENSOR.ATTN_OUT, "weight", bid), (spec.n_embd, spec.n_embd), qtype
    elif heads:
        q_dim, kv_dim = heads * spec.head_size, kv * spec.head_size
        for tensor, shape in ((MODEL_TENSOR.ATTN_Q, (q_dim, spec.n_embd)), (MODEL_TENSOR.ATTN_K, (kv_dim, spec.n_embd)),
                              (MODEL_TENSOR.ATTN_V, (kv_dim, spec.n_embd)), (MODEL_TENSOR.ATTN_OUT, (spec.n_embd, q_dim))):
            yield _tensor_name(arch, tensor, "weight", bid), shape, qtype
    if ff:
        yield _tensor_name(arch, MODEL_TENSOR.FFN_NORM, "weight", bid), (spec.n_embd,), f32
        yield from _dense_ffn_plan(spec, arch, bid, qtype, ff)


def _hybrid_block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes from llama_model_granite_hybrid::load_arch_tensors, reversed.
    f32 = GGMLQuantizationType.F32
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (spec.n_embd,), f32
    if spec.kv_heads(bid) == 0:
        yield from _mamba2_mixer_plan(spec, arch, bid, qtype)
    else:
        for tensor, shape in _attention_matrices(spec, bid):
            yield _tensor_name(arch, tensor, "weight", bid), shape, qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_NORM, "weight", bid), (spec.n_embd,), f32
    if not spec.n_expert:
        yield from _dense_ffn_plan(spec, arch, bid, qtype, spec.n_ff)
        return
    yield from _moe_ffn_plan(spec, arch, bid, qtype)
    if spec.n_ff_shexp:
        n_sh = spec.n_ff_shexp
        yield _tensor_name(arch, MODEL_TENSOR.FFN_GATE_SHEXP, "weight", bid), (n_sh, spec.n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.FFN_UP_SHEXP, "weight", bid), (n_sh, spec.n_embd), qtype
        yield _tensor_name(arch, MODEL_TENSOR.FFN_DOWN_SHEXP, "weight", bid), (spec.n_embd, n_sh), qtype


def _dense_ffn_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int, qtype: GGMLQuantizationType,
                    n_ff: int) -> Iterator[TensorPlan]:
    yield _tensor_name(arch, MODEL_TENSOR.FFN_GATE, "weight", bid), (n_ff, spec.n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_UP, "weight", bid), (n_ff, spec.n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.FFN_DOWN, "weight", bid), (spec.n_embd, n_ff), qtype


def _mamba2_mixer_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int,
                       qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes from llama.cpp's mamba2 loader (src/models/mamba2.cpp), reversed.
    f32 = GGMLQuantizationType.F32
    n_head, n_group = spec.ssm_dt_rank, spec.ssm_n_group
    yield _tensor_name(arch, MODEL_TENSOR.SSM_IN, "weight", bid), (spec.ssm_in_rows, spec.n_embd), qtype
    # ggml's ssm_conv needs an F32 kernel; llama.cpp never quantizes it.
    yield _tensor_name(arch, MODEL_TENSOR.SSM_CONV1D, "weight", bid), (spec.ssm_conv_dim, spec.ssm_d_conv), f32
    yield _tensor_name(arch, MODEL_TENSOR.SSM_CONV1D, "bias", bid), (spec.ssm_conv_dim,), f32
    yield _tensor_name(arch, MODEL_TENSOR.SSM_DT, "bias", bid), (n_head,), f32
    yield _tensor_name(arch, MODEL_TENSOR.SSM_A, None, bid), (n_head, 1), f32
    yield _tensor_name(arch, MODEL_TENSOR.SSM_D, None, bid), (n_head, 1), f32
    yield _tensor_name(arch, MODEL_TENSOR.SSM_NORM, "weight", bid), (n_group, spec.ssm_d_inner // n_group), f32
    yield _tensor_name(arch, MODEL_TENSOR.SSM_OUT, "weight", bid), (spec.n_embd, spec.ssm_d_inner), qtype


def _encoder_plan(spec: ModelSpec, arch: MODEL_ARCH, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # bert: post-LayerNorm blocks, every linear layer and norm with a bias.
    # Position and token-type embeddings stay F32, as llama.cpp's converter keeps them.
    f32 = GGMLQuantizationType.F32
    n_embd, n_ff = spec.n_embd, spec.n_ff
    yield _tensor_name(arch, MODEL_TENSOR.TOKEN_EMBD, "weight"), (spec.n_vocab, n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.TOKEN_TYPES, "weight"), (_N_TOKEN_TYPES, n_embd), f32
    yield _tensor_name(arch, MODEL_TENSOR.POS_EMBD, "weight"), (spec.n_ctx_train, n_embd), f32
    for suffix in ("weight", "bias"):
        yield _tensor_name(arch, MODEL_TENSOR.TOKEN_EMBD_NORM, suffix), (n_embd,), f32
    for bid in range(spec.n_layer):
        kv_dim = spec.kv_heads(bid) * spec.head_size
        for tensor, shape in [
            (MODEL_TENSOR.ATTN_Q, (n_embd, n_embd)),
            (MODEL_TENSOR.ATTN_K, (kv_dim, n_embd)),
            (MODEL_TENSOR.ATTN_V, (kv_dim, n_embd)),
            (MODEL_TENSOR.ATTN_OUT, (n_embd, n_embd)),
            (MODEL_TENSOR.FFN_UP, (n_ff, n_embd)),
            (MODEL_TENSOR.FFN_DOWN, (n_embd, n_ff)),
        ]:
            yield _tensor_name(arch, tensor, "weight", bid), shape, qtype
            yield _tensor_name(arch, tensor, "bias", bid), shape[:1], f32
        for tensor in (MODEL_TENSOR.ATTN_OUT_NORM, MODEL_TENSOR.LAYER_OUT_NORM):
            for suffix in ("weight", "bias"):
                yield _tensor_name(arch, tensor, suffix, bid), (n_embd,), f32
    if spec.n_cls_out:  # a cross-encoder's classification head (rerankers): dense + output projection
        for tensor, rows in ((MODEL_TENSOR.CLS, n_embd), (MODEL_TENSOR.CLS_OUT, spec.n_cls_out)):
            yield _tensor_name(arch, tensor, "weight"), (rows, n_embd), qtype if rows % GGML_QUANT_SIZES[qtype][0] == 0 else f32
            yield _tensor_name(arch, tensor, "bias"), (rows,), f32


LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_lora(path: str | os.PathLike[str], spec: ModelSpec, *, rank: int = 8, alpha: float = 16.0,
               targets: Sequence[str] = LORA_TARGETS, weight_type: str = "F16", seed: int = 1) -> pathlib.Path:
    """A LoRA adapter for `spec`'s model, as convert_lora_to_gguf writes one.

    For each target matrix W (ggml ne [n_in, n_out]) of every layer: `W.lora_a` [n_in, rank] and
    `W.lora_b` [rank, n_out], with general.type "adapter", adapter.type "lora" and adapter.lora.alpha.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    qtype = _weight_qtype(weight_type, sparse=False)
    _validate(spec, qtype)
    plan = list(_lora_plan(spec, qtype, rank, targets))
    if not plan:
        raise ValueError(f"no tensor of this model matches the LoRA targets {list(targets)}")
    out = pathlib.Path(path)
    writer = GGUFWriter(out, spec.arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    try:
        write_random_tensors(writer, plan, np.random.default_rng(seed))
    finally:
        writer.close()
    return out


def _lora_plan(spec: ModelSpec, qtype: GGMLQuantizationType, rank: int, targets: Sequence[str]) -> Iterator[TensorPlan]:
    for name, shape, _ in _tensor_plan(spec, qtype):
        if len(shape) == 2 and any(name.endswith(f".{t}.weight") for t in targets):
            n_out, n_in = shape  # numpy order
            yield f"{name}.lora_a", (rank, n_in), qtype
            yield f"{name}.lora_b", (n_out, rank), qtype


def _random_tensor(
    name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, rng: np.random.Generator
) -> np.ndarray:
    # mamba's A is -exp(A_log) < 0: a decaying state, as in a trained model.
    if name.endswith(".ssm_a"):
        return -np.ones(shape, dtype=np.float32)
    return random_tensor(name, shape, qtype, rng)


def _write_sparse(writer: GGUFWriter, path: pathlib.Path, plan: Sequence[TensorPlan]) -> None:
    align = writer.data_alignment
    data_size = 0
    for name, shape, qtype in plan:
        byte_shape = quant_shape_to_byte_shape(shape, qtype)
        nbytes = math.prod(byte_shape)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        data_size += _pad(nbytes, align)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    # Truncating past the end leaves a hole: full logical size, no disk blocks.
    data_start = _pad(path.stat().st_size, align)
    os.truncate(path, data_start + data_size)


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# --- ready-made specs -------------------------------------------------------

# Real layouts. Tokenizer kind and merge count match the real files too
# (llama-server loads them); use dataclasses.replace for the weight type.
_LLAMA3_MERGES = 280147
_QWEN2_MERGES = 151387

REALISTIC: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec(
        arch="llama", n_vocab=32000, n_embd=4096, n_layer=32, n_head=32, n_head_kv=32,
        n_ff=11008, n_ctx_train=4096, name="llama2-7b",
    ),
    "llama3-8b": ModelSpec(
        arch="llama", n_vocab=128256, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8,
        n_ff=14336, n_ctx_train=8192, rope_freq_base=500000.0,
        tokenizer="gpt2", n_merges=_LLAMA3_MERGES, name="llama3-8b",
    ),
    "llama3.2-1b": ModelSpec(
        arch="llama", n_vocab=128256, n_embd=2048, n_layer=16, n_head=32, n_head_kv=8,
        n_ff=8192, head_dim=64, n_ctx_train=131072, tied_output=True, rope_freq_base=500000.0,
        tokenizer="gpt2", n_merges=_LLAMA3_MERGES, name="llama3.2-1b",
    ),
    "qwen2.5-0.5b": ModelSpec(
        arch="qwen2", n_vocab=151936, n_embd=896, n_layer=24, n_head=14, n_head_kv=2,
        n_ff=4864, n_ctx_train=32768, tied_output=True, rope_freq_base=1000000.0,
        tokenizer="gpt2", n_merges=_QWEN2_MERGES, name="qwen2.5-0.5b",
    ),
    "qwen2.5-7b": ModelSpec(
        arch="qwen2", n_vocab=152064, n_embd=3584, n_layer=28, n_head=28, n_head_kv=4,
        n_ff=18944, n_ctx_train=32768, rope_freq_base=1000000.0,
        tokenizer="gpt2", n_merges=_QWEN2_MERGES, name="qwen2.5-7b",
    ),
    # The entries below keep the SentencePiece tokenizer: the vocabulary size
    # is real, the tokenizer kind is not (it does not change any buffer).
    "qwen3-8b": ModelSpec(
        arch="qwen3", n_vocab=151936, n_embd=4096, n_layer=36, n_head=32, n_head_kv=8, head_dim=128,
        n_ff=12288, n_ctx_train=40960, rope_freq_base=1000000.0, name="qwen3-8b",
    ),
    "qwen3-30b-a3b": ModelSpec(
        arch="qwen3moe", n_vocab=151936, n_embd=2048, n_layer=48, n_head=32, n_head_kv=4, head_dim=128,
        n_ff=6144, n_expert=128, n_expert_used=8, n_ff_exp=768, n_ctx_train=40960,
        rope_freq_base=1000000.0, name="qwen3-30b-a3b",
    ),
    # gemma3: every 6th layer (5, 11, ...) is global, the rest use the
    # 1024-token window (see ModelSpec).
    "gemma3-4b": ModelSpec(
        arch="gemma3", n_vocab=262208, n_embd=2560, n_layer=34, n_head=8, n_head_kv=4, head_dim=256,
        n_ff=10240, n_swa=1024, n_ctx_train=131072, tied_output=True, rope_freq_base=1000000.0,
        name="gemma3-4b",
    ),
    "gemma3-27b": ModelSpec(
        arch="gemma3", n_vocab=262208, n_embd=5376, n_layer=62, n_head=32, n_head_kv=16, head_dim=128,
        n_ff=21504, n_swa=1024, n_ctx_train=131072, tied_output=True, rope_freq_base=1000000.0,
        name="gemma3-27b",
    ),
    # state-spaces/mamba2-2.7b: d_model 2560, expand 2, head_dim 64 (80 SSM
    # heads), one B/C group; tied embeddings. Context 2**20 is what llama.cpp's
    # converter writes for mamba (no trained limit).
    "mamba2-2.7b": ModelSpec(
        arch="mamba2", n_vocab=50288, n_embd=2560, n_layer=64, n_ctx_train=1048576, tied_output=True,
        ssm_d_conv=4, ssm_d_inner=5120, ssm_d_state=128, ssm_n_group=1, ssm_dt_rank=80,
        name="mamba2-2.7b",
    ),
    # deepseek-ai/DeepSeek-V2-Lite: MLA with no Q compression (qk_nope 128,
    # qk_rope 64, v 128), first layer dense, 64 routed + 2 shared experts.
    # 27 layers is also what llama.cpp's "lite" heuristic keys on.
    "deepseek-v2-lite": ModelSpec(
        arch="deepseek2", n_vocab=102400, n_embd=2048, n_layer=27, n_head=16, head_dim=128,
        n_ff=10944, kv_lora_rank=512, q_lora_rank=0, n_rot=64, n_dense_lead=1,
        n_expert=64, n_expert_used=6, n_ff_exp=1408, n_shared_expert=2, n_ctx_train=163840,
        name="deepseek-v2-lite",
    ),
    # ibm-granite/granite-4.0-h-tiny: 40 layers, attention at 5, 15, 25 and 35 (Mamba-2 elsewhere,
    # 48 SSM heads of 64), 64 experts of 512 with 6 routed plus a 1024-wide shared expert, NoPE.
    "granite-4.0-h-tiny": ModelSpec(
        arch="granitehybrid", n_vocab=100352, n_embd=1536, n_layer=40, n_head=12,
        n_head_kv=tuple(4 if il % 10 == 5 else 0 for il in range(40)), n_ff=512,
        n_expert=64, n_expert_used=6, n_ff_exp=512, n_ff_shexp=1024, n_ctx_train=131072, tied_output=True,
        ssm_d_conv=4, ssm_d_inner=3072, ssm_d_state=128, ssm_n_group=1, ssm_dt_rank=48,
        name="granite-4.0-h-tiny",
    ),
    # LiquidAI/LFM2-1.2B: 10 short-convolution layers (L_cache 3) and 6 GQA attention layers
    # (2, 5, 8, 10, 12, 14), FFN 8192 as the GGUF states it, tied embeddings.
    "lfm2-1.2b": ModelSpec(
        arch="lfm2", n_vocab=65536, n_embd=2048, n_layer=16, n_head=32,
        n_head_kv=tuple(8 if il in (2, 5, 8, 10, 12, 14) else 0 for il in range(16)), n_ff=8192,
        shortconv_l_cache=3, n_ctx_train=128000, tied_output=True, rope_freq_base=1000000.0, name="lfm2-1.2b",
    ),
    # Qwen/Qwen3-Next-80B-A3B: 48 layers, every 4th gated full attention (16 heads of 256, 2 KV heads),
    # the others gated delta-net (16 key and 32 value heads of 128, conv 4); 512 experts of 512, 10 routed,
    # plus a 512-wide shared expert.
    "qwen3-next-80b-a3b": ModelSpec(
        arch="qwen3next", n_vocab=151936, n_embd=2048, n_layer=48, n_head=16, n_head_kv=2, head_dim=256,
        n_ff=5120, n_expert=512, n_expert_used=10, n_ff_exp=512, n_ff_shexp=512, full_attention_interval=4,
        ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32, ssm_d_inner=4096, n_ctx_train=262144,
        rope_freq_base=10000000.0, name="qwen3-next-80b-a3b",
    ),
}


def draft_spec(main: ModelSpec, n_layer: int = 2) -> ModelSpec:
    """A draft model for `main` (speculative decoding, -md): the same vocabulary, a quarter of the width."""
    from dataclasses import replace

    n_head = max(1, main.n_head // 2) if isinstance(main.n_head, int) else 4
    return replace(main, arch="llama", n_embd=max(64, main.n_embd // 2), n_layer=n_layer, n_head=n_head,
                   n_head_kv=max(1, n_head // 2), n_ff=max(128, main.n_ff // 2) if isinstance(main.n_ff, int) else 256,
                   n_expert=0, n_expert_used=0, n_ff_exp=0, head_dim=None, n_swa=0, tied_output=False)


def write_projector(path: str | os.PathLike[str], text: ModelSpec, *, n_embd: int = 64, n_ff: int = 128,
                    n_layer: int = 2, n_head: int = 4, image_size: int = 224, patch_size: int = 14,
                    projector_type: str = "gemma3") -> pathlib.Path:
    """A tiny random-weight vision projector (a SigLIP encoder with Gemma 3's projection) that llama-server's
    mtmd loads beside `text` (`--mmproj`): its output width is the text model's embedding width."""
    import gguf
    import numpy as np

    n_patches = (image_size // patch_size) ** 2
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", projector_type)
    for key, value in (("embedding_length", n_embd), ("feed_forward_length", n_ff), ("block_count", n_layer),
                       ("attention.head_count", n_head), ("projection_dim", text.n_embd), ("image_size", image_size),
                       ("patch_size", patch_size)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_bool("clip.use_gelu", True)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int, f16: bool = True) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float16 if f16 else np.float32))

    tensor("v.patch_embd.weight", n_embd, 3, patch_size, patch_size)
    tensor("v.patch_embd.bias", n_embd, f16=False)
    tensor("v.position_embd.weight", n_patches, n_embd)
    for il in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensor(f"v.blk.{il}.{name}.weight", n_embd, n_embd)
            tensor(f"v.blk.{il}.{name}.bias", n_embd, f16=False)
        for name in ("ln1", "ln2"):
            tensor(f"v.blk.{il}.{name}.weight", n_embd, f16=False)
            tensor(f"v.blk.{il}.{name}.bias", n_embd, f16=False)
        tensor(f"v.blk.{il}.ffn_up.weight", n_ff, n_embd)
        tensor(f"v.blk.{il}.ffn_up.bias", n_ff, f16=False)
        tensor(f"v.blk.{il}.ffn_down.weight", n_embd, n_ff)
        tensor(f"v.blk.{il}.ffn_down.bias", n_embd, f16=False)
    tensor("v.post_ln.weight", n_embd, f16=False)
    tensor("v.post_ln.bias", n_embd, f16=False)
    tensor("mm.input_projection.weight", n_embd, text.n_embd)
    tensor("mm.soft_emb_norm.weight", n_embd, f16=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)
