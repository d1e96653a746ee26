"""Frozen Gpu records and the two ways to get them: live from NVML, or simulated.

Simulated inventories are what let `estimate` and `plan` run for hardware that
is not here: `--gpus none`, `--gpus 24GiB,16GiB`, `--gpus 2x80GiB`,
`--gpus-file inv.json` or the env var LLAMACTL_GPUS with the `--gpus` syntax.
The file's schema is `to_json()`'s (what `llamactl gpus --json` prints and the
proxy's /status carries), read back, every field checked, by `from_json()`.
"""

from __future__ import annotations

import json
import os
import stat
import re
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import UsageError
from llamactl.gpu import nvml
from llamactl.units import parse_size

GPUS_ENV = "LLAMACTL_GPUS"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None
    instance: str | None = None  # the llamactl instance this pid is, if any


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    memory_used_bytes: int
    uuid: str | None = None
    utilization_gpu: int | None = None
    utilization_memory: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    simulated: bool = False
    error: str | None = None
    endpoint: str | None = None  # a device served by a worker's ggml-rpc-server: its host:port (llama-server --rpc)
    worker: str | None = None  # the [workers.NAME] it belongs to

    @property
    def remote(self) -> bool:
        return self.endpoint is not None


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    source: str  # "nvml", "simulated", or a file path
    note: str | None = None  # why the inventory is empty, for the user

    @property
    def usable(self) -> tuple[Gpu, ...]:
        return tuple(g for g in self.gpus if g.error is None)


_COUNT_RE = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d.*)$")


def parse_gpus_spec(spec: str) -> Inventory:
    """`none`, `24GiB,16GiB`, `2x80GiB` (mixable: `2x80GiB,24GiB`) → a simulated inventory."""
    text = spec.strip()
    if text.lower() in ("none", "cpu", ""):
        return Inventory((), "simulated", note="no GPUs (simulated inventory): planning for CPU")
    sizes: list[int] = []
    for part in text.split(","):
        match = _COUNT_RE.match(part)
        count, size_text = (int(match[1]), match[2]) if match else (1, part)
        if count < 1 or count > 64:
            raise UsageError(f"invalid --gpus part {part.strip()!r}: count must be 1..64")
        size = parse_size(size_text, what=f"GPU size in --gpus ({part.strip()!r})")
        if size <= 0:
            raise UsageError(f"invalid --gpus part {part.strip()!r}: a GPU needs some memory")
        sizes.extend([size] * count)
    gpus = tuple(
        Gpu(index=i, name=f"simulated {size // 1024**3}GiB" if size % 1024**3 == 0 else "simulated GPU",
            memory_total_bytes=size, memory_free_bytes=size, memory_used_bytes=0, simulated=True)
        for i, size in enumerate(sizes)
    )
    return Inventory(gpus, "simulated")


