"""Chaos, a short round (bench/chaos.py runs longer): the proxy under load while instances and the proxy
are SIGKILLed at random. Only processes this test started are signalled (the proxy it spawned, and
llama-servers tagged with its own state dir)."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import run


def test_kills_under_load_leave_no_orphans_no_entries_no_ports_and_no_hung_requests(tmp_path: Path) -> None:
    result = run(tmp_path, seconds=20, clients=4, seed=7, every_s=1.0, minimum={"instance": 3, "proxy": 1})
    assert result["kills"].get("instance", 0) >= 3 and result["kills"].get("proxy", 0) >= 1, result
    assert result["unanswered"] == 0, result
    assert result["orphans"] == 0 and result["live_entries_left"] == 0 and result["ports_held"] == [], result
    assert result["proxy_exit"] == 0, result
    outcomes = result["outcomes"]
    reached = result["requests"] - outcomes.get("refused (proxy down)", 0) - outcomes.get("reset (proxy killed)", 0)
    assert outcomes.get("200", 0) >= reached // 2, result  # most requests that reached a proxy were served
    assert "200-truncated" not in result["outcomes"], result
    assert not {"400", "500"} & set(outcomes), result  # a valid request never gets a client error or a crash  # a broken stream always says so (an error event)
