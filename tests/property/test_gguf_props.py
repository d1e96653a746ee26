"""Property tests of the GGUF header reader (and of model_params on what it returns).

Contract (docs: hostile input): whatever the bytes, `read_header` returns a header or raises GGUFError with
a one-line message naming the file, within the deadline; a header built from random metadata and tensor
infos reads back exactly as written; `model_params` on any header returns ModelParams or a UsageError.
"""

from __future__ import annotations

import atexit
import math
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llamactl.errors import GGUFError, UsageError
from llamactl.model.gguf import EAGER_ARRAY_LIMIT, GGUFArray, GGUFHeader, ValueType, read_array, read_header
from llamactl.model.memory import MemoryEstimate, estimate
from llamactl.model.params import MODELLED_ARCHS, ModelParams, model_params
from llamactl.model.settings import ServerSettings, resolve
from tests.property.contract import GGUF_RAW_KEY, KNOWN, counted, examples, one_line, outcome

V = ValueType
SCALAR_FORMATS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
                  V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
RESERVED_KEYS = {"general.alignment", "split.count"}  # keys whose value the reader checks (set explicitly)


# --- a GGUF writer that remembers where its length and type fields are (for the mutations) ---------------

@dataclass
class Writer:
    buf: bytearray = field(default_factory=bytearray)
    u64_at: list[int] = field(default_factory=list)  # offsets of every u64 (counts, lengths, dims, offsets)
    u32_at: list[int] = field(default_factory=list)  # offsets of every u32 (version, types, n_dims)

    def u32(self, value: int) -> None:
        self.u32_at.append(len(self.buf))
        self.buf += struct.pack("<I", value)

    def u64(self, value: int) -> None:
        self.u64_at.append(len(self.buf))
        self.buf += struct.pack("<Q", value)

    def string(self, text: str) -> None:
        raw = text.encode()
        self.u64(len(raw))
        self.buf += raw

    def items(self, item_type: V, values: list) -> None:
        self.u32(item_type)
        self.u64(len(values))
        for value in values:
            self.payload(item_type, value)

    def payload(self, vtype: V, value: object) -> None:
        if vtype == V.STRING:
            self.string(value)  # type: ignore[arg-type]
        elif vtype == V.ARRAY:
            item_type, values = value  # type: ignore[misc]
            self.items(item_type, values)
        else:
            self.buf += struct.pack("<" + SCALAR_FORMATS[vtype], value)


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape) // block * size


