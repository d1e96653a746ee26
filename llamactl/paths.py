"""Every directory llamactl uses: an explicit option, then an env var, then platformdirs."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "llamactl"


def _pick(explicit: str | os.PathLike[str] | None, env: str, default: str) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(env)
    if from_env:
        return Path(from_env).expanduser()
    return Path(default)


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state dir (state.json, instance logs): --state-dir, LLAMACTL_STATE_DIR, XDG state."""
    return _pick(explicit, "LLAMACTL_STATE_DIR", platformdirs.user_state_dir(APP))


def config_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file: --config, LLAMACTL_CONFIG, then $XDG_CONFIG_HOME/llamactl/config.toml."""
    if explicit or os.environ.get("LLAMACTL_CONFIG"):
        return _pick(explicit, "LLAMACTL_CONFIG", "")
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def cache_dir() -> Path:
    """Caches that can be rebuilt (the llama-server probe): LLAMACTL_CACHE_DIR, then XDG cache."""
    return _pick(None, "LLAMACTL_CACHE_DIR", platformdirs.user_cache_dir(APP))
