"""`llamactl logs NAME`: an instance's llama-server log; -n for the last lines, -f to follow."""

from __future__ import annotations

import os
import sys
import time

import typer

from llamactl.cli.common import state_store
from llamactl.cli.complete import instance_names
from llamactl.errors import UsageError
from llamactl.servers import files
from llamactl.servers.runner import tail
from llamactl.servers.state import check_name


def command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Instance name.", autocompletion=instance_names),
    lines: int = typer.Option(0, "-n", "--lines", min=0, help="Only the last N lines (0 = all)."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines until Ctrl-C."),
) -> None:
    """Print an instance's log."""
    store = state_store(ctx)
    path = store.log_path(check_name(name, "instance name"))  # derived from the name, never read from the state
    try:
        fd = files.open_regular(path, os.O_RDONLY)  # a planted link, FIFO or device is refused, not read
    except FileNotFoundError:
        raise UsageError(f"no log for {name!r} (looked in {path})") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    out = sys.stdout
    with os.fdopen(fd, "rb") as fh:
        if lines:
            out.write(tail(path, lines) + "\n")  # reads only the file's last 64 KiB
            fh.seek(0, 2)
        else:
            for chunk in iter(lambda: fh.read(65536), b""):
                out.write(chunk.decode("utf-8", "replace"))
        out.flush()
        if not follow:
            return
        try:
            while True:
                chunk = fh.read(65536)
                if chunk:
                    out.write(chunk.decode("utf-8", "replace"))
                    out.flush()
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return


def register(app: typer.Typer) -> None:
    app.command("logs")(command)
