"""`plan --explain`: the explanation of a door's plan (llamactl/explain.py) on the plan's own inputs, as text."""

from __future__ import annotations

from collections.abc import Iterator

from llamactl import render
from llamactl.explain import Explanation, Outcome, explain
from llamactl.gpu.inventory import Inventory
from llamactl.model.params import ModelParams
from llamactl.placement import Plan
from llamactl.servers.launcher import LaunchRequest, running_for_placement
from llamactl.servers.state import Instance


def for_request(req: LaunchRequest, params: ModelParams, inv: Inventory, instances: dict[str, Instance],
                now: Plan) -> Explanation:
    """Why `now` (launcher.plan_for's plan of `req`) is what it is, on the GPUs and instances it planned with."""
    return explain(params, req.settings, inv.usable, req.policy,
                   running_for_placement(instances, req.protected, inv), now)


def explanation_lines(e: Explanation) -> Iterator[str]:
    yield "\nexplain:"
    for verdict in e.gpus:
        yield f"  - {render.safe(verdict.text)}"
    if e.outcome is Outcome.ONE_GPU:
        yield "  it fits on one GPU: nothing to change"
    elif not e.what_ifs:
        yield "  no change of -ngl, -c, cache type, -np, --n-cpu-moe or idle instances makes it fit better"
    else:
        yield "  what would make it fit better (each checked by planning it):"
        for what_if in e.what_ifs:
            yield f"  - {render.safe(what_if.text)}"
