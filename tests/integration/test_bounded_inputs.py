"""Hostile inputs get a one-line error and exit 2, quickly: no hang, no unbounded read, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LLAMACTL_GPUS": ""})


def one_line_usage_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamactl: error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["fifo", "chardev", "huge", "deep", "directory"])
def test_gpus_file_only_a_bounded_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "inv.json"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: reading it would block forever
    elif kind == "chardev":
        path = Path("/dev/zero")  # endless
    elif kind == "huge":
        path.write_text("[" + " " * (8 * 2**20) + "]")
    elif kind == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    else:
        path.mkdir()
    start = time.monotonic()
    line = one_line_usage_error(run("plan", str(tmp_path / "none.gguf"), "--gpus-file", str(path), timeout=20))
    assert time.monotonic() - start < 10
    assert str(path) in line


@pytest.mark.parametrize("flags", [["-c", "-1"], ["-b", "0"], ["-np", "0"], ["-ts", "1,nan"], ["-ts", "inf"],
                                   ["--gpus", "8GiB", "--gpu-util-threshold", "101"],
                                   ["--gpus", "8GiB", "--gpu-mem-threshold", "nan"]])
def test_flag_values_are_bounded(tmp_path: Path, flags: list[str]) -> None:
    from tests.synth import ModelSpec, write_model

    model = write_model(tmp_path / "m.gguf", ModelSpec(n_vocab=300))
    one_line_usage_error(run("plan", str(model), "--gpus", "none", *flags) if "--gpus" not in flags
                         else run("plan", str(model), *flags))


@pytest.mark.parametrize("value", ["nan", "inf", "-1s", "1e300"])
def test_durations_are_finite(value: str) -> None:
    one_line_usage_error(run("evict", "--idle", value))


@pytest.mark.parametrize("line", ["poll_interval = -1", "poll_interval = nan", "max_body = 0", "load_timeout = inf",
                                  'api_keys = [" "]'])
def test_proxy_check_refuses_unbounded_config(tmp_path: Path, line: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(line + "\n")
    one_line_usage_error(run("proxy", "--check", "--config", str(cfg)))
