"""Pure placement: a model's memory model + GPUs + policy → a Plan (devices, split, -ngl) or no fit.

Order of preference: the whole model on one GPU (the seed's explicit wish),
then the fewest GPUs that hold it with `-ts` in proportion to what each can
hold, then, for a mixture of experts, every layer on the GPUs with the experts
of the fewest leading layers on the CPU (`--n-cpu-moe`: attention, KV and the
dense parts stay on the GPU, which beats dropping whole layers), then partial
offload (the largest `-ngl` that fits), then the CPU. Every
candidate is verified per device with the memory model, never by a sum. When
the model does not fit wholly on GPUs, the least-recently-used idle llamactl
instances whose removal would make it fit are proposed for eviction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from llamactl.gpu.inventory import Gpu
from llamactl.learn.calibrate import Learned
from llamactl.model.memory import DEFAULT_GPU_OVERHEAD_BYTES, MemoryEstimate, Placement, estimate
from llamactl.model.params import ModelParams
from llamactl.model.settings import Resolved, ServerSettings, resolve
from llamactl.units import MiB, format_bytes

DEFAULT_MARGIN_BYTES = 512 * MiB  # headroom per GPU, in the spirit of llama.cpp's --fit-target (1024 MiB there)
DEFAULT_UTIL_THRESHOLD = 50  # percent
DEFAULT_MEM_THRESHOLD = 0.5  # fraction of total used by other programs
SPLIT_REFINEMENTS = 8


class Fit(str, Enum):
    GPU = "gpu"
    PARTIAL = "partial"
    CPU = "cpu"
    NONE = "none"


class Strategy(str, Enum):
    SPREAD = "spread"  # the GPU with the most free memory
    PACK = "pack"  # the smallest GPU that fits, leaving big ones for big models


@dataclass(frozen=True)
class Policy:
    strategy: Strategy = Strategy.SPREAD
    max_gpus: int | None = None  # None = all candidates
    allow_partial: bool = True
    margin_bytes: int = DEFAULT_MARGIN_BYTES
    gpu_overhead_bytes: int = DEFAULT_GPU_OVERHEAD_BYTES
    util_threshold: int = DEFAULT_UTIL_THRESHOLD
    mem_threshold: float = DEFAULT_MEM_THRESHOLD
    allowed_gpus: tuple[int, ...] | None = None  # a model's `gpus` allow-list (NVML indices)
    host_memory_bytes: int | None = None  # RAM available for a CPU or partial plan; None = unchecked
    cpu_repack_types: frozenset[str] = frozenset()
    learned: Learned | None = None  # corrections from earlier launches (learn/); None = the formula alone


@dataclass(frozen=True)
class PlacementSpec:
    """A model's placement choices before the inventory is known; `policy()` completes them for one.

    The config's keys and the command line's flags both land here (resolve.py), each default once: Policy's.
    """

    strategy: Strategy = Policy.strategy
    max_gpus: int | None = Policy.max_gpus
    allow_partial: bool = Policy.allow_partial
    margin_bytes: int = Policy.margin_bytes
    gpu_overhead_bytes: int = Policy.gpu_overhead_bytes
    util_threshold: int = Policy.util_threshold
    mem_threshold: float = Policy.mem_threshold
    allowed_gpus: tuple[int, ...] | None = Policy.allowed_gpus
    host_memory_bytes: int | None = None  # None: this machine's available RAM when the GPUs are live
    calibration: bool = True  # plan with what earlier launches measured (--no-calibration: the formula alone)

    def policy(self, gpu_indices: frozenset[int], live_host_memory_bytes: int | None,
               cpu_repack_types: frozenset[str] = frozenset(), learned: Learned | None = None) -> Policy:
        """The Policy on an inventory with these GPU indices (`gpus` checked against them)."""
        from llamactl.errors import UsageError

        if self.allowed_gpus is not None:
            unknown = [i for i in self.allowed_gpus if i not in gpu_indices]
            if unknown:
                raise UsageError(f"no GPU {unknown[0]} in the inventory (GPUs: {sorted(gpu_indices) or 'none'}); "
                                 "check --gpu-ids or the model's gpus")
        host = self.host_memory_bytes if self.host_memory_bytes is not None else live_host_memory_bytes
        return Policy(strategy=self.strategy, max_gpus=self.max_gpus, allow_partial=self.allow_partial,
                      margin_bytes=self.margin_bytes, gpu_overhead_bytes=self.gpu_overhead_bytes,
                      util_threshold=self.util_threshold, mem_threshold=self.mem_threshold,
                      allowed_gpus=self.allowed_gpus, host_memory_bytes=host, cpu_repack_types=cpu_repack_types,
                      learned=learned if self.calibration else None)


@dataclass(frozen=True)
class RunningInstance:
    """A llamactl instance as placement sees it: what it holds where, and whether it may go."""

    name: str
    gpu_bytes: dict[int, int]  # NVML index → bytes it holds (measured, else estimated)
    last_used: float  # epoch seconds
    idle: bool = True  # no request in flight
    starting: bool = False  # loading: not to be evicted
    pids: tuple[int, ...] = ()
    visible: bool | None = None  # its memory shows in the inventory's used/free figures (None: unless starting)

    @property
    def shown(self) -> bool:
        return self.visible if self.visible is not None else not self.starting


@dataclass(frozen=True)
class DeviceCapacity:
    gpu: Gpu
    capacity_bytes: int  # what a new model may use: free − promised − margin (never below 0)
    candidate: bool
    reason: str | None = None  # why not a candidate


@dataclass(frozen=True)
class Plan:
    fit: Fit
    gpu_ids: tuple[int, ...]  # NVML indices, in the order llama-server sees them
    tensor_split: tuple[float, ...] | None  # None on one GPU or the CPU
    resolved: Resolved | None
    estimate: MemoryEstimate | None
    capacities: tuple[DeviceCapacity, ...]
    evict: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default=())

    @property
    def n_gpu_layers(self) -> int:
        return self.resolved.n_gpu_layers if self.resolved else 0

    @property
    def n_cpu_moe(self) -> int:
        return self.resolved.n_cpu_moe if self.resolved else 0


def capacities(gpus: Sequence[Gpu], instances: Sequence[RunningInstance], policy: Policy) -> list[DeviceCapacity]:
    """Candidate GPUs and what each can take, counting only other programs' use against the thresholds."""
    out = []
    for gpu in gpus:
        # an instance whose memory the inventory shows is in `used`; any other (starting, a simulated GPU,
        # NVML not showing its process yet) is promised on top
        ours_bytes = sum(inst.gpu_bytes.get(gpu.index, 0) for inst in instances if inst.shown)
        promised = sum(inst.gpu_bytes.get(gpu.index, 0) for inst in instances if not inst.shown)
        others_used = max(gpu.memory_used_bytes - ours_bytes, 0)
        capacity = max(gpu.memory_free_bytes - promised - policy.margin_bytes, 0)
        reason = None
        if gpu.error:
            reason = f"GPU {gpu.index}: {gpu.error}"
        elif policy.allowed_gpus is not None and gpu.index not in policy.allowed_gpus:
            reason = f"GPU {gpu.index} is not in the model's allow-list"
        elif gpu.utilization_gpu is not None and gpu.utilization_gpu >= policy.util_threshold:
            reason = f"GPU {gpu.index} is {gpu.utilization_gpu}% busy (threshold {policy.util_threshold}%)"
        elif gpu.memory_total_bytes and others_used / gpu.memory_total_bytes >= policy.mem_threshold:
            reason = (f"GPU {gpu.index}: other programs use {format_bytes(others_used)} of "
                      f"{format_bytes(gpu.memory_total_bytes)} (threshold {policy.mem_threshold:.0%})")
        out.append(DeviceCapacity(gpu, capacity, reason is None, reason))
    return out


