"""Why a plan is what it is, and what would change it: per-GPU verdicts and checked what-ifs (`plan --explain`).

Pure: the same inputs as `placement.plan()`. A what-if is a change a user can make (llama-server flags taken by
`plan` as they are, or idle instances to evict) that puts the model wholly on GPUs with a better outcome than
the plan's: on one GPU beats on several GPUs, which beats partial offload, the CPU, no fit. Each is found by searching with the planner
(the largest `-c` in steps of llama.cpp's padding, the fewest `--n-cpu-moe` layers, the most `-np` slots, the
fewest least-recently-used idle instances) and then planned once more with the real policy, so what it
promises is what `plan` with those flags says. The cost stays bounded: a bisection per knob and target.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from llamactl.errors import UsageError
from llamactl.gpu.inventory import Gpu
from llamactl.model import quants
from llamactl.model.params import ModelParams
from llamactl.model.registry import BY_FIELD
from llamactl.model.settings import CTX_PAD, ServerSettings, resolve
from llamactl.placement import (DeviceCapacity, Fit, Plan, Policy, RunningInstance, evictable, need_alone, plan,
                                without)
from llamactl.units import format_bytes

CACHE_TYPES = ("q8_0", "q4_0")  # tried in this order: the first that helps costs the least quality


class Outcome(IntEnum):
    """A plan's result, ordered from worst to best."""

    NONE = 0
    CPU = 1
    PARTIAL = 2
    GPUS = 3  # wholly on several GPUs
    ONE_GPU = 4


def outcome(p: Plan | WhatIf) -> Outcome:
    if p.fit is Fit.GPU:
        return Outcome.ONE_GPU if len(p.gpu_ids) == 1 else Outcome.GPUS
    return {Fit.PARTIAL: Outcome.PARTIAL, Fit.CPU: Outcome.CPU}.get(p.fit, Outcome.NONE)


@dataclass(frozen=True)
class GpuVerdict:
    index: int
    verdict: str  # taken | rejected (not a candidate) | short (cannot hold the model alone) | spare (could, not used)
    capacity_bytes: int  # what the model may use there: free − promised − margin
    share_bytes: int | None  # what the plan puts there (None: not taken)
    alone_bytes: int | None  # what the whole model would need there alone (None: rejected, not weighed)
    text: str

    @property
    def short_bytes(self) -> int | None:
        """How much more the GPU would need to hold the whole model alone (None: it would, or was not weighed)."""
        if self.alone_bytes is None or self.alone_bytes <= self.capacity_bytes:
            return None
        return self.alone_bytes - self.capacity_bytes


@dataclass(frozen=True)
class WhatIf:
    flags: tuple[str, ...]  # llama-server arguments to add or change, as `plan` takes them
    fit: Fit
    gpu_ids: tuple[int, ...]
    text: str
    evict: tuple[str, ...] = ()  # instances that must stop first (`llamactl evict NAME...`)


@dataclass(frozen=True)
class Explanation:
    outcome: Outcome
    gpus: tuple[GpuVerdict, ...]
    what_ifs: tuple[WhatIf, ...]


def explain(params: ModelParams, settings: ServerSettings, gpus: Sequence[Gpu], policy: Policy = Policy(),
            running: Sequence[RunningInstance] = (), now: Plan | None = None) -> Explanation:
    """Each GPU's verdict in the plan for these inputs (`now`, when already made) and the what-ifs that beat it."""
    now = now or plan(params, settings, gpus, policy, running)
    search = _Search(params, settings, tuple(gpus), policy, tuple(running), outcome(now))
    found: list[WhatIf] = []
    for knob in (_all_layers, _context, _cache_types, _slots, _expert_offload, _evictions):
        for what_if in knob(search):
            if all((w.flags, w.evict) != (what_if.flags, what_if.evict) for w in found):
                found.append(what_if)
    return Explanation(outcome(now), verdicts(params, settings, now, policy), tuple(found))


def verdicts(params: ModelParams, settings: ServerSettings, now: Plan, policy: Policy) -> tuple[GpuVerdict, ...]:
    """Why each GPU was taken or left: its share of the plan, the threshold it broke, or how far short it is."""
    return tuple(_verdict(params, settings, now, policy, cap) for cap in now.capacities)


