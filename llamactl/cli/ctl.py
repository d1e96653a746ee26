"""`llamactl ctl`: act on a running proxy — load or unload a model, unload every model, list what runs.

Each subcommand is one call to the proxy's management routes (`POST /models/NAME/load`, `POST
/models/NAME/unload`, `POST /models/unload`, `GET /running`), at `--url` (default: the config's host and
port). The API key comes from `--api-key-file`, else $LLAMACTL_API_KEY, else the config's first `api_keys`
entry when --url is not given: never from argv, which every user of the machine can read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from llamactl import render
from llamactl.cli.common import load_config, wants_json
from llamactl.errors import RemoteError, UsageError
from llamactl.units import format_bytes, format_duration, parse_duration

KEY_ENV = "LLAMACTL_API_KEY"
CALL_TIMEOUT_S = 30.0  # a load waits on the model's start: the proxy's load_timeout is added

URL = typer.Option(None, "--url", metavar="URL", help="The proxy, e.g. http://127.0.0.1:8080 (default: the config's host:port).")
KEY_FILE = typer.Option(None, "--api-key-file", metavar="FILE", help="File whose first line is the proxy's API key.")
JSON = typer.Option(False, "--json", help="Machine-readable JSON.")


def group() -> None:
    """Act on a running proxy: load or unload models, list what runs."""


def _target(ctx: typer.Context, url: str | None, key_file: Path | None) -> tuple[str, str | None, float]:
    """(the proxy's URL, its API key or None, the load timeout to allow for) from the flags and the config."""
    cfg = load_config(ctx)
    if key_file is not None:
        try:
            lines = key_file.read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--api-key-file {key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not lines:
            raise UsageError(f"--api-key-file {key_file}: the file is empty")
        key: str | None = lines[0].strip()
    else:
        key = os.environ.get(KEY_ENV) or (cfg.api_keys[0] if url is None and cfg.api_keys else None)
    if url is None:
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "", "::") else cfg.host
        url = f"http://[{host}]:{cfg.port}" if ":" in host else f"http://{host}:{cfg.port}"
    return url, key, cfg.load_timeout_s


def _call(ctx: typer.Context, method: str, path: str, url: str | None, key_file: Path | None,
          wait_s: float = 0.0) -> object:
    from urllib.parse import quote

    from llamactl.servers.client import call_proxy

    base, key, load_timeout_s = _target(ctx, url, key_file)
    return call_proxy(method, base, quote(path, safe="/?=&"), key, CALL_TIMEOUT_S + load_timeout_s + wait_s)


def load(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="A configured model or alias."),
         url: Optional[str] = URL, api_key_file: Optional[Path] = KEY_FILE, json_output: bool = JSON) -> None:
    """Start a model in the proxy now (as a request for it would); returns once it is ready."""
    data = _call(ctx, "POST", f"/models/{name}/load", url, api_key_file)
    if wants_json(ctx, json_output):
        render.emit_json(data)
    else:
        print(render.safe(f"{_field(data, 'model')}: {_field(data, 'state')}"))


def unload(ctx: typer.Context,
           name: Optional[str] = typer.Argument(None, metavar="NAME", help="A configured model or alias."),
           all_: bool = typer.Option(False, "--all", help="Unload every model, each once its requests end."),
           force: bool = typer.Option(False, "--force", help="With --all: cut the requests in flight."),
           wait: str = typer.Option("30s", "--wait", metavar="DURATION", help="With --all: how long to wait for requests in flight."),
           url: Optional[str] = URL, api_key_file: Optional[Path] = KEY_FILE, json_output: bool = JSON) -> None:
    """Stop a model's instance in the proxy, or every one (--all)."""
    if (name is None) == (not all_):
        raise UsageError("give a model NAME or --all (not both)")
    if name is not None and (force or wait != "30s"):
        raise UsageError("--force and --wait go with --all (a single unload is refused while requests are in flight)")
    if all_:
        wait_s = parse_duration(wait, what="--wait")
        data = _call(ctx, "POST", f"/models/unload?wait={wait_s:g}&force={str(force).lower()}", url, api_key_file,
                     wait_s)
    else:
        data = _call(ctx, "POST", f"/models/{name}/unload", url, api_key_file)
    if wants_json(ctx, json_output):
        render.emit_json(data)
    elif all_:
        print(render.safe(f"stopped: {', '.join(map(str, _field(data, 'stopped') or [])) or 'none'}"))
        if _field(data, "not_ours"):
            render.note(render.safe(f"left running (not started by the proxy): {', '.join(map(str, _field(data, 'not_ours')))}"))
    else:
        print(render.safe(f"{name}: {'stopped' if _field(data, 'stopped') else 'was not running'}"))


def running(ctx: typer.Context, url: Optional[str] = URL, api_key_file: Optional[Path] = KEY_FILE,
            json_output: bool = JSON) -> None:
    """What the proxy runs: each model's state, GPUs, memory, requests, idle time and TTL left."""
    rows = _field(_call(ctx, "GET", "/running", url, api_key_file), "running")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RemoteError("/running: not a list of instances (is this a llamactl proxy?)")
    if wants_json(ctx, json_output):
        render.emit_json(rows)
        return
    if not rows:
        render.note("nothing runs")
        return
    table = [[r.get("name"), r.get("state"), ",".join(map(str, r.get("gpu_ids") or [])) or "cpu",
              _bytes(r.get("actual_bytes") or r.get("estimated_bytes")), r.get("in_flight"), r.get("queued"),
              format_duration(r.get("idle_s")), "never" if r.get("ttl_s") is None else format_duration(r.get("ttl_left_s"))]
             for r in rows]
    print(render.table(table, ["MODEL", "STATE", "GPUS", "MEMORY", "IN FLIGHT", "QUEUED", "IDLE", "TTL LEFT"],
                       align_right_from=3))


def _field(data: object, key: str) -> object:
    if not isinstance(data, dict):
        raise RemoteError("the proxy's answer is not a JSON object (is this a llamactl proxy?)")
    return data.get(key)


def _bytes(value: object) -> str:
    return format_bytes(value) if isinstance(value, int) else "-"


def register(app: typer.Typer) -> None:
    app.info.name = "ctl"
    app.callback()(group)
    app.command("load")(load)
    app.command("unload")(unload)
    app.command("running")(running)