def _try(params: ModelParams, settings: ServerSettings, chosen: Sequence[DeviceCapacity], split: Sequence[float],
         policy: Policy, n_gpu_layers: int | None = None) -> tuple[bool, Resolved, MemoryEstimate]:
    # replace(), not keywords: the settings may carry an --n-cpu-moe chosen by _expert_offload
    wanted = replace(settings, n_gpu_layers=n_gpu_layers if n_gpu_layers is not None else settings.n_gpu_layers)
    resolved = resolve(wanted, params, len(chosen))
    est = estimate(params, resolved, Placement(n_gpus=len(chosen), tensor_split=tuple(split),
                                               gpu_overhead_bytes=policy.gpu_overhead_bytes,
                                               cpu_repack_types=policy.cpu_repack_types))
    if policy.learned is not None:
        est = calibrated(est, policy.learned, [cap.gpu.name for cap in chosen])
    fits = all(est.device(f"GPU{i}").total_bytes <= cap.capacity_bytes for i, cap in enumerate(chosen))
    if policy.host_memory_bytes is not None:
        fits = fits and est.device("CPU").total_bytes <= policy.host_memory_bytes
    return fits, resolved, est


def need_alone(params: ModelParams, settings: ServerSettings, cap: DeviceCapacity, policy: Policy) -> int:
    """The bytes the model needs on `cap`'s GPU alone, as the planner weighs a single-GPU candidate."""
    return _try(params, settings, [cap], [1.0], policy)[2].device("GPU0").total_bytes


