"""Kubernetes manifests for models planned on a node type, pure: plans and commands in, plain objects out.

Per model one Deployment (one pod) and one Service. The pod asks for the GPUs its plan uses as
`nvidia.com/gpu` (the NVIDIA device plugin hands them out whole and sets CUDA_VISIBLE_DEVICES to them),
selects nodes by NVIDIA GPU feature discovery's `nvidia.com/gpu.product` label, runs the plan's llama-server
arguments with the model files read from a volume mounted at /models, requests the host memory the
estimate puts on the CPU plus a margin, and is given a startup probe long enough to load the files.
`pack()` places models on nodes of the type with the fleet plan, each pod's GPUs its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from llamactl.errors import UsageError
from llamactl.fleet import Entry, plan_fleet
from llamactl.gpu.inventory import Gpu, Inventory
from llamactl.model import registry
from llamactl.placement import Fit
from llamactl.units import format_bytes

DEFAULT_IMAGE = "ghcr.io/ggml-org/llama.cpp:server-cuda"  # its entrypoint is llama-server: the pod gives args only
DEFAULT_VOLUME = "pvc:models"
MODELS_DIR = "/models"
POD_HOST = "0.0.0.0"  # llama-server listens on the pod's address; the Service is the way in
POD_PORT = 8080
GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
ANNOTATIONS = "llamactl"  # the prefix of the annotations llamactl writes
LOAD_BYTES_PER_S = 200 * 10**6  # a conservative read rate for network volumes
MIN_LOAD_S = 60  # CUDA's start and the warm-up take time whatever the size
STARTUP_PERIOD_S = 10
READY_PERIOD_S = 5
HOST_MARGIN_BYTES = 512 * 2**20  # at least this over the estimate's host part, or
HOST_MARGIN_FRACTION = 0.10  # this share of it, whichever is more
# llama-server's options whose value is a file: --model, and the settings the registry declares as files
FILE_FLAGS = frozenset({"--model", "-m"} | {f for s in registry.SETTINGS if isinstance(s.kind, registry.File)
                                            for f in (*s.flags, *s.spellings)})
ENV_COMMENT = ("CUDA_VISIBLE_DEVICES is left to the NVIDIA device plugin, which sets it to the GPUs it gives the "
               "pod; plan's env (its GPU pinning) does not apply here. The arguments are plan's but for the "
               f"model paths (in {MODELS_DIR}), --host and --port.")

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # an RFC 1035 label: what a Service's name must be


@dataclass(frozen=True)
class NodeType:
    """The GPUs of one kind of node, as a `gpus --json` file describes it."""

    gpus: int
    gpu_name: str
    gpu_memory_bytes: int
    product: str  # the nvidia.com/gpu.product label value that selects such nodes

    def describe(self) -> str:
        return f"{self.gpus}x {self.gpu_name} ({format_bytes(self.gpu_memory_bytes)})"


def product_label(gpu_name: str) -> str:
    """The label value GPU feature discovery derives from a GPU's name: `NVIDIA A100-SXM4-80GB` →
    `NVIDIA-A100-SXM4-80GB` (what is not a letter, digit, `-`, `_` or `.` becomes `-`)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", gpu_name.strip())[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def node_type(inv: Inventory, product: str | None = None) -> NodeType:
    """The node type of an inventory: its GPUs must be alike (the device plugin hands a pod any of them)."""
    gpus = inv.usable
    if not gpus:
        raise UsageError(f"{inv.source}: no usable GPU; a node type for GPU pods needs at least one")
    kinds = sorted({(g.name, g.memory_total_bytes) for g in gpus})
    if len(kinds) > 1:
        listed = ", ".join(f"{name} ({format_bytes(size)})" for name, size in kinds)
        raise UsageError(f"{inv.source}: the GPUs differ ({listed}); a node type's GPUs must be alike, as the "
                         "device plugin gives a pod any of them")
    name, size = kinds[0]
    label = product if product is not None else product_label(name)
    if not label or len(label) > 63 or not _LABEL_VALUE.match(label):
        raise UsageError(f"--gpu-product {label!r} is not a Kubernetes label value (63 characters at most: letters, "
                         "digits, '-', '_', '.', beginning and ending with a letter or digit)")
    return NodeType(len(gpus), name, size, label)


@dataclass(frozen=True)
class Volume:
    """Where the model files come from: a PersistentVolumeClaim or a directory on the node."""

    kind: str  # "pvc" or "host"
    source: str

    @classmethod
    def parse(cls, text: str) -> Volume:
        kind, _, source = text.partition(":")
        if kind not in ("pvc", "host") or not source:
            raise UsageError(f"--model-volume {text!r}: expected pvc:CLAIM or host:/PATH")
        if kind == "pvc" and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", source):
            raise UsageError(f"--model-volume {text!r}: {source!r} is not a PersistentVolumeClaim name")
        if kind == "host" and not source.startswith("/"):
            raise UsageError(f"--model-volume {text!r}: a host path must be absolute")
        return cls(kind, source)

    def to_json(self) -> dict[str, object]:
        if self.kind == "pvc":
            return {"name": "models", "persistentVolumeClaim": {"claimName": self.source, "readOnly": True}}
        return {"name": "models", "hostPath": {"path": self.source, "type": "Directory"}}


