"""A worker's ggml-rpc-servers: one per exported device, started, recorded, described and stopped.

`llamactl worker` (cli/worker.py) runs on a host whose devices another host's llama-server uses through
`--rpc`. Each exported device is one `ggml-rpc-server`, pinned like an instance (CUDA_VISIBLE_DEVICES by
UUID; the CPU device with every GPU hidden), started in its own session with llamactl's env tags, and
recorded in the state file as an entry of kind "rpc" — so `ps` shows it, a reconcile finds it, and only
a process provably ours is ever signalled (procs.py). rpc-server has no authentication: it runs tensor
work for whoever connects, so it listens on the address the user gave and nowhere else.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from llamactl.errors import LaunchError, ServerBinaryError, UsageError
from llamactl.gpu.inventory import Gpu, Inventory
from llamactl.servers import procs, runner
from llamactl.servers.state import INSTANCE_ENV, STATE_DIR_ENV, Instance, StateStore, Status

RPC_NAMES = ("ggml-rpc-server", "rpc-server")  # llama.cpp's build names it the first; older ones the second
START_TIMEOUT_S = 30.0
CPU = "CPU"


@dataclass(frozen=True)
class Export:
    """One device a worker serves: a local GPU (NVML index and UUID) or the host's CPU at a declared size."""

    name: str  # its state entry
    port: int
    gpu_index: int | None = None  # None: the CPU
    gpu_uuid: str | None = None
    cpu_memory_bytes: int | None = None

    @property
    def device(self) -> str:
        return CPU if self.gpu_index is None else f"GPU{self.gpu_index}"


def endpoint(host: str, port: int) -> str:
    """host:port as llama-server's --rpc takes it ([addr]:port for IPv6)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def choose(inv: Inventory, gpu_ids: Sequence[int] | None, cpu_memory_bytes: int | None, host: str,
           first_port: int) -> list[Export]:
    """What to export (pure): the chosen GPUs (all of them when none are named and no CPU size is given),
    then the CPU when given a size; ports from `first_port` up, one each."""
    by_index = {g.index: g for g in inv.usable}
    if gpu_ids is None:
        gpu_ids = [] if cpu_memory_bytes is not None else sorted(by_index)
    unknown = [i for i in gpu_ids if i not in by_index]
    if unknown:
        raise UsageError(f"no usable GPU {unknown[0]} on this host (GPUs: {sorted(by_index) or 'none'}); check --gpus")
    if not gpu_ids and cpu_memory_bytes is None:
        raise UsageError("no device to export: this host has no usable GPU; give --cpu-memory SIZE to export its CPU")
    if cpu_memory_bytes is not None and cpu_memory_bytes <= 0:
        raise UsageError("--cpu-memory must be a positive size")
    safe_host = host.replace(":", "_").strip("[]")
    out = [Export(f"rpc-{safe_host}-{first_port + k}", first_port + k, i, by_index[i].uuid)
           for k, i in enumerate(gpu_ids)]
    if cpu_memory_bytes is not None:
        port = first_port + len(out)
        out.append(Export(f"rpc-{safe_host}-{port}", port, cpu_memory_bytes=cpu_memory_bytes))
    if out[-1].port > 65535:
        raise UsageError(f"ports {first_port}..{out[-1].port} run past 65535; choose a lower --port")
    return out


def command(binary: Path, host: str, export: Export, threads: int) -> tuple[list[str], dict[str, str]]:
    """The rpc-server's argv and environment (pure): pinned to its GPU by UUID, or the CPU with GPUs hidden."""
    argv = [str(binary), "--host", host, "--port", str(export.port)]
    if export.gpu_index is None:
        argv += ["--device", CPU, "--threads", str(threads)]
        return argv, {"CUDA_VISIBLE_DEVICES": ""}
    env = {"CUDA_VISIBLE_DEVICES": export.gpu_uuid or str(export.gpu_index)}
    if export.gpu_uuid is None:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return argv, env