def calibrated(est: MemoryEstimate, learned: Learned, gpu_names: Sequence[str]) -> MemoryEstimate:
    """The estimate corrected by what earlier launches measured, noting what was used."""
    res = est.resolved
    partial = bool(gpu_names) and ("CPU" in est.layer_devices or res.n_cpu_moe > 0
                                   or any(t == "CPU" for _, t in res.tensor_overrides))
    corrected, notes = learned.apply(est, gpu_names, partial)
    return replace(corrected, calibration=notes)


def _proportional_split(params: ModelParams, settings: ServerSettings, chosen: Sequence[DeviceCapacity],
                        policy: Policy, n_gpu_layers: int | None = None) -> tuple[bool, tuple[float, ...], Resolved, MemoryEstimate]:
    """Split in proportion to what each GPU can hold for layers, then correct overflowing devices."""
    # what each GPU has left for layers once its fixed costs (overhead, compute) are paid
    probe_fit, _, probe = _try(params, settings, chosen, [1.0] * len(chosen), policy, n_gpu_layers)
    fixed = [probe.device(f"GPU{i}").compute_bytes + probe.device(f"GPU{i}").overhead_bytes for i in range(len(chosen))]
    split = [max(cap.capacity_bytes - f, 1) for cap, f in zip(chosen, fixed)]
    fits, resolved, est = _try(params, settings, chosen, split, policy, n_gpu_layers)
    for _ in range(SPLIT_REFINEMENTS):
        if fits:
            break
        # shrink the shares of devices that overflow by how much they overflow, grow the others'
        ratios = []
        for i, cap in enumerate(chosen):
            used = est.device(f"GPU{i}").total_bytes
            ratios.append(min(cap.capacity_bytes / used, 1.05) if used else 1.05)
        split = [max(s * r, 1.0) for s, r in zip(split, ratios)]  # a GPU with no room keeps a sliver: never all zero
        fits, resolved, est = _try(params, settings, chosen, split, policy, n_gpu_layers)
    total = sum(split)
    return fits, tuple(round(s / total, 4) for s in split), resolved, est


def preferred(cands: Sequence[DeviceCapacity]) -> list[DeviceCapacity]:
    """Local GPUs first (most room first), then each worker's devices together, the worker with the most room
    first: every prefix of this list spans the fewest hosts it can, and a remote device is taken only when the
    local ones are not enough (each extra host is a network hop per token)."""
    local = sorted((c for c in cands if not c.gpu.remote), key=lambda c: (-c.capacity_bytes, c.gpu.index))
    room: dict[str, int] = {}
    for c in cands:
        if c.gpu.remote:
            room[c.gpu.worker or ""] = room.get(c.gpu.worker or "", 0) + c.capacity_bytes
    remote = sorted((c for c in cands if c.gpu.remote),
                    key=lambda c: (-room[c.gpu.worker or ""], c.gpu.worker or "", -c.capacity_bytes, c.gpu.index))
    return local + remote


