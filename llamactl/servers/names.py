"""Instance names: they become file names (logs/NAME.log), env tags and config keys, so one rule for all."""

from __future__ import annotations

import re
from pathlib import Path

from llamactl.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_name(name: object) -> bool:
    """Letters, digits, '.', '_', '-'; a letter or digit first (no '..', no hidden files); at most 128."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_name(name: str, what: str = "--name") -> str:
    if not valid_name(name):
        raise UsageError(f"{what} {name!r} is not a valid instance name: use letters, digits, '.', '_' and '-' "
                         f"(starting with a letter or digit, at most 128 characters)")
    return name


def name_for(model: Path) -> str:
    """The default instance name of a model file: its stem (split files once), made a valid name."""
    stem = model.name.removesuffix(".gguf").split("-00001-of-")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:128]
    return name or "model"
