"""Hypothesis profiles for the property tests, and the count of inputs they tried.

The default profile, "ci", is reproducible: derandomized (the same inputs on every run) and with no example
database. HYPOTHESIS_PROFILE=dev draws fresh random inputs each run instead (and LLAMACTL_PROPERTY_SCALE
multiplies every test's max_examples). At the end of the session a summary line gives the number of inputs
tried per file; with LLAMACTL_PROPERTY_REPORT=PATH the counts are also written to PATH as JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.property import contract

settings.register_profile("ci", max_examples=100, deadline=2000, database=None, derandomize=True,
                          print_blob=False, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=2000, database=None, derandomize=False,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FAMILIES = ("gguf", "config", "state", "scheduler", "hostile_inputs")
_started = time.monotonic()


def _summary() -> dict:
    by_family = {family: 0 for family in FAMILIES}
    by_test: dict[str, int] = {}
    for (family, test), n in sorted(contract.tried.items()):
        by_family[family] = by_family.get(family, 0) + n
        by_test[f"{family}:{test}"] = n
    return {"total": sum(by_family.values()), "by_file": by_family, "by_test": by_test,
            "known_bug_hits": dict(sorted(contract.known_hits.items())), "strict": contract.STRICT,
            "profile": os.environ.get("HYPOTHESIS_PROFILE", "ci"), "seconds": round(time.monotonic() - _started, 1)}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    summary = _summary()
    if not summary["total"]:
        return
    files = ", ".join(f"{family} {n}" for family, n in summary["by_file"].items())
    terminalreporter.write_line(f"property tests: {summary['total']} inputs ({files})")
    if summary["known_bug_hits"]:
        hits = ", ".join(f"{bug} {n}" for bug, n in summary["known_bug_hits"].items())
        terminalreporter.write_line(f"property tests: inputs that hit known open bugs (tolerated): {hits}")
    report = os.environ.get("LLAMACTL_PROPERTY_REPORT")
    if report:
        Path(report).write_text(json.dumps(summary, indent=1) + "\n")
