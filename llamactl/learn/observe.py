"""What an instance really took, gathered once it is ready (or once it failed to load for lack of memory).

Per device: the buffers llama-server logged (it logs them at `--verbosity 4`, which llamactl gives every
instance it launches), the process's use of each GPU as NVML reports it, and its resident memory. Beside
them, the formula's terms for the same settings, so a correction is measured against the pure model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llamactl.learn.calibrate import (TERMS, DeviceObservation, Learned, Observation, device_terms, model_key,
                                      settings_json, settings_key)
from llamactl.model.memory import MemoryEstimate
from llamactl.model.params import ModelParams
from llamactl.servers.buffers import BufferLog, parse_buffer_log
from llamactl.units import MiB

log = logging.getLogger(__name__)

HEADER_HASH_BYTES = 1 * MiB
LOG_READ_LIMIT = 8 * MiB  # the load's lines come first; never read a huge log whole


def identity(path: str | Path) -> str:
    """A model file's identity: its size and the hash of its header's first MiB (a copy elsewhere is the same
    model; a file rewritten with other metadata or tensors is not)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(HEADER_HASH_BYTES)
    return model_key(size, hashlib.sha256(head).hexdigest()[:32])


def gpu_backend(extra_args: Sequence[str], n_gpus: int) -> str:
    """What a plan's GPU devices are: RPC endpoints when `--rpc` is among the extra args, else CUDA."""
    if not n_gpus:
        return "CPU"
    return "RPC" if any(a == "--rpc" or a.startswith("--rpc=") for a in extra_args) else "CUDA"


def rpc_endpoints(extra_args: Sequence[str]) -> list[str]:
    for i, arg in enumerate(extra_args):
        if arg == "--rpc" and i + 1 < len(extra_args):
            return extra_args[i + 1].split(",")
        if arg.startswith("--rpc="):
            return arg.split("=", 1)[1].split(",")
    return []


def is_host_buffer(name: str) -> bool:
    return name.startswith("CPU") or name.endswith("_Host")  # CUDA_Host: pinned host memory


