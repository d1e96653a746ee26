"""`llamactl plan MODEL`: choose GPUs, split and layers; print the exact llama-server command.

The exit code answers a CI fit check: 0 fully on GPU(s), 3 only partially
offloaded or on the CPU, 4 does not fit at all, 2 bad input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import typer

from llamactl import render
from llamactl.cli.common import load_config, state_store, wants_json
from llamactl.cli.estimate import device_lines, summary_lines
from llamactl.cli.complete import model_names
from llamactl.cli.options import INVENTORY, POLICY, SERVER, InventoryOptions, SettingsFlags, with_options
from llamactl.errors import ExitCode, UsageError
from llamactl.model.params import ModelParams
from llamactl.placement import Fit, Plan
from llamactl.servers.command import ServerCommand, check_extra_args
from llamactl.servers.launcher import command_for, plan_for
from llamactl.resolve import Overrides, open_door
from llamactl.servers.probe import locate

if TYPE_CHECKING:
    from llamactl.explain import Explanation

_EXIT = {Fit.GPU: ExitCode.OK, Fit.PARTIAL: ExitCode.PARTIAL_FIT, Fit.CPU: ExitCode.PARTIAL_FIT, Fit.NONE: ExitCode.NO_FIT}


def decision(result: Plan, model: str) -> str:
    if result.fit is Fit.GPU and len(result.gpu_ids) == 1:
        return f"{model} fits on GPU {result.gpu_ids[0]}."
    if result.fit is Fit.GPU:
        return f"{model} fits on GPUs {', '.join(map(str, result.gpu_ids))}, split {_split_text(result)}."
    if result.fit is Fit.PARTIAL and result.n_cpu_moe:
        return (f"{model} fits with the experts of {result.n_cpu_moe} layers on the CPU (--n-cpu-moe), "
                f"everything else on GPU {', '.join(map(str, result.gpu_ids))}.")
    if result.fit is Fit.PARTIAL:
        return (f"{model} fits only partially: {result.n_gpu_layers} of its layers on GPU "
                f"{', '.join(map(str, result.gpu_ids))}, the rest on the CPU.")
    if result.fit is Fit.CPU:
        return f"{model} runs on the CPU only."
    return f"{model} does not fit."


def _split_text(result: Plan) -> str:
    return ",".join(f"{s:g}" for s in result.tensor_split or ())


def plan_json(result: Plan, cmd: ServerCommand | None) -> dict[str, object]:
    caps = {f"GPU{i}": c.capacity_bytes for i, c in enumerate(c for gid in result.gpu_ids for c in result.capacities
                                                           if c.gpu.index == gid)}
    index_of = {f"GPU{i}": gid for i, gid in enumerate(result.gpu_ids)}
    devices = []
    if result.estimate is not None:
        for d in result.estimate.devices:
            devices.append({
                "device": d.device, "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes,
                "recurrent_bytes": d.recurrent_bytes, "compute_bytes": d.compute_bytes,
                "output_bytes": d.output_bytes, "overhead_bytes": d.overhead_bytes, "total_bytes": d.total_bytes,
                "capacity_bytes": caps.get(d.device), "gpu_index": index_of.get(d.device),
            })
    return {
        "fit": result.fit.value,
        "gpu_ids": list(result.gpu_ids),
        "tensor_split": list(result.tensor_split) if result.tensor_split else None,
        "n_gpu_layers": result.n_gpu_layers,
        "n_cpu_moe": result.n_cpu_moe,
        "argv": list(cmd.argv) if cmd else [],
        "env": dict(cmd.env) if cmd else {},
        "devices": devices,
        "evict": list(result.evict),
        "reasons": list(result.reasons),
        "calibration": list(result.estimate.calibration) if result.estimate is not None else [],
    }


@with_options(SERVER, INVENTORY, POLICY)
def command(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, metavar="MODEL", autocompletion=model_names,
                                          help="GGUF file (any shard of a split model), or a model name from the "
                                               "config; none: the fleet plan of every configured model."),
    extra: Optional[list[str]] = typer.Argument(None, metavar="-- EXTRA", help="Extra llama-server arguments."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                       help="Port for the llama-server command line (default: the config's port_start)."),
    server_bin: Optional[str] = typer.Option(None, "--server-bin", help="llama-server binary (else $LLAMA_SERVER, PATH)."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
    every: bool = typer.Option(False, "--all", help="The fleet plan of every configured model (as with no MODEL)."),
    explain: bool = typer.Option(False, "--explain",
                                 help="Why each GPU was taken or rejected, and the flags that would make it fit "
                                      "better (each checked by planning it)."),
    *,
    settings: SettingsFlags,
    inv: InventoryOptions,
    placement: dict,
) -> None:
    """Choose GPUs, tensor split and layers; print the llama-server command. Exit 0 GPU, 3 partial/CPU, 4 no fit.

    A configured model name plans with its config settings and placement; the flags given here override them.
    """
    cfg = load_config(ctx)
    inv = inv.with_workers(cfg)
    if model is None or every:
        if model is not None or extra or settings.given:
            raise UsageError("the fleet plan (no MODEL, or --all) takes no model, llama-server flags or extra "
                             "arguments: each model runs with its config")
        from llamactl.cli import fleet

        return fleet.run(ctx, cfg, inv.inventory, {**inv.given, **placement}, server_bin,
                         wants_json(ctx, json_output))
    check_extra_args(list(extra or []))
    store = state_store(ctx)
    door = open_door(cfg, model, Overrides(settings=settings.given, placement={**inv.given, **placement},
                                           extra_args=tuple(extra or ())),
                     inv.inventory, store.dir, lambda: locate(server_bin, cfg.server_bin, required=False))
    assert door.server is not None
    spec, req = door.spec, door.request()
    # llamactl's own instances on this box (NVML, or a simulated inventory standing for it) are accounted
    # exactly and proposed for eviction; a --gpus-file describes another box as it was measured
    instances = store.snapshot()
    result = plan_for(req, inv.inventory, instances)
    cmd = None
    note = "; ".join(n for n in (inv.inventory.note, door.server.note) if n) or None
    if result.resolved is not None:  # the command `launch` runs: byte for byte but the port it finds free
        cmd = command_for(req, result, door.server.binary, door.server.caps, inv.inventory, port or spec.port_start)
    explained = None
    if explain:
        from llamactl.cli.explained import for_request

        explained = for_request(req, door.params, inv.inventory, instances, result)
    render.result(wants_json(ctx, json_output), Planned(result, cmd, str(spec.path), door.params, note, explained),
                  exit_code=int(_EXIT[result.fit]))


@dataclass(frozen=True)
class Planned:
    """plan's result: the decision, the model and settings, the devices with their headroom, the command."""

    plan: Plan
    cmd: ServerCommand | None
    model: str
    params: ModelParams
    note: str | None
    explained: "Explanation | None" = None

    def to_json(self) -> dict[str, object]:
        data = plan_json(self.plan, self.cmd)
        if self.explained is not None:
            from llamactl.explain import explain_json

            data["explain"] = explain_json(self.explained)
        return data

    def text(self) -> Iterator[str]:
        result = self.plan
        yield decision(result, self.model)
        for reason in result.reasons:
            yield f"  - {reason}"
        if result.estimate is not None and result.resolved is not None:
            yield ""
            yield from summary_lines(self.model, self.params, result.resolved, self.note)
            yield ""
            chosen = [c for gid in result.gpu_ids for c in result.capacities if c.gpu.index == gid]
            capacity = {f"GPU{i}": c.capacity_bytes for i, c in enumerate(chosen)}
            yield from device_lines(result.estimate, capacity if chosen else None)
            if result.evict:
                yield f"\nto run fully on GPU, evict: {', '.join(result.evict)}"
            if self.cmd is not None:
                yield f"\ncommand:\n  {self.cmd.shell()}"
        if self.explained is not None:
            from llamactl.cli.explained import explanation_lines

            yield from explanation_lines(self.explained)


def register(app: typer.Typer) -> None:
    app.command("plan", context_settings={"allow_interspersed_args": True})(command)