def _int_field(entry: dict[str, object], key: str, where: str, *, optional: bool = False) -> int | None:
    value = entry.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _float_field(entry: dict[str, object], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e9:
        raise UsageError(f"{where}: {key!r} must be a non-negative number, got {value!r}")
    return float(value)


def to_json(inv: Inventory) -> list[dict[str, object]]:
    """The schema `llamactl gpus --json` prints and `--gpus-file` reads back: stable keys, bytes."""
    out: list[dict[str, object]] = []
    for gpu in inv.gpus:
        entry: dict[str, object] = {
            "index": gpu.index,
            "uuid": gpu.uuid,
            "name": gpu.name,
            "memory_total_bytes": gpu.memory_total_bytes,
            "memory_used_bytes": gpu.memory_used_bytes,
            "memory_free_bytes": gpu.memory_free_bytes,
            "utilization_gpu": gpu.utilization_gpu,
            "utilization_memory": gpu.utilization_memory,
            "temperature_c": gpu.temperature_c,
            "power_w": gpu.power_w,
            "processes": [{"pid": p.pid, "used_memory_bytes": p.used_memory_bytes, "instance": p.instance}
                          for p in gpu.processes],
        }
        if gpu.error:
            entry["error"] = gpu.error
        if gpu.endpoint is not None:
            entry["endpoint"] = gpu.endpoint
        if gpu.worker is not None:
            entry["worker"] = gpu.worker
        out.append(entry)
    return out


def from_json(data: object, where: str) -> Inventory:
    """An inventory from `to_json`'s schema (a list, or an object with `gpus`), every field checked: a
    UsageError naming `where` and the GPU otherwise."""
    if isinstance(data, dict) and "gpus" in data:
        data = data["gpus"]
    if not isinstance(data, list):
        raise UsageError(f"{where}: expected a list of GPUs as printed by `llamactl gpus --json`")
    gpus = []
    seen: set[int] = set()
    for position, entry in enumerate(data):
        gpu = gpu_from_json(entry, position, f"{where}: GPU #{position}")
        if gpu.index in seen:
            raise UsageError(f"{where}: GPU #{position}: index {gpu.index} appears twice")
        seen.add(gpu.index)
        gpus.append(gpu)
    return Inventory(tuple(gpus), where)


def gpu_from_json(entry: object, position: int, where: str) -> Gpu:
    """One GPU of `to_json`'s schema, checked (UsageError naming `where`); its index defaults to `position`."""
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected an object")
    total = _int_field(entry, "memory_total_bytes", where)
    used = _int_field(entry, "memory_used_bytes", where, optional=True)
    free = _int_field(entry, "memory_free_bytes", where, optional=True)
    assert total is not None
    if free is None:
        free = total - (used or 0)
    if used is None:
        used = total - free
    if free > total:
        raise UsageError(f"{where}: memory_free_bytes exceeds memory_total_bytes")
    if used > total:
        raise UsageError(f"{where}: memory_used_bytes exceeds memory_total_bytes")
    procs = []
    raw_procs = entry.get("processes") or []
    if not isinstance(raw_procs, list):
        raise UsageError(f"{where}: 'processes' must be a list")
    for number, proc in enumerate(raw_procs):
        pwhere = f"{where} process #{number}"
        if not isinstance(proc, dict):
            raise UsageError(f"{pwhere}: expected an object")
        instance = proc.get("instance")
        procs.append(GpuProcess(_int_field(proc, "pid", pwhere) or 0,
                                _int_field(proc, "used_memory_bytes", pwhere, optional=True),
                                instance if isinstance(instance, str) else None))
    index = entry.get("index", position)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise UsageError(f"{where}: 'index' must be a non-negative integer, got {index!r}")
    error = entry.get("error")
    endpoint, worker = entry.get("endpoint"), entry.get("worker")
    if endpoint is not None and not valid_endpoint(endpoint):
        raise UsageError(f"{where}: 'endpoint' must be HOST:PORT, got {str(endpoint)[:80]!r}")
    if worker is not None and not (isinstance(worker, str) and WORKER_NAME_RE.fullmatch(worker)):
        raise UsageError(f"{where}: 'worker' must be a worker name, got {str(worker)[:80]!r}")
    return Gpu(
        index=index,
        name=str(entry.get("name") or "GPU"),
        memory_total_bytes=total, memory_free_bytes=free, memory_used_bytes=used,
        uuid=entry.get("uuid") if isinstance(entry.get("uuid"), str) else None,
        utilization_gpu=_int_field(entry, "utilization_gpu", where, optional=True),
        utilization_memory=_int_field(entry, "utilization_memory", where, optional=True),
        temperature_c=_int_field(entry, "temperature_c", where, optional=True),
        power_w=_float_field(entry, "power_w", where),
        processes=tuple(procs), simulated=True, error=error if isinstance(error, str) and error else None,
        endpoint=endpoint, worker=worker,
    )


WORKER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENDPOINT_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})")


def valid_endpoint(text: object) -> bool:
    """HOST:PORT as llama-server's --rpc takes it: a name or IPv4 address, or [IPv6]; a port 1..65535."""
    if not isinstance(text, str):
        return False
    match = _ENDPOINT_RE.fullmatch(text)
    return match is not None and 0 < int(match[1]) < 65536


