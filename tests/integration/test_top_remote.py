"""`top --url` treats the server it watches as untrusted: every failure is one line naming the URL (exit 1,
no internal error), within a deadline and a size bound; a remote `log` is never read from a local path; what
the server sends cannot drive the terminal. A hostile fake /status server provokes each case."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llamactl.servers.buffers import free_port

SNAPSHOT = {"source": "proxy", "at": 0, "gpus": [], "instances": [], "events": [], "requests": [], "history": []}


class Hostile(http.server.BaseHTTPRequestHandler):
    mode = "ok"
    payload: dict = SNAPSHOT

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        mode = type(self).mode
        if mode == "404":
            self.send_response(404)
            self.end_headers()
            return
        if mode == "401" and self.headers.get("Authorization") != "Bearer right":
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            if mode == "garbage":
                self.wfile.write(b"<html>nope")
            elif mode == "list":
                self.wfile.write(b"[1, 2, 3]")
            elif mode == "wrong-types":
                self.wfile.write(json.dumps({"instances": [{"name": "a", "in_flight": "x", "tokens_per_s": "fast",
                                                            "gpu_ids": "0", "devices": [1]}],
                                             "gpus": [{"index": "0"}, 5], "events": "x"}).encode())
            elif mode == "slow":
                for _ in range(60):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1)
            elif mode in ("endless", "huge"):
                chunk = b" " * 2**20
                for _ in range(10_000 if mode == "endless" else 200):
                    self.wfile.write(chunk)
            else:
                self.wfile.write(json.dumps(type(self).payload).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def top(url: str, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("LLAMACTL_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "llamactl", "top", "--url", url, "--once", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(("mode", "says"), [
    ("garbage", "not JSON"), ("list", "unexpected shape"), ("404", "HTTP 404"), ("slow", "did not arrive within"),
    ("endless", "larger than"), ("huge", "larger than"), ("401", "wants an API key"),
])
def test_every_failure_is_one_line_naming_the_url(hostile, mode: str, says: str) -> None:
    server, url = hostile
    Hostile.mode = mode
    start = time.monotonic()
    out = top(url)
    assert time.monotonic() - start < 25
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and says in lines[0] and "internal error" not in lines[0], out.stderr


def test_a_refused_key_says_so(hostile) -> None:
    server, url = hostile
    Hostile.mode = "401"
    out = top(url, "--api-key", "wrong")
    assert out.returncode == 1 and "refused the API key" in out.stderr
    assert top(url, "--api-key", "right").returncode == 0


@pytest.mark.parametrize(("url", "says"), [("http://127.0.0.1:1", "nothing answers"), ("127.0.0.1:8080", "not an http"),
                                           ("http://[::1", "not a usable URL")])
def test_unreachable_and_malformed_urls(url: str, says: str) -> None:
    out = top(url)
    assert out.returncode == 1 and says in out.stderr and "internal error" not in out.stderr, out.stderr


def test_wrong_types_in_the_snapshot_are_drawn_not_crashed_on(hostile) -> None:
    server, url = hostile
    Hostile.mode = "wrong-types"
    out = top(url)
    assert out.returncode == 0 and "internal error" not in out.stderr, out.stderr


def test_a_remote_log_path_is_never_read_and_names_cannot_drive_the_terminal(hostile, tmp_path: Path) -> None:
    server, url = hostile
    secret = tmp_path / "secret"
    secret.write_text("root:the-secret-hash\n")
    Hostile.mode = "ok"
    Hostile.payload = {**SNAPSHOT, "instances": [
        {"name": "evil\x1b]0;pwned\x07\x1b[2J", "model": "m\u202eexe.txt", "state": "ready", "log": str(secret),
         "pid": 1, "port": 1, "gpu_ids": [], "devices": {}}],
        "events": [{"at": 0, "kind": "ready", "model": "x\x1b[31m", "detail": "\x9b2J"}]}
    out = top(url)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\u202e" not in out.stdout and "\x9b" not in out.stdout and "\x07" not in out.stdout
    assert "\\x1b" in out.stdout and "\\u202e" in out.stdout  # shown escaped, not dropped
    assert "the-secret-hash" not in out.stdout


def test_ps_and_proxy_check_print_escapes_not_control_characters(tmp_path: Path) -> None:
    from llamactl.servers.state import Instance, StateStore, Status

    state = tmp_path / "state"
    with StateStore(state).edit() as instances:  # an entry whose model field carries escapes (no process)
        instances["a"] = Instance(name="a", model="/m\x1b]0;pwned\x07\u202e.gguf", port=1, pid=None, create_time=None,
                                  status=Status.FAILED)
    model = tmp_path / "m.gguf"
    from tests.synth import ModelSpec, write_model

    write_model(model, ModelSpec(n_vocab=300))
    config = tmp_path / "c.toml"
    config.write_text(f'[models.a]\npath = "{model}"\naliases = ["x\\u202egpt"]\n')
    from tests.fakes.binary import fake_server_binary

    env = {**os.environ, "LLAMACTL_STATE_DIR": str(state), "LLAMA_SERVER": str(fake_server_binary())}
    for argv in (["ps"], ["--config", str(config), "proxy", "--check"]):
        out = subprocess.run([sys.executable, "-m", "llamactl", *argv], capture_output=True, text=True, timeout=60,
                             env=env)
        assert out.returncode == 0, out.stderr
        assert not any(c in out.stdout for c in "\x1b\x07\u202e"), (argv, out.stdout)
        assert "\\u202e" in out.stdout, (argv, out.stdout)
    raw = subprocess.run([sys.executable, "-m", "llamactl", "ps", "--json"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert json.loads(raw.stdout)[0]["model"].endswith("\u202e.gguf")  # JSON keeps the raw string
