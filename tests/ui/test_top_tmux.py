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
from llamactl.servers.client import wait_healthy
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

        def proxy(self, ttl: str) -> str:
            """A proxy on this state dir with the model as `alpha` (stopped at the end); its URL."""
            port = free_port()
            config = tmp_path / "config.toml"
            config.write_text(f'port = {port}\nport_start = {free_port()}\nidle_ttl = "{ttl}"\n'
                              f'[defaults]\nctx_size = 256\n[models.alpha]\npath = "{model}"\n')
            proc = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(config), "proxy"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proxies.append(proc)
            url = f"http://127.0.0.1:{port}"
            assert wait_healthy(url, 20, alive=lambda: proc.poll() is None, interval_s=0.1)
            return url

        def start(self, width: int = 160) -> None:
            tmux("new-session", "-d", "-s", session, "-x", str(width), "-y", "45",
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

    proxies: list[subprocess.Popen] = []
    t = Term()
    yield t
    tmux("kill-server")
    for proc in proxies:
        proc.terminate()
        proc.wait(timeout=30)
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


def test_top_at_80_columns_shows_what_the_proxy_knows_of_its_instances(term) -> None:
    """Local mode (the state dir, no --url) on an instance a proxy started: its TTL and the proxy's events;
    at 80 columns no header is cut (empty columns go, headers shorten, the model's name is cut first)."""
    import httpx

    url = term.proxy(ttl="10m")
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": []}, timeout=60)
    assert reply.status_code == 200
    term.start(width=80)
    shown = term.wait_for("9m")  # the TTL left of a 10-minute TTL, counting down
    shown = term.wait_for("on demand")  # the proxy's launch event (local differences would say "pid ...")
    assert "ready" in shown.split("events", 1)[1] and "none yet" not in shown
    header = next(line for line in shown.splitlines() if "NAME" in line)
    assert "…" not in header and "STATE" in header and "TTL" in header, shown
    row = next(line for line in shown.splitlines() if "alpha" in line and "ready" in line)
    assert "…" not in row.replace("…", "", 1)  # at most the model's name is cut, once
    assert max(len(line) for line in shown.splitlines()) <= 80
    term.keys("q")
