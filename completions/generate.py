"""Write completions/llamactl.bash, completions/_llamactl (zsh) and completions/llamactl.fish.

Usage: python completions/generate.py [--check]
The scripts come from the Typer app itself (`llamactl --show-completion SHELL`); they call back into
llamactl, which completes subcommands, flags, model names (from the config) and instance names (from
the state file). `--check` exits 1 when a committed script is stale (tests/unit/test_completions.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = {"bash": "llamactl.bash", "zsh": "_llamactl", "fish": "llamactl.fish"}


def script(shell: str) -> str:
    # without this Typer ignores the SHELL argument and prints the script for the shell it runs under
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    out = subprocess.run([sys.executable, "-m", "llamactl", "--show-completion", shell],
                         capture_output=True, text=True, check=True, cwd=HERE.parent, env=env)
    return out.stdout.rstrip("\n") + "\n"


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for shell, name in FILES.items():
        text = script(shell)
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale completion scripts: {', '.join(stale)}; run python completions/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
