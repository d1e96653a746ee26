"""One resolver: (config, model name or path, command-line overrides) → what to run. Every door uses it.

`estimate`, `plan`, `launch` and the proxy all turn what they were given into a
ModelSpec here, so a configured model means the same thing everywhere.
Precedence, field by field: the command line > `[models.NAME]` > `[defaults]`
(and the config's machine keys) > llamactl's built-in default, each defined once
(ServerSettings, Policy via PlacementSpec, config.DEFAULT_PORT_START).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl.config import Config, ModelConfig
from llamactl.errors import UsageError
from llamactl.gpu.inventory import Inventory
from llamactl.learn.calibrate import Learned
from llamactl.model.memory import DEFAULT_GPU_OVERHEAD_BYTES
from llamactl.model.params import ModelParams
from llamactl.model.settings import ServerSettings
from llamactl.placement import PlacementSpec, Policy
from llamactl.servers.names import check_name, name_for

if TYPE_CHECKING:
    from llamactl.servers.launcher import LaunchRequest
    from llamactl.servers.probe import Server


@dataclass(frozen=True)
class Overrides:
    """What the command line gave, and only that: anything absent here comes from the config."""

    settings: dict[str, Any] = field(default_factory=dict)  # ServerSettings field → value
    placement: dict[str, Any] = field(default_factory=dict)  # PlacementSpec field → value
    port_start: int | None = None
    extra_args: tuple[str, ...] = ()
    name: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A model ready to plan and run: where it is, how llama-server runs it, where it may go."""

    name: str  # the instance name
    path: Path
    settings: ServerSettings
    placement: PlacementSpec
    args: tuple[str, ...] = ()
    port_start: int = 8081
    ttl_s: float | None = None
    aliases: tuple[str, ...] = ()
    configured: bool = False  # from the config (by name or alias), not a bare path
    env: tuple[tuple[str, str], ...] = ()  # the model's `env`, for its llama-server's environment


def _apply(base: Any, updates: dict[str, Any]) -> Any:
    unknown = set(updates) - {f.name for f in fields(base)}
    if unknown:
        raise ValueError(f"not a field of {type(base).__name__}: {sorted(unknown)}")
    return replace(base, **updates) if updates else base


def resolve(cfg: Config, model: str | Path, given: Overrides = Overrides()) -> ModelSpec:
    """The ModelSpec for `model`: an existing file is a path (the config's [defaults] apply to it), else
    a configured name or alias; anything else is a usage error naming both."""
    path = Path(model)
    configured: ModelConfig | None = None
    if not path.exists():
        configured = cfg.lookup(str(model))
        if configured is None and str(model) in cfg.remotes:
            raise UsageError(f"{model}: served by another box ({cfg.remotes[str(model)].url}), not run here; "
                             "its own box plans and launches it")
        if configured is None:
            known = ", ".join(sorted(cfg.models)) or "none configured"
            where = f" in {cfg.source}" if cfg.source else ""
            raise UsageError(f"{model}: no such file, and no model of that name{where} (configured: {known})")
    if configured is not None:
        settings, placement, args = configured.settings, configured.placement, configured.args
        name, path, ttl_s, aliases = configured.name, configured.path, configured.ttl_s, configured.aliases
    else:
        settings, placement, args = cfg.defaults, cfg.placement, cfg.default_args
        name, ttl_s, aliases = name_for(path), None, ()
    return ModelSpec(
        name=check_name(given.name) if given.name is not None else name,
        path=path,
        settings=_apply(settings, given.settings),
        placement=_apply(placement, given.placement),
        args=(*args, *given.extra_args),
        port_start=given.port_start if given.port_start is not None else cfg.port_start,
        ttl_s=ttl_s, aliases=aliases, configured=configured is not None,
        env=configured.env if configured is not None else (),
    )


@dataclass(frozen=True)
class Door:
    """Everything a door (`estimate`, `plan`, `launch`, the proxy) needs for one model, decided once: the spec,
    the GGUF header read once, the placement policy (host memory, margin, strategy, calibration for this
    llama-server build) and the server it runs. Every door plans, estimates and builds argv from this."""

    spec: ModelSpec
    params: ModelParams
    policy: Policy
    server: "Server | None"  # None: not looked up (an estimate that learned nothing needs no build)

    def request(self, **kw: Any) -> "LaunchRequest":
        """The launch of this model (`plan` and `launch --dry-run` print its command, the proxy runs it)."""
        from llamactl.servers.launcher import request_for

        return request_for(self.spec, self.policy, params=self.params, **kw)


def open_door(cfg: Config, model: str | Path, given: Overrides, inv: Inventory, state_dir: Path | None,
              server: "Server | Callable[[], Server]", cpu_repack_types: frozenset[str] | None = None, *,
              need_server: bool = True) -> Door:
    """Resolve `model`, read its header once and complete its policy on `inv` for the server's build. A
    `server` given as a function is looked up after the model (a bad name is the error to report first), and
    without `need_server` only when the build matters (calibration to read)."""
    from llamactl.estimate import load_params
    from llamactl.learn.store import FILE_NAME

    spec = resolve(cfg, model, given)
    params = load_params(spec.path, spec.settings)
    calibrated = state_dir is not None and spec.placement.calibration and (state_dir / FILE_NAME).exists()
    if callable(server) and (need_server or calibrated):
        server = server()
    found = None if callable(server) else server
    policy = policy_for(spec, inv, cpu_repack_types, state_dir=state_dir, params=params,
                        build=found.build if found is not None else None)
    return Door(spec, params, policy, found)


def policy_for(spec: ModelSpec, inv: Inventory, cpu_repack_types: frozenset[str] | None = None, *,
               state_dir: Path | None = None, params: ModelParams | None = None, build: str | None = None) -> Policy:
    """The spec's placement on this inventory: `gpus` checked against it; host RAM read when its GPUs are live
    (a simulated inventory describes another machine, whose RAM is unknown unless host_memory says); with a
    state dir, what earlier launches measured (unless calibration is off for the model)."""
    from llamactl.estimate import host_repack_types

    live_host = None
    if inv.source == "nvml":
        import psutil

        live_host = int(psutil.virtual_memory().available)
    learned = None
    if state_dir is not None and spec.placement.calibration:
        learned = learned_for_spec(spec, inv, state_dir, params, build)
    return spec.placement.policy(frozenset(g.index for g in inv.gpus), live_host,
                                 host_repack_types() if cpu_repack_types is None else cpu_repack_types, learned)


def learned_for_spec(spec: ModelSpec, inv: Inventory, state_dir: Path, params: ModelParams | None = None,
                     build: str | None = None) -> Learned | None:
    """What the calibration store in `state_dir` knows that bears on this model on this inventory."""
    from llamactl.errors import LlamactlError
    from llamactl.estimate import load_params
    from llamactl.learn.observe import gpu_backend, learned_for
    from llamactl.learn.store import FILE_NAME

    if not (state_dir / FILE_NAME).exists():
        return None  # nothing learned yet: no header to read for it
    if params is None:
        try:
            params = load_params(spec.path, spec.settings)
        except LlamactlError:
            return None  # the plan or launch that follows reports the file's fault
    return learned_for(state_dir, spec.path, params, gpu_backend(spec.args, len(inv.usable)),
                       default_overhead=spec.placement.gpu_overhead_bytes,
                       honour_overhead=spec.placement.gpu_overhead_bytes == DEFAULT_GPU_OVERHEAD_BYTES,
                       nvml_live=inv.source == "nvml", build=build, gpu_names=[g.name for g in inv.usable])