def device_order(chosen: Sequence[DeviceCapacity]) -> list[DeviceCapacity]:
    """The order llama-server gives the model's devices, which `-ts` and the estimate's GPU<k> follow: RPC
    devices first, in `--rpc` order, then the local GPUs (llama.cpp src/llama.cpp: "add RPC servers at the
    front of the list to minimize network transfers")."""
    return [c for c in chosen if c.gpu.remote] + [c for c in chosen if not c.gpu.remote]


def _hops(chosen: Sequence[DeviceCapacity]) -> list[str]:
    """A reason naming the workers a plan uses, when it uses any."""
    workers = sorted({c.gpu.worker or "?" for c in chosen if c.gpu.remote})
    if not workers:
        return []
    n_remote = sum(1 for c in chosen if c.gpu.remote)
    return [f"{n_remote} of the {len(chosen)} devices are on {len(workers)} other host(s) ({', '.join(workers)}): "
            "every extra host adds a network hop to each token, which costs tokens per second"]


def _single_gpu(params, settings, cands, policy):
    fitting = []
    for cap in cands:
        fits, resolved, est = _try(params, settings, [cap], [1.0], policy)
        if fits:
            fitting.append((cap, resolved, est))
    if not fitting:
        return None
    if policy.strategy is Strategy.PACK:
        return min(fitting, key=lambda f: (f[0].capacity_bytes, f[0].gpu.index))
    return max(fitting, key=lambda f: (f[0].capacity_bytes, -f[0].gpu.index))


def _place_with_split(params: ModelParams, settings: ServerSettings, caps: list[DeviceCapacity],
                      policy: Policy) -> Plan | None:
    """A -ts given by the user: exactly those shares over the first candidate GPUs, verified per device."""
    split = settings.tensor_split or ()
    chosen = device_order(sorted((c for c in caps if c.candidate), key=lambda c: (c.gpu.remote, c.gpu.index))[:len(split)])
    reasons = [c.reason for c in caps if c.reason]
    if len(chosen) < len(split):
        return None
    ids = tuple(c.gpu.index for c in chosen)
    fits, resolved, est = _try(params, settings, chosen, split, policy)
    if fits:
        reasons.append(f"fits on GPUs {list(ids)} with the given -ts {','.join(f'{s:g}' for s in split)}")
        reasons += _hops(chosen)
        return Plan(Fit.GPU if resolved.n_gpu_layers == params.n_layer + 1 else Fit.PARTIAL, ids, tuple(split),
                    resolved, est, tuple(caps), reasons=tuple(reasons))
    if policy.allow_partial:
        top = resolved.n_gpu_layers
        for ngl in range(top - 1, 0, -1):
            fits, resolved, est = _try(params, settings, chosen, split, policy, ngl)
            if fits:
                reasons.append(f"with the given -ts, only {ngl} of {params.n_layer + 1} layers fit on GPUs {list(ids)}")
                return Plan(Fit.PARTIAL, ids, tuple(split), resolved, est, tuple(caps), reasons=tuple(reasons))
    return None


