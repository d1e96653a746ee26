"""`llamactl plan` with no model (or `--all`): the fleet plan of every configured model, for people and CI."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import typer

from llamactl import render
from llamactl.errors import ExitCode, UsageError
from llamactl.fleet import FleetPlan, Placed, plan_configured
from llamactl.gpu.inventory import Inventory
from llamactl.resolve import Overrides
from llamactl.servers.probe import locate
from llamactl.units import format_bytes


def run(ctx: typer.Context, cfg: Any, inv: Inventory, placement: dict[str, Any], server_bin: str | None,
        as_json: bool) -> None:
    """Plan every configured model together; exit 0 when every preload and pin model is resident, else 4."""
    from llamactl.cli.common import state_store

    if not cfg.models:
        where = f" in {cfg.source}" if cfg.source else " (no config file: give --config or a MODEL)"
        raise UsageError(f"no models configured{where}")
    store = state_store(ctx)
    result = plan_configured(cfg, inv, store.dir, lambda: locate(server_bin, cfg.server_bin, required=False),
                             store.snapshot(), Overrides(placement=placement))
    render.result(as_json, Fleet(result, inv), exit_code=int(ExitCode.OK if result.ok else ExitCode.NO_FIT))


def _model_json(p: Placed) -> dict[str, object]:
    return {"name": p.name, "resident": p.resident, "preload": p.residency.preload, "pin": p.residency.pin,
            "priority": p.residency.priority, "spill": p.residency.spill, "fit": p.plan.fit.value,
            "gpu_ids": list(p.plan.gpu_ids), "tensor_split": list(p.plan.tensor_split) if p.plan.tensor_split else None,
            "n_gpu_layers": p.plan.n_gpu_layers, "gpu_bytes": {str(k): v for k, v in p.gpu_bytes.items()},
            "total_bytes": p.plan.estimate.total_bytes if p.plan.estimate is not None else None,
            "evict": list(p.evict), "reasons": list(p.reasons)}


@dataclass(frozen=True)
class Fleet:
    """The fleet plan as `plan` (no model) shows it."""

    plan: FleetPlan
    inv: Inventory

    def to_json(self) -> dict[str, object]:
        return fleet_json(self.plan, self.inv)

    def text(self) -> Iterator[str]:
        return _lines(self.plan, self.inv)


def fleet_json(result: FleetPlan, inv: Inventory) -> dict[str, object]:
    return {"ok": result.ok, "preload_order": list(result.preload_order()),
            "models": [_model_json(p) for p in result.models],
            "gpus": [{"index": g.index, "name": g.name, "total_bytes": g.memory_total_bytes,
                      "free_bytes": g.memory_free_bytes, "free_after_bytes": result.free_after.get(g.index)}
                     for g in inv.usable]}


def _lines(result: FleetPlan, inv: Inventory) -> Iterator[str]:
    resident = [p for p in result.models if p.resident]
    yield (f"{len(resident)} of {len(result.models)} models resident at once"
          f"{f' on {len(inv.usable)} GPUs' if inv.usable else ' (no GPU)'}; "
          + ("every preload and pin model fits." if result.ok else "NOT every preload and pin model fits."))
    rows = []
    for p in result.models:
        flags = ",".join(f for f, on in (("preload", p.residency.preload), ("pin", p.residency.pin),
                                          ("gpu-only", not p.residency.spill)) if on) or "-"
        where = ",".join(map(str, p.plan.gpu_ids)) if p.plan.gpu_ids else ("CPU" if p.plan.fit.value == "cpu" else "-")
        size = format_bytes(p.plan.estimate.total_bytes) if p.plan.estimate is not None else "-"
        note = "; ".join(p.reasons) if not p.resident else ""
        rows.append([p.name, "yes" if p.resident else "no", flags, str(p.residency.priority), p.plan.fit.value,
                     where, size, note])
    yield render.table(rows, ["MODEL", "RESIDENT", "FLAGS", "PRIO", "FIT", "GPUS", "MEMORY", "NOTE"], align_right_from=8)
    if inv.usable:
        yield ""
        yield render.table([[str(g.index), g.name, format_bytes(g.memory_total_bytes), format_bytes(g.memory_free_bytes),
                             format_bytes(result.free_after.get(g.index, 0))] for g in inv.usable],
                           ["GPU", "NAME", "TOTAL", "FREE NOW", "FREE AFTER"], align_right_from=2)
    if result.preload_order():
        yield f"\nthe proxy preloads, in order: {', '.join(result.preload_order())}"
