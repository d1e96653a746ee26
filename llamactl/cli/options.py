"""Option groups shared by subcommands (llama-server flags, inventory flags), declared once.

`with_options(...)` adds a group's parameters to a Typer command's signature and
hands the command one frozen value per group, so `estimate`, `plan` and
`launch` take the same flags with the same meaning. Each value also says which
flags were given on the command line (`given`): those, and only those, override
the config in resolve.py.
"""

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import typer

from llamactl.errors import UsageError
from llamactl.gpu import inventory
from llamactl.placement import DEFAULT_MARGIN_BYTES, DEFAULT_MEM_THRESHOLD, DEFAULT_UTIL_THRESHOLD, Strategy
from llamactl.model.memory import DEFAULT_GPU_OVERHEAD_BYTES
from llamactl.model import registry
from llamactl.units import parse_size

if TYPE_CHECKING:
    from llamactl.config import Config


@dataclass(frozen=True)
class OptionGroup:
    name: str  # the keyword the command receives
    params: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def _opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


@dataclass(frozen=True)
class SettingsFlags:
    """The llama-server settings given on the command line: ServerSettings field → value."""

    given: dict[str, Any]


def _complete(options: tuple[str, ...]) -> Callable[[str], list[str]]:
    return lambda incomplete: [o for o in options if o.startswith(incomplete)]


def _setting_params(s: registry.Setting) -> list[inspect.Parameter]:
    """One registry entry as Typer options: llama-server's flag names, a value name, the default in the help."""
    kind = s.kind
    if isinstance(kind, registry.Flag) and s.tristate:
        on, off = s.flags[0::2], s.flags[1::2]
        decls = [f"{a}/{b}" for a, b in zip(on, off)]
        return [_opt(s.field, Optional[bool], typer.Option(None, *decls, help=s.help))]
    if isinstance(kind, registry.Flag):
        params = [_opt(s.field, bool, typer.Option(False, *s.flags, help=s.help))]
    else:
        default = s.described_default()
        help_text = s.help + (f"  [default: {default}]" if default and "default:" not in s.help else "")
        many = isinstance(kind, (registry.Files, registry.Overrides))
        extra = {"autocompletion": _complete(kind.choices())} if kind.choices() else {}
        params = [_opt(s.field, Optional[list[str]] if many else Optional[str],
                       typer.Option(None, *s.flags, metavar=kind.metavar, help=help_text, **extra))]
    if s.shortcut is not None:
        flags, _, help_text = s.shortcut
        params.append(_opt(f"{s.field}_shortcut", bool, typer.Option(False, *flags, help=help_text)))
    return params


def _given_setting(s: registry.Setting, raw: Any) -> Any:
    """The field's value for what the command line gave (a flag's presence, a value's text)."""
    if isinstance(s.kind, registry.Flag):
        return raw if s.tristate else not s.invert
    if isinstance(raw, list):
        return tuple(v for text in raw for v in s.from_text(text))
    return s.from_text(raw)


def _server_settings(given: frozenset[str] = frozenset(), **values: Any) -> SettingsFlags:
    out: dict[str, Any] = {}
    for s in registry.SETTINGS:
        raw = values[s.field]
        if raw not in (None, False, []):
            out[s.field] = _given_setting(s, raw)
        elif s.shortcut is not None and values[f"{s.field}_shortcut"]:
            out[s.field] = s.shortcut[1]
    return SettingsFlags(out)


SERVER = OptionGroup("settings", tuple(p for s in registry.SETTINGS for p in _setting_params(s)), _server_settings)


@dataclass(frozen=True)
class InventoryOptions:
    inventory: inventory.Inventory
    given: dict[str, Any]  # PlacementSpec fields given (gpu_overhead_bytes)

    def with_workers(self, cfg: "Config") -> "InventoryOptions":
        """The inventory with the devices of the config's workers beside the local ones (every door calls this
        once it has the config; a worker left out is named in a warning)."""
        from dataclasses import replace

        from llamactl.gpu.remote import with_workers

        return replace(self, inventory=with_workers(self.inventory, cfg.workers)) if cfg.workers else self

    def fresh(self, cfg: "Config") -> Callable[[], inventory.Inventory]:
        """The inventory read again for each step of a launch: NVML and the workers asked anew when live."""
        from llamactl.gpu.remote import with_workers

        if self.inventory.source != "nvml":
            return lambda: self.inventory
        return lambda: with_workers(inventory.resolve(None, None), cfg.workers)