def device_buffers(buffers: BufferLog, n_gpus: int, backend: str, extra_args: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """Which of llama.cpp's buffer names belong to which of our devices ("CPU", "GPU0"...)."""
    names: list[str] = []
    for per_buffer in buffers.by_term.values():
        for name in per_buffer:
            if name not in names:
                names.append(name)
    out: dict[str, list[str]] = {"CPU": [n for n in names if is_host_buffer(n)]}
    others = [n for n in names if not is_host_buffer(n)]
    endpoints = rpc_endpoints(extra_args) if backend == "RPC" else []
    for k in range(n_gpus):
        if backend == "CUDA":
            out[f"GPU{k}"] = [n for n in others if n == f"CUDA{k}"]
        elif endpoints and k < len(endpoints):
            out[f"GPU{k}"] = [n for n in others if n.endswith(f"[{endpoints[k]}]")]
        else:
            out[f"GPU{k}"] = others[k:k + 1]
    return {k: tuple(v) for k, v in out.items()}


def logged_terms(buffers: BufferLog, names: Sequence[str]) -> dict[str, int]:
    terms = {t: sum(buffers.by_term.get(t, {}).get(n, 0) for n in names) for t in TERMS}
    terms["weights"] += sum(buffers.by_term.get("lora", {}).get(n, 0) for n in names)  # adapters are weights to us
    return terms


def read_log_from(path: Path, offset: int) -> str:
    from llamactl.errors import PlantedFileError
    from llamactl.servers import files

    try:
        return files.read_from(path, offset, LOG_READ_LIMIT).decode("utf-8", "replace")
    except (OSError, PlantedFileError):
        return ""


LOAD_DONE = "model loaded"  # llama-server's line once every buffer of the load has been logged


def read_loaded_log(path: Path, offset: int, settle_s: float = 2.0) -> str:
    """The load's log once it is whole: llama.cpp writes its log from a thread of its own, so the buffer
    lines may reach the file a moment after /health says ready. A log that never began a load (another
    build, a fake) is taken as it is."""
    deadline = time.monotonic() + settle_s
    while True:
        text = read_log_from(path, offset)
        if LOAD_DONE in text or "buffer size" not in text or time.monotonic() >= deadline:
            return text
        time.sleep(0.02)


@dataclass(frozen=True)
class Context:
    """Everything about a launch an observation is keyed by."""

    params: ModelParams
    model_path: str
    model_key: str
    formula: MemoryEstimate  # the pure formula for the launched settings (no calibration)
    gpu_names: tuple[str, ...]  # the GPU model of each plan device GPU0, GPU1...
    gpu_indices: tuple[int, ...]  # their NVML indices
    backend: str
    build: str
    extra_args: tuple[str, ...] = ()
    nvml_live: bool = False

    @property
    def partial(self) -> bool:
        return is_partial(self.formula, len(self.gpu_names))

    @property
    def key(self) -> str:
        return settings_key(self.model_key, self.formula.resolved, self.formula.layer_devices, self.backend,
                            self.gpu_names)


def is_partial(est: MemoryEstimate, n_gpus: int) -> bool:
    res = est.resolved
    return n_gpus > 0 and ("CPU" in est.layer_devices or res.n_cpu_moe > 0
                           or any(t == "CPU" for _, t in res.tensor_overrides))


def _base(ctx: Context, outcome: str) -> dict:
    driver, cuda = system_versions() if ctx.nvml_live else (None, None)
    return dict(model_key=ctx.model_key, model_path=ctx.model_path, arch=ctx.params.arch, backend=ctx.backend,
                settings_key=ctx.key, settings={**settings_json(ctx.formula.resolved),
                                                "layer_devices": list(ctx.formula.layer_devices)},
                partial=ctx.partial, build=ctx.build, outcome=outcome, at=time.time(), driver=driver, cuda=cuda,
                uid=uuid.uuid4().hex)


def observe_ready(ctx: Context, log_text: str, pid: int) -> Observation:
    """The observation of a ready instance from its load's log lines, NVML and /proc."""
    buffers = parse_buffer_log(log_text)
    n_gpus = len(ctx.gpu_names)
    names = device_buffers(buffers, n_gpus, ctx.backend, ctx.extra_args)
    mapped = {n for group in names.values() for n in group}
    stray = sorted({n for per in buffers.by_term.values() for n in per} - mapped)
    if stray:  # e.g. more --rpc endpoints than the plan's GPUs: llama-server spread over devices it was not given
        raise ValueError(f"llama-server put buffers on devices the plan did not choose ({', '.join(stray)}); "
                         "nothing learned from this launch")
    nvml_use = per_gpu_use(pid) if ctx.nvml_live and n_gpus else {}
    devices = []
    for dev in ctx.formula.devices:
        k = None if dev.device == "CPU" else int(dev.device[3:])
        gpu_index = ctx.gpu_indices[k] if k is not None and k < len(ctx.gpu_indices) else None
        devices.append(DeviceObservation(
            device=dev.device, formula=device_terms(dev), logged=logged_terms(buffers, names.get(dev.device, ())),
            buffers=names.get(dev.device, ()), nvml_bytes=nvml_use.get(gpu_index) if gpu_index is not None else None,
            gpu_name=ctx.gpu_names[k] if k is not None and k < n_gpus else None))
    return Observation(devices=tuple(devices), host_rss_bytes=_rss(pid), **_base(ctx, "ready"))


_CUDA_OOM = re.compile(r"allocating ([\d.]+) MiB on device (\d+): cudaMalloc failed")
_BUFFER_OOM = re.compile(r"failed to allocate (\S+) buffer of size (\d+)")
_HOST_OOM = re.compile(r"cpu_buffer_type_alloc_buffer: failed to allocate buffer of size (\d+)")
_NAMED_OOM = re.compile(r"unable to allocate (\S+) buffer")


def shortfall(log_text: str, n_gpus: int, backend: str, extra_args: Sequence[str] = ()) -> tuple[str | None, int | None]:
    """The device whose allocation failed and its size, from llama.cpp's lines (either may be unknown)."""
    def device_of(buffer: str) -> str | None:
        if is_host_buffer(buffer):
            return "CPU"
        match = re.fullmatch(r"CUDA(\d+)", buffer)
        if match and int(match[1]) < n_gpus:
            return f"GPU{match[1]}"
        for k, ep in enumerate(rpc_endpoints(extra_args)):
            if buffer.endswith(f"[{ep}]") and k < n_gpus:
                return f"GPU{k}"
        return None

    if m := _CUDA_OOM.search(log_text):
        k = int(m[2])
        return (f"GPU{k}" if k < n_gpus else None), round(float(m[1]) * MiB)
    if m := _HOST_OOM.search(log_text):
        return "CPU", int(m[1])
    if m := _BUFFER_OOM.search(log_text):
        return device_of(m[1]), int(m[2])
    if m := _NAMED_OOM.search(log_text):
        return device_of(m[1]), None
    return None, None


def observe_oom(ctx: Context, log_text: str, killed: bool = False) -> Observation:
    """The observation of a load that ran out of memory: the failed device and size (when logged)."""
    device, size = ("CPU", None) if killed else shortfall(log_text, len(ctx.gpu_names), ctx.backend, ctx.extra_args)
    devices = tuple(DeviceObservation(device=d.device, formula=device_terms(d), logged={t: 0 for t in TERMS},
                                      gpu_name=ctx.gpu_names[int(d.device[3:])] if d.device != "CPU" else None)
                    for d in ctx.formula.devices)
    return Observation(devices=devices, shortfall_bytes=size, shortfall_device=device, **_base(ctx, "oom"))


def actual_bytes(obs: Observation) -> dict[str, int]:
    """What the instance holds per device: NVML's figure on a GPU, else what llama-server logged; the host's
    RSS for the host when known."""
    out = {}
    for d in obs.devices:
        if d.device == "CPU":
            value = obs.host_rss_bytes if obs.host_rss_bytes is not None else d.logged_total
        else:
            value = d.nvml_bytes if d.nvml_bytes is not None else d.logged_total
        if value:
            out[d.device] = value
    return out


def per_gpu_use(pid: int) -> dict[int, int]:
    """NVML index → bytes this process uses on that GPU (empty when NVML does not list it)."""
    from llamactl.gpu import nvml

    devices, reason = nvml.devices()
    if reason:
        return {}
    return nvml.use_by_pid(devices).get(pid, {})


def system_versions() -> tuple[str | None, str | None]:
    from llamactl.gpu import nvml

    return nvml.driver_versions()


def _rss(pid: int) -> int | None:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def learned_for(store_dir: Path, model_path: str | Path, params: ModelParams, backend: str, *,
                default_overhead: int, honour_overhead: bool, nvml_live: bool, build: str | None = None,
                gpu_names: Sequence[str] = ()) -> Learned | None:
    """What the state dir's store knows that bears on this model here; None without a store (or a usable one)."""
    from llamactl.learn.store import CalibrationStore

    store = CalibrationStore(store_dir)
    if not store.path.exists():
        return None
    try:
        key = identity(model_path)
        rows = store.relevant(key, params.arch, gpu_names)
    except Exception as exc:  # a damaged store never stops a plan: the formula alone
        log.warning("calibration not used: %s", exc)
        return None
    if not rows:
        return None
    driver = system_versions()[0] if nvml_live else None
    return Learned.build(rows, model=key, arch=params.arch, backend=backend, default_overhead=default_overhead,
                         honour_overhead=honour_overhead, driver=driver, build=build)
