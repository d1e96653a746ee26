"""Observations → corrections of the memory model, pure (no files, no clocks).

An `Observation` is one launch: per device, the formula's terms, what llama-server logged, and what NVML
saw for the process. `Learned.build()` folds the observations relevant to one model on one machine into
three kinds of knowledge, and `Learned.apply()` corrects a MemoryEstimate with them, most specific first:

1. the same file (size + header hash), resolved settings, layer placement, backend and GPU models → the
   terms llama-server logged (the largest of the recent launches) and the overhead NVML showed;
2. the same GPU model (+ driver + build when known) → the per-process overhead (NVML minus logged
   buffers) instead of the `--gpu-overhead` default;
3. the same architecture + backend (+ partial offload or not) → a factor on the compute term.

A correction that grows a reservation is taken from one observation; one that would shrink it needs
`AGREEING` observations within `SPREAD` of each other, and takes the largest of them, so a plan never
reserves less than any of them saw. An out-of-memory failure at load adds its shortfall to the device
that failed, for the same settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from llamactl.model.memory import DeviceMemory, MemoryEstimate
from llamactl.model.settings import Resolved
from llamactl.units import MiB, format_bytes

SCHEMA = 1
TERMS = ("weights", "kv", "recurrent", "compute", "output")
AGREEING = 3  # observations needed to lower a reservation
SPREAD = 0.10  # ... within this fraction of their median (or SPREAD_FLOOR bytes)
SPREAD_FLOOR = 32 * MiB
RECENT = 20  # the newest observations of a kind that count
LOG_ROUNDING = MiB // 200 + 1  # llama.cpp logs buffer sizes in MiB with two decimals
FACTOR_RANGE = (0.25, 8.0)  # compute ratios outside are broken observations, not corrections


@dataclass(frozen=True)
class DeviceObservation:
    device: str  # "CPU", "GPU0", ... as in the estimate
    formula: dict[str, int]  # the pure formula's terms (TERMS + "overhead")
    logged: dict[str, int]  # what llama-server logged for this device's buffers (TERMS)
    buffers: tuple[str, ...] = ()  # llama.cpp's buffer names it summed (CPU_Mapped, CUDA0, RPC0[...])
    nvml_bytes: int | None = None  # the process's use of this GPU as NVML reports it
    gpu_name: str | None = None

    @property
    def logged_total(self) -> int:
        return sum(self.logged.get(t, 0) for t in TERMS)

    @property
    def overhead_seen(self) -> int | None:
        """What the process holds on this GPU beyond llama.cpp's buffers (CUDA context, cuBLAS, pools)."""
        return None if self.nvml_bytes is None else self.nvml_bytes - self.logged_total

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "buffers": list(self.buffers)}

    @classmethod
    def from_json(cls, data: Any) -> DeviceObservation:
        if not isinstance(data, dict):
            raise ValueError("device: not an object")
        device = data.get("device")
        if not isinstance(device, str) or not (device == "CPU" or (device.startswith("GPU") and device[3:].isdigit())):
            raise ValueError(f"device: bad name {device!r}")
        return cls(device=device, formula=_terms(data.get("formula"), TERMS + ("overhead",)),
                   logged=_terms(data.get("logged"), TERMS),
                   buffers=tuple(str(b)[:128] for b in data.get("buffers") or () if isinstance(b, str))[:32],
                   nvml_bytes=_opt_bytes(data.get("nvml_bytes")),
                   gpu_name=str(data["gpu_name"])[:128] if isinstance(data.get("gpu_name"), str) else None)


def _bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**50:
        raise ValueError(f"not a byte count: {value!r}")
    return value


def _opt_bytes(value: Any) -> int | None:
    return None if value is None else _bytes(value)


def _terms(data: Any, names: Sequence[str]) -> dict[str, int]:
    if not isinstance(data, dict):
        raise ValueError("terms: not an object")
    return {name: _bytes(data.get(name, 0)) for name in names}


