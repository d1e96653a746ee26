"""`llamactl k8s render NAME|--all`: Kubernetes manifests for models planned on a node type, as `plan` plans a box.

Each model goes through the door `plan` uses (resolve, header, policy) onto the node type's inventory; its pod
runs plan's argv (paths in the model volume, --host and --port the pod's). A model that would not run wholly
on the node type's GPUs is refused with plan's reasons (exit 4) unless --allow-partial; `--all` packs the
configured models onto as few nodes as the fleet plan finds room on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from llamactl import k8s, render
from llamactl.cli.common import load_config, state_store, wants_json
from llamactl.cli.complete import model_names
from llamactl.errors import NoFitError, UsageError
from llamactl.placement import Fit, Plan

if TYPE_CHECKING:
    from llamactl.config import Config
    from llamactl.gpu.inventory import Inventory
    from llamactl.model.registry import Residency
    from llamactl.resolve import Door
    from llamactl.servers.probe import Server


def group() -> None:
    """Kubernetes manifests for models planned on a node type: GPUs, argv, probes, memory, as plan plans one box."""


@dataclass(frozen=True)
class Rendered:
    """One model on the node type: its door, its plan alone there, and its pod."""

    door: "Door"
    residency: "Residency"
    plan: Plan
    workload: k8s.Workload | None  # None: refused


def render_command(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, metavar="NAME", autocompletion=model_names,
                                         help="A configured model's name (or a GGUF file)."),
    every: bool = typer.Option(False, "--all", help="Every configured model, packed onto as few nodes as fit."),
    gpus_file: str = typer.Option(..., "--gpus-file", metavar="FILE",
                                  help="The node type: a file as `llamactl --json gpus --gpus 8x80GiB` writes."),
    gpu_product: Optional[str] = typer.Option(None, "--gpu-product", metavar="LABEL",
                                              help="nvidia.com/gpu.product to select nodes by (default: from the "
                                                   "GPU name in the file)."),
    model_volume: str = typer.Option(k8s.DEFAULT_VOLUME, "--model-volume", metavar="VOLUME",
                                     help=f"What holds the model files, mounted at {k8s.MODELS_DIR}: pvc:CLAIM or "
                                          "host:/PATH."),
    image: str = typer.Option(k8s.DEFAULT_IMAGE, "--image", metavar="IMAGE",
                              help="Container image whose entrypoint is llama-server."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Render a model that offloads to host memory instead of refusing it."),
    json_output: bool = typer.Option(False, "--json", help="A JSON list of the objects instead of YAML."),
) -> None:
    """Print a Deployment and a Service per model; exit 4 when a model would not run wholly on the GPUs."""
    from llamactl.gpu import inventory

    if (name is None) == (not every):
        raise UsageError("give a model NAME or --all (every configured model), one of them")
    cfg = load_config(ctx)
    if every and not cfg.models:
        where = f" in {cfg.source}" if cfg.source else " (no config file: give --config or a NAME)"
        raise UsageError(f"no models configured{where}")
    inv = inventory.resolve(None, gpus_file)
    node = k8s.node_type(inv, gpu_product)
    volume = k8s.Volume.parse(model_volume)
    state_dir = state_store(ctx).dir
    rendered = [_render(cfg, model, inv, state_dir, allow_partial)
                for model in (list(cfg.models) if every else [name])]
    refused = [r for r in rendered if r.workload is None]
    if refused:
        raise NoFitError("; ".join(_refusal(r, node) for r in refused)
                         + ("" if allow_partial else " (--allow-partial renders a pod that offloads to host memory)"))
    workloads = _placed(rendered, inv) if every else [r.workload for r in rendered if r.workload is not None]
    _check_names(workloads)
    render.result(wants_json(ctx, json_output), Manifests(tuple(workloads), node, image, volume))


def image_server() -> "Server":
    """The llama-server a pod runs: the image's, taken to be a current build (as `plan` without a binary)."""
    from llamactl.servers.command import ASSUMED_FLAGS
    from llamactl.servers.probe import Server, ServerCaps

    return Server("llama-server", ServerCaps("llama-server", "assumed", None, ASSUMED_FLAGS),
                  "the image's llama-server is taken to be a current build")


