"""render.result(): one result written as JSON or as text, notes on stderr, the exit code, a failing result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from llamactl import render
from llamactl.errors import NoFitError, UsageError


@dataclass(frozen=True)
class Counted:
    n: int

    def to_json(self) -> dict[str, object]:
        return {"n": self.n}

    def text(self) -> Iterator[str]:
        yield render.Note("before")
        yield f"{self.n} things\nover two lines"
        yield render.Note("after")


def test_text_goes_to_stdout_and_notes_to_stderr_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    render.result(False, Counted(3))
    out, err = capsys.readouterr()
    assert (out, err) == ("3 things\nover two lines\n", "before\nafter\n")


@pytest.mark.parametrize("compact, expected", [(False, '{\n  "n": 3\n}\n'), (True, '{"n":3}\n')])
def test_json_is_the_document_alone(capsys: pytest.CaptureFixture[str], compact: bool, expected: str) -> None:
    render.result(True, Counted(3), compact=compact)
    assert capsys.readouterr() == (expected, "")


@pytest.mark.parametrize("as_json", [False, True])
def test_a_nonzero_exit_code_exits_after_the_output(capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    with pytest.raises(SystemExit) as exited:
        render.result(as_json, Counted(1), exit_code=3)
    assert exited.value.code == 3 and "1" in capsys.readouterr().out


def test_a_failing_result_under_json_is_one_object_with_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        render.result(True, Counted(2), failure=NoFitError("too big"))
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"n": 2, "error": {"type": "no_fit", "message": "too big", "exit_code": 4}}
    assert exited.value.code == 4


def test_a_failing_result_as_text_prints_then_raises_the_failure(capsys: pytest.CaptureFixture[str]) -> None:
    failure = UsageError("bad key")
    with pytest.raises(UsageError) as raised:
        render.result(False, Counted(2), failure=failure)
    assert raised.value is failure and "2 things" in capsys.readouterr().out


def test_line_is_one_line_or_one_note(capsys: pytest.CaptureFixture[str]) -> None:
    render.result(False, render.Line("deleted 2", {"deleted": 2}))
    render.result(False, render.Line("wrote it", {"file": "x"}, note=True))
    render.result(True, render.Line("deleted 2", {"deleted": 2}))
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "deleted 2" and json.loads("\n".join(out.splitlines()[1:])) == {"deleted": 2}
    assert err == "wrote it\n"