@dataclass(frozen=True)
class Observation:
    """One launch of one model, as seen once it was ready (or as it failed for lack of memory)."""

    model_key: str  # "<size>:<sha256 of the header's first MiB>"
    model_path: str
    arch: str
    backend: str  # "CPU", "CUDA", "RPC": what the GPU devices were
    settings_key: str  # see settings_key()
    settings: dict[str, Any]  # the resolved settings and layer placement, for people and export
    partial: bool  # some layers or experts on the host while GPUs hold others
    devices: tuple[DeviceObservation, ...]
    build: str  # llama-server's version line
    outcome: str = "ready"  # or "oom"
    at: float = 0.0
    driver: str | None = None
    cuda: str | None = None
    host_rss_bytes: int | None = None
    shortfall_bytes: int | None = None  # oom: the allocation that failed
    shortfall_device: str | None = None  # oom: on which device ("CPU", "GPU0"...)
    uid: str = ""

    def device(self, name: str) -> DeviceObservation | None:
        return next((d for d in self.devices if d.device == name), None)

    @property
    def gpu_names(self) -> tuple[str, ...]:
        return tuple(d.gpu_name or "" for d in self.devices if d.device != "CPU")


def model_key(size: int, header_sha256: str) -> str:
    return f"{size}:{header_sha256}"


