"""Small helpers shared by subcommand modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
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