def _inventory(gpus, gpus_file, gpu_overhead, no_calibration, given: frozenset[str] = frozenset()) -> InventoryOptions:
    overhead = parse_size(gpu_overhead, what="--gpu-overhead")
    placement: dict[str, Any] = {"gpu_overhead_bytes": overhead} if "gpu_overhead" in given else {}
    if no_calibration:
        placement["calibration"] = False
    return InventoryOptions(inventory.resolve(gpus, gpus_file), placement)


INVENTORY = OptionGroup("inv", (
    _opt("gpus", Optional[str], typer.Option(None, "--gpus", help="Simulated GPUs: none, 24GiB,24GiB, 2x80GiB (env LLAMACTL_GPUS).")),
    _opt("gpus_file", Optional[str], typer.Option(None, "--gpus-file", help="Inventory file as printed by `gpus --json`.")),
    _opt("gpu_overhead", str, typer.Option(f"{DEFAULT_GPU_OVERHEAD_BYTES // 2**20}MiB", "--gpu-overhead", help="Per-GPU CUDA context and pools (default: learned from earlier launches, else 400MiB).")),
    _opt("no_calibration", bool, typer.Option(False, "--no-calibration", help="The formula alone: ignore what earlier launches measured.")),
), _inventory)


def _policy(strategy, max_gpus, no_partial, margin, util_threshold, mem_threshold, gpu_ids, host_mem,
            given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The PlacementSpec fields given on the command line, checked."""
    if not (math.isfinite(mem_threshold) and 0 < mem_threshold <= 1):
        raise UsageError(f"--gpu-mem-threshold must be in (0, 1], got {mem_threshold}")
    if not 0 <= util_threshold <= 100:
        raise UsageError(f"--gpu-util-threshold must be in 0..100 (%), got {util_threshold}")
    values = {
        "strategy": ("strategy", strategy), "max_gpus": ("max_gpus", max_gpus),
        "no_partial": ("allow_partial", not no_partial),
        "margin": ("margin_bytes", parse_size(margin, what="--margin")),
        "util_threshold": ("util_threshold", util_threshold), "mem_threshold": ("mem_threshold", mem_threshold),
        "gpu_ids": ("allowed_gpus", _parse_ids(gpu_ids)),
        "host_mem": ("host_memory_bytes", parse_size(host_mem, what="--host-memory") if host_mem is not None else None),
    }
    return dict(values[name] for name in given if name in values)


POLICY = OptionGroup("placement", (
    _opt("strategy", Strategy, typer.Option(Strategy.SPREAD, "--strategy", help="One GPU: spread (most free) or pack (smallest that fits).")),
    _opt("max_gpus", Optional[int], typer.Option(None, "--max-gpus", min=1, help="Split over at most this many GPUs.")),
    _opt("no_partial", bool, typer.Option(False, "--no-partial", help="Refuse partial offload (GPU or CPU only).")),
    _opt("margin", str, typer.Option(f"{DEFAULT_MARGIN_BYTES // 2**20}MiB", "--margin", help="Headroom left free on each GPU.")),
    _opt("util_threshold", int, typer.Option(DEFAULT_UTIL_THRESHOLD, "--gpu-util-threshold", help="Skip GPUs at least this busy (%).")),
    _opt("mem_threshold", float, typer.Option(DEFAULT_MEM_THRESHOLD, "--gpu-mem-threshold", help="Skip GPUs other programs use this fraction of.")),
    _opt("gpu_ids", Optional[str], typer.Option(None, "--gpu-ids", help="Allow-list of GPU indices, e.g. 0,2.")),
    _opt("host_mem", Optional[str], typer.Option(None, "--host-memory", help="RAM available for CPU layers (default: this machine's, for live GPUs).")),
), _policy)


def _parse_ids(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--gpu-ids {text!r}: expected GPU indices separated by commas") from None
    if not ids or any(i < 0 for i in ids):
        raise UsageError(f"--gpu-ids {text!r}: expected GPU indices (>= 0) separated by commas")
    return ids


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"  # COMMANDLINE or ENVIRONMENT


def with_options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace each group's keyword parameter by the group's options; call with the built value."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)  # the command module may use string annotations
        own = [p for p in sig.parameters.values() if p.name not in {g.name for g in groups}]
        added = [p for g in groups for p in g.params]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            ctx = kwargs.get("ctx")  # every such command takes the (click) context: it knows each value's source
            for group in groups:
                values = {p.name: kwargs.pop(p.name) for p in group.params}
                given = frozenset(name for name in values if ctx is not None and _given(ctx, name))
                kwargs[group.name] = group.build(given=given, **values)
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}  # typer must read the signature's real types, not fn's strings
        return wrapper

    return decorate