def settings_key(model: str, resolved: Resolved, layer_devices: Sequence[str], backend: str,
                 gpu_names: Sequence[str]) -> str:
    """What makes two launches allocate the same: the file, the resolved settings, which device each layer is
    on, the backend and the GPU models (the split itself only matters through the layers it places)."""
    blob = json.dumps([model, settings_json(resolved), list(layer_devices), backend, list(gpu_names)],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def settings_json(resolved: Resolved) -> dict[str, Any]:
    """The resolved settings that make a launch what it is: every required field, and the optional ones only
    when they differ from their default, so a setting a later llamactl adds does not orphan what was learned."""
    data = {}
    for f in fields(resolved):
        value = getattr(resolved, f.name)
        if f.default is MISSING or value != f.default:
            data[f.name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
    return data


def device_backend(device: str, backend: str) -> str:
    return "CPU" if device == "CPU" else backend


@dataclass(frozen=True)
class Basis:
    """A learned figure and what it rests on, for the user."""

    value: float
    n: int
    text: str


def _settle(values: Sequence[float], baseline: float, floor: float) -> tuple[float | None, str]:
    """The figure to use from newest-first observations: the largest, if it grows the reservation or if
    AGREEING of them agree; else None and why."""
    if not values:
        return None, ""
    top = max(values)
    if top >= baseline:
        return top, ""
    if len(values) < AGREEING:
        return None, f"{len(values)} of the {AGREEING} agreeing launches needed to lower it"
    med = statistics.median(values)
    if top - min(values) > max(SPREAD * abs(med), floor):
        return None, f"{len(values)} launches disagree ({min(values):g}..{top:g}); not lowered"
    return top, ""


@dataclass(frozen=True)
class Learned:
    """What the store knows that bears on one model on this machine; applied to each candidate estimate."""

    model: str  # model_key
    backend: str  # of the GPUs a plan would use
    exact: dict[str, tuple[Observation, ...]] = field(default_factory=dict)  # settings_key → ready, newest first
    ooms: dict[str, tuple[Observation, ...]] = field(default_factory=dict)  # settings_key → oom, newest first
    overhead: dict[str, Basis] = field(default_factory=dict)  # GPU model → per-process overhead (bytes)
    overhead_notes: dict[str, str] = field(default_factory=dict)  # GPU model → why not used
    compute: dict[tuple[str, bool], Basis] = field(default_factory=dict)  # (backend, partial) → factor
    honour_overhead: bool = True  # False when the user set --gpu-overhead / gpu_overhead themselves

    @classmethod
    def build(cls, observations: Iterable[Observation], *, model: str, arch: str, backend: str,
              default_overhead: int, honour_overhead: bool = True, driver: str | None = None,
              build: str | None = None) -> Learned:
        """Fold observations (any order) into what applies to `model` (arch, backend) here."""
        obs = sorted(observations, key=lambda o: o.at, reverse=True)
        exact: dict[str, list[Observation]] = {}
        ooms: dict[str, list[Observation]] = {}
        for o in obs:
            if o.model_key == model:
                (exact if o.outcome == "ready" else ooms).setdefault(o.settings_key, []).append(o)
        overhead, overhead_notes = gpu_overheads([o for o in obs if o.outcome == "ready"], default_overhead, driver, build)
        compute = compute_factors([o for o in obs if o.outcome == "ready" and o.arch == arch])
        # an out-of-memory failure counts until a launch with the same settings succeeds (its figures then tell)
        ooms = {k: [o for o in v if not exact.get(k) or o.at > exact[k][0].at] for k, v in ooms.items()}
        return cls(model=model, backend=backend,
                   exact={k: tuple(v[:RECENT]) for k, v in exact.items()},
                   ooms={k: tuple(v[:RECENT]) for k, v in ooms.items() if v},
                   overhead=overhead, overhead_notes=overhead_notes, compute=compute, honour_overhead=honour_overhead)

    def apply(self, est: MemoryEstimate, gpu_names: Sequence[str], partial: bool) -> tuple[MemoryEstimate, tuple[str, ...]]:
        """`est` corrected with what was learned, and one line per correction used."""
        key = settings_key(self.model, est.resolved, est.layer_devices, self.backend, gpu_names)
        seen = self.exact.get(key, ())
        notes: list[str] = []
        rows = []
        for dev in est.devices:
            k = None if dev.device == "CPU" else int(dev.device[3:])
            name = gpu_names[k] if k is not None and k < len(gpu_names) else None
            row = dev
            if name is not None and row.overhead_bytes and self.honour_overhead and (basis := self.overhead.get(name)):
                row = replace(row, overhead_bytes=int(basis.value))
            observed = [d for d in (o.device(dev.device) for o in seen) if d is not None]
            if observed:
                # llama.cpp's buffers for the same inputs are deterministic: one launch tells them exactly
                row = replace(row, **{f"{t}_bytes": _seen(getattr(dev, f"{t}_bytes"), [d.logged.get(t, 0) for d in observed])
                                      for t in TERMS})
                over = [float(d.overhead_seen) for d in observed if d.overhead_seen is not None]
                if k is not None and over and row.overhead_bytes:  # NVML's figure is a measurement: the usual rule
                    value, _ = _settle(over, float(row.overhead_bytes), float(SPREAD_FLOOR))
                    if value is not None:
                        row = replace(row, overhead_bytes=max(int(value), 0))
            elif row.compute_bytes and (basis := self.compute.get((device_backend(dev.device, self.backend), partial))):
                row = replace(row, compute_bytes=math.ceil(row.compute_bytes * basis.value))
            failed = [o.shortfall_bytes for o in self.ooms.get(key, ()) if o.shortfall_device == dev.device and o.shortfall_bytes]
            if failed:
                row = replace(row, overhead_bytes=row.overhead_bytes + max(failed))  # type: ignore[type-var]
            rows.append(row)
        if seen:
            notes.append(f"as llama-server logged at {_launches(len(seen))} of this file with these settings "
                         "(the largest of each term)")
        else:
            for (backend, part), basis in sorted(self.compute.items()):
                if part == partial and (backend == "CPU" or backend == self.backend):
                    notes.append(f"compute on {backend}{' (partial offload)' if part else ''} × {basis.value:.3f}: {basis.text}")
        used = {gpu_names[int(r.device[3:])] for r, d in zip(rows, est.devices) if r.device != "CPU" and
                r.overhead_bytes and int(r.device[3:]) < len(gpu_names)} if self.honour_overhead else set()
        for name in sorted(used):
            if name in self.overhead and not seen:
                notes.append(f"GPU overhead {format_bytes(int(self.overhead[name].value))}: {self.overhead[name].text}")
            elif name in self.overhead_notes and not seen:
                notes.append(f"GPU overhead on {name} kept at the default: {self.overhead_notes[name]}")
        for dev in est.devices:
            failed = [o for o in self.ooms.get(key, ()) if o.shortfall_device == dev.device and o.shortfall_bytes]
            if failed:
                notes.append(f"{dev.device}: +{format_bytes(max(o.shortfall_bytes or 0 for o in failed))} after "
                             f"{_launches(len(failed), 'out-of-memory failure')} at load with these settings")
        return replace(est, devices=tuple(rows)), tuple(notes)


def _seen(formula: int, logged: Sequence[int]) -> int:
    """A term from what was logged: the largest logged value, unless the formula is within the log's rounding
    (llama.cpp prints MiB with two decimals), where the formula is the more exact of the two."""
    top = max(logged)
    return max(formula, top) if abs(formula - top) <= LOG_ROUNDING else top


def _launches(n: int, what: str = "launch") -> str:
    return f"{n} {what}{'es' if n != 1 and what.endswith('h') else 's' if n != 1 else ''}"


def gpu_overheads(obs: Sequence[Observation], default: int, driver: str | None,
               build: str | None) -> tuple[dict[str, Basis], dict[str, str]]:
    """Per GPU model: NVML minus logged buffers, from the most specific group that has observations."""
    samples: dict[str, list[tuple[int, str | None, str]]] = {}
    for o in obs:
        for d in o.devices:
            if d.device != "CPU" and d.gpu_name and d.overhead_seen is not None and d.logged_total:
                samples.setdefault(d.gpu_name, []).append((d.overhead_seen, o.driver, o.build))
    out: dict[str, Basis] = {}
    why: dict[str, str] = {}
    for name, rows in samples.items():
        groups = [([v for v, dr, b in rows if dr == driver and b == build], f", driver {driver}, this llama-server build"),
                  ([v for v, dr, _ in rows if dr == driver], f", driver {driver}"),
                  ([v for v, _, _ in rows], "")]
        values, where = next(((g, w) for g, w in groups if g), ([], ""))
        values = values[:RECENT]
        value, reason = _settle([float(v) for v in values], float(default), float(SPREAD_FLOOR))
        if value is None:
            why[name] = reason
            continue
        out[name] = Basis(value, len(values), f"the largest of {_launches(len(values))} on {name}{where} "
                                              f"(median {format_bytes(int(statistics.median(values)))}; "
                                              f"the default {format_bytes(default)})")
    return out, why


def compute_factors(obs: Sequence[Observation]) -> dict[tuple[str, bool], Basis]:
    """Per (backend, partial): llama-server's logged compute buffers over the formula's, on devices with layers."""
    ratios: dict[tuple[str, bool], list[float]] = {}
    for o in obs:
        for d in o.devices:
            est, got = d.formula.get("compute", 0), d.logged.get("compute", 0)
            if est > MiB and got:
                ratio = got / est
                if FACTOR_RANGE[0] <= ratio <= FACTOR_RANGE[1]:
                    ratios.setdefault((device_backend(d.device, o.backend), o.partial), []).append(ratio)
    out = {}
    for key, values in ratios.items():
        values = values[:RECENT]
        value, _ = _settle(values, 1.0, 0.0)
        if value is not None:
            out[key] = Basis(value, len(values), f"the largest ratio of logged to estimated over "
                                                 f"{_launches(len(values))} of this architecture")
    return out


def device_terms(dev: DeviceMemory) -> dict[str, int]:
    return {"weights": dev.weights_bytes, "kv": dev.kv_bytes, "recurrent": dev.recurrent_bytes,
            "compute": dev.compute_bytes, "output": dev.output_bytes, "overhead": dev.overhead_bytes}


def observation_to_row(o: Observation) -> dict[str, Any]:
    """The JSON form (store rows and export files)."""
    data = asdict(o)
    data["devices"] = [d.to_json() for d in o.devices]
    data["schema"] = SCHEMA
    return data


EARLIEST_AT = 1_672_531_200.0  # 2023-01-01: no llamactl observation is older
FUTURE_SLACK_S = 86_400.0  # clocks of the exporting box may run a little ahead


def observation_from_row(data: Any, *, now: float | None = None) -> Observation:
    """A validated Observation from its JSON form (an exported file is input: check everything). With `now`,
    its time must lie between 2023 and a day past `now`."""
    if not isinstance(data, dict):
        raise ValueError("not an object")

    def text(key: str, limit: int = 4096, optional: bool = False) -> Any:
        value = data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > limit:
            raise ValueError(f"{key}: expected text")
        return value

    def number(key: str) -> float:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number")
        return float(value)

    outcome = text("outcome", 16)
    if outcome not in ("ready", "oom"):
        raise ValueError(f"outcome: {outcome!r}")
    backend = text("backend", 16)
    if backend not in ("CPU", "CUDA", "RPC"):
        raise ValueError(f"backend: {backend!r}")
    devices = data.get("devices")
    if not isinstance(devices, list) or not 1 <= len(devices) <= 65:
        raise ValueError("devices: expected a list of 1-65 devices")
    settings = data.get("settings")
    if not isinstance(settings, dict):
        raise ValueError("settings: expected an object")
    shortfall_device = text("shortfall_device", 16, optional=True)
    if now is not None and not EARLIEST_AT <= number("at") <= now + FUTURE_SLACK_S:
        raise ValueError("at: not a plausible time")
    return Observation(
        model_key=text("model_key", 128), model_path=text("model_path"), arch=text("arch", 64), backend=backend,
        settings_key=text("settings_key", 64), settings=settings, partial=bool(data.get("partial")),
        devices=tuple(DeviceObservation.from_json(d) for d in devices), build=text("build", 256),
        outcome=outcome, at=number("at"), driver=text("driver", 64, optional=True), cuda=text("cuda", 64, optional=True),
        host_rss_bytes=_opt_bytes(data.get("host_rss_bytes")), shortfall_bytes=_opt_bytes(data.get("shortfall_bytes")),
        shortfall_device=shortfall_device, uid=text("uid", 64),
    )
