"""Hostile GGUF headers are answered with a one-line error, in bounded memory, whatever they claim.

The files are the issue's four shapes (100 MB of empty strings, 2.8M metadata pairs, 1.5M tensors,
8.7M nested empty arrays) and the same shapes just within the reader's limits, plus many eager arrays.
Each runs as its own `llamactl estimate` process; its peak RSS is read back from the kernel. Timing
figures are in bench/hostile_gguf.py (no timed asserts here beyond a hang guard).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ggufbytes import hostile_files

MAX_RSS_MB = 150
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(__import__('json').dumps([r.returncode, r.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return hostile_files(tmp_path_factory.mktemp("hostile"), scale=0.25)


@pytest.mark.parametrize("name", ["empty-strings-100MB", "empty-strings-at-limit", "metadata-2.8M", "metadata-at-limit",
                                  "tensors-1.5M", "tensors-at-limit", "nested-arrays-8.7M", "nested-arrays-at-limit",
                                  "eager-arrays-4M-values"])
def test_hostile_header_is_refused_in_bounded_memory(files: dict[str, Path], name: str) -> None:
    out = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "llamactl", "estimate", str(files[name]),
                          "--gpus", "none"], capture_output=True, text=True, timeout=60)
    code, stderr, peak_kib = json.loads(out.stdout)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llamactl: error: "), stderr
    assert str(files[name]) in lines[0]
    assert peak_kib / 1024 <= MAX_RSS_MB, f"{name}: peak RSS {peak_kib / 1024:.0f} MB"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("llama.embedding_length", 0, "embedding_length is 0"),
    ("llama.embedding_length", 2**31, "embedding_length is 2147483648"),
    ("llama.attention.head_count", 0, "head_count is 0 on every layer"),
    ("llama.attention.head_count_kv", 0, "head_count_kv is 0 although layers have attention heads"),
    ("llama.attention.key_length", 2**31, "an attention head of 2147483648 dimensions"),
])
def test_implausible_hyperparameters_are_refused(tmp_path: Path, key: str, value: int, message: str) -> None:
    from tests.ggufbytes import kv_u32, minimal

    hparams = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.attention.head_count": 4,
               "llama.attention.head_count_kv": 2, key: value}
    model = minimal("llama")
    model.kvs += [kv_u32(k, v) for k, v in hparams.items()]
    path = tmp_path / "m.gguf"
    path.write_bytes(model.build())
    out = subprocess.run([sys.executable, "-m", "llamactl", "estimate", str(path), "--gpus", "none"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr and "not a real model" in out.stderr, out.stderr