MAX_GPUS_FILE_BYTES = 4 * 2**20  # `gpus --json` of 1024 GPUs is a few hundred KiB


def load_gpus_file(path: str | os.PathLike[str]) -> Inventory:
    """Read an inventory in the schema `llamactl gpus --json` prints."""
    file = Path(path)
    try:
        # O_NONBLOCK: a FIFO opens without waiting for a writer, and is then refused as not a regular file
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise UsageError(f"{file}: not a regular file (a GPU inventory is a JSON file)")
            raw = fh.read(MAX_GPUS_FILE_BYTES + 1)
        if len(raw) > MAX_GPUS_FILE_BYTES:
            raise UsageError(f"{file}: larger than {MAX_GPUS_FILE_BYTES // 2**20} MiB; not a GPU inventory")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{file}: no such GPU inventory file") from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"{file}: cannot read GPU inventory: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    return from_json(data, str(file))


def instance_of(pid: int) -> str | None:
    """The llamactl instance a GPU process is, from the env tag its launch gave it (None if not ours)."""
    try:
        import psutil

        from llamactl.servers.state import INSTANCE_ENV

        return psutil.Process(pid).environ().get(INSTANCE_ENV)
    except Exception:  # gone, another user's, or no permission: not known to be ours
        return None


def unsupported_platform() -> str | None:
    """Why this machine's GPUs are out of llamactl's scope (the non-goals), or None."""
    import sys

    if sys.platform == "darwin":
        return "macOS/Metal is not supported by llamactl (Linux with NVIDIA GPUs only); planning for CPU"
    if not sys.platform.startswith("linux"):
        return f"{sys.platform} is not supported by llamactl (Linux with NVIDIA GPUs only); planning for CPU"
    if Path("/dev/kfd").exists() or Path("/opt/rocm").exists():
        return "AMD ROCm GPUs are not supported by llamactl (NVIDIA only); planning for CPU"
    return None


def live() -> Inventory:
    """The GPUs NVML sees now; empty with a note when there is no driver or NVML."""
    devices, reason = nvml.devices()
    if reason:
        return Inventory((), "nvml", note=unsupported_platform() or f"no NVIDIA GPU found: {reason}; planning for CPU")
    gpus = []
    for dev in devices:
        total = dev.memory_total_bytes or 0
        free = dev.memory_free_bytes if dev.memory_free_bytes is not None else 0
        gpus.append(Gpu(
            index=dev.index, name=dev.name or f"GPU {dev.index}", uuid=dev.uuid,
            memory_total_bytes=total, memory_free_bytes=free,
            memory_used_bytes=dev.memory_used_bytes if dev.memory_used_bytes is not None else total - free,
            utilization_gpu=dev.utilization_gpu, utilization_memory=dev.utilization_memory,
            temperature_c=dev.temperature_c, power_w=dev.power_w,
            processes=tuple(GpuProcess(p.pid, p.used_memory_bytes, instance_of(p.pid)) for p in dev.processes),
            error=dev.error or (None if dev.memory_total_bytes else "memory information unavailable"),
        ))
    if not gpus:
        return Inventory((), "nvml", note="no NVIDIA GPU found: NVML lists none; planning for CPU")
    return Inventory(tuple(gpus), "nvml")


def resolve(gpus: str | None = None, gpus_file: str | None = None) -> Inventory:
    """The inventory a command works on: --gpus, --gpus-file, LLAMACTL_GPUS, then live NVML."""
    if gpus is not None and gpus_file is not None:
        raise UsageError("give either --gpus or --gpus-file, not both")
    if gpus is not None:
        if not gpus.strip():
            raise UsageError("--gpus needs a value: none, 24GiB,16GiB or 2x80GiB")
        return parse_gpus_spec(gpus)
    if gpus_file is not None:
        return load_gpus_file(gpus_file)
    env = os.environ.get(GPUS_ENV)
    if env is not None:
        return parse_gpus_spec(env)
    return live()
