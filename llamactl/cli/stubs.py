"""Subcommands registered for the whole design whose issues have not landed yet."""

from __future__ import annotations

from collections.abc import Callable

import typer

from llamactl.errors import NotBuiltError

_PENDING = {
    "proxy": "OpenAI-compatible server: route by model, launch on demand, evict idle",
}


def _stub(name: str, summary: str) -> Callable[..., None]:
    def command(
        args: list[str] = typer.Argument(None, hidden=True),  # accept anything: the message is the same
    ) -> None:
        raise NotBuiltError(f"`llamactl {name}` is not built yet ({summary})")

    command.__doc__ = f"{summary[0].upper()}{summary[1:]} (not built yet)."
    return command


def register(app: typer.Typer) -> None:
    for name, summary in _PENDING.items():
        app.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(_stub(name, summary))
