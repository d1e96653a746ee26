"""Read what llama-server says it allocated: the buffer-size lines it logs at `-lv 4`.

These lines are the ground truth the memory model is measured against
(tests/e2e, bench/accuracy.py), and what a launched instance really holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field

from llamactl.units import MiB

_LINE_RE = re.compile(
    r"(?P<fn>load_tensors|llama_kv_cache|llama_memory_recurrent|sched_reserve|llama_context|"
    r"llama_adapter_lora_init_impl):\s+"
    r"(?P<buf>\S+)\s+(?P<kind>model|KV|RS|compute|output|LoRA) buffer size =\s*(?P<mib>[\d.]+) MiB"
)
_KIND_KEY = {"model": "weights", "KV": "kv", "RS": "recurrent", "compute": "compute", "output": "output",
             "LoRA": "lora"}


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


_MODEL_LOAD = "llama_model_loader: loaded meta data"


def parse_buffer_log(text: str) -> BufferLog:
    """Collect every `<buf> <kind> buffer size = X MiB` line (values rounded to 0.01 MiB by llama.cpp).

    Each model llama-server loads (the main one, a draft model) starts a section with its own buffers and
    context; the sections add up."""
    bounds = [0, *_find_all(text, _MODEL_LOAD)[1:], len(text)]  # the first section takes what precedes it
    total: dict[str, dict[str, int]] = _parse_projector(text)
    for lo, hi in zip(bounds, bounds[1:]):
        for term, buffers in _parse_section(text[lo:hi]).items():
            into = total.setdefault(term, {})
            for name, size in buffers.items():
                into[name] = into.get(name, 0) + size
    return BufferLog(total)


_CLIP_BACKEND = re.compile(r"clip_ctx: CLIP using (\S+) backend")
_CLIP_WEIGHTS = re.compile(r"load_hparams: model size:\s+(?P<mib>[\d.]+) MiB")
_CLIP_COMPUTE = re.compile(r"reserve_compute_meta:\s+(?P<buf>\S+) compute buffer size =\s*(?P<mib>[\d.]+) MiB")


def _parse_projector(text: str) -> dict[str, dict[str, int]]:
    """A vision projector's buffers (mtmd's CLIP logs its own lines): weights on the backend it chose, and
    its compute buffer (the last reserve's size)."""
    backend = _CLIP_BACKEND.search(text)
    weights = _CLIP_WEIGHTS.search(text)
    out: dict[str, dict[str, int]] = {}
    if backend and weights:
        out["weights"] = {backend[1]: round(float(weights["mib"]) * MiB)}
    computes = list(_CLIP_COMPUTE.finditer(text))
    if computes:
        out["compute"] = {computes[-1]["buf"]: round(float(computes[-1]["mib"]) * MiB)}
    return out


def _find_all(text: str, needle: str) -> list[int]:
    out, at = [], text.find(needle)
    while at >= 0:
        out.append(at)
        at = text.find(needle, at + 1)
    return out


def _parse_section(text: str) -> dict[str, dict[str, int]]:
    by_term: dict[str, dict[str, int]] = {}
    for match in _LINE_RE.finditer(text):
        term = _KIND_KEY[match["kind"]]
        buffers = by_term.setdefault(term, {})
        size = round(float(match["mib"]) * MiB)
        if term in ("kv", "recurrent", "lora"):
            # caches log one line each, and a model may have two on one buffer type (iSWA: full + window)
            buffers[match["buf"]] = buffers.get(match["buf"], 0) + size
        else:
            buffers[match["buf"]] = size  # one line per buffer (the last reserve's size)
    return by_term


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
    """Run llama-server until it is ready, then stop it and parse its buffer log.

    The argv must log at verbosity 4 (build_command(..., verbose_buffers=True)). `while_ready`
    is called with the server's base URL before it is stopped. Raises LaunchError with the
    log's tail if the server exits or misses the deadline.
    """
    import tempfile

    from llamactl.servers import runner

    model = argv[argv.index("--model") + 1] if "--model" in argv else ""
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "llama-server.log"
        child = runner.spawn(argv, env, log_path)
        try:
            ready_s = runner.wait_ready(child, port, model, timeout_s)
            rss_bytes = _rss(child.pid)
            if while_ready is not None:
                while_ready(f"http://127.0.0.1:{port}")
        finally:
            runner.stop_child(child.proc, grace_s=5.0)
        text = log_path.read_text(errors="replace")
    return Measurement(parse_buffer_log(text), text, ready_s, rss_bytes)


def _rss(pid: int) -> int | None:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
