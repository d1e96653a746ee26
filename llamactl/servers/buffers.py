"""Read what llama-server says it allocated: the buffer-size lines it logs at `-lv 4`.

These lines are the ground truth the memory model is measured against
(tests/e2e, bench/accuracy.py), and what a launched instance really holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from llamactl.units import MiB

_LINE_RE = re.compile(
    r"(?P<fn>load_tensors|llama_kv_cache|llama_memory_recurrent|sched_reserve|llama_context):\s+"
    r"(?P<buf>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size =\s*(?P<mib>[\d.]+) MiB"
)
_KIND_KEY = {"model": "weights", "KV": "kv", "RS": "recurrent", "compute": "compute", "output": "output"}


@dataclass(frozen=True)
class BufferLog:
    """Buffer sizes by term and by llama.cpp buffer name (CPU_Mapped, CPU_REPACK, CUDA0, ...), in bytes."""

    by_term: dict[str, dict[str, int]] = field(default_factory=dict)  # term -> buffer -> bytes

    def term(self, term: str, *, device: str | None = None) -> int:
        """Bytes of one term; device "CPU" sums the host's buffers, "CUDA0" one GPU's."""
        buffers = self.by_term.get(term, {})
        if device is None:
            return sum(buffers.values())
        if device == "CPU":
            return sum(v for k, v in buffers.items() if k.startswith("CPU"))
        return sum(v for k, v in buffers.items() if k == device)


def parse_buffer_log(text: str) -> BufferLog:
    """Collect every `<buf> <kind> buffer size = X MiB` line (values rounded to 0.01 MiB by llama.cpp)."""
    by_term: dict[str, dict[str, int]] = {}
    for match in _LINE_RE.finditer(text):
        term = _KIND_KEY[match["kind"]]
        buffers = by_term.setdefault(term, {})
        size = round(float(match["mib"]) * MiB)
        if term in ("kv", "recurrent"):
            # caches log one line each, and a model may have two on one buffer type (iSWA: full + window)
            buffers[match["buf"]] = buffers.get(match["buf"], 0) + size
        else:
            buffers[match["buf"]] = size  # one line per buffer (the last reserve's size)
    return BufferLog(by_term)


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Measurement:
    buffers: BufferLog
    log: str
    ready_s: float  # from spawn to /health 200
    rss_bytes: int | None = None  # the process's resident memory once ready


def measure(argv: list[str], env: dict[str, str], port: int, *, timeout_s: float = 120.0,
            while_ready: Callable[[str], None] | None = None) -> Measurement:
    """Run llama-server until it answers /health, then stop it and parse its buffer log.

    The argv must log at verbosity 4 (build_command(..., verbose_buffers=True)). `while_ready`
    is called with the server's base URL before it is stopped. Raises
    RuntimeError with the log's tail if the server exits or misses the deadline.
    """
    import subprocess
    import tempfile
    import time

    from llamactl.servers import client
    from llamactl.servers.runner import LaunchError, child_env

    with tempfile.TemporaryFile("w+") as log_file:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(env),
                                start_new_session=True)
        try:
            with client.session() as http:
                while True:
                    if proc.poll() is not None:
                        raise LaunchError(f"llama-server exited with {proc.returncode}: {_tail(log_file)}")
                    if time.monotonic() - start > timeout_s:
                        raise LaunchError(f"llama-server not ready after {timeout_s:.0f} s: {_tail(log_file)}")
                    if client.health(http, f"http://127.0.0.1:{port}") == 200:
                        break
                    time.sleep(0.02)
            ready_s = time.monotonic() - start
            rss_bytes = _rss(proc.pid)
            if while_ready is not None:
                while_ready(f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.seek(0)
        text = log_file.read()
    return Measurement(parse_buffer_log(text), text, ready_s, rss_bytes)


def _rss(pid: int) -> int | None:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _tail(log_file: object, lines: int = 8) -> str:
    log_file.seek(0)  # type: ignore[attr-defined]
    return " | ".join(log_file.read().strip().splitlines()[-lines:])  # type: ignore[attr-defined]
