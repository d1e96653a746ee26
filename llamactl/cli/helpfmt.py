"""Help as shell users read it (git, ripgrep): a flag shows no value, a value option a name for what it
takes (`DURATION`, `N`, `SIZE`, `FILE`), an argument its name alone; never a Python type (`<str>`,
`<int range>`, `<list[str]>`).

Typer 0.29 prints the parameter's type beside every name unless a metavar is given; these two hooks give
each option a value name (its own metavar, else one for its flag or its type) and drop the type beside
arguments. Typer is pinned below 0.30 (pyproject.toml) and tests/integration/test_cli.py checks every
command's help for type tags and line width, so a Typer that changes this is caught.
"""

from __future__ import annotations

from typing import Any

import typer.core
from typer import _click as click  # Typer 0.29 vendors Click (only its Context type is named here)

# value names for the flags whose type alone says too little
VALUE_NAMES = {
    "--gpus": "SPEC", "--gpus-file": "FILE", "--server-bin": "FILE", "--config": "FILE", "--model": "FILE",
    "--state-dir": "DIR", "--gpu-overhead": "SIZE", "--margin": "SIZE", "--host-memory": "SIZE",
    "--grace": "DURATION", "--timeout": "DURATION", "--idle": "DURATION", "--tensor-split": "N,N,...",
    "--gpu-ids": "IDS", "--url": "URL", "--name": "NAME", "--host": "ADDR", "--api-key": "KEY",
    "--cache-type-k": "TYPE", "--cache-type-v": "TYPE", "--cache-type-k-draft": "TYPE",
    "--cache-type-v-draft": "TYPE", "--flash-attn": "on|off|auto", "--gpu-layers": "N",
    "--n-gpu-layers": "N", "--n-gpu-layers-draft": "N", "--log-format": "text|json", "--interval": "SECONDS",
    "--gpu-mem-threshold": "FRACTION", "--gpu-util-threshold": "PERCENT", "--port": "PORT",
    "--port-start": "PORT",
}


def _value_name(option: Any) -> str:
    for opt in option.opts:
        if opt in VALUE_NAMES:
            return VALUE_NAMES[opt]
    desc = option.type_descriptor
    if desc.is_choice:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    bare = option.bare_type()
    if bare.endswith("int"):
        return "N"
    if bare.endswith("float"):
        return "NUM"
    long = next((o for o in option.opts if o.startswith("--")), option.opts[0])
    return long.lstrip("-").upper().replace("-", "_")


def shown_value_name(option: Any) -> str:
    """The name --help shows for what the option takes (completion reads FILE and DIR as paths)."""
    return option.metavar if option.metavar is not None else _value_name(option)


def _option_value(self: Any, ctx: click.Context) -> str | None:
    return shown_value_name(self)


def _no_type(self: Any, ctx: click.Context) -> str | None:
    return None


def install() -> None:
    typer.core.TyperOption.display_type_rich = _option_value  # type: ignore[method-assign]
    typer.core.TyperArgument.display_type_rich = _no_type  # type: ignore[method-assign]
