"""Find the llama-server processes a test's state dir owns (by the env tag llamactl gives them)."""

from __future__ import annotations

from pathlib import Path

import psutil

from llamactl.servers.state import INSTANCE_ENV, STATE_DIR_ENV


def tagged_instances(state_dir: Path) -> list[psutil.Process]:
    wanted = str(state_dir.resolve())
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if proc.status() != psutil.STATUS_ZOMBIE and env.get(STATE_DIR_ENV) == wanted and INSTANCE_ENV in env:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
