"""What the calibration store holds, summed up for people (`llamactl calibration show`): per model and
settings, per GPU model's overhead, per architecture's compute correction. Pure: observations in, plain
JSON-ready data out."""

from __future__ import annotations

import statistics
from typing import Any

from llamactl.learn.calibrate import TERMS, Observation, compute_factors, gpu_overheads
from llamactl.model.memory import DEFAULT_GPU_OVERHEAD_BYTES


def summary(observations: list[Observation]) -> dict[str, Any]:
    """Per model and settings: launches, failures, and the newest launch's formula vs logged per device;
    the learned GPU overheads and compute corrections."""
    ready = [o for o in observations if o.outcome == "ready"]
    return {"observations": len(observations), "models": _models(observations), "gpu_overhead": _overheads(
        observations, ready), "compute": _compute(observations, ready)}


def _models(observations: list[Observation]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Observation]] = {}
    for o in observations:
        groups.setdefault((o.model_key, o.settings_key), []).append(o)
    rows = []
    for (model, key), obs in groups.items():
        obs.sort(key=lambda o: o.at, reverse=True)
        ready = [o for o in obs if o.outcome == "ready"]
        newest = ready[0] if ready else obs[0]
        rows.append({
            "model": newest.model_path, "model_key": model, "settings_key": key, "arch": newest.arch,
            "backend": newest.backend, "gpus": list(newest.gpu_names), "launches": len(ready),
            "out_of_memory": len(obs) - len(ready), "last": newest.at, "build": newest.build,
            "devices": [{"device": d.device, "estimated_bytes": sum(d.formula.get(t, 0) for t in TERMS),
                         "logged_bytes": d.logged_total, "nvml_bytes": d.nvml_bytes} for d in newest.devices] if ready else [],
        })
    rows.sort(key=lambda r: r["last"], reverse=True)
    return rows


def _overheads(observations: list[Observation], ready: list[Observation]) -> list[dict[str, Any]]:
    overhead, why = gpu_overheads(ready, DEFAULT_GPU_OVERHEAD_BYTES, None, None)
    samples: dict[str, list[int]] = {}
    for o in observations:
        for d in o.devices:
            if d.gpu_name and d.overhead_seen is not None and d.logged_total:
                samples.setdefault(d.gpu_name, []).append(d.overhead_seen)
    return [{"gpu": name, "launches": len(values), "median_bytes": int(statistics.median(values)),
             "used_bytes": int(overhead[name].value) if name in overhead else None,
             "note": overhead[name].text if name in overhead else why.get(name, "")}
            for name, values in sorted(samples.items())]


def _compute(observations: list[Observation], ready: list[Observation]) -> list[dict[str, Any]]:
    compute = []
    for arch in sorted({o.arch for o in observations}):
        for (backend, partial), basis in sorted(compute_factors([o for o in ready if o.arch == arch]).items()):
            compute.append({"arch": arch, "backend": backend, "partial": partial, "factor": round(basis.value, 4),
                            "launches": basis.n})
    return compute
