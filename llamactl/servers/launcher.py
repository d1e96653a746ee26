"""Launch and stop instances: plan, make room, reserve a port, spawn, wait, record — and the reverse.

The one place that changes an instance's recorded lifecycle for the CLI
(`launch`, `evict`) and the proxy. Each state change happens under the
state file's lock; slow work (spawning, readiness, stopping) happens outside it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from llamactl.config import DEFAULT_PORT_START
from llamactl.errors import (KilledWhileLoading, NameTaken, NoFitError, NoRoomYet, OutOfMemoryAtLoad, PlanOvertaken, SpillRefused,
                             StateError, UsageError)
from llamactl.gpu.inventory import Inventory
from llamactl.estimate import load_params
from llamactl.model.params import ModelParams
from llamactl.model.settings import ServerSettings
from llamactl.learn import observe
from llamactl.learn.calibrate import Observation
from llamactl.learn.store import CalibrationStore
from llamactl.model.memory import Placement, estimate
from llamactl.placement import FIT_RANK, Fit, Plan, Policy, RunningInstance, fits_beside, plan
from llamactl import scheduler
from llamactl.servers import launch_rules, procs, runner, slot_cache
from llamactl.servers.command import ServerCommand, build_command, check_extra_args
from llamactl.servers.probe import ServerCaps
from llamactl.units import MiB, format_bytes
if TYPE_CHECKING:
    from llamactl.resolve import ModelSpec
from llamactl.servers.state import INSTANCE_ENV, STATE_DIR_ENV, Instance, StateStore, Status, check_name

STARTED_BY_ENV = "LLAMACTL_STARTED_BY"

log = logging.getLogger(__name__)

PORT_SEARCH = 1000
MEMORY_RELEASE_TIMEOUT_S = 10.0
MAX_REPLANS = 50  # a launch re-plans each time another one records first; this many means something is wrong


@dataclass(frozen=True)
class LaunchRequest:
    model: Path
    name: str
    settings: ServerSettings
    policy: Policy
    port: int | None = None
    port_start: int = DEFAULT_PORT_START  # the built-in; a ModelSpec carries the configured one
    host: str = "127.0.0.1"
    extra: tuple[str, ...] = ()
    timeout_s: float = 300.0
    wait: bool = True
    replace_existing: bool = False
    started_by: str = "cli"
    protected: frozenset[str] = frozenset()  # instances that must not be evicted (requests in flight, not ours)
    may_evict: bool = True  # act on the plan's eviction proposal
    # instances whose memory will come free (the proxy's own: busy, starting, stopping): a plan worse than
    # the one without them raises NoRoomYet instead of running partially or on the CPU
    wait_for: frozenset[str] = frozenset()
    api_key: str | None = None  # reaches llama-server as LLAMA_API_KEY, never on argv
    gpu_only: bool = False  # spill = false: a partial or CPU plan is refused (SpillRefused), not run
    env: tuple[tuple[str, str], ...] = ()  # the model's own variables (config `env`); llamactl's own win
    slot_save_path: Path | None = None  # keep_cache: llama-server's --slot-save-path, created 0700 at the start
    params: ModelParams | None = field(default=None, compare=False, repr=False)  # the header, when read already


def request_for(spec: "ModelSpec", policy: Policy, **kw: object) -> LaunchRequest:
    """The launch of a resolved model (resolve.py): its path, name, settings, args and port range."""
    return LaunchRequest(model=spec.path, name=spec.name, settings=spec.settings, policy=policy,
                         port_start=spec.port_start, extra=spec.args, env=spec.env, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Launched:
    instance: Instance
    plan: Plan
    command: ServerCommand
    ready_s: float | None
    evicted: tuple[str, ...] = field(default=())


def running_for_placement(instances: dict[str, Instance], protected: frozenset[str] = frozenset(),
                          inv: Inventory | None = None) -> list[RunningInstance]:
    """The state's live instances (starting, ready, busy, stopping) as placement counts them on `inv`; a
    worker's rpc-servers are not among them (their GPUs' memory shows in NVML as another program's).

    The inventory is this box (simulated, or NVML) unless it was read from a file: another box as it was
    measured, whose used/free figures stand alone. A simulated GPU never shows what runs, so every instance
    is promised memory there; on NVML an instance counts as shown once its process appears on its GPUs.
    """
    if inv is not None and inv.source not in ("nvml", "simulated"):
        return []
    return [RunningInstance(name=i.name, gpu_bytes=i.gpu_bytes(), last_used=i.last_used,
                            idle=i.status is Status.READY and i.name not in protected,
                            starting=i.status is Status.STARTING, pids=(i.pid,) if i.pid else (),
                            visible=_shown(i, inv))
            for i in instances.values() if i.live and i.serves_http]


def _shown(inst: Instance, inv: Inventory | None) -> bool | None:
    if inv is None:
        return None
    if inv.source == "simulated":
        return False
    if inst.status is Status.STARTING:
        return False
    listed = [g for g in inv.gpus if g.index in inst.gpu_ids and g.processes]
    if not listed:  # NVML lists no process (a container's pid namespace, an old driver): trust its figures
        return True
    return any(p.pid == inst.pid for g in listed for p in g.processes)


def seats_of(instances: dict[str, Instance], protected: frozenset[str] = frozenset()) -> dict[str, scheduler.Seat]:
    """The state's live instances as the scheduler sees them: busy or protected ones have a request in flight."""
    phase = {Status.STARTING: Status.STARTING, Status.READY: Status.READY, Status.BUSY: Status.READY,
             Status.STOPPING: Status.STOPPING}
    return {n: scheduler.Seat(n, phase[i.status], in_flight=int(i.status is Status.BUSY or n in protected),
                              last_used=i.last_used) for n, i in instances.items() if i.live and i.serves_http}


