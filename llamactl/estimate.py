"""Estimate a GGUF file's memory for an inventory: read the header, resolve settings, run the model.

The glue between the pure memory model and its inputs (files, GPUs, the host
CPU's features). `plan` and `launch` estimate through here too, so what is
estimated is what will run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl.errors import UsageError
from llamactl.learn.calibrate import Learned
from llamactl.gpu.inventory import Inventory
from llamactl.model.gguf import read_header
from llamactl.model.memory import REPACK_TYPES_BY_FEATURE, MemoryEstimate, Placement, estimate
from llamactl.model.params import ModelParams, lora_tensors, model_params
from llamactl.model.settings import ServerSettings, parse_tensor_split, resolve  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from llamactl.resolve import Door


@dataclass(frozen=True)
class EstimateResult:
    path: Path
    params: ModelParams
    estimate: MemoryEstimate
    tensor_split: tuple[float, ...]


@lru_cache(maxsize=1)
def host_repack_types() -> frozenset[str]:
    """Weight types this host's CPU backend repacks (x86 SIMD features from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    types: set[str] = set()
    for feature, feature_types in REPACK_TYPES_BY_FEATURE.items():
        if feature in flags:
            types |= feature_types
    return frozenset(types)


def split_for(inv: Inventory, requested: tuple[float, ...] | None) -> tuple[float, ...]:
    """-ts as given, else llama.cpp's default: in proportion to each GPU's free memory."""
    gpus = inv.usable
    if requested is not None:
        if len(requested) > max(len(gpus), 1):
            raise UsageError(f"-ts gives {len(requested)} shares for {len(gpus)} GPUs")
        return requested + (0.0,) * (len(gpus) - len(requested))
    return tuple(float(g.memory_free_bytes) for g in gpus)


def load_params(path: str | Path, settings: ServerSettings) -> ModelParams:
    """A model's hyperparameters from its header, with the LoRA adapters the settings load beside it."""
    params = model_params(read_header(path))
    if settings.lora:
        adapters = tuple(t for lora in settings.lora for t in lora_tensors(read_header(lora), params))
        params = replace(params, adapters=adapters)
    if settings.draft_model:
        draft = model_params(read_header(settings.draft_model))
        if abs(draft.n_vocab - params.n_vocab) > 128:  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
            raise UsageError(f"draft model {settings.draft_model}: its vocabulary ({draft.n_vocab} tokens) is not the "
                             f"main model's ({params.n_vocab}); llama-server cannot draft with it")
        params = replace(params, draft=draft)
    if settings.mmproj:
        from llamactl.model.projector import projector_params

        projector = projector_params(settings.mmproj)
        params = replace(params, projector=projector)
    return params


def estimate_model(path: str | Path, settings: ServerSettings, inv: Inventory, *, gpu_overhead_bytes: int,
                   repack_types: frozenset[str], learned: "Learned | None" = None,
                   params: ModelParams | None = None) -> EstimateResult:
    n_gpus = len(inv.usable)
    split = split_for(inv, settings.tensor_split) if n_gpus else ()
    placement = Placement(n_gpus=n_gpus, tensor_split=split, gpu_overhead_bytes=gpu_overhead_bytes,
                          cpu_repack_types=repack_types)
    params = params or load_params(path, settings)
    resolved = resolve(settings, params, n_gpus)
    est = estimate(params, resolved, placement)
    if learned is not None:
        from llamactl.placement import calibrated

        est = calibrated(est, learned, [g.name for g in inv.usable])
    return EstimateResult(Path(path), params, est, split)


def estimate_door(door: "Door", inv: Inventory) -> EstimateResult:
    """A resolved model's memory on every usable device of `inv`, with its policy's overhead, repacking and
    calibration: the figures `plan` uses on the same devices."""
    policy = door.policy
    return estimate_model(door.spec.path, door.spec.settings, inv, gpu_overhead_bytes=policy.gpu_overhead_bytes,
                          repack_types=policy.cpu_repack_types, learned=policy.learned, params=door.params)
