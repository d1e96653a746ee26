"""The proxy's log under `--log-format json`: every line of its output a JSON object a log shipper takes as
it is, with an RFC 3339 time, a level and an event, through a start, a request, a reload and a stop."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from datetime import datetime

from tests.integration.test_proxy import make_proxy, wait_for  # noqa: F401  (make_proxy: the fixture)


def _lines(text: str) -> list[dict]:
    """Every line parsed (a line that is not JSON fails the test, naming it)."""
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return lines


def _events(text: str) -> list[str]:
    return [line.get("event") for line in _lines(text)]


def test_every_line_is_json_with_time_level_and_event(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, flags=("--log-format", "json"))
    assert proxy.post("alpha", max_tokens=3).status_code == 200
    proxy.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload" in _events(proxy.logs()), 10), proxy.logs()
    assert proxy.stop() == 0
    lines = _lines(proxy.logs())
    for line in lines:
        assert {"time", "level", "event", "message"} <= line.keys(), line
        stamp = datetime.fromisoformat(line["time"])
        assert stamp.tzinfo is not None and line["time"][10] == "T", line["time"]
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
    by_event = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    assert {"listening", "launch", "ready", "access", "reload", "stopped"} <= by_event.keys(), sorted(by_event)
    ready = by_event["ready"][0]
    assert ready["model"] == "alpha" and isinstance(ready["port"], int) and ready["duration_ms"] > 0
    assert by_event["launch"][0]["port"] == ready["port"]
    chat = next(a for a in by_event["access"] if a["path"] == "/v1/chat/completions")
    assert chat["model"] == "alpha" and chat["status"] == 200 and chat["method"] == "POST" and chat["duration_ms"] > 0
    assert by_event["reload"][0]["models"] == ["alpha"]
    assert [s["reason"] for s in by_event["stopped"]] == ["shutdown"] and by_event["stopped"][0]["model"] == "alpha"
    times = [datetime.fromisoformat(line["time"]) for line in lines]
    assert times == sorted(times)  # one process, one clock: the stream is in order


def test_a_fatal_error_is_the_streams_last_json_line(make_proxy) -> None:
    proxy = make_proxy({"alpha": []}, flags=("--log-format", "json"))
    # a second proxy on the port the first holds: it cannot listen, and says so in JSON
    out = subprocess.run(proxy.argv, env=proxy.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    last = _lines(out.stderr)[-1]
    assert last["event"] == "fatal" and last["level"] == "error" and last["exit_code"] == 2
    assert f"cannot listen on 127.0.0.1:{proxy.port}" in last["message"] and last["error_type"] == "usage"


def test_text_lines_stay_plain(make_proxy) -> None:
    proxy = make_proxy({"alpha": []})
    assert proxy.post("alpha").status_code == 200
    assert proxy.stop() == 0
    text = proxy.logs()
    assert "llamactl: alpha: ready on port" in text and "llamactl: POST /v1/chat/completions model=alpha status=200" in text
    assert not any(line.startswith("{") for line in text.splitlines())
