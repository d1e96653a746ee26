"""Write synthetic GGUF model files that a real llama-server can load.

This module has one job: produce GGUF files with a chosen architecture
layout (random weights, or a "sparse" file with no tensor data at all) so
tests, benchmarks and the README demo do not need to download real models.
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
    TokenType,
)
from gguf.quants import quant_shape_to_byte_shape, quantize

__all__ = ["ModelSpec", "REALISTIC", "demo_spec", "write_model"]

_RMS_EPS = 1e-5
# Small weights keep activations tiny, so random models never produce NaNs.
_WEIGHT_SCALE = 0.02
_QUANT_VERSION = 2

# Three special tokens plus 256 byte tokens: the least a byte-fallback
# SentencePiece vocabulary needs to tokenize any input.
_N_SPECIAL = 3
MIN_VOCAB = _N_SPECIAL + 256
# gpt2 vocabulary: byte tokens fill ids 0..255, then end-of-text, then filler.
_GPT2_EOT = 256
_GPT2_BASE = 257
# Merges beyond the filler tokens join into strings outside the vocabulary;
# llama.cpp accepts that (it falls back to byte tokens), so real merge counts
# larger than the vocabulary (llama 3: 280147) can be reproduced.
_MAX_MERGES = 256 * 256 * 257

_ARCHES = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}
_BIASED_ARCHES = {MODEL_ARCH.QWEN2}

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
    """Shape of a synthetic model; validated by write_model."""

    arch: str = "llama"  # "llama" or "qwen2" (qwen2 adds attention q/k/v biases)
    n_vocab: int = 512
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    # A tuple is written as a per-layer array. llama-server's llama/qwen2
    # loaders size every layer's K/V like layer 0, so unequal entries give a
    # valid GGUF that the server refuses ("wrong shape"): reader tests only.
    n_head_kv: int | tuple[int, ...] = 2
    n_ff: int = 128
    head_dim: int | None = None  # None: n_embd // n_head, and no key/value_length keys
    n_ctx_train: int = 4096
    tied_output: bool = False  # True: no output.weight; llama.cpp reuses token_embd
    weight_type: str = "F16"  # ggml type of 2D matrices; norms and biases stay F32
    tokenizer: str = "llama"  # "llama" (SentencePiece byte fallback) or "gpt2" (byte-level BPE)
    n_merges: int = 0  # gpt2 only, and required there (>= 1)
    name: str = "tiny"
    rope_freq_base: float = 10000.0

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def kv_heads(self, layer: int) -> int:
        if isinstance(self.n_head_kv, int):
            return self.n_head_kv
        return self.n_head_kv[layer]


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
            _write_dense(writer, plan, np.random.default_rng(seed))
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
    if spec.tokenizer not in ("llama", "gpt2"):
        raise ValueError(f"tokenizer {spec.tokenizer!r} not supported; use 'llama' or 'gpt2'")
    if spec.n_vocab < MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {MIN_VOCAB} (specials + 256 byte tokens), got {spec.n_vocab}")
    if min(spec.n_embd, spec.n_layer, spec.n_head, spec.n_ff) <= 0:
        raise ValueError("n_embd, n_layer, n_head and n_ff must be positive")
    if spec.head_dim is None and spec.n_embd % spec.n_head:
        raise ValueError(f"n_embd {spec.n_embd} is not divisible by n_head {spec.n_head}; set head_dim")
    if spec.head_size <= 0:
        raise ValueError("head_dim must be positive")
    _validate_kv_heads(spec)
    _validate_merges(spec)
    _validate_rows(spec, qtype)


def _validate_kv_heads(spec: ModelSpec) -> None:
    if isinstance(spec.n_head_kv, tuple) and len(spec.n_head_kv) != spec.n_layer:
        raise ValueError(f"n_head_kv has {len(spec.n_head_kv)} entries for {spec.n_layer} layers")
    counts = [spec.kv_heads(layer) for layer in range(spec.n_layer)]
    if any(n <= 0 for n in counts):
        raise ValueError("every n_head_kv entry must be > 0")


def _validate_merges(spec: ModelSpec) -> None:
    if spec.tokenizer == "llama" and spec.n_merges:
        raise ValueError("n_merges only applies to the gpt2 tokenizer")
    # llama.cpp refuses a BPE vocabulary without a merges array, and the gguf
    # writer cannot write an empty one.
    if spec.tokenizer == "gpt2" and not 1 <= spec.n_merges <= _MAX_MERGES:
        raise ValueError(f"the gpt2 tokenizer needs 1 <= n_merges <= {_MAX_MERGES}, got {spec.n_merges}")


def _validate_rows(spec: ModelSpec, qtype: GGMLQuantizationType) -> None:
    block_size = GGML_QUANT_SIZES[qtype][0]
    # Rows of every matrix are n_embd, n_ff or n_head*head_dim elements long.
    for row in {spec.n_embd, spec.n_ff, spec.n_head * spec.head_size}:
        if row % block_size:
            raise ValueError(f"row size {row} is not a multiple of the {qtype.name} block size {block_size}")


# --- metadata ---------------------------------------------------------------


def _add_hparams(writer: GGUFWriter, spec: ModelSpec, qtype: GGMLQuantizationType) -> None:
    writer.add_name(spec.name)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    n_head_kv = spec.n_head_kv
    writer.add_head_count_kv(n_head_kv if isinstance(n_head_kv, int) else list(n_head_kv))
    writer.add_layer_norm_rms_eps(_RMS_EPS)
    writer.add_rope_dimension_count(spec.head_size)
    writer.add_rope_freq_base(spec.rope_freq_base)
    writer.add_vocab_size(spec.n_vocab)
    if spec.head_dim is not None:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_file_type(_FILE_TYPES[qtype])
    if qtype not in _FLOAT_TYPES:
        writer.add_quantization_version(_QUANT_VERSION)


def _add_vocab(writer: GGUFWriter, spec: ModelSpec) -> None:
    if spec.tokenizer == "gpt2":
        tokens, types = _gpt2_vocab(spec.n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_merges(_gpt2_merges(spec.n_merges))
        writer.add_bos_token_id(_GPT2_EOT)
        writer.add_eos_token_id(_GPT2_EOT)
    else:
        tokens, types = _spm_vocab(spec.n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * spec.n_vocab)


def _spm_vocab(n_vocab: int) -> tuple[list[str], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += itertools.islice(_spm_filler(), n_vocab - len(tokens))
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    return tokens, [int(t) for t in types]


def _spm_filler() -> Iterator[str]:
    # Letter strings, bare and with the SentencePiece word marker, so prompts
    # tokenize into pieces rather than only byte fallbacks.
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in itertools.count(1):
        words = ["".join(p) for p in itertools.product(letters, repeat=length)]
        yield from words
        yield from ("\u2581" + w for w in words)


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

TensorPlan = tuple[str, tuple[int, ...], GGMLQuantizationType]


def _tensor_name(arch: MODEL_ARCH, tensor: MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    if tensor not in MODEL_TENSORS[arch]:
        raise ValueError(f"{MODEL_ARCH_NAMES[arch]} has no {tensor.name} tensor")
    base = TENSOR_NAMES[tensor]
    return f"{base.format(bid=bid) if bid is not None else base}.{suffix}"


def _tensor_plan(spec: ModelSpec, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    # Shapes are numpy order (rows, cols): the reverse of ggml's ne.
    arch = _ARCHES[spec.arch]
    f32 = GGMLQuantizationType.F32
    yield _tensor_name(arch, MODEL_TENSOR.TOKEN_EMBD, "weight"), (spec.n_vocab, spec.n_embd), qtype
    yield _tensor_name(arch, MODEL_TENSOR.OUTPUT_NORM, "weight"), (spec.n_embd,), f32
    if not spec.tied_output:
        yield _tensor_name(arch, MODEL_TENSOR.OUTPUT, "weight"), (spec.n_vocab, spec.n_embd), qtype
    for layer in range(spec.n_layer):
        yield from _block_plan(spec, arch, layer, qtype)


def _block_plan(spec: ModelSpec, arch: MODEL_ARCH, bid: int, qtype: GGMLQuantizationType) -> Iterator[TensorPlan]:
    f32 = GGMLQuantizationType.F32
    q_dim = spec.n_head * spec.head_size
    kv_dim = spec.kv_heads(bid) * spec.head_size
    matrices = [
        (MODEL_TENSOR.ATTN_Q, (q_dim, spec.n_embd)),
        (MODEL_TENSOR.ATTN_K, (kv_dim, spec.n_embd)),
        (MODEL_TENSOR.ATTN_V, (kv_dim, spec.n_embd)),
        (MODEL_TENSOR.ATTN_OUT, (spec.n_embd, q_dim)),
        (MODEL_TENSOR.FFN_GATE, (spec.n_ff, spec.n_embd)),
        (MODEL_TENSOR.FFN_UP, (spec.n_ff, spec.n_embd)),
        (MODEL_TENSOR.FFN_DOWN, (spec.n_embd, spec.n_ff)),
    ]
    yield _tensor_name(arch, MODEL_TENSOR.ATTN_NORM, "weight", bid), (spec.n_embd,), f32
    yield _tensor_name(arch, MODEL_TENSOR.FFN_NORM, "weight", bid), (spec.n_embd,), f32
    for tensor, shape in matrices:
        yield _tensor_name(arch, tensor, "weight", bid), shape, qtype
    if arch in _BIASED_ARCHES:
        for tensor, shape in matrices[:3]:
            yield _tensor_name(arch, tensor, "bias", bid), shape[:1], f32


def _write_dense(writer: GGUFWriter, plan: Sequence[TensorPlan], rng: np.random.Generator) -> None:
    for name, shape, qtype in plan:
        writer.add_tensor(name, _random_tensor(name, shape, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


def _random_tensor(
    name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, rng: np.random.Generator
) -> np.ndarray:
    # Unit norm weights keep RMSNorm an identity scale, as in a trained model.
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(_WEIGHT_SCALE)
    return quantize(values, qtype)


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
}


def demo_spec() -> ModelSpec:
    """A small model with a real-sized vocabulary for the README demo.

    Q4_0 with a tied output keeps the 32k x 256 embedding (the bulk of the
    file) near 4.6 MB; the whole file is about 6 MB.
    """
    return ModelSpec(
        arch="llama", n_vocab=32000, n_embd=256, n_layer=4, n_head=8, n_head_kv=4,
        n_ff=512, n_ctx_train=4096, tied_output=True, weight_type="Q4_0", name="demo",
    )
