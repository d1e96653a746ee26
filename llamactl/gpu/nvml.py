"""The only importer of pynvml: init once, every query through one function with a default.

Importing this module never fails. A failed init is remembered and reported
as a reason string to callers who ask for GPUs; an optional field whose NVML
call fails (NVMLError only: anything else is a bug and goes through) becomes
None, logged at debug level. Memory comes from the v2 call where the driver has
it (its `used` leaves out driver-reserved memory), else v1; processes are the
compute and the graphics ones.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_state: dict[str, object] = {"done": False, "error": None}


@dataclass(frozen=True)
class NvmlProcess:
    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True)
class NvmlDevice:
    index: int
    uuid: str | None
    name: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    utilization_gpu: int | None
    utilization_memory: int | None
    temperature_c: int | None
    power_w: float | None
    processes: tuple[NvmlProcess, ...]
    error: str | None = None


def use_by_pid(devices: Iterable[object]) -> dict[int, dict[int, int]]:
    """pid → {GPU index: bytes} from NVML's per-process lists (of NVML devices or inventory GPUs alike).

    A process can appear more than once on one GPU (a compute and a graphics context): its figures add up.
    A process NVML lists without a figure (no permission, MIG) is left out, not counted as 0."""
    use: dict[int, dict[int, int]] = {}
    for dev in devices:
        for proc in dev.processes:  # type: ignore[attr-defined]
            if proc.used_memory_bytes is not None:
                per_gpu = use.setdefault(proc.pid, {})
                per_gpu[dev.index] = per_gpu.get(dev.index, 0) + proc.used_memory_bytes  # type: ignore[attr-defined]
    return use


def init() -> str | None:
    """Initialise NVML once; return None on success or why it is unavailable."""
    if not _state["done"]:
        _state["done"] = True
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            _state["error"] = _describe(exc)
    error = _state["error"]
    return str(error) if error else None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.rstrip(".")


def _nvml_error() -> type[BaseException]:
    """pynvml's NVMLError (every NVML failure derives from it); only that is a missing field: anything else
    is a bug and goes through."""
    error = getattr(sys.modules.get("pynvml"), "NVMLError", None)
    return error if isinstance(error, type) and issubclass(error, BaseException) else OSError


def query(fn: Callable[[], T], default: T | None = None, *, what: str = "") -> T | None:
    """Call an NVML function; an NVML failure gives `default` (optional fields are None, not errors)."""
    try:
        return fn()
    except _nvml_error() as exc:
        log.debug("NVML %s failed: %s", what or getattr(fn, "__name__", "query"), exc)
        return default


def _memory(nv: object, handle: object) -> object | None:
    """Memory with the v2 call where the driver has it (≥ 510): its `used` leaves out what the driver reserves
    for itself, which v1 counts as used (so "other programs' use" looked larger than it is); else v1."""
    version = getattr(nv, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nv.nvmlDeviceGetMemoryInfo(handle, version=version)  # type: ignore[attr-defined]
        except TypeError:  # a binding without the version argument
            pass
        except _nvml_error() as exc:  # NotSupported / FunctionNotFound on older drivers
            log.debug("NVML v2 memory not available (%s); using v1", exc)
    return query(lambda: nv.nvmlDeviceGetMemoryInfo(handle), what="memory")  # type: ignore[attr-defined]


def devices() -> tuple[list[NvmlDevice], str | None]:
    """All GPUs NVML sees, and a note when NVML is unavailable (then the list is empty)."""
    reason = init()
    if reason:
        return [], reason
    import pynvml

    count = query(pynvml.nvmlDeviceGetCount, 0, what="device count") or 0
    return [_device(pynvml, index) for index in range(count)], None


def _device(pynvml: object, index: int) -> NvmlDevice:
    nv = pynvml
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
    except _nvml_error() as exc:  # a lost GPU: an entry with its error, not a crashed listing
        return NvmlDevice(index, None, None, None, None, None, None, None, None, None, (), error=_describe(exc))
    memory = _memory(nv, handle)
    util = query(lambda: nv.nvmlDeviceGetUtilizationRates(handle), what="utilization")  # type: ignore[attr-defined]
    temp = query(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU), what="temperature")  # type: ignore[attr-defined]
    power_mw = query(lambda: nv.nvmlDeviceGetPowerUsage(handle), what="power")  # type: ignore[attr-defined]
    # compute and graphics contexts both hold memory (Xorg on a workstation GPU is a graphics one); a process
    # with both appears twice, and use_by_pid adds them up
    procs = (query(lambda: nv.nvmlDeviceGetComputeRunningProcesses(handle), [], what="processes") or [])  # type: ignore[attr-defined]
    if hasattr(nv, "nvmlDeviceGetGraphicsRunningProcesses"):
        procs = list(procs) + list(query(lambda: nv.nvmlDeviceGetGraphicsRunningProcesses(handle), [],  # type: ignore[attr-defined]
                                         what="graphics processes") or [])
    name = query(lambda: nv.nvmlDeviceGetName(handle), what="name")  # type: ignore[attr-defined]
    uuid = query(lambda: nv.nvmlDeviceGetUUID(handle), what="uuid")  # type: ignore[attr-defined]
    return NvmlDevice(
        index=index,
        uuid=_text(uuid),
        name=_text(name),
        memory_total_bytes=getattr(memory, "total", None),
        memory_used_bytes=getattr(memory, "used", None),
        memory_free_bytes=getattr(memory, "free", None),
        utilization_gpu=getattr(util, "gpu", None),
        utilization_memory=getattr(util, "memory", None),
        temperature_c=temp,
        power_w=power_mw / 1000 if isinstance(power_mw, (int, float)) else None,
        processes=tuple(NvmlProcess(p.pid, getattr(p, "usedGpuMemory", None)) for p in procs),
    )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def driver_versions() -> tuple[str | None, str | None]:
    """The driver version ("580.65.06") and the CUDA version it supports ("13.0"); None each when unknown."""
    if init():
        return None, None
    import pynvml

    driver = _text(query(pynvml.nvmlSystemGetDriverVersion, what="driver version"))
    cuda = query(pynvml.nvmlSystemGetCudaDriverVersion, what="CUDA version")
    cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) and cuda > 0 else None
    return driver, cuda_text
