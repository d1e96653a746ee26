"""Output for people (tables) and for programs (JSON); nothing else prints results.

A command builds a result (a frozen record with `to_json()` and `text()`) and hands it to `result()`,
which writes one or the other: the JSON document and the text come from the same fields, and every
command's output, success or failure, obeys `--json` the same way.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llamactl.errors import LlamactlError


class Note(str):
    """A line of a result's text that is a remark for the user, not the result: written to stderr."""


class Result(Protocol):
    """What a command returns for `result()` to write."""

    def to_json(self) -> object:
        """The `--json` document (the keys docs/usage.md lists)."""
        ...

    def text(self) -> Iterable[str]:
        """The lines for people, in order: a str goes to stdout (a table may be one multi-line str), a Note
        to stderr."""
        ...


@dataclass(frozen=True)
class Line:
    """A result that is one line for people and a flat object for programs (`deleted 3 observations`,
    `{"deleted": 3}`); `note`: the line is a remark, for stderr."""

    line: str
    doc: dict[str, object]
    note: bool = False

    def to_json(self) -> dict[str, object]:
        return dict(self.doc)

    def text(self) -> Iterable[str]:
        return [Note(self.line) if self.note else self.line]


def result(as_json: bool, res: Result, *, exit_code: int = 0, failure: LlamactlError | None = None,
           compact: bool = False) -> None:
    """Write a command's result: its JSON document on stdout, or its text; then exit with `exit_code`
    unless it is 0 (plan's fit codes).

    `failure` is a result that is also an error (`proxy --check` with problems): under --json the document
    gains the `error` member every JSON error has (still one object on stdout) and the process exits with
    the error's code; as text the error is raised after the lines, for the CLI's one line on stderr.
    `compact`: the document on one line (JSON lines, as `gpus --watch` writes)."""
    if as_json:
        doc = res.to_json()
        if failure is not None:
            from llamactl.errors import type_name

            assert isinstance(doc, dict), "a failing result's document is an object"
            doc = {**doc, **error_json(type_name(failure), str(failure), int(failure.exit_code))}
            exit_code = int(failure.exit_code)
        emit_json(doc, compact=compact)
    else:
        for line in res.text():
            if isinstance(line, Note):
                note(line)
            else:
                print(line)
        if failure is not None:
            raise failure
    if exit_code:
        sys.stdout.flush()
        raise SystemExit(exit_code)


def error_json(kind: str, message: str, exit_code: int) -> dict[str, object]:
    """A failure under --json: `{"error": {"type", "message", "exit_code"}}` (docs/usage.md, "Error types")."""
    return {"error": {"type": kind, "message": message, "exit_code": exit_code}}


def emit_json(data: object, *, compact: bool = False) -> None:
    """One JSON document on stdout; compact = one line (JSON lines for --watch)."""
    if compact:
        json.dump(data, sys.stdout, separators=(",", ":"), allow_nan=False)
    else:
        json.dump(data, sys.stdout, indent=2, sort_keys=False, allow_nan=False)
    sys.stdout.write("\n")


# what a terminal would act on rather than show: C0 and C1 controls (ESC starts every escape sequence),
# DEL, and the bidirectional overrides and isolates that reorder what follows them
_UNSAFE = frozenset([*range(0x00, 0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                     *range(0x2066, 0x206A)])


def safe(text: object) -> str:
    """Text for a terminal: every control character and bidi override shown escaped (`\\x1b`, `\\u202e`),
    so a name, a path or a remote string cannot move the cursor, retitle the window or reorder a line.
    JSON output keeps the raw strings."""
    text = str(text)
    if not any(ord(c) in _UNSAFE for c in text):
        return text
    return "".join(c if ord(c) not in _UNSAFE else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def safe_tree(data: object) -> object:
    """Every string in a tree of JSON values and dataclasses made safe() (a snapshot, before it is drawn)."""
    if isinstance(data, str):
        return safe(data)
    if isinstance(data, dict):
        return {safe(k) if isinstance(k, str) else k: safe_tree(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(safe_tree(v) for v in data)
    if is_dataclass(data) and not isinstance(data, type):  # a frozen record (a view, a GPU): a copy, made safe
        return replace(data, **{f.name: safe_tree(getattr(data, f.name)) for f in fields(data) if f.init})
    return data


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], *, align_right_from: int = 1) -> str:
    from tabulate import tabulate  # ~40 ms: only the commands that print a table pay it

    rows = [[safe(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]
    colalign = ["left"] * min(align_right_from, len(headers)) + ["right"] * max(0, len(headers) - align_right_from)
    return tabulate(rows, headers=headers, tablefmt="simple", colalign=colalign, disable_numparse=True)


def note(message: str) -> None:
    """A remark for the user on stderr (never mixed into JSON on stdout)."""
    print(message, file=sys.stderr)
