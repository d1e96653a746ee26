"""The command line is the outermost layer: no module of llamactl outside `llamactl/cli` imports it (the proxy,
the views, the servers, GPUs and the calibration are usable without the CLI). `__main__` is the one door in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llamactl

PACKAGE = Path(llamactl.__file__).parent
ENTRY_POINTS = {PACKAGE / "__main__.py"}  # `python -m llamactl` runs the CLI


def cli_imports(tree: ast.AST) -> list[str]:
    """Every import of llamactl.cli (or a module in it) in a module's syntax tree, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "llamactl.cli" or a.name.startswith("llamactl.cli.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            if node.module == "llamactl.cli" or node.module.startswith("llamactl.cli."):
                found.append(node.module)
            elif node.module == "llamactl":
                found += [f"llamactl.{a.name}" for a in node.names if a.name == "cli"]
    return found


def outside_cli() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if (PACKAGE / "cli") not in p.parents and p not in ENTRY_POINTS)


@pytest.mark.parametrize(("source", "found"), [
    ("from llamactl.cli.ps import refresh", ["llamactl.cli.ps"]),
    ("def f():\n    import llamactl.cli.gpus as g", ["llamactl.cli.gpus"]),
    ("from llamactl import cli, views", ["llamactl.cli"]),
    ("from llamactl.client import x\nimport llamactl.clinic", []),
])
def test_the_walk_finds_imports_of_the_cli_anywhere_in_a_module(source: str, found: list[str]) -> None:
    assert cli_imports(ast.parse(source)) == found


def test_no_module_outside_the_cli_imports_it() -> None:
    modules = outside_cli()
    assert PACKAGE / "views.py" in modules and PACKAGE / "proxy" / "app.py" in modules
    offenders = {str(p.relative_to(PACKAGE)): cli_imports(ast.parse(p.read_text(), str(p))) for p in modules}
    assert {p: found for p, found in offenders.items() if found} == {}