@dataclass
class Model:
    """What a GGUF file says, before it is written."""

    metadata: dict[str, tuple[V, object]]
    tensors: list[Tensor]
    alignment: int | None = None  # written as general.alignment (u32) when set
    version: int = 3

    @property
    def align(self) -> int:
        return self.alignment or 32

    def offsets(self) -> list[int]:
        out, end = [], 0
        for tensor in self.tensors:
            start = -(-end // self.align) * self.align
            out.append(start)
            end = start + tensor.n_bytes
        return out

    def build(self) -> Writer:
        w = Writer()
        w.buf += b"GGUF"
        w.u32(self.version)
        meta = dict(self.metadata)
        if self.alignment is not None:
            meta["general.alignment"] = (V.UINT32, self.alignment)
        w.u64(len(self.tensors))
        w.u64(len(meta))
        for key, (vtype, value) in meta.items():
            w.string(key)
            w.u32(vtype)
            w.payload(vtype, value)
        offsets = self.offsets()
        for tensor, offset in zip(self.tensors, offsets):
            w.string(tensor.name)
            w.u32(len(tensor.shape))
            for dim in tensor.shape:
                w.u64(dim)
            w.u32(tensor.ggml_type)
            w.u64(offset)
        w.buf += b"\0" * (-len(w.buf) % self.align)
        data_end = max((o + t.n_bytes for o, t in zip(offsets, self.tensors)), default=0)
        w.buf += b"\0" * data_end
        return w


# --- strategies -------------------------------------------------------------------------------------------

TEXT = st.characters(codec="utf-8")  # any Unicode scalar but surrogates (GGUF strings are UTF-8)
REAL_KEYS = ["general.architecture", "general.name", "general.file_type", "llama.block_count",
             "llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
             "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "qwen2.context_length"]
keys = st.one_of(st.sampled_from(REAL_KEYS), st.text(TEXT, max_size=24)).filter(lambda k: k not in RESERVED_KEYS)


def scalar(vtype: V) -> st.SearchStrategy:
    if vtype == V.BOOL:
        return st.booleans()
    if vtype == V.FLOAT32:
        return st.floats(width=32)
    if vtype == V.FLOAT64:
        return st.floats()
    fmt = SCALAR_FORMATS[vtype]
    bits = struct.calcsize(fmt) * 8
    if fmt.islower():
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


SCALAR_TYPES = [t for t in V if t not in (V.STRING, V.ARRAY)]
scalar_types = st.sampled_from(SCALAR_TYPES)
strings = st.text(TEXT, max_size=16)


@st.composite
def array_of(draw, item_types: st.SearchStrategy, max_len: int = 8) -> tuple[V, list]:
    item_type = draw(item_types)
    if item_type == V.STRING:
        return item_type, draw(st.lists(strings, max_size=max_len))
    if item_type == V.ARRAY:
        inner = array_of(st.sampled_from([*SCALAR_TYPES, V.STRING]), max_len=4)
        return item_type, draw(st.lists(inner, max_size=4))
    return item_type, draw(st.lists(scalar(item_type), max_size=max_len))


@st.composite
def typed_values(draw) -> tuple[V, object]:
    vtype = draw(st.sampled_from(list(V)))
    if vtype == V.STRING:
        return vtype, draw(strings)
    if vtype == V.ARRAY:
        return vtype, draw(array_of(st.sampled_from(list(V))))
    return vtype, draw(scalar(vtype))


ggml_types = st.sampled_from(sorted(GGMLQuantizationType, key=int))


@st.composite
def tensors(draw, names: st.SearchStrategy = st.text(TEXT, max_size=20)) -> Tensor:
    ggml_type = draw(ggml_types)
    block = GGML_QUANT_SIZES[ggml_type][0]
    n_dims = draw(st.integers(1, 4))
    shape = (block * draw(st.integers(0, 4)), *draw(st.lists(st.integers(0, 3), min_size=n_dims - 1, max_size=n_dims - 1)))
    return Tensor(draw(names), shape, ggml_type)


@st.composite
def models(draw, min_kv: int = 0, min_tensors: int = 0) -> Model:
    metadata = draw(st.dictionaries(keys, typed_values(), min_size=min_kv, max_size=8))
    tensor_list = draw(st.lists(tensors(), min_size=min_tensors, max_size=5, unique_by=lambda t: t.name))
    alignment = draw(st.none() | st.sampled_from([1, 2, 8, 32, 64, 256]))
    return Model(metadata, tensor_list, alignment, draw(st.sampled_from([2, 3])))


# --- helpers ----------------------------------------------------------------------------------------------

_dir = Path(tempfile.mkdtemp(prefix="llamactl-gguf-props-"))
atexit.register(shutil.rmtree, _dir, ignore_errors=True)


def write(data: bytes | bytearray) -> Path:
    path = _dir / "m.gguf"  # never a split name (NAME-00001-of-00002.gguf)
    path.write_bytes(data)
    return path


def read(data: bytes | bytearray) -> GGUFHeader | GGUFError | object:
    """read_header under the contract: a header, a one-line GGUFError naming the file, or a known bug."""
    path = write(data)
    result = outcome(lambda: read_header(path), expect=GGUFError, known=(GGUF_RAW_KEY,))
    if isinstance(result, GGUFError):
        assert str(path) in str(result), str(result)
        reason = re.sub(r"'[^']*'|\d+", "_", str(result).removeprefix(f"{path}: "))
        event(f"GGUFError: {' '.join(reason.split()[:3])}")
    elif result is not KNOWN:
        event("header")
        assert isinstance(result, GGUFHeader)
        assert result.file_bytes == len(data)
    return result


def same(value: object, expected: object) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(value, float) and math.isnan(value)
    return value == expected and type(value) is type(expected)


def check_value(got: object, vtype: V, value: object) -> None:
    if vtype == V.ARRAY:
        item_type, values = value  # type: ignore[misc]
        assert isinstance(got, GGUFArray) and got.item_type == item_type and got.length == len(values)
        if item_type == V.STRING:
            assert got.values is None and read_array(got) == tuple(values)
        elif item_type == V.ARRAY:
            assert got.values is not None and len(got.values) == len(values)
            for inner, inner_value in zip(got.values, values):
                check_value(inner, V.ARRAY, inner_value)
        else:
            assert got.values is not None and len(values) <= EAGER_ARRAY_LIMIT
            assert all(same(g, v) for g, v in zip(got.values, values)), (got.values, values)
    else:
        assert same(got, value), (got, value)


# --- properties -------------------------------------------------------------------------------------------

def gguf_prefix(tail: st.SearchStrategy) -> st.SearchStrategy:
    """Bytes that pass the magic and (mostly) the version check, so the rest of the reader is reached."""
    version = st.sampled_from([2, 3]) | st.integers(0, 2**32 - 1)
    counts = st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, 8), st.integers(0, 2**64 - 1) | st.integers(0, 8))
    return st.builds(lambda v, c, t: b"GGUF" + struct.pack("<IQQ", v, *c) + t, version, counts, tail)


