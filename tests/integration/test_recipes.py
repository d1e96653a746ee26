"""The operations recipes in docs/operations.md work as written (where this machine can check them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _unit() -> str:
    match = re.search(r"```ini\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/operations.md lost its systemd unit"
    return match.group(1)


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine (the unit's other checks still ran)")
    unit = tmp_path / "llamactl-proxy.service"
    # the recipe's venv path, pointed at this one: verify checks that ExecStart exists
    unit.write_text(_unit().replace("/opt/llamactl/.venv/bin/llamactl", str(Path(sys.executable).parent / "llamactl")))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Unknown" not in out.stderr, out.stderr


def test_the_unit_keeps_what_it_says_it_keeps() -> None:
    """KillMode=mixed SIGKILLs every instance once the proxy exits: --keep-instances needs KillMode=process."""
    unit = _unit()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    keeps = "--keep-instances" in settings["ExecStart"]
    assert settings["KillMode"] == ("process" if keeps else "mixed")
    # only groups every NVIDIA host has: `render` is missing on many, and systemd then refuses to start
    assert set(settings.get("SupplementaryGroups", "").split()) <= {"video"}
    assert "KillMode=process" in DOC.read_text()  # the keep-instances variant is documented


def test_the_cron_line_runs_in_crons_environment(tmp_path: Path) -> None:
    (block,) = re.findall(r"```cron\n(.*?)```", DOC.read_text(), re.S)
    (line,) = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    command = line.split(None, 5)[5].split()
    assert command[0].startswith("/") and command[0].endswith("/llamactl"), f"cron's PATH has no venv: {command}"
    # as cron runs it: a bare environment; the recipe's paths pointed at this venv and a temp state dir
    command[0] = str(Path(sys.executable).parent / "llamactl")
    command[command.index("--state-dir") + 1] = str(tmp_path / "state")
    out = subprocess.run(command, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
