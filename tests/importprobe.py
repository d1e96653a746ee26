"""Run the CLI in a fresh interpreter and report which of some modules it imported (start-up tests)."""

from __future__ import annotations

import ast
import subprocess
import sys


def run_and_list(argv: list[str], modules: tuple[str, ...], env: dict[str, str] | None = None
                 ) -> tuple[str, list[str], subprocess.CompletedProcess[str]]:
    """`llamactl ARGV` in a fresh process: its stdout, which of `modules` it imported, and the process."""
    probe = ("import sys, runpy\n"
             "sys.argv = ['llamactl'] + sys.argv[1:]\n"
             "try:\n"
             "    runpy.run_module('llamactl', run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             f"print(sorted(m for m in {modules!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60, env=env)
    stdout, _, loaded = out.stdout.rstrip("\n").rpartition("\n")
    return stdout, ast.literal_eval(loaded) if loaded.startswith("[") else [loaded], out
