"""The one table of failures (errors.FAILURES): every error class has its row, docs/usage.md lists each with
the same exit code and HTTP status, and only a client's fault is a 4xx."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import llamactl
from llamactl import errors
from llamactl.errors import ExitCode

USAGE_MD = Path(__file__).resolve().parents[2] / "docs" / "usage.md"

# the failures a client's request causes; every other is the proxy's side (config, state, llama-server, a bug)
CLIENT_FAULTS = {errors.BadRequestError, errors.AuthError, errors.ForbiddenError, errors.UnknownModelError,
                 errors.RequestTimeoutError, errors.BodyTooLargeError, errors.UnsupportedMediaError,
                 errors.QueueFullError}


def doc_table(heading: str) -> list[list[str]]:
    """The rows of the first table under `heading` in docs/usage.md, cells stripped of backticks."""
    text = USAGE_MD.read_text()
    section = text[text.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


def error_classes() -> set[type[BaseException]]:
    """Every exception class defined anywhere in llamactl (all modules imported)."""
    for mod in pkgutil.walk_packages(llamactl.__path__, "llamactl."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [BaseException]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("llamactl"):
                found.add(sub)
    return found


def test_every_error_class_is_in_errors_py_with_its_own_row() -> None:
    classes = error_classes()
    assert {c for c in classes if c.__module__ != "llamactl.errors"} == set()
    assert classes == set(errors.FAILURES)


def test_the_documented_table_is_the_code_table() -> None:
    documented = {row[0]: (int(row[1]), int(row[2])) for row in doc_table("### Error types")}
    in_code = {errors.type_name(cls): (int(f.exit_code), f.http_status) for cls, f in errors.FAILURES.items()}
    assert documented == in_code


def test_every_exit_code_is_documented() -> None:
    documented = {int(row[0]) for row in doc_table("## Exit codes")}
    assert documented == {int(code) for code in ExitCode}
    assert {int(f.exit_code) for f in errors.FAILURES.values()} <= documented


@pytest.mark.parametrize("cls", sorted(errors.FAILURES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_only_a_clients_fault_is_a_4xx(cls: type[BaseException]) -> None:
    status = errors.FAILURES[cls].http_status
    if cls in CLIENT_FAULTS:
        assert 400 <= status < 500
    else:
        assert 500 <= status < 600


@pytest.mark.parametrize("exc, status, code, kind", [
    (errors.StateError("cannot use state dir"), 500, "internal_error", "state"),
    (errors.PlantedFileError("/s/state.lock", "a FIFO"), 500, "internal_error", "planted_file"),
    (errors.NotReadyInTime("late"), 504, "load_timeout", "not_ready_in_time"),
    (errors.KilledWhileLoading(1.5), 503, "model_unavailable", "killed_while_loading"),
    (errors.GGUFError("bad magic"), 503, "model_unavailable", "gguf"),
    (errors.QueueFullError("full", retry_after_s=1), 429, "queue_full", "queue_full"),
    (KeyError("a bug"), 500, "internal_error", "internal"),
])
def test_an_error_maps_by_its_type(exc: BaseException, status: int, code: str, kind: str) -> None:
    assert errors.http_status(exc) == status
    assert errors.failure_of(exc).code == code
    assert errors.type_name(exc) == kind


def test_a_subclass_without_a_row_takes_its_parents() -> None:
    class Elsewhere(errors.ExitedEarly):
        pass

    assert errors.failure_of(Elsewhere("x")) == errors.FAILURES[errors.ExitedEarly]
    assert Elsewhere("x").exit_code is ExitCode.FAILURE
    assert errors.OutOfMemoryAtLoad("x").exit_code is ExitCode.NO_FIT


def test_killed_while_loading_says_what_happened_apart_from_the_guess() -> None:
    exc = errors.KilledWhileLoading(2.25, "tail")
    assert exc.event == "llama-server was killed by SIGKILL after 2.2 s while loading"
    assert str(exc).startswith(exc.event) and "out-of-memory killer" in str(exc)
    assert exc.log_text == "tail"  # no fuller log read yet: the tail stands for it


@pytest.mark.parametrize("exc, status, kind, code", [
    (errors.StateError("cannot use state dir"), 500, "server_error", "internal_error"),
    (errors.BadRequestError("request body is not valid JSON"), 400, "invalid_request_error", "bad_request"),
    (errors.QueueFullError("full", retry_after_s=2), 429, "rate_limit_error", "queue_full"),
])
def test_the_proxy_answers_from_the_table(exc: errors.LlamactlError, status: int, kind: str, code: str) -> None:
    import json

    from llamactl.proxy.guard import error_response

    response = error_response(exc)
    assert response.status == status
    assert json.loads(response.body) == {"error": {"message": str(exc), "type": kind, "code": code}}
