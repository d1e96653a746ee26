"""The operations recipes in docs/operations.md work as written (where this machine can check them); the
systemd unit it shows is checked in test_systemd_unit.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


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