def _verdict(params: ModelParams, settings: ServerSettings, now: Plan, policy: Policy,
             cap: DeviceCapacity) -> GpuVerdict:
    index, available = cap.gpu.index, cap.capacity_bytes
    if not cap.candidate:
        return GpuVerdict(index, "rejected", available, None, None, f"rejected: {cap.reason}")
    alone = need_alone(params, settings, cap, policy)
    short = (f"short by {format_bytes(alone - available)} for the whole model alone "
             f"(needs {format_bytes(alone)}, {format_bytes(available)} available)")
    if index in now.gpu_ids:
        assert now.estimate is not None
        share = now.estimate.device(f"GPU{now.gpu_ids.index(index)}").total_bytes
        text = f"GPU {index} taken: {format_bytes(share)} of {format_bytes(available)} available"
        return GpuVerdict(index, "taken", available, share, alone, text + (f"; {short}" if alone > available else ""))
    if alone > available:
        return GpuVerdict(index, "short", available, None, alone, f"GPU {index} {short}")
    chosen = ", ".join(map(str, now.gpu_ids))
    why = (f"GPU {chosen} preferred (--strategy {policy.strategy.value})" if now.fit is Fit.GPU and chosen
           else "not used by this plan")
    return GpuVerdict(index, "spare", available, None, alone,
                      f"GPU {index} would hold it alone ({format_bytes(alone)} of {format_bytes(available)}); {why}")


@dataclass(frozen=True)
class _Search:
    params: ModelParams
    settings: ServerSettings
    gpus: tuple[Gpu, ...]
    policy: Policy
    running: tuple[RunningInstance, ...]
    now: Outcome

    def targets(self) -> tuple[Outcome, ...]:
        """The better outcomes worth searching for, the easier first."""
        return tuple(o for o in (Outcome.GPUS, Outcome.ONE_GPU) if o > self.now)

    def reaches(self, target: Outcome, gpus: Sequence[Gpu] | None = None,
                running: Sequence[RunningInstance] | None = None, **changes: Any) -> bool:
        """Whether the settings with `changes` plan at `target` or better. A whole-GPU fit never depends on
        partial offload being allowed, so the search skips weighing it."""
        trial = self._plan(replace(self.policy, allow_partial=False), gpus, running, changes)
        return trial is not None and outcome(trial) >= target

    def checked(self, flags: Sequence[str], note: str, gpus: Sequence[Gpu] | None = None,
                running: Sequence[RunningInstance] | None = None, evict: tuple[str, ...] = (),
                **changes: Any) -> WhatIf | None:
        """The what-if as the real planner sees it; None unless it is wholly on GPUs and beats the plan."""
        result = self._plan(self.policy, gpus, running, changes)
        if result is None or outcome(result) < Outcome.GPUS or outcome(result) <= self.now:
            return None
        lead = f"llamactl evict {' '.join(evict)}" if evict else shlex.join(flags)
        return WhatIf(tuple(flags), result.fit, result.gpu_ids, f"{lead}: {_where(result)} ({note})", evict)

    def _plan(self, policy: Policy, gpus: Sequence[Gpu] | None, running: Sequence[RunningInstance] | None,
              changes: dict[str, Any]) -> Plan | None:
        try:
            return plan(self.params, replace(self.settings, **changes), self.gpus if gpus is None else gpus, policy,
                        self.running if running is None else running)
        except UsageError:  # a value llama.cpp refuses for this model (a cache block that does not divide a head)
            return None


def _where(p: Plan) -> str:
    ids = ", ".join(map(str, p.gpu_ids))
    where = f"fits on GPU {ids} alone" if len(p.gpu_ids) == 1 else f"fits on GPUs {ids}"
    if p.n_cpu_moe:
        where += f", the experts of {p.n_cpu_moe} layers on the CPU"
    return where


def _flag(field: str) -> str:
    return BY_FIELD[field].flags[0]


def _all_layers(s: _Search) -> Iterator[WhatIf]:
    """Every layer on the GPUs, when -ngl asks for fewer (a plan never overrides a given -ngl)."""
    given = s.settings.n_gpu_layers
    if s.targets() and given is not None and given < s.params.n_layer + 1:
        found = s.checked([_flag("n_gpu_layers"), "all"], f"every layer, not {given}", n_gpu_layers=None)
        if found:
            yield found


