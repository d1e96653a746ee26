"""Byte constants, parsing sizes like "24GiB", and humanising bytes for display only."""

from __future__ import annotations

import math
import re

from llamactl.errors import UsageError

MAX_DURATION_S = 1e9  # ~31 years: anything longer is a typo, and inf/nan are not durations

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_UNITS = {
    "b": 1,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": KiB, "m": MiB, "g": GiB, "t": TiB,  # llama.cpp-style shorthands are binary
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse "24GiB", "512 MiB", "1.5TB" into bytes; "0" alone is allowed.

    A number without a unit is refused (is "24" bytes or GiB?), as is any
    other unit; the message names the bad text.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid {what} {text!r}: expected a number with a unit such as 24GiB or 512MiB")
    number, unit = match.groups()
    if not unit:
        if float(number) == 0:
            return 0
        raise UsageError(f"invalid {what} {text!r}: missing unit (KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise UsageError(f"invalid {what} {text!r}: unknown unit {unit!r} (use KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    value = float(number) * factor
    if not value < 2**63:  # also inf and nan: 400 digits parse as a float of infinity
        raise UsageError(f"invalid {what} {text[:40]!r}{'...' if len(text) > 40 else ''}: too large")
    return int(round(value))


def format_bytes(n_bytes: int | None) -> str:
    """Human size in binary units as llama.cpp prints them: 1.50 GiB, 512.00 MiB."""
    if n_bytes is None:
        return "-"
    sign = "-" if n_bytes < 0 else ""
    value = abs(n_bytes)
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if value >= factor:
            return f"{sign}{value / factor:.2f} {unit}"
    return f"{sign}{value} B"


def format_mib(n_bytes: int) -> str:
    """MiB with two decimals, the unit of llama.cpp's own buffer logs."""
    return f"{n_bytes / MiB:.2f} MiB"


def format_count(n: int) -> str:
    """Parameter counts: 8.03B, 494.03M, 12.3K."""
    for suffix, factor in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= factor:
            return f"{n / factor:.2f}{suffix}"
    return str(n)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Seconds from "30m", "1h30m", "45s", "2d", "500ms"; a bare number is seconds."""
    stripped = text.strip()
    try:
        value = float(stripped)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0 or value > MAX_DURATION_S:
            raise UsageError(f"invalid {what} {text!r}: expected a finite, non-negative number of seconds")
        return value
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(stripped):
        if stripped[pos:match.start()].strip():
            break
        total += float(match[1]) * _DURATION_S[match[2].lower()]
        pos = match.end()
    if pos == 0 or stripped[pos:].strip():
        raise UsageError(f"invalid {what} {text!r}: expected e.g. 30s, 10m, 1h30m, 2d")
    if total > MAX_DURATION_S:
        raise UsageError(f"invalid {what} {text!r}: longer than {MAX_DURATION_S:g} s")
    return total


def format_duration(seconds: float | None) -> str:
    """Short human duration: 45s, 12m, 3h05m, 2d04h."""
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
