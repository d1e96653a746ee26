"""`llamactl top` as a person uses it: in a real terminal (tmux), reading the screen, pressing keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamactl.servers.buffers import free_port
from tests.fakes.procs import tagged_instances
from tests.fakes.binary import fake_server_binary
from tests.synth import ModelSpec, write_model

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_llama_server.py"


@pytest.fixture
def term(tmp_path: Path):
    if shutil.which("tmux") is None:
        pytest.fail("these tests need tmux (apt install tmux; .ci/run installs it)", pytrace=False)
    wrapper = fake_server_binary()  # an executable named llama-server
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp_path / "state"), "LLAMACTL_GPUS": "none",
           "LLAMACTL_CACHE_DIR": str(tmp_path / "cache"), "LLAMA_SERVER": str(wrapper), "TERM": "xterm-256color"}
    model = write_model(tmp_path / "tiny.gguf", ModelSpec(n_vocab=300))
    session = f"llamactl-top-{os.getpid()}"
    sock = str(tmp_path / "tmux.sock")

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True, env=env, timeout=20).stdout

    class Term:
        def launch(self, name: str) -> None:
            out = subprocess.run([sys.executable, "-m", "llamactl", "launch", str(model), "--name", name, "-c", "256",
                                  "--port-start", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr

        def start(self) -> None:
            tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "45",
                 f"{sys.executable} -m llamactl top --interval 0.5; sleep 30")

        def screen(self) -> str:
            return tmux("capture-pane", "-p", "-t", session)

        def keys(self, *keys: str) -> None:
            tmux("send-keys", "-t", session, *keys)

        def wait_for(self, text: str, timeout_s: float = 10, present: bool = True) -> str:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                shown = self.screen()
                if (text in shown) == present:
                    return shown
                time.sleep(0.2)
            raise AssertionError(f"{'no' if present else 'still'} {text!r} on screen:\n{self.screen()}")

        def ps(self) -> list[dict]:
            out = subprocess.run([sys.executable, "-m", "llamactl", "ps", "--json"], env=env, capture_output=True,
                                 text=True, timeout=30)
            return json.loads(out.stdout)

    t = Term()
    yield t
    tmux("kill-server")
    for proc in tagged_instances(tmp_path / "state"):
        proc.kill()


def test_top_shows_instances_and_evicts_the_selected_one_on_confirmation(term) -> None:
    term.launch("alpha")
    term.launch("beta")
    term.start()
    shown = term.wait_for("beta")
    assert "llamactl top" in shown and "alpha" in shown and "ready" in shown and "GPUs: none" in shown
    term.keys("Down")  # select beta
    term.keys("e")
    term.wait_for("evict beta? y/n")
    term.keys("n")  # changed its mind
    term.wait_for("kept beta")
    assert {i["name"] for i in term.ps()} == {"alpha", "beta"}
    term.keys("e")
    term.wait_for("evict beta? y/n")
    term.keys("y")
    term.wait_for("evicted beta")
    assert [i["name"] for i in term.ps()] == ["alpha"]
    term.wait_for("stopped", timeout_s=5)  # the event list says what happened
    term.keys("l")
    term.wait_for("log: alpha")  # the selected instance's log tail
    term.keys("q")
    term.wait_for("llamactl top", present=False)


def test_top_sees_a_launch_happen_and_sorts(term) -> None:
    term.start()
    term.wait_for("no instances")
    term.launch("gamma")
    term.wait_for("gamma")
    assert "launch" in term.wait_for("launch")  # an event, not only a row
    term.keys("s")
    term.wait_for("sort: memory")
    term.keys("q")