@dataclass(frozen=True)
class Workload:
    """One model's pod as planned: what the manifests say about it."""

    model: str  # the model's name as llamactl knows it (the alias llama-server answers to)
    name: str  # the Kubernetes objects' name
    args: tuple[str, ...]  # llama-server's arguments, argv[0] left to the image's entrypoint
    files: tuple[str, ...]  # the file names the volume must hold
    fit: Fit
    gpus: int
    device_bytes: tuple[tuple[str, int], ...]  # the estimate per device (CPU, GPU0, ...)
    load_bytes: int  # what llama-server reads at start-up
    node: int = 1  # which of the planned nodes it was placed on

    @property
    def host_bytes(self) -> int:
        return dict(self.device_bytes).get("CPU", 0)


def object_name(model: str) -> str:
    """A Kubernetes name for a model's objects: lower case, `-` for what a DNS label cannot hold."""
    name = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = f"llm-{name}".rstrip("-")
    name = name[:63].rstrip("-")
    assert _NAME.match(name), name
    return name


def pod_files(paths: Sequence[str]) -> dict[str, str]:
    """Each model file's path on this machine → its path in the pod (`/models/<file name>`); two files of one
    name cannot both be there."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for path in paths:
        base = PurePosixPath(path).name
        if seen.get(base, path) != path:
            raise UsageError(f"{seen[base]} and {path} share the file name {base}: in {MODELS_DIR} only one can")
        seen[base] = path
        out[path] = f"{MODELS_DIR}/{base}"
    return out


def pod_args(argv: Sequence[str], files: Mapping[str, str]) -> tuple[str, ...]:
    """plan's argv for the pod: without argv[0] (the image's entrypoint), every file option's value moved
    into the volume."""
    args = list(argv[1:])
    for i in range(1, len(args)):
        if args[i - 1] in FILE_FLAGS and args[i] in files:
            args[i] = files[args[i]]
    return tuple(args)


def memory_request_bytes(host_bytes: int) -> int:
    """The pod's memory request: the estimate's host part and a margin, in whole MiB."""
    want = host_bytes + max(HOST_MARGIN_BYTES, math.ceil(host_bytes * HOST_MARGIN_FRACTION))
    return -(-want // 2**20) * 2**20


def startup_failures(load_bytes: int) -> int:
    """The startup probe's failureThreshold: its periods cover the load at LOAD_BYTES_PER_S, at least MIN_LOAD_S."""
    load_s = max(MIN_LOAD_S, math.ceil(load_bytes / LOAD_BYTES_PER_S))
    return -(-load_s // STARTUP_PERIOD_S)


def _labels(w: Workload) -> dict[str, str]:
    return {"app.kubernetes.io/name": "llama-server", "app.kubernetes.io/instance": w.name,
            "app.kubernetes.io/managed-by": "llamactl"}


def _annotations(w: Workload, node: NodeType) -> dict[str, str]:
    out = {f"{ANNOTATIONS}/model": w.model, f"{ANNOTATIONS}/fit": w.fit.value,
           f"{ANNOTATIONS}/node-type": node.describe(), f"{ANNOTATIONS}/node": str(w.node),
           f"{ANNOTATIONS}/files": ",".join(w.files)}
    out.update({f"{ANNOTATIONS}/estimate-{device.lower()}-bytes": str(size) for device, size in w.device_bytes})
    return out


def _probe(path: str, period_s: int, failures: int) -> dict[str, object]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "failureThreshold": failures}


def deployment(w: Workload, node: NodeType, image: str, volume: Volume) -> dict[str, object]:
    resources: dict[str, object] = {"requests": {"memory": f"{memory_request_bytes(w.host_bytes) // 2**20}Mi"}}
    if w.gpus:
        resources["limits"] = {GPU_RESOURCE: w.gpus}  # an extended resource is asked for by its limit
    container = {
        "name": "llama-server", "image": image, "args": list(w.args),
        "ports": [{"name": "http", "containerPort": POD_PORT, "protocol": "TCP"}],
        "resources": resources,
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True}],
        "startupProbe": _probe("/health", STARTUP_PERIOD_S, startup_failures(w.load_bytes)),
        "readinessProbe": _probe("/health", READY_PERIOD_S, 3),
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": w.name, "labels": _labels(w), "annotations": _annotations(w, node)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # a rolling update would need the GPUs twice over
            "selector": {"matchLabels": {"app.kubernetes.io/instance": w.name}},
            "template": {
                "metadata": {"labels": _labels(w)},
                "spec": {"nodeSelector": {PRODUCT_LABEL: node.product}, "containers": [container],
                         "volumes": [volume.to_json()]},
            },
        },
    }


def service(w: Workload) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": w.name, "labels": _labels(w)},
        "spec": {"type": "ClusterIP", "selector": {"app.kubernetes.io/instance": w.name},
                 "ports": [{"name": "http", "port": POD_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


def pack(entries: Sequence[Entry], gpus: Sequence[Gpu]) -> tuple[tuple[str, ...], ...]:
    """The models of each node, in the fleet plan's order: a node takes the residents of the fleet plan of
    the models left, each holding its GPUs whole; the rest go on to the next node. `entries` are models that
    run on the node type alone: one the fleet plan makes resident nowhere (spill = false beside others)
    gets a node of its own."""
    left = list(entries)
    nodes: list[tuple[str, ...]] = []
    while left:
        fleet = plan_fleet(left, gpus, whole_gpus=True)
        used: set[int] = set()
        here: list[str] = []
        for placed in fleet.models:
            if placed.resident and used.isdisjoint(placed.plan.gpu_ids):
                here.append(placed.name)
                used.update(placed.plan.gpu_ids)
        nodes.append(tuple(here) or (fleet.models[0].name,))
        left = [e for e in left if e.name not in nodes[-1]]
    return tuple(nodes)
