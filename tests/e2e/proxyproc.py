"""A real `llamactl proxy` process for end-to-end tests and benches: its own state dir, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llamactl.servers.buffers import free_port
from llamactl.servers.client import wait_healthy


@contextmanager
def running_proxy(tmp: Path, config: str, binary: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The proxy on `config` (TOML after its `port = N` line, which this adds) in `tmp`, no GPUs: (its URL, the
    environment its commands need). On leaving, SIGTERM and an exit code of 0 asserted."""
    port = free_port()
    (tmp / "config.toml").write_text(f"port = {port}\n{config}")
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp / "state"), "LLAMACTL_GPUS": "none",
           "LLAMA_SERVER": str(binary), "LLAMACTL_CACHE_DIR": str(tmp / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(tmp / "config.toml"), "proxy"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, 30, alive=lambda: proc.poll() is None), "llamactl proxy did not start"
        yield url, env
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 0