def _place(params: ModelParams, settings: ServerSettings, caps: list[DeviceCapacity], policy: Policy) -> Plan:
    if settings.tensor_split and len(settings.tensor_split) > 1:
        planned = _place_with_split(params, settings, caps, policy)
        if planned is not None:
            return planned
        settings = replace(settings, tensor_split=None)  # the given split cannot work: plan as usual
    cands = preferred([c for c in caps if c.candidate])
    max_gpus = len(cands) if policy.max_gpus is None else min(policy.max_gpus, len(cands))
    reasons = [c.reason for c in caps if c.reason]
    full = resolve(settings, params, 1).n_gpu_layers if cands else 0
    wants_full = settings.n_gpu_layers is None or settings.n_gpu_layers >= params.n_layer + 1
    if cands and max_gpus >= 1 and wants_full:
        single = _single_gpu(params, settings, [c for c in cands if not c.gpu.remote], policy)
        if single:
            cap, resolved, est = single
            why = f"fits on GPU {cap.gpu.index} alone ({format_bytes(est.device('GPU0').total_bytes)} of {format_bytes(cap.capacity_bytes)} available)"
            return Plan(Fit.GPU, (cap.gpu.index,), None, resolved, est, tuple(caps), reasons=tuple(reasons + [why]))
        reasons.append("no single GPU holds the whole model")
        for k in range(1 if cands[0].gpu.remote else 2, max_gpus + 1):  # one local GPU was tried alone
            chosen = device_order(cands[:k])
            fits, split, resolved, est = _proportional_split(params, settings, chosen, policy)
            if fits:
                ids = tuple(c.gpu.index for c in chosen)
                reasons.append(f"fits on {k} GPU{'s' if k > 1 else ''} {list(ids)}" + (f" with -ts {','.join(f'{s:g}' for s in split)}"
                                                                  if k > 1 else ""))
                return Plan(Fit.GPU, ids, split if k > 1 else None, resolved, est, tuple(caps),
                            reasons=tuple(reasons + _hops(chosen)))
        if max_gpus >= 2:
            reasons.append(f"not even {max_gpus} GPUs hold the whole model")
    if cands and max_gpus >= 1 and policy.allow_partial and wants_full and settings.n_cpu_moe is None and params.n_expert:
        planned = _expert_offload(params, settings, cands[:max_gpus], policy)
        if planned is not None:
            n, ids, split, resolved, est = planned
            reasons.append(f"every layer on GPU {list(ids)} with the experts of the first {n} of {params.n_layer} "
                           f"layers on the CPU (--n-cpu-moe {n}): attention and KV stay on the GPU")
            return Plan(Fit.PARTIAL, ids, split, resolved, est, tuple(caps), reasons=tuple(reasons))
    if cands and max_gpus >= 1 and policy.allow_partial:
        chosen = device_order(cands[:max_gpus])
        top = min(full, settings.n_gpu_layers) if settings.n_gpu_layers is not None else full
        for ngl in range(top - (1 if wants_full else 0), 0, -1):
            if len(chosen) == 1:
                fits, resolved, est = _try(params, settings, chosen, [1.0], policy, ngl)
                split: tuple[float, ...] | None = None
            else:
                fits, split, resolved, est = _proportional_split(params, settings, chosen, policy, ngl)
            if fits:
                ids = tuple(c.gpu.index for c in chosen)
                reasons.append(f"partial offload: {ngl} of {params.n_layer + 1} layers on GPU {list(ids)}, the rest on the CPU")
                return Plan(Fit.PARTIAL, ids, split, resolved, est, tuple(caps), reasons=tuple(reasons))
        reasons.append("not even one layer fits on the GPUs")
    elif cands and not policy.allow_partial:
        reasons.append("partial offload refused (--no-partial)")
    if cands and settings.n_gpu_layers == 0:
        reasons = [r for r in reasons if not r.startswith("not even one layer")] + ["-ngl 0 asks for the CPU"]
    if not cands:
        reasons.append("no GPU to place on")
    resolved = resolve(replace(settings, n_gpu_layers=0), params, 0)
    est = estimate(params, resolved, Placement(cpu_repack_types=policy.cpu_repack_types))
    if policy.learned is not None:
        est = calibrated(est, policy.learned, ())
    host = est.device("CPU").total_bytes
    if policy.host_memory_bytes is not None and host > policy.host_memory_bytes:
        reasons.append(f"the CPU would need {format_bytes(host)}, {format_bytes(policy.host_memory_bytes)} of RAM is available")
        return Plan(Fit.NONE, (), None, None, est, tuple(caps), reasons=tuple(reasons))
    reasons.append(f"runs on the CPU ({format_bytes(host)})")
    return Plan(Fit.CPU, (), None, resolved, est, tuple(caps), reasons=tuple(reasons))