def _context(s: _Search) -> Iterator[WhatIf]:
    """The largest -c (a multiple of llama.cpp's padding) that fits, for each better outcome."""
    ctx_size = resolve(s.settings, s.params, 1).ctx_size
    for target in s.targets():
        steps = _largest(1, (ctx_size - 1) // CTX_PAD, lambda k: s.reaches(target, ctx_size=k * CTX_PAD))
        if steps is not None:
            c = steps * CTX_PAD
            found = s.checked([_flag("ctx_size"), str(c)], "the largest context that does", ctx_size=c)
            if found:
                yield found


def _cache_types(s: _Search) -> Iterator[WhatIf]:
    """A smaller KV cache type for K and V, each tried only when it beats the smaller types' outcome."""
    current = max(_element_bytes(s.settings.cache_type_k), _element_bytes(s.settings.cache_type_v))
    best = s.now
    for kind in CACHE_TYPES:
        if not s.targets() or _element_bytes(kind) >= current:
            continue
        flags = [_flag("cache_type_k"), kind, _flag("cache_type_v"), kind]
        flash = s.settings.flash_attn
        if flash == "off":  # a quantized V cache needs flash attention
            flags += [_flag("flash_attn"), "on"]
            flash = "on"
        found = s.checked(flags, f"a {kind} KV cache", cache_type_k=kind, cache_type_v=kind, flash_attn=flash)
        if found and outcome(found) > best:
            best = outcome(found)
            yield found


def _slots(s: _Search) -> Iterator[WhatIf]:
    """The most -np slots below the given number that fit, for each better outcome (only when -np is given)."""
    given = s.settings.parallel
    if not given or given <= 1:
        return
    for target in s.targets():
        n = _largest(1, given - 1, lambda k: s.reaches(target, parallel=k))
        if n is not None:
            found = s.checked([_flag("parallel"), str(n)], f"{n} slot{'s' if n > 1 else ''} instead of {given}",
                              parallel=n)
            if found:
                yield found


def _expert_offload(s: _Search) -> Iterator[WhatIf]:
    """For a mixture of experts: the fewest leading layers whose experts stay on the CPU, for each better outcome."""
    if not s.params.n_expert:
        return
    first = (s.settings.n_cpu_moe or 0) + 1
    for target in s.targets():
        n = _smallest(first, s.params.n_layer, lambda k: s.reaches(target, n_cpu_moe=k))
        if n is not None:
            found = s.checked([_flag("n_cpu_moe"), str(n)], "the fewest expert layers on the CPU that do", n_cpu_moe=n)
            if found:
                yield found


def _evictions(s: _Search) -> Iterator[WhatIf]:
    """The fewest least-recently-used idle instances whose memory would give each better outcome."""
    idle = evictable(s.running)
    for target in s.targets():
        for n in range(1, len(idle) + 1):
            gpus, running = without(s.gpus, s.running, idle[:n])
            if s.reaches(target, gpus, running):
                names = tuple(i.name for i in idle[:n])
                found = s.checked((), "least recently used, idle", gpus, running, evict=names)
                if found:
                    yield found
                break


def _element_bytes(kind: str) -> float:
    per_block, block_bytes = quants.sizes(quants.by_name(kind))
    return block_bytes / per_block


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest n in lo..hi with ok(n), by bisection (ok holds below any n where it holds); None if not at lo."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest n in lo..hi with ok(n) (ok holds above any n where it holds); None if not at hi."""
    k = _largest(0, hi - lo, lambda k: ok(hi - k))
    return None if k is None else hi - k


def explain_json(e: Explanation) -> dict[str, object]:
    """`plan --json --explain`'s "explain" object."""
    return {
        "outcome": e.outcome.name.lower(),
        "gpus": [{"index": v.index, "verdict": v.verdict, "capacity_bytes": v.capacity_bytes,
                  "share_bytes": v.share_bytes, "alone_bytes": v.alone_bytes, "short_bytes": v.short_bytes,
                  "text": v.text} for v in e.gpus],
        "what_ifs": [{"flags": list(w.flags), "evict": list(w.evict), "fit": w.fit.value, "gpu_ids": list(w.gpu_ids),
                      "text": w.text} for w in e.what_ifs],
    }