@settings(max_examples=examples(300))
@given(st.binary(max_size=64) | st.builds(lambda t: b"GGUF" + t, st.binary(max_size=256)) | gguf_prefix(st.binary(max_size=512)))
@counted
def test_arbitrary_bytes_give_a_header_or_one_line_gguf_error(data: bytes) -> None:
    read(data)


@st.composite
def mutated(draw) -> tuple[bytes, list]:
    """A valid file with 1..4 mutations: byte flips, a truncation, length and type fields overwritten."""
    w = draw(models(min_kv=1, min_tensors=1)).build()
    buf = bytearray(w.buf)
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "u64", "u64", "u32", "insert", "delete"]))
        if len(buf) <= 4:
            break
        at = draw(st.integers(4, len(buf) - 1))  # past the magic (test_arbitrary_bytes covers a bad one)
        if kind == "flip":
            buf[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "u64" and w.u64_at:
            at = draw(st.sampled_from(w.u64_at[2:] or w.u64_at) | st.sampled_from(w.u64_at))
            value = draw(st.sampled_from([2**64 - 1, 2**63, 2**62 + 1, 2**40, 2**32, 2**21 + 1, 65_537, len(buf), 0])
                         | st.integers(0, 2**64 - 1))
            buf[at:at + 8] = struct.pack("<Q", value)[: max(0, len(buf) - at)]
        elif kind == "u32" and w.u32_at:
            at = draw(st.sampled_from(w.u32_at[1:] or w.u32_at) | st.sampled_from(w.u32_at))
            value = draw(st.integers(0, 14) | st.sampled_from([2**31, 2**32 - 1, 0x03000000]) | st.integers(0, 2**32 - 1))
            buf[at:at + 4] = struct.pack("<I", value)[: max(0, len(buf) - at)]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[at:at + draw(st.integers(1, 16))]
        ops.append((kind, at))
    return bytes(buf), ops


@settings(max_examples=examples(300), deadline=2000)
@given(mutated())
@counted
def test_mutated_valid_file_gives_a_header_or_one_line_gguf_error_quickly(case: tuple[bytes, list]) -> None:
    data, _ops = case
    read(data)


@settings(max_examples=examples(150))
@given(models())
@counted
def test_valid_header_reads_back_what_was_written(model: Model) -> None:
    data = model.build().buf
    header = read_header(write(data))  # no error of any kind is acceptable here
    assert header.version == model.version and header.alignment == model.align
    assert header.file_bytes == len(data)
    expected = dict(model.metadata)
    if model.alignment is not None:
        expected["general.alignment"] = (V.UINT32, model.alignment)
    assert list(header.metadata) == list(expected)
    for key, (vtype, value) in expected.items():
        check_value(header.metadata[key], vtype, value)
    assert [t.name for t in header.tensors] == [t.name for t in model.tensors]
    for got, tensor, offset in zip(header.tensors, model.tensors, model.offsets()):
        assert (got.shape, got.ggml_type, got.offset, got.n_bytes, got.shard) == \
            (tensor.shape, tensor.ggml_type, offset, tensor.n_bytes, 0)


# --- model_params on random and hostile hyperparameters ---------------------------------------------------

ARCHS = sorted(MODELLED_ARCHS) + ["mamba", "jamba", "rwkv6", "gemma3n", "cohere2moe", "falcon-h1", "not-an-arch", ""]
HPARAMS = ["block_count", "embedding_length", "attention.head_count", "attention.head_count_kv", "attention.key_length",
           "attention.value_length", "attention.sliding_window", "attention.sliding_window_pattern", "context_length",
           "feed_forward_length", "expert_count", "expert_used_count", "expert_feed_forward_length", "vocab_size",
           "ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.group_count", "ssm.time_step_rank",
           "shortconv.l_cache", "full_attention_interval", "attention.recurrent_layers", "attention.causal",
           "attention.key_length_mla", "attention.value_length_mla"]
HOSTILE_INTS = [0, 1, 2**16, 2**16 + 1, 2**20 + 1, 2**31, 2**32 - 1, 2**40, 2**40 + 1, 2**63, 2**64 - 1]


@st.composite
def hparam_values(draw, n_layer_hint: int) -> tuple[V, object]:
    choice = draw(st.sampled_from(["small", "small", "hostile", "random", "per-layer", "per-layer-random"]))
    if choice == "small":
        return V.UINT32, draw(st.integers(1, 64))
    if choice == "hostile":
        vtype = draw(st.sampled_from([V.UINT64, V.INT64, V.UINT32, V.INT32]))
        fmt = SCALAR_FORMATS[vtype]
        low, high = (-(2 ** (8 * struct.calcsize(fmt) - 1)), 2 ** (8 * struct.calcsize(fmt) - 1) - 1) if fmt.islower() \
            else (0, 2 ** (8 * struct.calcsize(fmt)) - 1)
        fitting = [v for v in HOSTILE_INTS if low <= v <= high]
        return vtype, draw(st.sampled_from(fitting) | st.sampled_from([low, high]))
    if choice == "per-layer":
        return V.ARRAY, (V.UINT32, draw(st.lists(st.integers(0, 64), min_size=n_layer_hint, max_size=n_layer_hint)))
    if choice == "per-layer-random":
        return V.ARRAY, draw(array_of(st.sampled_from(list(V)), max_len=n_layer_hint + 2))
    return draw(typed_values())


TENSOR_NAMES = ["token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight",
                "blk.0.ffn_up.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_up_exps.weight", "blk.0.ffn_up_shexp.weight",
                "blk.0.ffn_gate_exps.weight", "blk.99999.attn_k.weight"]


@st.composite
def hparam_models(draw) -> Model:
    """A plausible model's hyperparameters, a few of them replaced by random or hostile values."""
    arch = draw(st.sampled_from(ARCHS))
    n_layer = draw(st.integers(1, 6))
    plausible = {"block_count": n_layer, "embedding_length": 64 * draw(st.integers(1, 8)), "attention.head_count": 4,
                 "attention.head_count_kv": draw(st.sampled_from([1, 2, 4])), "feed_forward_length": 256,
                 "context_length": 2048}
    metadata: dict[str, tuple[V, object]] = {"general.architecture": (V.STRING, arch)}
    metadata.update({f"{arch}.{k}": (V.UINT32, v) for k, v in plausible.items()})
    for key in draw(st.lists(st.sampled_from(HPARAMS), unique=True, max_size=4)):
        metadata[f"{arch}.{key}"] = draw(hparam_values(n_layer))
    for key in draw(st.lists(st.sampled_from(list(metadata)), unique=True, max_size=2)):
        del metadata[key]  # a required key missing
    if draw(st.booleans()):
        metadata["general.file_type"] = draw(typed_values() | st.tuples(st.just(V.UINT32), st.integers(0, 40)))
    if draw(st.integers(0, 3)):
        metadata["tokenizer.ggml.tokens"] = (V.ARRAY, (V.STRING, draw(st.lists(strings, max_size=4))))
    names = st.sampled_from(TENSOR_NAMES) | st.text(TEXT, max_size=12)
    tensor_list = draw(st.lists(tensors(names), max_size=6, unique_by=lambda t: t.name))
    return Model(metadata, tensor_list)


@settings(max_examples=examples(300))
@given(hparam_models())
@counted
def test_model_params_gives_params_or_a_usage_error(model: Model) -> None:
    header = read_header(write(model.build().buf))  # the file itself is valid
    params = outcome(lambda: model_params(header), expect=UsageError)
    event(f"model_params: {type(params).__name__}")
    if not isinstance(params, ModelParams):
        return
    n_layer = params.n_layer
    assert 0 < n_layer and 0 < params.n_embd
    for per_layer in (params.n_head, params.n_head_kv, params.n_ff, params.swa_layers, params.recurrent_layers):
        assert len(per_layer) == n_layer
    # what `llamactl estimate` does next, on the CPU with default settings: an estimate or a UsageError
    result = outcome(lambda: estimate(params, resolve(ServerSettings(), params, 0)), expect=UsageError)
    assert isinstance(result, (MemoryEstimate, UsageError)), result
    event(f"estimate: {type(result).__name__}")


# --- regressions: the bugs these tests found, fixed ----------------------

def test_regression_gguf_raw_key_in_message(tmp_path: Path) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"a\nb" + struct.pack("<IQ", V.STRING, 1000)
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError) as info:
        read_header(path)
    assert one_line(str(info.value)), repr(str(info.value))
