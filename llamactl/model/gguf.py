"""Header-only GGUF reader: metadata and tensor infos, never tensor data.

Walks the header of a GGUF v2/v3 file (and every shard of a split model) with
bounds checks on every read, so hostile input raises GGUFError naming the file
and the fault instead of allocating, hanging or crashing. Large arrays (the
vocabulary, merges, scores) are recorded by type, length and offset; their
values are read only when asked (`read_array`). Type sizes and enums come from
the `gguf` package; its GGUFReader is not used (seconds on a 150k vocabulary).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from itertools import repeat
from pathlib import Path
from types import MappingProxyType
from typing import Union

from llamactl.model import quants

from llamactl.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
MAX_ARRAY_NESTING = 2  # an array of arrays is legal GGUF; deeper is hostile
EAGER_ARRAY_LIMIT = 4096  # numeric arrays up to this length are read with the header (per-layer values)
# Limits far above any real model, so that a hostile header costs bounded time and memory whatever it
# claims (real files: ~50 metadata keys, < 5,000 tensors, vocabularies up to ~262k tokens, ~500k merges)
MAX_METADATA = 65_536
MAX_TENSORS = 65_536  # per file
MAX_STRING_ARRAY = 2**21  # items in one array of strings (skipped one by one)
MAX_NESTED_ARRAY = 65_536  # items in one array of arrays
MAX_HEADER_VALUES = 2**21  # Python objects the header may create: eager array values and nested arrays


class ValueType(IntEnum):
    """GGUF metadata value types (the file format's own numbering)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS = {
    ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
    ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.FLOAT32: "f", ValueType.BOOL: "?",
    ValueType.UINT64: "Q", ValueType.INT64: "q", ValueType.FLOAT64: "d",
}
_SCALAR_SIZES = {vt: struct.calcsize("<" + fmt) for vt, fmt in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array: its type and length always, its values when small or asked for."""

    item_type: ValueType
    length: int
    offset: int  # file offset of the first item, for read_array
    shard_path: Path
    values: tuple[Scalar, ...] | None = None  # None: not read (large, or strings)


Scalar = Union[int, float, bool, str]
Value = Union[Scalar, GGUFArray]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. `shape` is in ggml order (ne[0] first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: IntEnum  # quants.GGMLType (gguf's own enum for a type our table lacks)
    offset: int  # from the start of its shard's data section
    n_bytes: int
    shard: int = 0

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file's header; for a split model, all shards merged."""

    path: Path
    version: int
    alignment: int
    metadata: Mapping[str, Value]
    tensors: tuple[TensorInfo, ...]
    file_bytes: int  # sum over shards
    shard_paths: tuple[Path, ...]

    def get(self, key: str, default: Value | None = None) -> Value | None:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else "unknown"


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; every overrun names the file and the field."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path
        self.budget = MAX_HEADER_VALUES  # eager values and nested arrays left to create

    def spend(self, n_values: int, what: str) -> None:
        self.budget -= n_values
        if self.budget < 0:
            raise self.fail(f"{what}: the header holds more than {MAX_HEADER_VALUES} array values; not a real model")

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes < 0 or self.pos + n_bytes > self.size:
            raise self.fail(f"truncated: {what} at offset {self.pos} needs {n_bytes} bytes, file has {self.size}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        self.need(length, what)
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8 at offset {self.pos - length}") from None

    def skip_strings(self, count: int, what: str) -> None:
        # `count` was bounded by the bytes left (each string costs at least its 8-byte length). The hop is
        # the whole cost of a large vocabulary (262,144 tokens: ~20 ms), so the loop is bare: a length read
        # past the end raises, and the end is checked once after the last string.
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        try:
            for _ in repeat(None, count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):  # a length past the end, or past any offset
            raise self.fail(f"truncated: {what} runs past the end of the file") from None
        if pos > self.size:
            raise self.fail(f"truncated: {what} runs past the end of the file")
        self.pos = pos

    def value_type(self, what: str) -> ValueType:
        raw = self.u32(f"{what} type")
        try:
            return ValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None


def _read_value(cur: _Cursor, vtype: ValueType, key: str, depth: int) -> Value:
    if vtype == ValueType.STRING:
        return cur.string(f"value of {key}")
    if vtype == ValueType.ARRAY:
        return _read_array(cur, key, depth + 1)
    size = _SCALAR_SIZES[vtype]
    cur.need(size, f"value of {key}")
    (value,) = struct.unpack_from("<" + _SCALAR_FORMATS[vtype], cur.buf, cur.pos)
    cur.pos += size
    return value


def _read_array(cur: _Cursor, key: str, depth: int) -> GGUFArray:
    if depth > MAX_ARRAY_NESTING:
        raise cur.fail(f"{key}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
    item_type = cur.value_type(f"array {key} item")
    length = cur.u64(f"array {key} length")
    start = cur.pos
    remaining = cur.size - cur.pos
    min_item = 8 if item_type in (ValueType.STRING, ValueType.ARRAY) else _SCALAR_SIZES[item_type]
    if length > remaining // min_item:
        raise cur.fail(f"array {key} claims {length} items, more than the {remaining} bytes left can hold")
    if item_type == ValueType.STRING:
        if length > MAX_STRING_ARRAY:
            raise cur.fail(f"array {key} has {length} strings (at most {MAX_STRING_ARRAY}); not a real model")
        cur.skip_strings(length, f"array {key}")
        return GGUFArray(item_type, length, start, cur.path)
    if item_type == ValueType.ARRAY:
        if length > MAX_NESTED_ARRAY:
            raise cur.fail(f"array {key} has {length} arrays (at most {MAX_NESTED_ARRAY}); not a real model")
        cur.spend(length, f"array {key}")
        items = tuple(_read_array(cur, key, depth + 1) for _ in range(length))
        return GGUFArray(item_type, length, start, cur.path, items if length <= EAGER_ARRAY_LIMIT else None)
    n_bytes = length * min_item
    cur.need(n_bytes, f"array {key}")
    values = None
    if length <= EAGER_ARRAY_LIMIT:
        cur.spend(length, f"array {key}")
        values = struct.unpack_from(f"<{length}{_SCALAR_FORMATS[item_type]}", cur.buf, cur.pos)
    cur.pos += n_bytes
    return GGUFArray(item_type, length, start, cur.path, values)


_SHAPES = {n: struct.Struct(f"<{n}QIQ") for n in range(1, GGML_MAX_DIMS + 1)}  # shape, type, offset
_MAX_DIM = 2**40  # elements along one dimension; beyond, the byte count of any tensor overflows reality


def _read_tensor_info(cur: _Cursor, index: int) -> TensorInfo:
    # the hot loop of a header with many tensors: plain unpacks, messages built only on failure
    buf, pos, size = cur.buf, cur.pos, cur.size
    if pos + 8 > size:
        raise cur.fail(f"truncated: tensor {index} name at offset {pos}")
    (length,) = _U64.unpack_from(buf, pos)
    pos += 8
    if length > size - pos - 4:
        raise cur.fail(f"truncated: tensor {index} name at offset {pos} needs {length} bytes")
    try:
        name = buf[pos:pos + length].decode("utf-8")
    except UnicodeDecodeError:
        raise cur.fail(f"tensor {index} name is not valid UTF-8 at offset {pos}") from None
    pos += length
    (n_dims,) = _U32.unpack_from(buf, pos)
    pos += 4
    layout = _SHAPES.get(n_dims)
    if layout is None:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{GGML_MAX_DIMS} allowed)")
    if pos + layout.size > size:
        raise cur.fail(f"truncated: tensor {name!r} shape, type and offset at offset {pos}")
    *shape, raw_type, offset = layout.unpack_from(buf, pos)
    cur.pos = pos + layout.size
    try:
        ggml_type = quants.by_value(raw_type)
    except ValueError:
        raise cur.fail(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    block_size, type_size = quants.sizes(ggml_type)
    n_elements = 1
    for dim in shape:
        if dim >= _MAX_DIM:
            raise cur.fail(f"tensor {name!r} has a dimension of {dim} elements; not a real model")
        n_elements *= dim
    if shape[0] % block_size:
        raise cur.fail(f"tensor {name!r}: first dimension {shape[0]} is not a multiple of {ggml_type.name}'s block of {block_size}")
    n_bytes = n_elements // block_size * type_size
    return TensorInfo(name, tuple(shape), ggml_type, offset, n_bytes)


def _read_one(path: Path, shard: int) -> tuple[int, int, dict[str, Value], list[TensorInfo], int]:
    """Read one file's header → (version, alignment, metadata, tensors, file size)."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise GGUFError(f"{path}: not a regular file")  # a FIFO would block the open
    try:
        with open(path, "rb") as fh:
            file_bytes = os.fstat(fh.fileno()).st_size
            if file_bytes < 4:
                raise GGUFError(f"{path}: not a GGUF file (only {file_bytes} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path), shard) + (file_bytes,)
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except PermissionError:
        raise GGUFError(f"{path}: permission denied") from None
    except (OSError, ValueError) as exc:  # mmap of a pipe or special file
        raise GGUFError(f"{path}: cannot read: {exc}") from None


def _parse(cur: _Cursor, shard: int) -> tuple[int, int, dict[str, Value], list[TensorInfo]]:
    cur.need(4, "magic")
    magic = bytes(cur.buf[0:4])
    cur.pos = 4
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in SUPPORTED_VERSIONS:
            raise cur.fail("big-endian GGUF files are not supported (llama.cpp on x86/ARM reads little-endian only)")
        if version == 1:
            raise cur.fail("GGUF version 1 is obsolete and not supported; re-convert the model")
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # each KV pair takes at least 8 (key length) + 4 (type) + 1 bytes, each tensor info at least 8 + 4 + 8 + 4 + 8
    remaining = cur.size - cur.pos
    if n_kv > remaining // 13:
        raise cur.fail(f"header claims {n_kv} metadata entries, more than the file can hold")
    if n_tensors > remaining // 32:
        raise cur.fail(f"header claims {n_tensors} tensors, more than the file can hold")
    if n_kv > MAX_METADATA:
        raise cur.fail(f"header claims {n_kv} metadata entries (at most {MAX_METADATA}); not a real model")
    if n_tensors > MAX_TENSORS:
        raise cur.fail(f"header claims {n_tensors} tensors (at most {MAX_TENSORS} per file); not a real model")
    metadata: dict[str, Value] = {}
    for index in range(n_kv):
        key = cur.string(f"metadata key {index}")
        vtype = cur.value_type(f"metadata {key!r}")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        metadata[key] = _read_value(cur, vtype, key, 0)
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for index in range(n_tensors):
        info = _read_tensor_info(cur, index)
        if info.name in names:
            raise cur.fail(f"duplicate tensor name {info.name!r}")
        names.add(info.name)
        tensors.append(TensorInfo(info.name, info.shape, info.ggml_type, info.offset, info.n_bytes, shard))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    data_bytes = cur.size - data_start
    for info in tensors:
        if info.offset % alignment:
            raise cur.fail(f"tensor {info.name!r} offset {info.offset} is not aligned to {alignment}")
        if info.offset + info.n_bytes > data_bytes:
            raise cur.fail(
                f"truncated: tensor {info.name!r} data ends at {data_start + info.offset + info.n_bytes}, "
                f"file has {cur.size} bytes"
            )
    return version, alignment, metadata, tensors


def shard_paths(path: Path) -> tuple[Path, ...]:
    """All shards of a split model named like `*-00001-of-00003.gguf`, or just `path`."""
    match = _SPLIT_RE.match(path.name)
    if not match:
        return (path,)
    count = int(match["count"])
    if count < 1 or int(match["index"]) < 1 or int(match["index"]) > count:
        raise GGUFError(f"{path}: split name says shard {match['index']} of {match['count']}")
    return tuple(path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read a GGUF header; for a split model (any shard's name), all shards' tensors."""
    path = Path(path)
    shards = shard_paths(path)
    version, alignment, metadata, tensors, file_bytes = _read_one(shards[0], 0)
    declared = metadata.get("split.count")
    if len(shards) == 1 and isinstance(declared, int) and declared > 1:
        raise GGUFError(f"{path}: split.count is {declared} but the name is not of the form NAME-00001-of-{declared:05d}.gguf")
    if len(shards) > 1 and isinstance(declared, int) and declared != len(shards):
        raise GGUFError(f"{shards[0]}: split.count is {declared} but the file name says {len(shards)} shards")
    all_tensors = list(tensors)
    for index, shard in enumerate(shards[1:], start=1):
        if not shard.exists():
            raise GGUFError(f"{path}: shard {index + 1} of {len(shards)} is missing ({shard.name})")
        _, _, shard_meta, shard_tensors, shard_bytes = _read_one(shard, index)
        file_bytes += shard_bytes
        all_tensors.extend(shard_tensors)
    names = [t.name for t in all_tensors]
    if len(set(names)) != len(names):
        raise GGUFError(f"{path}: a tensor name appears in more than one shard")
    return GGUFHeader(
        path=shards[0], version=version, alignment=alignment,
        metadata=MappingProxyType(metadata), tensors=tuple(all_tensors),
        file_bytes=file_bytes, shard_paths=shards,
    )


def read_array(array: GGUFArray) -> tuple[Scalar, ...]:
    """The values of an array recorded without them (e.g. the vocabulary's tokens)."""
    if array.values is not None:
        return array.values
    if array.item_type == ValueType.ARRAY:
        raise GGUFError(f"{array.shard_path}: reading a large nested array is not supported")
    with open(array.shard_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, array.shard_path)
        cur.pos = array.offset
        if array.item_type == ValueType.STRING:
            return tuple(cur.string("array item") for _ in range(array.length))
        fmt = _SCALAR_FORMATS[array.item_type]
        cur.need(array.length * _SCALAR_SIZES[array.item_type], "array")
        return struct.unpack_from(f"<{array.length}{fmt}", buf, cur.pos)
