"""A plan for the whole fleet: every configured model placed together on one inventory, pure.

The order is the residency order: preloaded and pinned models first (in config order), then by priority
(highest first), then in config order. Each model in turn is planned beside the ones already resident: it
is resident too when it runs there as well as it would alone (and within max_instances); otherwise it runs
only by evicting residents (the lowest priority, last placed first; never a pinned one), or not at all
(the reasons say why). `llamactl plan` with no model prints this, and the proxy's start-up preloads the
`preload` models this plan makes resident, in this order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl.gpu.inventory import Gpu
from llamactl.model.params import ModelParams
from llamactl.model.registry import Residency, ServerSettings
from llamactl.placement import FIT_RANK, Fit, Plan, Policy, RunningInstance, evictable, evictions_for, plan

if TYPE_CHECKING:
    from llamactl.config import Config
    from llamactl.gpu.inventory import Inventory
    from llamactl.resolve import Overrides
    from llamactl.servers.probe import Server
    from llamactl.servers.state import Instance


@dataclass(frozen=True)
class Entry:
    """One configured model as the fleet plan takes it."""

    name: str
    residency: Residency
    params: ModelParams
    settings: ServerSettings
    policy: Policy


@dataclass(frozen=True)
class Placed:
    name: str
    residency: Residency
    plan: Plan  # beside the residents placed before it (when resident), else alone
    resident: bool  # runs at once with every resident placed before it
    evict: tuple[str, ...] = ()  # not resident: the residents that would have to go for it to run as well as alone
    reasons: tuple[str, ...] = ()

    @property
    def gpu_bytes(self) -> dict[int, int]:
        """What it holds per GPU index (its estimate's GPU<k> on gpu_ids[k])."""
        if self.plan.estimate is None:
            return {}
        by_device = {d.device: d.total_bytes for d in self.plan.estimate.devices}
        return {gpu: by_device.get(f"GPU{k}", 0) for k, gpu in enumerate(self.plan.gpu_ids)}


@dataclass(frozen=True)
class FleetPlan:
    models: tuple[Placed, ...]
    free_after: dict[int, int]  # GPU index → bytes still free once every resident runs

    @property
    def ok(self) -> bool:
        """Every preload and pin model is resident at once."""
        return all(p.resident for p in self.models if p.residency.preload or p.residency.pin)

    def preload_order(self) -> tuple[str, ...]:
        """The models the proxy starts at start-up, in order."""
        return tuple(p.name for p in self.models if p.resident and p.residency.preload)


def order(entries: Sequence[Entry]) -> list[Entry]:
    """Preloaded and pinned first, then by priority (highest first); config order breaks ties."""
    ranked = sorted(enumerate(entries), key=lambda ie: (not (ie[1].residency.preload or ie[1].residency.pin),
                                                         -ie[1].residency.priority, ie[0]))
    return [e for _, e in ranked]


def _acceptable(fit: Fit, residency: Residency) -> bool:
    return fit is Fit.GPU or (fit is not Fit.NONE and residency.spill)


def plan_fleet(entries: Sequence[Entry], gpus: Sequence[Gpu], max_instances: int | None = None, *,
               whole_gpus: bool = False) -> FleetPlan:
    """`whole_gpus`: a resident holds every GPU it uses whole (a Kubernetes pod's GPUs are its own), so a
    later model is placed only on GPUs no resident uses."""
    total = {g.index: g.memory_total_bytes for g in gpus}
    placed: list[Placed] = []
    residents: list[RunningInstance] = []
    for entry in order(entries):
        alone = plan(entry.params, entry.settings, gpus, entry.policy, ())
        if not _acceptable(alone.fit, entry.residency):
            why = alone.reasons[-1:] if alone.fit is Fit.NONE else (
                f"it would run {'partially on GPUs' if alone.fit is Fit.PARTIAL else 'on the CPU'} and has spill = false",)
            placed.append(Placed(entry.name, entry.residency, alone, False, reasons=tuple(why)))
            continue
        beside = plan(entry.params, entry.settings, gpus, entry.policy, residents)
        full = max_instances is not None and len(residents) >= max_instances
        if not full and FIT_RANK[beside.fit] >= FIT_RANK[alone.fit]:
            here = Placed(entry.name, entry.residency, beside, True)
            placed.append(here)
            # promised, not evictable: the next models plan beside it
            held = {i: total[i] for i in here.plan.gpu_ids} if whole_gpus else here.gpu_bytes
            residents.append(RunningInstance(entry.name, held, last_used=-len(residents), idle=False,
                                             visible=False))
            continue
        # the residents it may evict: every one but the pinned, the last placed (lowest ranked) first
        residents_now = [replace(r, idle=not _pinned(r.name, placed)) for r in residents]
        if full:
            victims = tuple(r.name for r in evictable(residents_now)[:1])
            why = f"max_instances ({max_instances}) reached"
        else:
            victims = evictions_for(entry.params, entry.settings, gpus, entry.policy, residents_now, alone.fit)
            why = f"no room beside {', '.join(r.name for r in residents)}"
        if victims:
            why += f"; runs by evicting {', '.join(victims)}"
        placed.append(Placed(entry.name, entry.residency, alone, False, victims, (why,)))
    free_after = {g.index: g.memory_free_bytes - sum(r.gpu_bytes.get(g.index, 0) for r in residents) for g in gpus}
    return FleetPlan(tuple(placed), free_after)


def _pinned(name: str, placed: Sequence[Placed]) -> bool:
    return any(p.name == name and p.residency.pin for p in placed)


def plan_configured(cfg: Config, inv: Inventory, state_dir: Path | None, server: Server | Callable[[], Server],
                    instances: dict[str, Instance] | None = None, given: Overrides | None = None) -> FleetPlan:
    """The fleet plan of every configured model on `inv`, each resolved as every door resolves it (headers
    read, calibration applied). Running instances of configured models are planned as if stopped: the plan
    is what the fleet looks like from a start."""
    from llamactl.errors import LlamactlError
    from llamactl.placement import relieve
    from llamactl.resolve import Overrides, open_door
    from llamactl.servers.launcher import running_for_placement

    entries, broken = [], []
    for name, model in cfg.models.items():
        try:
            door = open_door(cfg, name, given or Overrides(), inv, state_dir, server, need_server=False)
        except LlamactlError as exc:
            broken.append(Placed(name, model.residency, Plan(Fit.NONE, (), None, None, None, ()), False,
                                 reasons=(str(exc),)))
            continue
        entries.append(Entry(name, model.residency, door.params, door.spec.settings, door.policy))
    ours = [r for r in running_for_placement(instances or {}, inv=inv) if r.name in cfg.models]
    result = plan_fleet(entries, relieve(inv.usable, ours), cfg.max_instances)
    return replace(result, models=result.models + tuple(broken))
