"""`llamactl logs NAME`: an instance's llama-server log; -n for the last lines, -f to follow."""

from __future__ import annotations

import sys
import time

import typer

from llamactl.cli.common import state_store
from llamactl.cli.complete import instance_names
from llamactl.errors import UsageError
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
    if not path.exists():
        raise UsageError(f"no log for {name!r} (looked in {path})")
    out = sys.stdout
    with open(path, "rb") as fh:
        if lines:
            out.write(tail(path, lines) + "\n")
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
