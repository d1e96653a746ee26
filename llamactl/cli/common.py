"""Small helpers shared by subcommand modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    import socket

    from llamactl.config import Config
    from llamactl.servers.state import StateStore


def wants_json(ctx: typer.Context, local_flag: bool) -> bool:
    """`--json` works before the subcommand (global) and after it (local)."""
    return local_flag or bool(getattr(ctx.obj, "json", False))


def state_store(ctx: typer.Context) -> "StateStore":
    """The state file for --state-dir / LLAMACTL_STATE_DIR / XDG state."""
    from llamactl import paths
    from llamactl.servers.state import StateStore

    return StateStore(paths.state_dir(getattr(ctx.obj, "state_dir", None)))


def load_config(ctx: typer.Context) -> "Config":
    """The config file: --config (must exist), else the default path when it exists."""
    from llamactl import config, paths

    explicit = getattr(ctx.obj, "config", None)
    return config.load(paths.config_file(explicit), required=bool(explicit))


def listen(host: str, port: int, *, backlog: int, busy: str) -> "socket.socket":
    """A listening, non-blocking socket on host:port, bound before a server starts so that a port in use is
    one line (`busy` says who might hold it) rather than a traceback from inside the event loop."""
    import socket

    from llamactl.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc} ({busy}); "
                         "choose another --port") from None
    sock.setblocking(False)
    return sock
