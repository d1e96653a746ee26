"""The NVML backend against a fake pynvml: optional fields fail to None, a lost GPU is an entry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llamactl.gpu import inventory, nvml
from llamactl.servers.state import INSTANCE_ENV
from llamactl.units import GiB
from tests.fakes.fake_pynvml import FakeGpu, NVMLError_LibraryNotFound, make


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch):
    def install(gpus: list[FakeGpu], **kw) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", make(gpus, **kw))
        monkeypatch.setitem(nvml._state, "done", False)
        monkeypatch.setitem(nvml._state, "error", None)

    return install


def test_full_inventory(fake_nvml) -> None:
    fake_nvml([FakeGpu(used=10 * GiB, util=37, pids=[(4242, 9 * GiB)]), FakeGpu(name="NVIDIA L4", total=24 * GiB)])
    inv = inventory.live()
    assert inv.note is None and len(inv.gpus) == 2
    g0, g1 = inv.gpus
    assert (g0.name, g0.memory_used_bytes, g0.memory_free_bytes, g0.utilization_gpu) == ("NVIDIA H200", 10 * GiB, 131 * GiB, 37)
    assert g0.temperature_c == 40 and g0.power_w == 90.0
    assert g0.processes[0].pid == 4242 and g0.processes[0].used_memory_bytes == 9 * GiB
    assert g1.memory_total_bytes == 24 * GiB


def test_optional_fields_fail_to_none(fake_nvml) -> None:
    fake_nvml([FakeGpu(fail={"temperature", "power", "utilization", "processes", "uuid"})])
    (gpu,) = inventory.live().gpus
    assert gpu.error is None
    assert (gpu.temperature_c, gpu.power_w, gpu.utilization_gpu, gpu.uuid, gpu.processes) == (None, None, None, None, ())


def test_lost_gpu_is_an_entry_not_a_crash(fake_nvml) -> None:
    fake_nvml([FakeGpu(), FakeGpu(fail={"handle"}), FakeGpu(fail={"memory"})])
    inv = inventory.live()
    assert [g.error is None for g in inv.gpus] == [True, False, False]
    assert "handle failed" in inv.gpus[1].error
    assert [g.index for g in inv.usable] == [0]


def test_no_driver_is_an_empty_inventory_with_a_note(fake_nvml) -> None:
    fake_nvml([], init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    inv = inventory.live()
    assert inv.gpus == () and inv.note == "no NVIDIA GPU found: NVML Shared Library Not Found; planning for CPU"


def test_llamactl_instances_are_marked(fake_nvml) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             env={**os.environ, INSTANCE_ENV: "qwen-7b"})
    try:
        import time

        import psutil

        deadline = time.monotonic() + 5  # until exec, the child still shows our environment
        while time.monotonic() < deadline and INSTANCE_ENV not in psutil.Process(child.pid).environ():
            time.sleep(0.01)
        fake_nvml([FakeGpu(pids=[(child.pid, GiB), (os.getpid(), GiB)])])
        procs = inventory.live().gpus[0].processes
        assert [(p.pid, p.instance) for p in procs] == [(child.pid, "qwen-7b"), (os.getpid(), None)]
    finally:
        child.kill()
        child.wait()


def test_gpus_table_renders_errors_and_instances(fake_nvml) -> None:
    from llamactl.cli.gpus import gpus_table

    fake_nvml([FakeGpu(pids=[(1, GiB)]), FakeGpu(fail={"handle"})])
    inv = inventory.live()
    table = gpus_table(inv)
    assert "error: handle failed" in table and "NVIDIA H200" in table
    data = inventory.to_json(inv)
    assert data[1]["error"].startswith("handle failed") and data[0]["processes"][0]["pid"] == 1


def test_non_goal_platforms_say_so(fake_nvml, monkeypatch) -> None:
    fake_nvml([], init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "macOS/Metal is not supported by llamactl" in inventory.live().note


def test_use_by_pid_adds_a_process_up_per_gpu_and_leaves_out_unknown_figures(fake_nvml) -> None:
    """One summing for ps, top and the calibration: a pid seen twice on a GPU adds up; no figure is not 0."""
    fake_nvml([FakeGpu(pids=[(4242, 3 * GiB), (4242, 1 * GiB), (99, None)]), FakeGpu(pids=[(4242, 2 * GiB)])])
    devices, reason = nvml.devices()
    assert reason is None
    assert nvml.use_by_pid(devices) == {4242: {0: 4 * GiB, 1: 2 * GiB}}
    assert nvml.use_by_pid(inventory.live().gpus) == {4242: {0: 4 * GiB, 1: 2 * GiB}}  # the inventory's GPUs too


@pytest.mark.parametrize(("v2", "used", "free"), [(True, 10 * GiB, 130 * GiB), (False, 11 * GiB, 130 * GiB)])
def test_memory_with_the_v2_call_where_the_driver_has_it(fake_nvml, v2: bool, used: int, free: int) -> None:
    """A new driver: v2's `used` leaves out the 1 GiB the driver reserves; an old one (no v2): v1's figures."""
    fake_nvml([FakeGpu(total=141 * GiB, used=10 * GiB, reserved=1 * GiB)], v2=v2)
    (gpu,) = inventory.live().gpus
    assert (gpu.memory_used_bytes, gpu.memory_free_bytes) == (used, free)


def test_graphics_processes_are_listed_and_summed_with_compute_ones(fake_nvml) -> None:
    fake_nvml([FakeGpu(pids=[(4242, 2 * GiB)], graphics=[(999, 300 * 2**20), (4242, 100 * 2**20)])])
    (gpu,) = inventory.live().gpus
    assert sorted(p.pid for p in gpu.processes) == [999, 4242, 4242]
    assert nvml.use_by_pid(inventory.live().gpus)[4242] == {0: 2 * GiB + 100 * 2**20}


def test_a_non_nvml_exception_is_not_hidden_as_a_missing_field(fake_nvml) -> None:
    fake_nvml([FakeGpu()], bug=KeyError("a bug in a binding"))
    with pytest.raises(KeyError):
        inventory.live()
