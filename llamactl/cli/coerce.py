"""Values that need no conversion skip Typer's pydantic adapters, so most commands never import pydantic.

Typer 0.29 converts every parameter's value through a pydantic TypeAdapter built on first use; importing
pydantic costs ~70 ms on any command that parses a parameter, a Tab of completion included, even for a
default or a string given to a `str` option. Here a missing value, a value already of the parameter's
plain type (a default, a string for a string), a decimal integer for an unbounded `int` and strings for
a list of strings are taken as the adapter would return them; anything else (a bounded number, a float
given as text, a choice, a path) goes to Typer's own adapter, with its messages. tests/unit/
test_cli_coerce.py checks both agree. Typer is pinned below 0.30 (pyproject.toml): this replaces its
`core.build_runtime_param`.
"""

from __future__ import annotations

import re
from typing import Any

import typer.core
from typer._coercion import PassThroughRuntimeParam, RuntimeParam, TypeDescriptor, build_runtime_param

_DECIMAL = re.compile(r"-?[0-9]+")
_PLAIN = (str, int, float)
NOT_PLAIN = object()


def plain(descriptor: TypeDescriptor, value: Any) -> Any:
    """What the parameter's adapter would return for `value` (not None), or NOT_PLAIN where it must decide."""
    annotation, info = descriptor.annotation, descriptor.parameter_info
    if info.min is not None or info.max is not None:
        return NOT_PLAIN
    if annotation in _PLAIN and type(value) is annotation:
        return value
    if annotation is int and type(value) is str and _DECIMAL.fullmatch(value):
        return int(value)
    if annotation == list[str] and isinstance(value, (list, tuple)) and all(type(v) is str for v in value):
        return list(value)
    return NOT_PLAIN


class Deferred:
    """A parameter's coercion: plain values here, the rest through Typer's adapter (built on first need)."""

    def __init__(self, descriptor: TypeDescriptor) -> None:
        self.descriptor = descriptor
        self.full: RuntimeParam | None = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None:  # None, or () for a multi-value parameter, as Typer's own coercion returns
            return PassThroughRuntimeParam(annotation=None, parameter_info=self.descriptor.parameter_info).coerce(
                None, param=param, ctx=ctx)
        converted = plain(self.descriptor, value)
        if converted is not NOT_PLAIN:
            return converted
        if self.full is None:
            self.full = build_runtime_param(self.descriptor)
        return self.full.coerce(value, param=param, ctx=ctx)


def install() -> None:
    typer.core.build_runtime_param = Deferred  # type: ignore[assignment]
