"""`llamactl proxy`: the OpenAI-compatible server (or `--check` to validate the config)."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Optional

import typer

from llamactl import config as config_mod
from llamactl import render
from llamactl.cli.common import load_config, state_store, wants_json
from llamactl.errors import UsageError
from llamactl.estimate import host_repack_types
from llamactl.gpu import inventory
from llamactl.estimate import load_params
from llamactl.model.settings import resolve as resolve_settings
from llamactl.resolve import resolve
from llamactl.units import format_duration, parse_duration, parse_size


@dataclass(frozen=True)
class ModelCheck:
    """One configured model as `proxy --check` shows it (fields in the JSON's order)."""

    name: str
    path: str
    aliases: tuple[str, ...]
    ctx_size: int
    n_gpu_layers: int | None  # None: all
    cache_type_k: str
    cache_type_v: str
    flash_attn: str  # on, off, auto
    parallel: int | None
    args: tuple[str, ...]
    ttl_s: float | None
    file: str  # "ok", or "error" (the problem is in ConfigCheck.problems)

    def row(self) -> list[object]:
        return [self.name, self.path, ", ".join(self.aliases) or "-", self.ctx_size,
                "all" if self.n_gpu_layers is None else self.n_gpu_layers, format_duration(self.ttl_s), self.file]


@dataclass(frozen=True)
class ConfigCheck:
    """proxy --check's result: the config, the binary the proxy would start, each model, the problems."""

    source: str | None
    host: str
    port: int
    server_bin: str | None
    models: tuple[ModelCheck, ...]
    problems: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"config": self.source, "host": self.host, "port": self.port, "server_bin": self.server_bin,
                "models": [asdict(m) for m in self.models], "problems": list(self.problems)}

    def text(self) -> Iterator[str]:
        yield render.safe(f"config: {self.source or '(none: defaults)'}; listening on {self.host}:{self.port}; "
                          f"llama-server: {self.server_bin or 'not usable'}")
        if self.models:
            yield render.table([m.row() for m in self.models], ["MODEL", "PATH", "ALIASES", "CTX", "NGL", "TTL", "FILE"],
                               align_right_from=3)
        else:
            yield render.Note("no models configured (add [models.NAME] tables or models_dir)")

    def failure(self) -> UsageError | None:
        """The problems as one error (the first, and how many more), or None when there are none."""
        if not self.problems:
            return None
        more = len(self.problems) - 1
        return UsageError(self.problems[0] + (f" (and {more} more)" if more else ""))


def _check(cfg: config_mod.Config, server_bin: str | None = None) -> ConfigCheck:
    problems, models = [], []
    from llamactl.errors import LlamactlError
    from llamactl.servers.probe import find_server, probe

    try:  # what the proxy would start: a binary that is there and is llama-server
        binary = str(probe(find_server(server_bin, cfg.server_bin)).path)
    except LlamactlError as exc:
        binary = None
        problems.append(f"llama-server: {exc}")
    for name, model in sorted(cfg.models.items()):
        try:  # what a launch checks before it starts anything: the header, LoRA files, settings vs the model
            spec = resolve(cfg, name)
            resolve_settings(spec.settings, load_params(spec.path, spec.settings), 0)
            ok = "ok"
        except UsageError as exc:
            ok = "error"
            problems.append(str(exc))
        s = model.settings
        models.append(ModelCheck(name, str(model.path), tuple(model.aliases), s.ctx_size, s.n_gpu_layers, s.cache_type_k,
                                 s.cache_type_v, s.flash_attn, s.parallel, tuple(model.args),
                                 model.ttl_s if model.ttl_s is not None else cfg.idle_ttl_s, ok))
    return ConfigCheck(str(cfg.source) if cfg.source else None, cfg.host, cfg.port, binary, tuple(models),
                       tuple(problems))