def rpc_endpoints(chosen: Sequence[int], inv: Inventory) -> tuple[str, ...]:
    """The --rpc list of a plan's devices: the endpoints of its remote ones, in the plan's (llama.cpp's) order."""
    by_index = {g.index: g for g in inv.gpus}
    return tuple(by_index[i].endpoint or "" for i in chosen if i in by_index and by_index[i].remote)


def cuda_devices(chosen: Sequence[int], inv: Inventory) -> tuple[str, ...]:
    """CUDA_VISIBLE_DEVICES for a plan's local GPUs (by UUID when all have one); a remote device is not local."""
    by_index = {g.index: g for g in inv.gpus}
    chosen = [i for i in chosen if not (i in by_index and by_index[i].remote)]
    uuids = [by_index[i].uuid if i in by_index else None for i in chosen]
    if uuids and all(uuids):
        return tuple(u for u in uuids if u)
    return tuple(str(i) for i in chosen)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(instances: dict[str, Instance], start: int, host: str) -> int:
    """The first port from `start` that no live instance holds and nothing listens on."""
    taken = {i.port for i in instances.values() if i.live}
    for port in range(start, min(start + PORT_SEARCH, 65536)):
        if port not in taken and _port_free(host, port):
            return port
    raise UsageError(f"no free port in {start}..{start + PORT_SEARCH - 1}")


def plan_for(req: LaunchRequest, inv: Inventory, instances: dict[str, Instance],
             params: ModelParams | None = None) -> Plan:
    params = params or req.params or load_params(req.model, req.settings)
    others = {n: i for n, i in instances.items() if n != req.name or not req.replace_existing}
    return plan(params, req.settings, inv.usable, req.policy, running_for_placement(others, req.protected, inv))


def check_spill(req: LaunchRequest, the_plan: Plan) -> None:
    """SpillRefused when the model must stay on GPUs (spill = false) and the plan is partial or on the CPU."""
    if req.gpu_only and the_plan.fit is not Fit.GPU:
        where = "only partially on GPUs" if the_plan.fit is Fit.PARTIAL else "on the CPU only"
        raise SpillRefused(f"{req.name} would run {where} and has spill = false: "
                           + "; ".join(the_plan.reasons[-3:]))


def check_room(req: LaunchRequest, params: ModelParams, inv: Inventory, instances: dict[str, Instance],
               the_plan: Plan) -> None:
    """NoRoomYet when `the_plan` is worse than the plan without the instances in req.wait_for (their memory
    will come free): the caller waits for them rather than run partially or on the CPU."""
    if not req.wait_for:
        return
    holding = {n for n, i in instances.items() if n in req.wait_for and i.live and any(i.gpu_bytes().values())}
    if not holding:
        return
    without = plan_for(req, inv, {n: i for n, i in instances.items() if n not in holding}, params)
    if FIT_RANK[the_plan.fit] < FIT_RANK[without.fit]:
        names = ", ".join(sorted(holding))
        raise NoRoomYet(f"GPU memory is held by {names} (busy, starting or stopping); it would run {without.fit.value} "
                        f"without them, {the_plan.fit.value} now", tuple(sorted(holding)))


