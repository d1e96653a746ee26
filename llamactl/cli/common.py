"""Small helpers shared by subcommand modules."""

from __future__ import annotations

import typer


def wants_json(ctx: typer.Context, local_flag: bool) -> bool:
    """`--json` works before the subcommand (global) and after it (local)."""
    return local_flag or bool(getattr(ctx.obj, "json", False))