def command(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default from config: 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="Port (default from config: 8080)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Simulated GPUs: none, 24GiB,24GiB, 2x80GiB."),
    gpus_file: Optional[str] = typer.Option(None, "--gpus-file", help="Inventory file as printed by `gpus --json`."),
    gpu_overhead: Optional[str] = typer.Option(None, "--gpu-overhead", help="Per-GPU CUDA context and pools."),
    server_bin: Optional[str] = typer.Option(None, "--server-bin", help="llama-server binary."),
    check: bool = typer.Option(False, "--check", help="Validate the config, print the resolved models, exit."),
    keep_instances: bool = typer.Option(False, "--keep-instances", help="Leave started instances running at exit."),
    grace: str = typer.Option("30s", "--grace", help="How long in-flight requests may finish at shutdown."),
    log_format: str = typer.Option("text", "--log-format", help="Log format on stderr: text, or json (one object a line)."),
    json_output: bool = typer.Option(False, "--json", help="With --check: JSON."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth",
                                          help="Listen beyond loopback without api_keys (anyone on the network may use it)."),
) -> None:
    """OpenAI-compatible server: route by model, launch on demand, queue, stream, evict idle."""
    from llamactl.proxy import logs

    if log_format not in logs.FORMATS:
        raise UsageError(f"--log-format must be text or json, got {log_format!r}")
    if not check:
        logs.configure(log_format, debug=getattr(ctx.obj, "debug", False))
    with logs.fatal_as_json(log_format == "json" and not check):
        cfg = load_config(ctx)
        if host is not None or port is not None:
            from dataclasses import replace

            cfg = replace(cfg, host=host or cfg.host, port=port or cfg.port)
        _check_exposure(cfg, insecure_no_auth)
        if check:
            report = _check(cfg, server_bin)
            render.result(wants_json(ctx, json_output), report, failure=report.failure())
            return
        _serve(ctx, cfg, gpus, gpus_file, gpu_overhead, server_bin, keep_instances, grace)


def _serve(ctx: typer.Context, cfg: config_mod.Config, gpus: str | None, gpus_file: str | None,
           gpu_overhead: str | None, server_bin: str | None, keep_instances: bool, grace: str) -> None:
    from aiohttp import web

    from llamactl.proxy.app import build_app
    from llamactl.proxy.pool import Pool
    from llamactl.servers.probe import find_server, probe

    log = logging.getLogger("llamactl.proxy")
    binary = find_server(server_bin, cfg.server_bin)
    caps = probe(binary)
    from llamactl.gpu.remote import with_workers

    inv = with_workers(inventory.resolve(gpus, gpus_file), cfg.workers)
    # the workers are asked again with each read of a live inventory (a worker that went away drops out)
    inventory_fn = ((lambda: with_workers(inventory.resolve(None, None), cfg.workers)) if inv.source == "nvml"
                    else (lambda: inv))
    if inv.note:
        log.info(inv.note, extra={"event": "inventory", "source": inv.source})
    sock = _listen(cfg.host, cfg.port)
    pool = Pool(cfg, state_store(ctx), str(binary), caps, inventory_fn, repack_types=host_repack_types(),
                gpu_overhead_bytes=parse_size(gpu_overhead, what="--gpu-overhead") if gpu_overhead else None)
    reload_fn = (lambda: config_mod.load(cfg.source, required=True)) if cfg.source else None
    grace_s = parse_duration(grace, what="--grace")
    app = build_app(pool, inventory_fn, keep_instances=keep_instances, reload_fn=reload_fn, grace_s=grace_s,
                    address=(cfg.host, cfg.port))
    log.info("proxy on http://%s:%d for %d models (%s)", cfg.host, cfg.port, len(cfg.models),
             ", ".join(sorted(cfg.models)) or "none",
             extra={"event": "listening", "url": f"http://{cfg.host}:{cfg.port}", "models": sorted(cfg.models)})
    # keepalive_timeout also bounds a new connection's wait for its request line and headers (slow clients)
    # lingering_time: after answering a body it did not read (408, 413), wait 1 s for the rest, not 10
    web.run_app(app, sock=sock, shutdown_timeout=max(grace_s, 1.0), keepalive_timeout=cfg.header_timeout_s,
                lingering_time=1.0, print=None, access_log=None, handler_cancellation=True)


def _check_exposure(cfg: config_mod.Config, insecure_no_auth: bool) -> None:
    """A proxy reachable from the network starts models and answers for anyone who finds it: keys first."""
    from llamactl.proxy.browsers import is_loopback

    if is_loopback(cfg.host) or cfg.api_keys:
        return
    if not insecure_no_auth:
        raise UsageError(f"refusing to listen on {cfg.host} without api_keys: anyone who can reach this address "
                         "could load models and read answers; set api_keys in the config, bind 127.0.0.1, or pass "
                         "--insecure-no-auth")
    logging.getLogger("llamactl.proxy").warning(
        "listening on %s without api_keys (--insecure-no-auth): anyone who reaches it can use it", cfg.host,
        extra={"event": "no_auth", "host": cfg.host})


def _listen(host: str, port: int) -> socket.socket:
    """Bind before the app starts: a port in use is one line, and a second proxy never adopts (and then,
    exiting, stops) the instances of the one that holds the port."""
    from llamactl.cli.common import listen

    return listen(host, port, backlog=1024, busy="another proxy?")


def register(app: typer.Typer) -> None:
    app.command("proxy")(command)