def _expert_offload(params: ModelParams, settings: ServerSettings, cands: Sequence[DeviceCapacity], policy: Policy):
    """The fewest leading layers whose experts must stay on the CPU for the rest to fit, on the fewest GPUs.

    GPU memory only falls as N grows, so N is found by bisection on each GPU count.
    """
    def attempt(chosen: Sequence[DeviceCapacity], n: int):
        trial = replace(settings, n_cpu_moe=n)
        if len(chosen) == 1:
            fits, resolved, est = _try(params, trial, chosen, [1.0], policy)
            return fits, None, resolved, est
        fits, split, resolved, est = _proportional_split(params, trial, chosen, policy)
        return fits, split, resolved, est

    for k in range(1, len(cands) + 1):
        chosen = device_order(cands[:k])
        if not attempt(chosen, params.n_layer)[0]:
            continue  # not even with every expert on the CPU
        lo, hi = 1, params.n_layer  # hi fits
        while lo < hi:
            mid = (lo + hi) // 2
            if attempt(chosen, mid)[0]:
                hi = mid
            else:
                lo = mid + 1
        fits, split, resolved, est = attempt(chosen, hi)
        return hi, tuple(c.gpu.index for c in chosen), split, resolved, est
    return None


def plan(params: ModelParams, settings: ServerSettings, gpus: Sequence[Gpu], policy: Policy = Policy(),
         instances: Sequence[RunningInstance] = ()) -> Plan:
    """Where to run `params` with `settings`, and which idle instances to evict if that would help."""
    caps = capacities(gpus, instances, policy)
    result = _place(params, settings, caps, policy)
    if result.fit is Fit.GPU:
        return result
    victims = evictions_for(params, settings, gpus, policy, instances)
    if victims:
        names = ", ".join(victims)
        return replace(result, evict=victims,
                       reasons=result.reasons + (f"evicting {names} (least recently used, idle) would let it run fully on GPU",))
    return result


def fits_beside(the_plan: Plan, gpus: Sequence[Gpu], instances: Sequence[RunningInstance], policy: Policy) -> bool:
    """Whether a plan made earlier still fits on its GPUs beside `instances` (re-checked when it is recorded:
    another launch may have claimed the memory meanwhile)."""
    if the_plan.estimate is None or not the_plan.gpu_ids:
        return True
    caps = {c.gpu.index: c.capacity_bytes for c in capacities(gpus, instances, policy)}
    need = {d.device: d.total_bytes for d in the_plan.estimate.devices}
    return all(need.get(f"GPU{k}", 0) <= caps.get(gpu, 0) for k, gpu in enumerate(the_plan.gpu_ids))


def relieve(gpus: Sequence[Gpu], gone: Sequence[RunningInstance]) -> list[Gpu]:
    """The GPUs as they would be without `gone`: memory the inventory shows them holding counted free again
    (promised memory is relieved by leaving them out of the instances alone)."""
    shown = [v for v in gone if v.shown]
    return [replace(g, memory_free_bytes=g.memory_free_bytes + sum(v.gpu_bytes.get(g.index, 0) for v in shown),
                    memory_used_bytes=max(g.memory_used_bytes - sum(v.gpu_bytes.get(g.index, 0) for v in shown), 0))
            for g in gpus]


FIT_RANK = {Fit.NONE: 0, Fit.CPU: 1, Fit.PARTIAL: 2, Fit.GPU: 3}


def evictions_for(params: ModelParams, settings: ServerSettings, gpus: Sequence[Gpu], policy: Policy,
                  instances: Sequence[RunningInstance], want: Fit = Fit.GPU) -> tuple[str, ...]:
    """The shortest least-recently-used prefix of idle instances whose memory would make the fit `want` (a
    GPU fit, unless asked for less) or better."""
    idle = evictable(instances)
    for n in range(1, len(idle) + 1):
        freed = idle[:n]
        gpus_after, remaining = without(gpus, instances, freed)
        fit = _place(params, settings, capacities(gpus_after, remaining, policy), policy).fit
        if FIT_RANK[fit] >= FIT_RANK[want]:
            return tuple(v.name for v in freed)
    return ()


def evictable(instances: Sequence[RunningInstance]) -> list[RunningInstance]:
    """The instances an eviction may take, least recently used first: idle and not loading."""
    return sorted((i for i in instances if i.idle and not i.starting), key=lambda i: i.last_used)


def without(gpus: Sequence[Gpu], instances: Sequence[RunningInstance],
            gone: Sequence[RunningInstance]) -> tuple[list[Gpu], list[RunningInstance]]:
    """The GPUs and the instances as they would be once `gone` stopped."""
    names = {i.name for i in gone}
    return relieve(gpus, gone), [i for i in instances if i.name not in names]
