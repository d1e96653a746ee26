"""The real llama-server for end-to-end tests. Missing binary = a loud failure, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.errors import ServerBinaryError
from llamactl.servers.probe import ServerCaps, find_server, probe


@pytest.fixture(scope="session")
def server_binary() -> Path:
    try:
        return find_server()
    except ServerBinaryError as exc:
        pytest.fail(f"end-to-end tests need the real llama-server: {exc}. "
                    "Run `llamactl install-server` (builds one), or export LLAMA_SERVER, "
                    "or deselect them explicitly with -m 'not e2e'.", pytrace=False)


@pytest.fixture(scope="session")
def server_caps(server_binary: Path) -> ServerCaps:
    return probe(server_binary)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