def rpc_binary(server_binary: str | Path) -> Path:
    """The ggml-rpc-server built beside llama-server; ServerBinaryError naming the build flag otherwise."""
    folder = Path(server_binary).resolve().parent
    for name in RPC_NAMES:
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return folder / name
    raise ServerBinaryError(f"no ggml-rpc-server beside {server_binary}: build llama.cpp with -DGGML_RPC=ON "
                            "(`llamactl install-server` does)")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def start(store: StateStore, binary: Path, host: str, exports: Sequence[Export], *,
          timeout_s: float = START_TIMEOUT_S, threads: int | None = None) -> list[Instance]:
    """Spawn and record each rpc-server (in one locked edit each, so none runs without an entry), then wait
    until each listens. On any failure those already started are stopped before the error goes on."""
    threads = threads or max(os.cpu_count() or 1, 1)
    started: list[Instance] = []
    try:
        for export in exports:
            started.append(_spawn(store, binary, host, export, threads))
        for inst in started:
            _wait_listening(store, inst, timeout_s)
        with store.edit() as current:
            for inst in started:
                if inst.name in current and current[inst.name].pid == inst.pid:
                    current[inst.name] = current[inst.name].moved(Status.READY)
        return [replace(i, status=Status.READY) for i in started]
    except BaseException:
        stop(store, [i.name for i in started])
        raise


def _spawn(store: StateStore, binary: Path, host: str, export: Export, threads: int) -> Instance:
    argv, env = command(binary, host, export, threads)
    with store.edit() as current:
        live = current.get(export.name)
        if live is not None and live.live:
            raise UsageError(f"{export.name} already runs (pid {live.pid}); is another worker on port {export.port}?")
        tags = {**env, INSTANCE_ENV: export.name, STATE_DIR_ENV: str(store.dir.resolve()), "LLAMACTL_STARTED_BY": "worker"}
        child = runner.spawn(argv, tags, store.log_path(export.name), shared=store.shared)
        if child.create_time is None:
            code = child.proc.wait()
            raise LaunchError(f"{binary.name} exited with code {code} at once", runner.tail(store.log_path(export.name)))
        now = time.time()
        inst = Instance(name=export.name, model=f"rpc:{export.device}", port=export.port, pid=child.pid,
                        create_time=child.create_time, argv=tuple(argv), env=env,
                        gpu_ids=() if export.gpu_index is None else (export.gpu_index,), started_at=now,
                        last_used=now, started_by="worker", status=Status.STARTING, host=host, kind="rpc")
        current[export.name] = inst
    return inst


def _wait_listening(store: StateStore, inst: Instance, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _listening(inst.host, inst.port):
        if procs.check(inst.claim(store.dir)).ownership is not procs.Ownership.OURS:
            raise LaunchError(f"{inst.name}: ggml-rpc-server exited before it listened on port {inst.port}",
                              runner.tail(store.log_path(inst.name)))
        if time.monotonic() > deadline:
            raise LaunchError(f"{inst.name}: ggml-rpc-server did not listen on port {inst.port} within "
                              f"{timeout_s:g} s", runner.tail(store.log_path(inst.name)))
        time.sleep(0.05)


def stop(store: StateStore, names: Sequence[str], grace_s: float = runner.DEFAULT_GRACE_S) -> list[str]:
    """TERM → KILL each of ours and drop its entry (the launcher's stop: only what is provably ours)."""
    from llamactl.servers.launcher import stop_instances

    return stop_instances(store, names, grace_s=grace_s)


def devices(store: StateStore, host: str, exports: Sequence[Export], local: Callable[[], Inventory]) -> list[Gpu]:
    """The devices served now, each with its endpoint, in `gpus --json`'s schema: a GPU as NVML shows it, the
    CPU at its declared size less what its rpc-server holds. One whose rpc-server is gone is left out."""
    recorded = store.snapshot()
    gpus = {g.index: g for g in local().gpus} if any(e.gpu_index is not None for e in exports) else {}
    out = []
    for position, export in enumerate(exports):
        inst = recorded.get(export.name)
        if inst is None or not inst.live:
            continue
        where = endpoint(host, export.port)
        if export.gpu_index is not None:
            gpu = gpus.get(export.gpu_index)
            if gpu is not None:
                out.append(replace(gpu, index=position, endpoint=where, processes=()))
            continue
        size = export.cpu_memory_bytes or 0
        used = min(_rss(inst.pid), size)
        out.append(Gpu(index=position, name=CPU, memory_total_bytes=size,
                       memory_free_bytes=size - used, memory_used_bytes=used, endpoint=where))
    return out


def _rss(pid: int | None) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss) if pid else 0
    except Exception:  # gone between the snapshot and now: it holds nothing
        return 0