def _render(cfg: "Config", model: str, inv: "Inventory", state_dir: Path, allow_partial: bool) -> Rendered:
    """The model planned alone on the node type, and its pod unless it would not run there as asked."""
    from llamactl.resolve import Overrides, open_door
    from llamactl.servers.launcher import command_for, plan_for

    door = open_door(cfg, model, Overrides(), inv, state_dir, image_server())
    req = replace(door.request(), host=k8s.POD_HOST)
    plan = plan_for(req, inv, {})  # a node of the type, as the file describes it: nothing of ours runs there
    configured = cfg.models.get(door.spec.name) if door.spec.configured else None
    residency = configured.residency if configured is not None else cfg.residency
    if plan.fit is Fit.NONE or (plan.fit is not Fit.GPU and not (allow_partial and residency.spill)):
        return Rendered(door, residency, plan, None)
    assert door.server is not None and plan.estimate is not None
    cmd = command_for(req, plan, door.server.binary, door.server.caps, inv, k8s.POD_PORT)
    shards, others = _model_files(door)
    files = k8s.pod_files([*shards, *others])
    workload = k8s.Workload(
        model=door.spec.name, name=k8s.object_name(door.spec.name), args=k8s.pod_args(cmd.argv, files),
        files=tuple(os.path.basename(p) for p in files), fit=plan.fit, gpus=len(plan.gpu_ids),
        device_bytes=tuple((d.device, d.total_bytes) for d in plan.estimate.devices),
        load_bytes=door.params.file_bytes + sum(map(_size, others)))  # file_bytes: every shard's
    return Rendered(door, residency, plan, workload)


def _model_files(door: "Door") -> tuple[list[str], list[str]]:
    """The files llama-server opens: the model's (the path given first, then the other shards of a split
    one), and the draft model, projector and adapters."""
    from llamactl.model.gguf import shard_paths

    path, settings = Path(door.spec.path), door.spec.settings
    others = [p for p in (settings.draft_model, settings.mmproj) if p is not None] + list(settings.lora)
    return [str(path), *(str(p) for p in shard_paths(path) if p != path)], [str(p) for p in others]


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # the door read it already; a file gone since only shortens the startup probe's estimate


def _refusal(r: Rendered, node: k8s.NodeType) -> str:
    why = "; ".join(r.plan.reasons[-2:]) or r.plan.fit.value
    if r.plan.fit is Fit.NONE:
        return f"{r.door.spec.name} does not fit {node.describe()}: {why}"
    spill = "" if r.residency.spill else " (spill = false)"
    return f"{r.door.spec.name} would not run wholly on the GPUs of {node.describe()}{spill}: {why}"


def _placed(rendered: Sequence[Rendered], inv: "Inventory") -> list[k8s.Workload]:
    """The workloads node by node, as k8s.pack places them with the fleet plan."""
    from llamactl.fleet import Entry

    cfg_order = {r.door.spec.name: r for r in rendered}
    entries = [Entry(name, r.residency, r.door.params, r.door.spec.settings, r.door.policy)
               for name, r in cfg_order.items()]
    out = []
    for index, names in enumerate(k8s.pack(entries, inv.usable), start=1):
        out += [replace(cfg_order[n].workload, node=index) for n in names]  # type: ignore[type-var]
    return out


def _check_names(workloads: Sequence[k8s.Workload]) -> None:
    seen: dict[str, str] = {}
    for w in workloads:
        if w.name in seen:
            raise UsageError(f"models {seen[w.name]} and {w.model} both become Kubernetes name {w.name}; rename one")
        seen[w.name] = w.model


@dataclass(frozen=True)
class Manifests:
    """k8s render's result: a Deployment and a Service per model (YAML documents, or a JSON list)."""

    workloads: tuple[k8s.Workload, ...]
    node: k8s.NodeType
    image: str
    volume: k8s.Volume

    def objects(self) -> Iterator[tuple[dict[str, object], str | None]]:
        """Each object with the comment that goes before it in YAML."""
        for w in self.workloads:
            yield k8s.deployment(w, self.node, self.image, self.volume), k8s.ENV_COMMENT
            yield k8s.service(w), None

    def to_json(self) -> list[dict[str, object]]:
        return [obj for obj, _ in self.objects()]

    def text(self) -> Iterator[str]:
        import textwrap

        import yaml  # only this command pays its import

        nodes = max((w.node for w in self.workloads), default=0)
        yield render.Note(f"{len(self.workloads)} model{'s' * (len(self.workloads) != 1)} on {nodes} node"
                          f"{'s' * (nodes != 1)} of {self.node.describe()} ({k8s.PRODUCT_LABEL}={self.node.product})")
        node = self.node
        if node.gpu_name.startswith("simulated") and node.product == k8s.product_label(node.gpu_name):
            yield render.Note(f"the GPUs are simulated: no node is labelled {k8s.PRODUCT_LABEL}={self.node.product}; "
                              "give --gpu-product with your nodes' label")
        docs = []
        for obj, comment in self.objects():
            lines = "".join(f"# {line}\n" for line in textwrap.wrap(comment, 100)) if comment else ""
            docs.append(lines + yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=1000))
        yield "---\n" + "---\n".join(docs).rstrip("\n")


def register(app: typer.Typer) -> None:
    app.info.name = "k8s"  # the group's name: the lazy root lists it as `k8s`
    app.callback()(group)
    app.command("render")(render_command)
