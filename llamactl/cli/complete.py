"""Shell completion of arguments: model names from the config, instance names from the state file.

Completion runs inside the shell's key press: it must be quick and must never fail loudly, so every
lookup is best-effort and returns nothing on any error.
"""

from __future__ import annotations

import typer


def _root_params(ctx: typer.Context) -> dict[str, object]:
    root = ctx.find_root()
    return dict(root.params or {})


def instance_names(ctx: typer.Context, incomplete: str) -> list[str]:
    try:
        from llamactl import paths
        from llamactl.servers.state import StateStore

        state_dir = _root_params(ctx).get("state_dir")
        store = StateStore(paths.state_dir(state_dir if isinstance(state_dir, str) else None))
        return sorted(n for n in store.snapshot() if n.startswith(incomplete))
    except Exception:
        return []


def model_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Configured model names and aliases; nothing (so the shell completes file names) otherwise."""
    try:
        from llamactl import config, paths

        explicit = _root_params(ctx).get("config")
        cfg = config.load(paths.config_file(explicit if isinstance(explicit, str) else None))
        names = set(cfg.models) | {a for m in cfg.models.values() for a in m.aliases}
        return sorted(n for n in names if n.startswith(incomplete))
    except Exception:
        return []
