"""Output for people (tables) and for programs (JSON); nothing else prints results."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def emit_json(data: object, *, compact: bool = False) -> None:
    """One JSON document on stdout; compact = one line (JSON lines for --watch)."""
    if compact:
        json.dump(data, sys.stdout, separators=(",", ":"), allow_nan=False)
    else:
        json.dump(data, sys.stdout, indent=2, sort_keys=False, allow_nan=False)
    sys.stdout.write("\n")


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], *, align_right_from: int = 1) -> str:
    from tabulate import tabulate  # ~40 ms: only the commands that print a table pay it

    colalign = ["left"] * min(align_right_from, len(headers)) + ["right"] * max(0, len(headers) - align_right_from)
    return tabulate(rows, headers=headers, tablefmt="simple", colalign=colalign, disable_numparse=True)


def note(message: str) -> None:
    """A remark for the user on stderr (never mixed into JSON on stdout)."""
    print(message, file=sys.stderr)
