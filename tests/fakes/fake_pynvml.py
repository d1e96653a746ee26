"""A stand-in pynvml module: GPUs described by data, faults injected per call."""

from __future__ import annotations

import types
from dataclasses import dataclass, field


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_FunctionNotFound(NVMLError):
    pass


@dataclass
class FakeGpu:
    name: str = "NVIDIA H200"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total: int = 141 * 2**30
    used: int = 0
    util: int = 0
    temp: int = 40
    power_mw: int = 90_000
    pids: list[tuple[int, int]] = field(default_factory=list)  # (pid, used bytes): compute processes
    graphics: list[tuple[int, int]] = field(default_factory=list)  # (pid, used bytes): graphics contexts (Xorg)
    reserved: int = 0  # what the driver keeps for itself; v1's `used` includes it, v2's does not
    fail: set[str] = field(default_factory=set)  # call names that raise for this GPU; "handle" = lost GPU


def make(gpus: list[FakeGpu], *, init_error: Exception | None = None, driver: str = "580.65.06",
         cuda: int = 13000, v2: bool = True, bug: Exception | None = None) -> types.ModuleType:
    """`v2=False` answers as a driver older than 510 (no v2 memory call); `bug` is raised by the process
    list as a non-NVML exception would be (a bug must not be hidden as a missing field)."""
    mod = types.ModuleType("pynvml")
    mod.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.nvmlMemory_v2 = 0x02000028  # type: ignore[attr-defined]

    def guard(gpu: FakeGpu, call: str) -> None:
        if call in gpu.fail:
            raise NVMLError(f"{call} failed (fake)")

    def nvmlInit() -> None:
        if init_error:
            raise init_error

    def handle(index: int) -> FakeGpu:
        gpu = gpus[index]
        guard(gpu, "handle")
        return gpu

    def memory(gpu: FakeGpu, version: int | None = None):
        guard(gpu, "memory")
        if version is not None:
            if not v2:
                raise NVMLError_FunctionNotFound("Function Not Found (fake: driver < 510)")
            return types.SimpleNamespace(total=gpu.total, reserved=gpu.reserved, used=gpu.used,
                                         free=gpu.total - gpu.used - gpu.reserved)
        return types.SimpleNamespace(total=gpu.total, used=gpu.used + gpu.reserved, free=gpu.total - gpu.used - gpu.reserved)

    def util(gpu: FakeGpu):
        guard(gpu, "utilization")
        return types.SimpleNamespace(gpu=gpu.util, memory=gpu.util // 2)

    def temp(gpu: FakeGpu, _sensor: int) -> int:
        guard(gpu, "temperature")
        return gpu.temp

    def power(gpu: FakeGpu) -> int:
        guard(gpu, "power")
        return gpu.power_mw

    def procs(gpu: FakeGpu):
        guard(gpu, "processes")
        if bug is not None:
            raise bug
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.pids]

    def graphics(gpu: FakeGpu):
        guard(gpu, "graphics")
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.graphics]

    def name(gpu: FakeGpu) -> str:
        guard(gpu, "name")
        return gpu.name

    def uuid(gpu: FakeGpu) -> str:
        guard(gpu, "uuid")
        return gpu.uuid

    mod.nvmlInit = nvmlInit  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUtilizationRates = util  # type: ignore[attr-defined]
    mod.nvmlDeviceGetTemperature = temp  # type: ignore[attr-defined]
    mod.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    mod.nvmlDeviceGetComputeRunningProcesses = procs  # type: ignore[attr-defined]
    mod.nvmlDeviceGetGraphicsRunningProcesses = graphics  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = name  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = uuid  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: driver  # type: ignore[attr-defined]
    mod.nvmlSystemGetCudaDriverVersion = lambda: cuda  # type: ignore[attr-defined]
    return mod
