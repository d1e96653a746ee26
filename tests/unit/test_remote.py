"""Remote boxes without I/O: what an upstream's /v1/models and /running say, and which box a request goes to."""

from __future__ import annotations

import json

import pytest

from llamactl.config import Config, ModelConfig, Remote
from llamactl.errors import ModelUnavailableError
from llamactl.model.registry import ServerSettings
from llamactl.proxy import remote
from llamactl.proxy.remote import Box, Reading, Remotes


def _config(**upstreams: str) -> Config:
    local = ModelConfig("local", path=None, settings=ServerSettings(), aliases=("loc",))  # type: ignore[arg-type]
    return Config(models={"local": local}, remotes={"solo": Remote("solo", "http://s:1", "k")},
                  upstreams=tuple(Remote(n, u) for n, u in upstreams.items()))


def test_models_of_keeps_valid_names_in_order_bounded() -> None:
    body = json.dumps({"data": [{"id": "b"}, {"id": "a"}, {"id": "../x"}, {"id": 3}, "junk", {"id": "b"}]}).encode()
    assert remote.models_of(body) == ("b", "a")
    assert remote.models_of(json.dumps({"data": [{"id": f"m{i}"} for i in range(300)]}).encode(), limit=256)[-1] == "m255"
    assert remote.models_of(b"not json") is None and remote.models_of(b"[]") is None


def test_running_slots_of_ready_models() -> None:
    body = json.dumps({"running": [
        {"model": "a", "state": "ready", "slots_total": 4, "in_flight": 1},
        {"model": "b", "state": "ready", "slots_total": None, "in_flight": 0},  # slots unknown: one
        {"model": "c", "state": "starting", "slots_total": 4, "in_flight": 0},
        {"model": "d", "state": "ready", "slots_total": 2, "in_flight": 2},
        {"model": "a", "state": "ready", "slots_total": 2, "in_flight": 2},  # a second row: the freer one stays
    ]}).encode()
    assert remote.running_slots(body) == {"a": (1, 4), "b": (0, 1), "d": (2, 2)}
    assert remote.running_slots(b"{") == {} and remote.running_slots(b'{"running": 3}') == {}


@pytest.mark.parametrize("spares,reachable,in_flight,chosen", [
    ([0, 1], [True, True], [0, 0], 1),  # the one with a free slot
    ([0, 0], [True, True], [0, 0], 0),  # none free: the first
    ([1, 1], [False, True], [0, 0], 1),  # an unreachable one is never chosen
    ([1, 1], [True, True], [1, 0], 1),  # a slot this proxy already fills is not free
    ([0, 0], [None, True], [0, 0], 0),  # not polled yet: tried
    ([1, 1], [False, False], [0, 0], None),
])
def test_pick(spares, reachable, in_flight, chosen) -> None:
    boxes = [Box(Remote(f"b{i}", f"http://b{i}:1"), True, reachable=r, models=("m",), slots={"m": (0, s)},
                 in_flight={"m": f}) for i, (s, r, f) in enumerate(zip(spares, reachable, in_flight))]
    got = remote.pick(boxes, "m")
    assert (boxes.index(got) if got is not None else None) == chosen


def test_import_skips_local_names_and_routes_to_the_box_with_a_free_slot() -> None:
    remotes = Remotes(_config(one="http://one:1", two="http://two:2"))
    solo, one, two = remotes.boxes
    remotes.record(one, Reading(True, 3.0, ("local", "loc", "solo", "shared"), {"shared": (1, 1)}))
    remotes.record(two, Reading(True, 4.0, ("shared", "other"), {"shared": (2, 4)}))
    assert one.models == ("shared",)  # the proxy's own model, alias and url model win over an import
    assert remotes.serving("local") == [] and remotes.serving("solo") == [solo]
    assert [(m, b.name) for m, b in remotes.served()] == [("other", "two"), ("shared", "one"), ("shared", "two"),
                                                        ("solo", "solo")]
    first, second, third = (remotes.acquire("shared") for _ in range(3))
    assert (first, second, third) == (two, two, one)  # two's two free slots, then the first
    remotes.release(first, "shared")
    assert remotes.acquire("shared") is two


def test_an_unreachable_box_keeps_its_models_and_is_named_in_the_503() -> None:
    remotes = Remotes(_config(one="http://one:1"))
    _, one = remotes.boxes
    remotes.record(one, Reading(True, 1.0, ("m",)))
    remotes.record(one, Reading(False))
    assert one.models == ("m",) and one.state == "unreachable"
    with pytest.raises(ModelUnavailableError, match=r"m: upstream one \(http://one:1\) is unreachable"):
        remotes.acquire("m")
    remotes.record(one, Reading(True, 1.0, ("m",)))
    assert remotes.acquire("m") is one


def test_a_failed_box_is_left_for_the_next_and_a_reload_keeps_what_polls_learned() -> None:
    config = _config(one="http://one:1", two="http://two:2")
    remotes = Remotes(config)
    _, one, two = remotes.boxes
    for box in (one, two):
        remotes.record(box, Reading(True, 1.0, ("m",)))
    box = remotes.acquire("m")
    remotes.failed(box, "refused")
    assert remotes.acquire("m", tried=[box]) is two and box.reachable is False
    remotes.reload(config)
    assert remotes.boxes[1] is one and one.models == ("m",)
    remotes.reload(_config(one="http://elsewhere:1"))
    assert remotes.boxes[1].models == () and remotes.boxes[1].reachable is None
