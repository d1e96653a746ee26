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
