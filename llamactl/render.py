"""Output for people (tables) and for programs (JSON); nothing else prints results."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import fields, is_dataclass, replace


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