def stop_instances(store: StateStore, names: Sequence[str], *, grace_s: float = runner.DEFAULT_GRACE_S) -> list[str]:
    """Stop the named instances (TERM → KILL) and drop them from the state; returns those that were running.

    Only a process that is provably ours is signalled (procs.stop checks pid, create time and env tag at
    the moment of each signal); an entry whose pid runs anything else is dropped with a warning.
    """
    with store.edit() as instances:
        targets = {n: instances[n] for n in names if n in instances}
        for name, inst in targets.items():
            if inst.live:
                instances[name] = inst.moved(Status.STOPPING)
    stopped = []
    for name, inst in targets.items():
        if not inst.live or inst.pid is None:
            continue
        verdict = procs.stop(inst.claim(store.dir), grace_s)
        if verdict.ownership is procs.Ownership.OURS:
            stopped.append(name)
        elif verdict.ownership is procs.Ownership.FOREIGN:
            log.warning("instance %r: %s; not ours, left alone and dropped from the state", name, verdict.reason,
                        extra={"event": "not_ours", "instance": name, "reason": verdict.reason})
    with store.edit() as instances:
        for name, inst in targets.items():
            current = instances.get(name)
            if current is not None and current.pid == inst.pid:
                del instances[name]
    return stopped


def split_secrets(extra: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """`--api-key K` taken out of extra args (it would be readable by every user in /proc/PID/cmdline)."""
    out: list[str] = []
    key = None
    it = iter(extra)
    for arg in it:
        if arg == "--api-key":
            key = next(it, None)
        elif arg.startswith("--api-key="):
            key = arg.split("=", 1)[1]
        else:
            out.append(arg)
    return tuple(out), key


def wait_memory_released(gpu_ids: Sequence[int], inv_fn: Callable[[], Inventory], before: Inventory,
                         freed_bytes: dict[int, int], timeout_s: float = MEMORY_RELEASE_TIMEOUT_S) -> None:
    """After a stop, wait (bounded) until NVML shows the memory back: it is not free the moment a process exits."""
    if before.source != "nvml" or not gpu_ids:
        return
    start_free = {g.index: g.memory_free_bytes for g in before.gpus}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = {g.index: g.memory_free_bytes for g in inv_fn().gpus}
        if all(now.get(i, 0) >= start_free.get(i, 0) + 0.9 * freed_bytes.get(i, 0) for i in gpu_ids):
            return
        time.sleep(0.25)


def command_for(req: LaunchRequest, the_plan: Plan, binary: str | Path, caps: ServerCaps, inv: Inventory,
                port: int) -> ServerCommand:
    """The llama-server command a plan runs as (`launch` and `launch --dry-run` alike)."""
    if the_plan.resolved is None:
        raise NoFitError(f"{req.model.name} does not fit: " + "; ".join(the_plan.reasons[-2:]))
    return build_command(binary, req.model, the_plan.resolved, caps, host=req.host, port=port,
                         tensor_split=the_plan.tensor_split, cuda_devices=cuda_devices(the_plan.gpu_ids, inv),
                         rpc=rpc_endpoints(the_plan.gpu_ids, inv),
                         extra=req.extra, alias=req.name, verbose_buffers=True,  # buffer sizes: what it took
                         slot_save_path=req.slot_save_path)


class Effects(Protocol):
    """What launch() does to the world past reading the model and the inventory, behind one small interface
    (what to do is decided by launch_rules). ProcessLaunch is the real one; tests drive launch() with a fake."""

    def instances(self) -> dict[str, Instance]: ...  # the state, reconciled with live processes
    def snapshot(self) -> dict[str, Instance]: ...  # the state as recorded
    def stop(self, names: Sequence[str]) -> list[str]: ...  # TERM → KILL, drop from the state; those that ran
    def start(self, req: LaunchRequest, the_plan: Plan, ctx: "observe.Context", inv: Inventory,
              api_key: str | None, evicted: tuple[str, ...]) -> Launched: ...  # spawn, record, wait, observe
    def record_oom(self, ctx: "observe.Context", exc: OutOfMemoryAtLoad) -> Observation: ...
    def host_memory_tight(self, the_plan: Plan, policy: Policy) -> bool: ...


class ProcessLaunch:
    """The real effects: the state file, llama-server processes, the calibration store, the host's memory."""

    def __init__(self, store: StateStore, binary: str, caps: ServerCaps,
                 progress: Callable[[float, str], None] | None, grace_s: float) -> None:
        self.store, self.binary, self.caps, self.progress, self.grace_s = store, binary, caps, progress, grace_s

    def instances(self) -> dict[str, Instance]:
        return self.store.instances()

    def snapshot(self) -> dict[str, Instance]:
        return self.store.snapshot()

    def stop(self, names: Sequence[str]) -> list[str]:
        return stop_instances(self.store, names, grace_s=self.grace_s)

    def start(self, req: LaunchRequest, the_plan: Plan, ctx: "observe.Context", inv: Inventory,
              api_key: str | None, evicted: tuple[str, ...]) -> Launched:
        return _start(self.store, req, the_plan, ctx, self.binary, self.caps, inv, api_key, self.progress,
                      self.grace_s, evicted)

    def record_oom(self, ctx: "observe.Context", exc: OutOfMemoryAtLoad) -> Observation:
        return record_oom(self.store, ctx, exc)

    def host_memory_tight(self, the_plan: Plan, policy: Policy) -> bool:
        return _host_memory_tight(the_plan, policy)


def launch(store: StateStore, req: LaunchRequest, binary: str, caps: ServerCaps, inventory_fn: Callable[[], Inventory],
           *, progress: Callable[[float, str], None] | None = None, grace_s: float = runner.DEFAULT_GRACE_S,
           effects: Effects | None = None) -> Launched:
    """Plan, make room, start and (unless req.wait is False) wait until ready. Records every step.

    No llama-server runs without an entry: if recording fails after the spawn, or the wait is interrupted
    (Ctrl-C), the process just started is stopped before the error goes on. Once ready, what the instance
    really took is observed and stored (learn/). An out-of-memory failure at load is recorded too, and the
    launch tried once more with the shortfall added to the room it leaves (which may evict idle instances,
    or offload fewer layers); a second failure says what was tried.
    """
    fx = effects or ProcessLaunch(store, binary, caps, progress, grace_s)
    check_name(req.name)
    extra, extra_key = split_secrets(req.extra)
    api_key = req.api_key or extra_key
    req = replace(req, extra=extra)
    check_extra_args(req.extra)
    params = req.params or load_params(req.model, req.settings)  # read once: a bad file fails before anything starts
    instances = fx.instances()
    seats = seats_of(instances, req.protected)
    # one process per name: the scheduler starts it unless one is ready (Use) or starting/stopping (Wait)
    free = isinstance(scheduler.decide(req.name, seats, scheduler.Limits(max_queue=1)), scheduler.Start)
    if launch_rules.on_name(req.name, instances.get(req.name), free, req.replace_existing) is launch_rules.OnName.REPLACE:
        fx.stop([req.name])
        instances = fx.snapshot()  # liveness is enough now: adoption ran in the read above
        seats = seats_of(instances, req.protected)
    trim_logs(store, instances)
    tried: list[str] = []
    last_tail = first_cause = ""
    evicted: tuple[str, ...] = ()
    replans = 0
    while True:
        inv = inventory_fn()
        the_plan, gone = _plan_and_make_room(fx, req, params, inv, instances, seats, inventory_fn)
        evicted += gone
        if gone:
            inv = inventory_fn()
        if the_plan.fit is Fit.NONE or the_plan.resolved is None or the_plan.estimate is None:
            reasons = "; ".join(the_plan.reasons[-2:])
            if tried:
                raise OutOfMemoryAtLoad(f"{req.name}: {first_cause} with {tried[0]}, and a plan that leaves more "
                                        f"room does not fit: {reasons}", last_tail)
            raise NoFitError(f"{req.model.name} does not fit: " + reasons)
        check_room(req, params, inv, fx.snapshot() if req.wait_for else instances, the_plan)
        check_spill(req, the_plan)
        ctx = observation_context(req, params, the_plan, inv, caps)
        try:
            return fx.start(req, the_plan, ctx, inv, api_key, evicted)
        except PlanOvertaken:
            # another launch recorded its claim between our plan and our record: plan again with it counted
            replans += 1
            if replans > MAX_REPLANS:
                raise PlanOvertaken(f"{req.name}: other launches kept taking the memory planned for it "
                                    f"({MAX_REPLANS} plans); try again") from None
            instances = fx.snapshot()
            seats = seats_of(instances, req.protected)
            continue
        except OutOfMemoryAtLoad as exc:
            tried.append(describe_attempt(the_plan, inv, req.policy.margin_bytes))
            verdict = launch_rules.after_oom(req.name, exc, fx.host_memory_tight(the_plan, req.policy), tuple(tried))
            obs = fx.record_oom(ctx, exc) if verdict.learn else None
            if not verdict.retry:
                assert verdict.error is not None
                raise verdict.error from None
            assert obs is not None
            last_tail = exc.log_tail
            first_cause = first_cause or str(exc)
            req = replace(req, policy=roomier(req.policy, the_plan, obs))
            room = _shortfall_or_guess(the_plan, obs)
            log.warning("%s ran out of memory while loading (%s); trying once more with %s more room",
                        req.name, tried[0], format_bytes(room),
                        extra={"event": "oom_retry", "model": req.name, "error": tried[0], "more_room_bytes": room})
            instances = fx.snapshot()
            seats = seats_of(instances, req.protected)


def _plan_and_make_room(fx: Effects, req: LaunchRequest, params: ModelParams, inv: Inventory,
                        instances: dict[str, Instance], seats: dict[str, scheduler.Seat],
                        inventory_fn: Callable[[], Inventory]) -> tuple[Plan, tuple[str, ...]]:
    """The plan, after stopping the idle instances it proposes to evict (and re-planning without them)."""
    the_plan = plan_for(req, inv, instances, params)
    victims = scheduler.memory_victims(the_plan.evict, seats, adopt=True) if req.may_evict else ()
    if not victims:
        return the_plan, ()
    freed: dict[int, int] = {}
    for name in victims:
        for gpu, used in instances[name].gpu_bytes().items():
            freed[gpu] = freed.get(gpu, 0) + used
    evicted = tuple(fx.stop(victims))
    wait_memory_released(list(freed), inventory_fn, inv, freed)
    return plan_for(req, inventory_fn(), fx.snapshot(), params), evicted


def _start(store: StateStore, req: LaunchRequest, the_plan: Plan, ctx: "observe.Context", binary: str,
           caps: ServerCaps, inv: Inventory, api_key: str | None, progress: Callable[[float, str], None] | None,
           grace_s: float, evicted: tuple[str, ...]) -> Launched:
    """Re-check the plan against the claims, spawn and record in one locked edit, wait until ready, observe."""
    assert the_plan.estimate is not None
    log_path = store.log_path(req.name)
    child: runner.Child | None = None
    if req.slot_save_path is not None:
        try:
            slot_cache.ensure_dir(req.slot_save_path)
        except OSError as exc:
            raise StateError(f"cannot use the prompt cache directory {req.slot_save_path}: {exc.strerror or exc}") from None
    try:
        with store.edit() as current:
            live = current.get(req.name)
            if live is not None and live.live:
                raise NameTaken(f"an instance named {req.name!r} was started meanwhile (pid {live.pid})")
            others = running_for_placement({n: i for n, i in current.items() if n != req.name}, req.protected, inv)
            if not fits_beside(the_plan, inv.usable, others, req.policy):
                raise PlanOvertaken(f"{req.name}: another launch took the memory planned for it")
            port = req.port if req.port is not None else pick_port(current, req.port_start, req.host)
            if req.port is not None:
                holder = next((i.name for i in current.values() if i.live and i.port == port), None)
                if holder is not None:
                    raise UsageError(f"port {port} is already used by instance {holder!r}")
                if not _port_free(req.host, port):
                    raise UsageError(f"port {port} is already in use on {req.host} by another program")
            cmd = command_for(req, the_plan, binary, caps, inv, port)
            env = {**dict(req.env), **cmd.env, INSTANCE_ENV: req.name, STATE_DIR_ENV: str(store.dir.resolve()),
                   STARTED_BY_ENV: req.started_by}  # who started it, should its entry be lost (a kill mid-write)
            if api_key:
                env[runner.API_KEY_ENV] = api_key
            now = time.time()
            log_offset = _size(log_path)
            child = runner.spawn(list(cmd.argv), env, log_path, shared=store.shared)
            if child.create_time is None:  # gone before we could see it: exited at once
                code = child.proc.wait()
                raise runner.exited_early(f"llama-server exited with code {code} at once",
                                          observe.read_log_from(log_path, log_offset))
            current[req.name] = Instance(
                name=req.name, model=str(req.model), port=port, pid=child.pid, create_time=child.create_time,
                argv=cmd.argv, env=cmd.env, gpu_ids=the_plan.gpu_ids,
                estimated_bytes={d.device: d.total_bytes for d in the_plan.estimate.devices},
                started_at=now, last_used=now, started_by=req.started_by, status=Status.STARTING, host=req.host,
            )
    except BaseException as exc:
        if child is not None:  # started but not recorded: stop it, so nothing runs unseen
            runner.stop_child(child.proc, grace_s=min(grace_s, 5.0))
            error = launch_rules.after_failed_record(exc, req.name, child.pid)
            if error is not exc:
                raise error from None
        raise
    log.info("%s: spawned pid %d on port %d (%s)", req.name, child.pid, port,
             "GPUs " + ",".join(map(str, the_plan.gpu_ids)) if the_plan.gpu_ids else "CPU",
             extra={"event": "launch", "model": req.name, "pid": child.pid, "port": port,
                    "gpu_ids": list(the_plan.gpu_ids), "started_by": req.started_by})
    if not req.wait:
        return Launched(store.instances().get(req.name, current[req.name]), the_plan, cmd, None, evicted)
    try:
        ready_s = runner.wait_ready(child, port, str(req.model), req.timeout_s, host=req.host, progress=progress)
    except (runner.LaunchError, KeyboardInterrupt) as exc:
        ended_by = child.proc.poll()  # before our own stop: how it ended, if it did
        runner.stop_child(child.proc, grace_s=min(grace_s, 5.0))
        with store.edit() as current:
            after = launch_rules.after_failed_wait(exc, ended_by, current.get(req.name), child.pid)
            launch_rules.apply_entry(current, req.name, after.entry)
        error = launch_rules.answer(after.answer, exc, req.name, child.pid)
        if error is not exc:
            raise error from None
        if isinstance(exc, OutOfMemoryAtLoad):  # learning reads the whole load's log, not the tail
            exc.log_text = observe.read_log_from(log_path, log_offset)
        raise
    actual = record_ready(store, ctx, observe.read_loaded_log(log_path, log_offset), child.pid)
    with store.edit() as current:
        mine = current.get(req.name)
        if mine is not None and mine.pid == child.pid and mine.status is Status.STARTING:
            inst = mine.moved(Status.READY, last_used=time.time(), actual_bytes=actual)
            current[req.name] = inst
    if mine is None or mine.pid != child.pid or mine.status is Status.STOPPING:
        # evicted or replaced by another llamactl while it loaded
        runner.stop_child(child.proc, grace_s=min(grace_s, 5.0))
        raise launch_rules.entry_removed(req.name)
    if mine.status is not Status.STARTING:  # the reconcile found it gone: it died the moment it was ready
        runner.stop_child(child.proc, grace_s=min(grace_s, 5.0))
        raise runner.exited_early(f"llama-server exited just after it became ready (code {child.proc.poll()})",
                                  observe.read_log_from(log_path, log_offset))
    return Launched(inst, the_plan, cmd, ready_s, evicted)


def trim_logs(store: StateStore, instances: dict[str, Instance]) -> None:
    """Keep the live instances' logs bounded (they log at verbosity 4: ~7 KB a request)."""
    for name, inst in instances.items():
        if inst.live:
            runner.trim_log(store.log_path(name))


def _host_memory_tight(the_plan: Plan, policy: Policy) -> bool:
    """Whether the host's memory (available now, or the budget --host-memory gives) is near what the plan puts
    there: only then is a SIGKILL while loading taken for the kernel's OOM killer."""
    import psutil

    assert the_plan.estimate is not None
    need = the_plan.estimate.device("CPU").total_bytes
    room = int(psutil.virtual_memory().available)
    if policy.host_memory_bytes is not None:
        room = min(room, policy.host_memory_bytes)
    return room < 2 * need + 512 * MiB


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def observation_context(req: LaunchRequest, params: ModelParams, the_plan: Plan, inv: Inventory,
                        caps: ServerCaps) -> "observe.Context":
    """What an observation of this launch is keyed by, with the pure formula for the planned settings."""
    assert the_plan.resolved is not None
    names = {g.index: g.name for g in inv.gpus}
    gpu_names = tuple(names.get(i, "") for i in the_plan.gpu_ids)
    formula = estimate(params, the_plan.resolved, Placement(
        n_gpus=len(the_plan.gpu_ids), tensor_split=the_plan.tensor_split or (),
        gpu_overhead_bytes=req.policy.gpu_overhead_bytes, cpu_repack_types=req.policy.cpu_repack_types))
    try:
        key = observe.identity(req.model)
    except OSError:
        key = "unknown"
    return observe.Context(params=params, model_path=str(req.model), model_key=key, formula=formula,
                           gpu_names=gpu_names, gpu_indices=the_plan.gpu_ids,
                           backend=observe.gpu_backend(req.extra, len(the_plan.gpu_ids)), build=caps.version,
                           extra_args=req.extra, nvml_live=inv.source == "nvml")


def record_ready(store: StateStore, ctx: "observe.Context", log_text: str, pid: int) -> dict[str, int]:
    """Observe a ready instance and store it; what it holds per device. Never fails the launch."""
    try:
        obs = observe.observe_ready(ctx, log_text, pid)
        if any(d.logged_total for d in obs.devices):  # nothing logged (an old or quiet build): nothing learned
            CalibrationStore(store.dir, file_mode=store.file_mode).add([obs])
        return observe.actual_bytes(obs)
    except Exception as exc:
        log.warning("could not record what %s took: %s", ctx.model_path, exc,
                    extra={"event": "calibration_failed", "error": str(exc)})
        return {}


def record_oom(store: StateStore, ctx: "observe.Context", exc: OutOfMemoryAtLoad) -> "Observation":
    obs = observe.observe_oom(ctx, exc.log_text, killed=isinstance(exc, KilledWhileLoading))
    try:
        CalibrationStore(store.dir, file_mode=store.file_mode).add([obs])
    except Exception as err:
        log.warning("could not record the out-of-memory failure: %s", err,
                    extra={"event": "calibration_failed", "error": str(err)})
    return obs


def _shortfall_or_guess(the_plan: Plan, obs: "Observation") -> int:
    """The bytes the failed allocation wanted, else a tenth of the failing device's estimate (≥ 256 MiB)."""
    if obs.shortfall_bytes:
        return obs.shortfall_bytes
    assert the_plan.estimate is not None
    device = obs.shortfall_device or next((d.device for d in the_plan.estimate.devices if d.device != "CPU"), "CPU")
    return max(the_plan.estimate.device(device).total_bytes // 10, 256 * MiB)


def roomier(policy: Policy, the_plan: Plan, obs: "Observation") -> Policy:
    """The policy for a retry after an out-of-memory failure: the shortfall added to the room left free on
    the device that failed (the host's budget shrinks by it when the host failed and its RAM is known)."""
    extra = _shortfall_or_guess(the_plan, obs)
    if obs.shortfall_device == "CPU" or not the_plan.gpu_ids:
        if policy.host_memory_bytes is not None:
            return replace(policy, host_memory_bytes=max(policy.host_memory_bytes - extra, 0))
        assert the_plan.estimate is not None
        return replace(policy, host_memory_bytes=max(the_plan.estimate.device("CPU").total_bytes - extra, 0))
    return replace(policy, margin_bytes=policy.margin_bytes + extra)


def describe_attempt(the_plan: Plan, inv: Inventory, base_margin: int) -> str:
    """One plan, as a person would say it: "-ngl 33 on GPU 0 (estimate 9.10 GiB)"."""
    assert the_plan.estimate is not None and the_plan.resolved is not None
    if not the_plan.gpu_ids:
        return f"the CPU (estimate {format_bytes(the_plan.estimate.device('CPU').total_bytes)})"
    gpu_total = sum(d.total_bytes for d in the_plan.estimate.devices if d.device != "CPU")
    where = "GPU " + ",".join(map(str, the_plan.gpu_ids))
    moe = f" --n-cpu-moe {the_plan.n_cpu_moe}" if the_plan.n_cpu_moe else ""
    return f"-ngl {the_plan.n_gpu_layers}{moe} on {where} (estimate {format_bytes(gpu_total)}, {format_bytes(base_margin)} left free)"

