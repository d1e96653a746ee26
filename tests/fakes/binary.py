"""The fake llama-server as an executable named `llama-server` (compiled once per machine and cached).

llamactl treats a process as its instance only if its executable is a llama.cpp server (the name
`llama-server` or `ggml-rpc-server`), besides pid, create time and environment tags. A shell wrapper that
runs `python fake_llama_server.py` would be seen as `python`, so the tests use a tiny C program that embeds
this Python and runs the fake script: its executable really is `llama-server`. Needs gcc and Python's
headers and shared library (present wherever llama-server itself can be built); fails loudly otherwise.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "llama_server_main.c"
FAKE = HERE / "fake_llama_server.py"


def fake_server_binary(script: Path = FAKE) -> Path:
    """The path of an executable `llama-server` running `script` (the fake server by default)."""
    var = sysconfig.get_config_var
    key = hashlib.sha256(SOURCE.read_bytes() + str(script).encode() + sys.version.encode()
                         + str(var("LIBDIR")).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"llamactl-fake-server-{os.getuid()}-{key}"
    binary = folder / "llama-server"
    if binary.exists():
        return binary
    folder.mkdir(mode=0o700, exist_ok=True)
    version = f"{var('VERSION')}{getattr(sys, 'abiflags', '')}"
    partial = folder / f".llama-server.{os.getpid()}"
    cmd = ["gcc", "-O1", "-o", str(partial), str(SOURCE), f"-I{var('INCLUDEPY')}", f'-DFAKE_SCRIPT="{script}"',
           f"-L{var('LIBDIR')}", f"-lpython{version}", f"-Wl,-rpath,{var('LIBDIR')}", "-lm"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError("cannot build the fake llama-server (needs gcc and Python's headers and shared "
                             f"library): {' '.join(cmd)}\n{out.stderr}")
    os.replace(partial, binary)  # atomic: a concurrent test sees the whole binary or none
    return binary


def server_named_sleep(folder: Path) -> Path:
    """`sleep` under a llama.cpp server's name: a stand-in instance that only has to exist (a copy, so that
    /proc/PID/exe names it)."""
    import shutil

    target = folder / "llama-server-sleep"
    if not target.exists():
        shutil.copy2(os.path.realpath(shutil.which("sleep") or "/bin/sleep"), target)
    return target
