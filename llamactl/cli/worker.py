"""`llamactl worker`: lend this host's devices to another host's llama-server through ggml-rpc-servers.

Starts one rpc-server per chosen GPU (or the CPU at a declared size), serves `GET /inventory` (the
devices in `gpus --json`'s schema, each with its RPC endpoint) to whoever presents the key, and stops
its rpc-servers when it gets SIGTERM or Ctrl-C. The key comes from a file or the environment, never argv.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.common import listen, state_store
from llamactl.errors import UsageError
from llamactl.gpu import inventory
from llamactl.units import parse_size

KEY_ENV = "LLAMACTL_WORKER_KEY"
MAX_KEY_FILE_BYTES = 4096

log = logging.getLogger("llamactl.worker")


def read_key(key_file: str | None) -> str:
    """The worker's key: the first line of --api-key-file, else $LLAMACTL_WORKER_KEY; UsageError if neither."""
    if key_file is not None:
        try:
            with open(key_file, "rb") as fh:
                raw = fh.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"--api-key-file {key_file}: {exc.strerror or exc}") from None
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise UsageError(f"--api-key-file {key_file}: larger than {MAX_KEY_FILE_BYTES} bytes; not a key")
        key = raw.decode("utf-8", "replace").strip().splitlines()[0] if raw.strip() else ""
    else:
        key = os.environ.get(KEY_ENV, "").strip()
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise UsageError(f"the worker needs a key without spaces: --api-key-file FILE or ${KEY_ENV}")
    return key


def authorized(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), key.encode())


def _parse_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gpus takes GPU indices like 0,1, got {text!r}") from None


def command(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDR",
                             help="Address the worker and its rpc-servers bind (a trusted network or a tunnel)."),
    port: int = typer.Option(50050, "--port", min=1, max=65534, metavar="N",
                             help="Port of /inventory; the rpc-servers take the ports after it."),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", metavar="FILE",
                                               help=f"File holding the key clients must present (else ${KEY_ENV})."),
    gpus: Optional[str] = typer.Option(None, "--gpus", metavar="IDS", help="GPU indices to export (default: all)."),
    cpu_memory: Optional[str] = typer.Option(None, "--cpu-memory", metavar="SIZE",
                                             help="Export the CPU as one device of this size, e.g. 32GiB."),
    server_bin: Optional[str] = typer.Option(None, "--server-bin", metavar="FILE",
                                             help="llama-server whose ggml-rpc-server to run."),
) -> None:
    """Lend this host's GPUs (or CPU) to another host's llama-server: ggml-rpc-servers and their inventory."""
    from llamactl.cli.common import load_config
    from llamactl.servers import worker
    from llamactl.servers.probe import find_server

    key = read_key(api_key_file)
    cpu_bytes = parse_size(cpu_memory, what="--cpu-memory") if cpu_memory is not None else None
    ids = _parse_ids(gpus)
    local = inventory.live if ids is not None or cpu_bytes is None else (lambda: inventory.Inventory((), "nvml"))
    exports = worker.choose(local(), ids, cpu_bytes, host, port + 1)
    binary = worker.rpc_binary(find_server(server_bin, load_config(ctx).server_bin))
    sock = listen(host, port, backlog=64, busy="another worker?")
    logging.basicConfig(level=logging.INFO, format="llamactl: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    store = state_store(ctx)
    signal.signal(signal.SIGTERM, _exit)  # a TERM while starting still stops what started (the finally below)
    started = worker.start(store, binary, host, exports)
    try:
        for inst in started:
            log.info("%s: ggml-rpc-server on %s (pid %d, %s)", inst.name, worker.endpoint(host, inst.port), inst.pid,
                     inst.model.removeprefix("rpc:"))
        log.warning("rpc-server has no authentication: anyone who reaches %s can run tensor work on it; keep it on a "
                    "trusted network or a WireGuard/SSH tunnel", host)
        _serve(sock, key, lambda: worker.devices(store, host, exports, local))
    finally:
        worker.stop(store, [e.name for e in exports])


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(sock, key: str, devices) -> None:  # noqa: ANN001
    """GET /inventory behind the key until SIGTERM or Ctrl-C (aiohttp's run_app returns on either)."""
    from aiohttp import web

    @web.middleware
    async def auth(request: web.Request, handler):  # noqa: ANN001, ANN202
        if not authorized(request.headers.get("Authorization"), key):
            return web.json_response({"error": "a valid key is required (Authorization: Bearer KEY)"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def listing(_: web.Request) -> web.Response:
        return web.json_response({"gpus": inventory.to_json(inventory.Inventory(tuple(devices()), "worker"))})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/inventory", listing)
    web.run_app(app, sock=sock, print=None, access_log=None, shutdown_timeout=2.0)


def register(app: typer.Typer) -> None:
    app.command("worker")(command)
