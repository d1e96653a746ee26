"""`llamactl launch MODEL`: plan, make room, start llama-server detached, wait until ready, record it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import typer

from llamactl import render
from llamactl.cli.common import load_config, state_store, wants_json
from llamactl.cli.complete import model_names
from llamactl.cli.options import INVENTORY, POLICY, SERVER, InventoryOptions, SettingsFlags, with_options
from llamactl.config import DEFAULT_PORT_START
from llamactl.servers import runner
from llamactl.resolve import Overrides, open_door
from llamactl.servers.command import ServerCommand, check_extra_args
from llamactl.servers.launcher import Launched, pick_port, command_for, launch, plan_for, request_for, split_secrets
from llamactl.servers.probe import locate
from llamactl.units import format_bytes, parse_duration


def _progress(name: str) -> Callable[[float, str], None] | None:
    if not runner.is_terminal():
        return None

    def show(elapsed: float, phase: str) -> None:
        sys.stderr.write(f"\r\x1b[K  starting {name}: {elapsed:5.1f} s  {phase}")
        sys.stderr.flush()

    return show


@with_options(SERVER, INVENTORY, POLICY)
def command(
    ctx: typer.Context,
    model: str = typer.Argument(..., metavar="MODEL", help="GGUF file, or a model name from the config.",
                                autocompletion=model_names),
    extra: Optional[list[str]] = typer.Argument(None, metavar="-- EXTRA", help="Extra llama-server arguments."),
    name: Optional[str] = typer.Option(None, "--name", help="Instance name (default: the config's name, else the file stem)."),
    replace_existing: bool = typer.Option(False, "--replace", help="Stop a live instance of that name first."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="Port (default: first free from --port-start)."),
    port_start: Optional[int] = typer.Option(None, "--port-start", min=1, max=65535,
                                             help=f"Where the port search starts (default: the config's port_start, else {DEFAULT_PORT_START})."),
    server_bin: Optional[str] = typer.Option(None, "--server-bin", help="llama-server binary (else $LLAMA_SERVER, PATH)."),
    timeout: str = typer.Option("300s", "--timeout", help="Readiness deadline, e.g. 90s, 5m."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return once started; do not wait for readiness."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan's argv and env; start nothing."),
    grace: str = typer.Option("10s", "--grace", help="Grace between TERM and KILL when stopping."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
    *,
    settings: SettingsFlags,
    inv: InventoryOptions,
    placement: dict,
) -> None:
    """Start llama-server for a model (planned like `plan`), wait until ready, record it.

    MODEL is a GGUF path, or a model name or alias from the config (its settings, placement, args and the
    config's port_start apply; the flags given here override them).
    """
    cfg = load_config(ctx)
    inv = inv.with_workers(cfg)
    extra_args, api_key = split_secrets(extra or [])
    check_extra_args(extra_args)  # before the probe: a refused flag costs nothing
    store = state_store(ctx)
    door = open_door(cfg, model, Overrides(settings=settings.given, placement={**inv.given, **placement},
                                           port_start=port_start, extra_args=extra_args, name=name),
                     inv.inventory, store.dir, lambda: locate(server_bin, cfg.server_bin, required=not dry_run))
    spec, server = door.spec, door.server
    assert server is not None
    if server.note:  # a dry run prints what it would run, binary or not
        render.note(f"note: {server.note}")
    instance_name = spec.name
    req = door.request(port=port, timeout_s=parse_duration(timeout, what="--timeout"), wait=not no_wait,
                       replace_existing=replace_existing, api_key=api_key)
    if dry_run:
        current = store.snapshot()
        the_plan = plan_for(req, inv.inventory, current)
        # the port a launch would take now (the first free one), not merely where the search starts
        cmd = command_for(req, the_plan, server.binary, server.caps, inv.inventory,
                          port or pick_port(current, spec.port_start, req.host))
        render.result(wants_json(ctx, json_output), DryRun(instance_name, cmd, the_plan.evict))
        return
    fresh = inv.fresh(cfg)
    try:
        done = launch(store, req, server.binary, server.caps, fresh, progress=_progress(instance_name),
                      grace_s=parse_duration(grace, what="--grace"))
    except runner.LaunchError as exc:
        if runner.is_terminal():
            sys.stderr.write("\r\x1b[K")
        if exc.log_tail:
            sys.stderr.write(f"--- last lines of {store.log_path(instance_name)} ---\n{exc.log_tail}\n---\n")
        raise
    if runner.is_terminal():
        sys.stderr.write("\r\x1b[K")
    render.result(wants_json(ctx, json_output), Started(done, str(store.log_path(done.instance.name))))


@dataclass(frozen=True)
class DryRun:
    """launch --dry-run's result: the command a launch would run now, and what it would evict first."""

    name: str
    command: ServerCommand
    evict: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "argv": list(self.command.argv), "env": self.command.env, "evict": list(self.evict)}

    def text(self) -> Iterator[str]:
        yield self.command.shell()
        if self.evict:
            yield f"# would evict first: {', '.join(self.evict)}"


@dataclass(frozen=True)
class Started:
    """launch's result: the recorded instance, how long it took to be ready, what made room for it."""

    launched: Launched
    log_path: str

    def to_json(self) -> dict[str, object]:
        done, inst = self.launched, self.launched.instance
        return {"name": inst.name, "status": inst.status.value, "pid": inst.pid, "port": inst.port,
                "url": f"http://{inst.host}:{inst.port}", "gpu_ids": list(inst.gpu_ids), "fit": done.plan.fit.value,
                "ready_s": done.ready_s, "evicted": list(done.evicted), "log_path": self.log_path}

    def text(self) -> Iterator[str]:
        done, inst = self.launched, self.launched.instance
        for gone in done.evicted:
            yield render.Note(f"evicted {gone} to make room")
        where = "GPU " + ",".join(map(str, inst.gpu_ids)) if inst.gpu_ids else "CPU"
        est = sum(inst.estimated_bytes.values())
        state = f"ready in {done.ready_s:.1f} s" if done.ready_s is not None else "starting (not waited for)"
        yield f"{inst.name} {state}: http://{inst.host}:{inst.port} (pid {inst.pid}, {where}, est. {format_bytes(est)})"


def register(app: typer.Typer) -> None:
    app.command("launch", context_settings={"allow_interspersed_args": True})(command)
