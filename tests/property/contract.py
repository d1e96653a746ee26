"""The contract every property test checks, the bugs it already knows, and the count of inputs tried.

Contract: a parser given hostile input returns its result or raises llamactl's own error (a LlamactlError
subclass) whose message is one non-empty line; never another exception type and never a hang (Hypothesis'
deadline). A failure that matches a KNOWN bug below is counted and tolerated, so the suite stays green while
the bug is open; each known bug also has a strict-xfail reproducer in the test files, which turns red once
the bug is fixed (then delete the entry here). LLAMACTL_PROPERTY_STRICT=1 tolerates nothing.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import event

from llamactl.errors import LlamactlError

# every bug listed below is fixed (each has a regression test), so nothing is tolerated unless asked for:
# LLAMACTL_PROPERTY_STRICT=0 tolerates the listed ones again (e.g. while a new one is being fixed)
STRICT = os.environ.get("LLAMACTL_PROPERTY_STRICT", "1") not in ("", "0")
SCALE = float(os.environ.get("LLAMACTL_PROPERTY_SCALE", "1") or 1)

tried: Counter[tuple[str, str]] = Counter()  # (family, test name) → examples run
known_hits: Counter[str] = Counter()  # known bug id → examples that hit it


def examples(n: int) -> int:
    """A test's max_examples, scaled by LLAMACTL_PROPERTY_SCALE (e.g. 10 for a long local run)."""
    return max(1, int(n * SCALE))


def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Count every call of a property test body (put it under @given) under its file's family."""
    family = fn.__module__.rsplit(".", 1)[-1].removeprefix("test_").removesuffix("_props")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tried[(family, fn.__name__)] += 1
        return fn(*args, **kwargs)

    return wrapper


def one_line(message: str) -> bool:
    return bool(message.strip()) and len(message.splitlines()) == 1


@dataclass(frozen=True)
class KnownBug:
    id: str
    exc_type: type[BaseException]
    pattern: str = ""  # regex searched in str(exc)
    multiline: bool = False  # the bug is a LlamactlError whose message spans lines

    def matches(self, exc: BaseException) -> bool:
        if not isinstance(exc, self.exc_type):
            return False
        if self.multiline and one_line(str(exc)):
            return False
        return re.search(self.pattern, str(exc)) is not None


# Bugs found by these tests, all fixed (test_regression_* reproduce each); kept to name them in a failure.
GGUF_RAW_KEY = KnownBug("gguf-raw-key-in-message", LlamactlError, multiline=True)
CONFIG_UNDECODABLE = KnownBug("config-undecodable", UnicodeDecodeError, "codec can't decode")
CONFIG_SIZE_OVERFLOW = KnownBug("config-size-overflow", OverflowError, "cannot convert float infinity to integer")
CONFIG_DURATION_OVERFLOW = KnownBug("config-duration-overflow", OverflowError, "int too large to convert to float")
CONFIG_INT_DIGITS = KnownBug("config-int-digits", ValueError, r"Exceeds the limit \(\d+ digits\) for integer string")
CONFIG_UNKNOWN_USER = KnownBug("config-unknown-user-home", RuntimeError, "Could not determine home directory")
CONFIG_RAW_TEXT = KnownBug("config-raw-text-in-message", LlamactlError, multiline=True)  # keys, names, paths
CONFIG_UNHASHABLE_BITS = KnownBug("config-json-unhashable-cache-bits", TypeError, "unhashable type")
CONFIG_JSON_NO_PATH = KnownBug("config-json-error-without-path", LlamactlError)  # detected by the test itself
STATE_UNHASHABLE_STATUS = KnownBug("state-unhashable-status", TypeError, "unhashable type")


KNOWN = object()  # what `outcome` returns for an input that hit a known, tolerated bug


def tolerate(bug: KnownBug) -> bool:
    """For a known bug a test detects itself (not by an exception): count it; True unless strict."""
    if STRICT:
        return False
    known_hits[bug.id] += 1
    event(f"known bug: {bug.id}")
    return True


def outcome(call: Callable[[], Any], *, expect: type[LlamactlError] | tuple[()] = LlamactlError,
            known: tuple[KnownBug, ...] = ()) -> Any:
    """`call()`'s result, or the expected LlamactlError it raised (checked: one line), or KNOWN.

    `expect=()` allows no exception at all. Any other exception propagates: Hypothesis shrinks it and
    reports the smallest input.
    """
    try:
        return call()
    except Exception as exc:
        bug = next((b for b in known if b.matches(exc)), None)
        if bug is not None and tolerate(bug):
            return KNOWN
        if not isinstance(exc, expect):
            raise
        message = str(exc)
        assert one_line(message), f"{type(exc).__name__} message is not one line: {message!r}"
        return exc
