"""Values taken without Typer's pydantic adapter are the adapter's own answers; the rest still go to it."""

from __future__ import annotations

import json
from enum import Enum

import pytest
from typer._coercion import build_runtime_param, resolve_type_descriptor
from typer.models import OptionInfo

from llamactl.cli.coerce import NOT_PLAIN, plain
from tests.synth import ModelSpec, write_model
from tests.importprobe import run_and_list


class Color(str, Enum):
    red = "red"


@pytest.mark.parametrize(("annotation", "value"), [
    (str, "f16"), (str, ""), (str, " spaced "), (str, "24GiB,24GiB"),
    (int, 4096), (int, "8192"), (int, "-5"), (int, "007"), (int, "-0"), (int, "123456789012345678901234567890"),
    (float, 1.0), (list[str], ("a.gguf", "b.gguf")), (list[str], ["x"]), (list[str], ()),
])
def test_plain_values_are_what_typers_adapter_returns(annotation, value) -> None:
    descriptor = resolve_type_descriptor(annotation, OptionInfo())
    theirs = build_runtime_param(descriptor)._coerce_value(value, param=None, ctx=None)
    ours = plain(descriptor, value)
    assert (type(ours), ours) == (type(theirs), theirs)


@pytest.mark.parametrize(("annotation", "info", "value"), [
    (int, OptionInfo(), "1_000"), (int, OptionInfo(), "+5"), (int, OptionInfo(), " 5"), (int, OptionInfo(), "٣"),
    (int, OptionInfo(), "abc"), (int, OptionInfo(min=1), "5"), (int, OptionInfo(min=1), 5), (float, OptionInfo(), "0.5"),
    (Color, OptionInfo(), "red"), (list[str], OptionInfo(), ("a", 1)), (list[int], OptionInfo(), ("1",)),
])
def test_everything_else_goes_to_the_adapter(annotation, info, value) -> None:
    assert plain(resolve_type_descriptor(annotation, info), value) is NOT_PLAIN


def test_estimate_with_numbers_runs_without_pydantic(tmp_path) -> None:
    model = write_model(tmp_path / "m.gguf", ModelSpec())
    argv = ["estimate", str(model), "-c", "1024", "-b", "256", "--gpus", "none", "--json"]
    stdout, loaded, out = run_and_list(argv, ("pydantic",))
    assert loaded == [], out.stderr
    settings = json.loads(stdout)["settings"]
    assert (settings["ctx_size"], settings["batch_size"]) == (1024, 256)
