"""The model `llamactl demo` writes and runs: a tiny llama with random weights that llama-server loads.

Four layers 256 wide with a real-sized 32k SentencePiece vocabulary; Q4_0 with a tied output keeps the
32k x 256 embedding (the bulk of the file) near 4.6 MB, the whole file about 6.6 MB. The vocabulary and
the random-tensor writing are public because the test-model generator (tests/synth.py) writes them the
same way. This module imports gguf, and with it numpy: import it only where a model is written.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType, LlamaFileType, TokenType
from gguf.quants import quantize

__all__ = ["MIN_VOCAB", "RMS_EPS", "TensorPlan", "add_spm_vocab", "random_tensor", "write_demo_model",
           "write_random_tensors"]

RMS_EPS = 1e-5
# Small weights keep activations tiny, so random models never produce NaNs.
_WEIGHT_SCALE = 0.02
# Three special tokens plus 256 byte tokens: the least a byte-fallback SentencePiece vocabulary needs to
# tokenize any input.
_SPECIALS = ("<unk>", "<s>", "</s>")
MIN_VOCAB = len(_SPECIALS) + 256

_N_VOCAB, _N_CTX_TRAIN, _N_EMBD, _N_LAYER, _N_FF = 32000, 4096, 256, 4, 512
_N_HEAD, _N_HEAD_KV = 8, 4
_HEAD_SIZE = _N_EMBD // _N_HEAD
_QUANT_VERSION = 2  # ggml's quantized block format (general.quantization_version)

TensorPlan = tuple[str, tuple[int, ...], GGMLQuantizationType]  # name, numpy shape (ggml's ne reversed), type
# (name, shape, type, rng) -> the tensor's values, quantized to the type's bytes
TensorValues = Callable[[str, tuple[int, ...], GGMLQuantizationType, np.random.Generator], np.ndarray]


def write_demo_model(path: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Write the demo model at `path` (seeded random weights) and return the path."""
    out = pathlib.Path(path)
    writer = GGUFWriter(out, "llama")
    try:
        _add_hparams(writer)
        add_spm_vocab(writer, _N_VOCAB)
        write_random_tensors(writer, _plan(), np.random.default_rng(seed))
    finally:
        writer.close()
    return out


def _add_hparams(writer: GGUFWriter) -> None:
    writer.add_name("demo")
    writer.add_context_length(_N_CTX_TRAIN)
    writer.add_embedding_length(_N_EMBD)
    writer.add_block_count(_N_LAYER)
    writer.add_feed_forward_length(_N_FF)
    writer.add_head_count(_N_HEAD)
    writer.add_head_count_kv(_N_HEAD_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(_HEAD_SIZE)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(_N_VOCAB)
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(_QUANT_VERSION)


def _plan() -> Iterator[TensorPlan]:
    # The output projection is tied to token_embd, so there is no output.weight.
    f32, q4 = GGMLQuantizationType.F32, GGMLQuantizationType.Q4_0
    q_dim, kv_dim = _N_HEAD * _HEAD_SIZE, _N_HEAD_KV * _HEAD_SIZE
    yield "token_embd.weight", (_N_VOCAB, _N_EMBD), q4
    yield "output_norm.weight", (_N_EMBD,), f32
    for bid in range(_N_LAYER):
        yield f"blk.{bid}.attn_norm.weight", (_N_EMBD,), f32
        yield f"blk.{bid}.ffn_norm.weight", (_N_EMBD,), f32
        for name, shape in (("attn_q", (q_dim, _N_EMBD)), ("attn_k", (kv_dim, _N_EMBD)), ("attn_v", (kv_dim, _N_EMBD)),
                            ("attn_output", (_N_EMBD, q_dim)), ("ffn_gate", (_N_FF, _N_EMBD)),
                            ("ffn_up", (_N_FF, _N_EMBD)), ("ffn_down", (_N_EMBD, _N_FF))):
            yield f"blk.{bid}.{name}.weight", shape, q4


def add_spm_vocab(writer: GGUFWriter, n_vocab: int) -> None:
    """A byte-fallback SentencePiece vocabulary of `n_vocab` (>= MIN_VOCAB) tokens: specials, the 256
    byte tokens, then letter strings, so prompts tokenize into pieces rather than only byte fallbacks."""
    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    tokens += itertools.islice(_spm_filler(), n_vocab - len(tokens))
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_scores([0.0] * n_vocab)


def _spm_filler() -> Iterator[str]:
    # Letter strings, bare and with the SentencePiece word marker.
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in itertools.count(1):
        words = ["".join(p) for p in itertools.product(letters, repeat=length)]
        yield from words
        yield from ("\u2581" + w for w in words)


def random_tensor(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType,
                  rng: np.random.Generator) -> np.ndarray:
    """Values for tensor `name`, in `qtype`'s bytes: seeded small random values; norms an identity scale
    (weights 1, biases 0), as in a trained model."""
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    if name.endswith("norm.bias"):
        return np.zeros(shape, dtype=np.float32)
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(_WEIGHT_SCALE)
    return quantize(values, qtype)


def write_random_tensors(writer: GGUFWriter, plan: Iterable[TensorPlan], rng: np.random.Generator,
                         values: TensorValues = random_tensor) -> None:
    """Add the tensors of `plan` after the metadata, with `values` drawn from `rng` in plan order, then
    write the file: header, metadata, tensor infos and data."""
    for name, shape, qtype in plan:
        writer.add_tensor(name, values(name, shape, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
