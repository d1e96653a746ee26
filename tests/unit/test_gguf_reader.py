"""The header-only GGUF reader: valid files match gguf's own reader; hostile files fail clearly."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from llamactl.errors import GGUFError
from llamactl.model.gguf import read_array, read_header
from tests.ggufbytes import (ARRAY, FLOAT32, GGUFBytes, kv_i32_array, kv_str, kv_str_array, kv_u32, minimal, s,
                             tensor_info)
from tests.synth import ModelSpec, write_model


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_matches_gguf_reader_on_generated_model(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", ModelSpec(n_vocab=1000, n_head_kv=(2, 2), weight_type="Q8_0"))
    ours = read_header(path)
    theirs = gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.shape == tuple(int(d) for d in ref.shape)
        assert mine.ggml_type == ref.tensor_type
        assert mine.n_bytes == ref.n_bytes
        assert mine.offset == ref.data_offset - theirs.data_offset
    assert set(ours.metadata) == {k for k in theirs.fields if not k.startswith("GGUF.")}
    assert ours.get("llama.block_count") == 2
    tokens = ours.get("tokenizer.ggml.tokens")
    assert tokens.length == 1000 and tokens.values is None  # recorded, not read
    assert read_array(tokens)[:4] == ("<unk>", "<s>", "</s>", "<0x00>")
    assert ours.get("llama.attention.head_count_kv").values == (2, 2)


def test_reads_v2(tmp_path: Path) -> None:
    header = read_header(write(tmp_path, GGUFBytes(version=2, kvs=minimal().kvs, tensors=minimal().tensors, data_bytes=32).build()))
    assert header.version == 2 and header.tensors[0].n_bytes == 32


def test_large_arrays_are_skipped_fast(tmp_path: Path) -> None:
    n = 150_000
    data = GGUFBytes(kvs=minimal().kvs + [kv_str_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(n)]),
                                          kv_i32_array("tokenizer.ggml.token_type", [1] * n)],
                     tensors=minimal().tensors, data_bytes=32).build()
    path = write(tmp_path, data)
    start = time.perf_counter()
    header = read_header(path)
    assert time.perf_counter() - start < 5  # generous: a hang or quadratic walk fails, noise does not
    assert header.get("tokenizer.ggml.tokens").length == n
    assert header.get("tokenizer.ggml.token_type").values is None
    assert read_array(header.get("tokenizer.ggml.token_type"))[-1] == 1


def _hostile() -> list[tuple[str, bytes, str]]:
    ok = minimal()
    cases = [
        ("empty", b"", "not a GGUF file"),
        ("wrong magic", b"GGML" + ok.build()[4:], "not a GGUF file (magic b'GGML'"),
        ("version 1", GGUFBytes(version=1).build(), "version 1 is obsolete"),
        ("version 4", GGUFBytes(version=4).build(), "unsupported GGUF version 4"),
        ("big-endian", b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        ("truncated header", ok.build()[:70], "truncated"),
        ("absurd kv count", GGUFBytes(n_kv=2**60).build(), "metadata entries, more than the file can hold"),
        ("absurd tensor count", GGUFBytes(n_tensors=2**40).build(), "tensors, more than the file can hold"),
        ("absurd string length", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + b"key" + b"\0" * 32, "truncated"),
        ("unknown value type", GGUFBytes(kvs=[s("k") + struct.pack("<I", 99)]).build(), "unknown value type 99"),
        ("deep nesting", GGUFBytes(kvs=[s("k") + struct.pack("<IIQ", ARRAY, ARRAY, 1) + struct.pack("<IQ", ARRAY, 1)
                                        + struct.pack("<IQ", FLOAT32, 1) + b"\0" * 4]).build(), "nested deeper"),
        ("absurd array length", GGUFBytes(kvs=[s("k") + struct.pack("<IIQ", ARRAY, FLOAT32, 2**50)]).build(), "claims"),
        ("strings past end", GGUFBytes(kvs=[s("k") + struct.pack("<IIQ", ARRAY, 8, 2) + s("a") + struct.pack("<Q", 10**6)]).build(), "truncated"),
        ("non-utf8 key", GGUFBytes(kvs=[s(b"\xff\xfe") + struct.pack("<II", 4, 1)]).build(), "not valid UTF-8"),
        ("duplicate key", GGUFBytes(kvs=[kv_u32("a", 1), kv_u32("a", 2)]).build(), "duplicate metadata key 'a'"),
        ("five dims", GGUFBytes(tensors=[tensor_info("t", (1, 1, 1, 1, 1), 0, 0)], data_bytes=32).build(), "5 dimensions"),
        ("unknown ggml type", GGUFBytes(tensors=[tensor_info("t", (8,), 77, 0)], data_bytes=32).build(), "unknown ggml type 77"),
        ("bad block multiple", GGUFBytes(tensors=[tensor_info("t", (33,), 8, 0)], data_bytes=64).build(), "not a multiple"),
        ("data past end", GGUFBytes(kvs=ok.kvs, tensors=ok.tensors, data_bytes=16).build(), "truncated: tensor 'output_norm.weight'"),
        ("misaligned offset", GGUFBytes(tensors=[tensor_info("t", (8,), 0, 4)], data_bytes=64).build(), "not aligned"),
        ("duplicate tensor", GGUFBytes(tensors=[tensor_info("t", (8,), 0, 0), tensor_info("t", (8,), 0, 32)], data_bytes=64).build(), "duplicate tensor name"),
        ("bad alignment", GGUFBytes(kvs=[kv_u32("general.alignment", 24)]).build(), "not a power of two"),
        ("huge dims overflow", GGUFBytes(tensors=[tensor_info("t", (2**62, 2**62), 0, 0)], data_bytes=32).build(), "not a real model"),
    ]
    return cases


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in _hostile()], ids=[c[0] for c in _hostile()])
def test_hostile_input_raises_one_clear_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(GGUFError) as info:
        read_header(path)
    text = str(info.value)
    assert text.startswith(str(path)), text
    assert message in text, text
    assert "\n" not in text


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file"):
        read_header(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        read_header(tmp_path)


def _shard(index: int, count: int, name: str, with_meta: bool) -> bytes:
    kvs = [kv_str("general.architecture", "llama")] if with_meta else []
    kvs.append(struct.pack("<Q", len("split.count")) + b"split.count" + struct.pack("<IH", 2, count))
    return GGUFBytes(kvs=kvs, tensors=[tensor_info(name, (8,), 0, 0)], data_bytes=32).build()


def test_split_model_reads_every_shard(tmp_path: Path) -> None:
    for i, name in ((1, "a.weight"), (2, "b.weight"), (3, "c.weight")):
        write(tmp_path, _shard(i, 3, name, i == 1), f"m-{i:05d}-of-00003.gguf")
    for any_shard in ("m-00001-of-00003.gguf", "m-00002-of-00003.gguf"):
        header = read_header(tmp_path / any_shard)
        assert [t.name for t in header.tensors] == ["a.weight", "b.weight", "c.weight"]
        assert [t.shard for t in header.tensors] == [0, 1, 2]
        assert header.architecture == "llama"
        assert header.file_bytes == sum(p.stat().st_size for p in tmp_path.glob("m-*.gguf"))


def test_split_model_missing_shard(tmp_path: Path) -> None:
    write(tmp_path, _shard(1, 2, "a.weight", True), "m-00001-of-00002.gguf")
    with pytest.raises(GGUFError, match="shard 2 of 2 is missing"):
        read_header(tmp_path / "m-00001-of-00002.gguf")


def test_reader_never_reads_tensor_data(tmp_path: Path) -> None:
    # a sparse file: 4.6 GB of declared data, a few MiB on disk
    from tests.synth import REALISTIC
    from dataclasses import replace

    path = write_model(tmp_path / "big.gguf", replace(REALISTIC["llama3-8b"], weight_type="Q4_0"), sparse=True)
    header = read_header(path)
    assert header.file_bytes > 4 * 10**9
    assert len(header.tensors) == 2 + 32 * 9 + 1
    assert np.isclose(sum(t.n_elements for t in header.tensors), 8.03e9, rtol=0.01)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="not a regular file"):
        read_header(fifo)
