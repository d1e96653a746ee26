"""Hand-built GGUF bytes for reader tests: valid files and every kind of hostile one."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

STRING, ARRAY, UINT32, INT32, FLOAT32, UINT64 = 8, 9, 4, 5, 6, 10


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", UINT32, value)


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", STRING) + s(value)


def kv_str_array(key: str, values: list[str]) -> bytes:
    return s(key) + struct.pack("<IIQ", ARRAY, STRING, len(values)) + b"".join(s(v) for v in values)


def kv_i32_array(key: str, values: list[int]) -> bytes:
    return s(key) + struct.pack("<IIQ", ARRAY, INT32, len(values)) + struct.pack(f"<{len(values)}i", *values)


def tensor_info(name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", ggml_type, offset)


@dataclass
class GGUFBytes:
    """A GGUF file under construction; `build()` pads to 32 and appends `data_bytes` of data."""

    version: int = 3
    kvs: list[bytes] = field(default_factory=list)
    tensors: list[bytes] = field(default_factory=list)
    data_bytes: int = 0
    magic: bytes = b"GGUF"
    n_kv: int | None = None  # override the declared counts
    n_tensors: int | None = None

    def build(self) -> bytes:
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        n_tensors = len(self.tensors) if self.n_tensors is None else self.n_tensors
        head = self.magic + struct.pack("<IQQ", self.version, n_tensors, n_kv) + b"".join(self.kvs) + b"".join(self.tensors)
        head += b"\0" * (-len(head) % 32)
        return head + b"\0" * self.data_bytes


def minimal(arch: str = "llama") -> GGUFBytes:
    """A valid one-tensor file: an f32 tensor of 8 elements (32 bytes)."""
    return GGUFBytes(kvs=[kv_str("general.architecture", arch), kv_u32("general.alignment", 32)],
                     tensors=[tensor_info("output_norm.weight", (8,), 0, 0)], data_bytes=32)


UINT8 = 0


def _write(path, head: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.write(b"\0" * (-len(head) % 32 + 32))


def hostile_files(directory, scale: float = 1.0) -> dict[str, object]:
    """Headers that cost a naive reader time or memory out of proportion to what they claim: the
    issue's four shapes, each once past llamactl's limits and once just within them. Returns name → path.
    `scale` shrinks the past-the-limit ones (their refusal does not depend on their size)."""
    from pathlib import Path

    directory = Path(directory)
    out = {}

    def emit(name: str, head: bytes) -> None:
        out[name] = directory / f"{name}.gguf"
        _write(out[name], head)

    def header(n_tensors: int, n_kv: int) -> bytes:
        return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)

    for name, count in (("empty-strings-100MB", int(12_500_000 * scale)), ("empty-strings-at-limit", 2**21)):
        emit(name, header(0, 1) + s("a") + struct.pack("<IIQ", ARRAY, STRING, count) + s("") * count)
    for name, count in (("metadata-2.8M", int(2_800_000 * scale)), ("metadata-at-limit", 65_536)):
        keys = b"".join(s(f"k{i}") + struct.pack("<IB", UINT8, 0) for i in range(count))
        emit(name, header(0, count) + keys)
    for name, count in (("tensors-1.5M", int(1_500_000 * scale)), ("tensors-at-limit", 65_536)):
        infos = b"".join(tensor_info(f"t{i}", (1,), 0, 0) for i in range(count))
        emit(name, header(count, 0) + infos)
    inner = struct.pack("<IQ", UINT8, 0)  # an empty array of u8: 12 bytes
    for name, count in (("nested-arrays-8.7M", int(8_700_000 * scale)), ("nested-arrays-at-limit", 65_536)):
        emit(name, header(0, 1) + s("a") + struct.pack("<IIQ", ARRAY, ARRAY, count) + inner * count)
    # many small eager arrays: each within the eager limit, together millions of Python objects
    arrays = b"".join(s(f"a{i}") + struct.pack("<IIQ", ARRAY, UINT8, 4096) + b"\0" * 4096 for i in range(1024))
    emit("eager-arrays-4M-values", header(0, 1024) + arrays)
    return out
