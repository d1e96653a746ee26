"""The notes a proxy leaves for local viewers (`servers/proxy_notes.py`): written and read back, merged into
the state file's view of the same process only, and, as input anyone with the dir could plant, every check
failing to "absent" — never an error, a hang or a borrowed field."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from llamactl.servers import proxy_notes
from llamactl.servers.procs import create_time_of
from llamactl.views import Event, InstanceView

NOW = time.time()
ME = os.getpid()


def _views() -> tuple[InstanceView, ...]:
    return (InstanceView("alpha", "alpha", "ready", pid=4242, ttl_s=600.0, ttl_left_s=590.0, in_flight=0, queued=0),
            InstanceView("busy", "busy", "ready", pid=4343, ttl_s=600.0, ttl_left_s=600.0, in_flight=2, queued=1),
            InstanceView("idle", "idle", "stopped", ttl_s=600.0))  # not running: not noted


def _notes(**changes: object) -> dict:
    data = proxy_notes.to_json("http://127.0.0.1:8080", ME, create_time_of(ME), 1.0, _views(),
                               (Event(NOW - 5, "launch", "alpha", "on demand"), Event(NOW - 4, "ready", "alpha", "port 8081")),
                               NOW)
    return {**json.loads(json.dumps(data)), **changes}


def test_written_and_read_back(tmp_path: Path) -> None:
    proxy_notes.write(proxy_notes.path_for(tmp_path, 8080), _notes())
    [notes] = proxy_notes.read_all(tmp_path, NOW + 10)
    assert notes.url == "http://127.0.0.1:8080" and set(notes.instances) == {"alpha", "busy"}
    assert notes.instances["alpha"].ttl_left_s(NOW + 10) == pytest.approx(580.0)  # the deadline counts down
    assert notes.instances["busy"].ttl_left_s(NOW + 10) == 600.0  # in flight: no countdown
    assert [e.kind for e in notes.events] == ["launch", "ready"]
    assert oct(os.stat(proxy_notes.path_for(tmp_path, 8080)).st_mode & 0o777) == "0o600"


def test_only_the_same_process_is_annotated() -> None:
    notes = [proxy_notes.parse(_notes(), NOW)]
    same = proxy_notes.annotate(InstanceView("alpha", "/m/a.gguf", "ready", pid=4242), notes, NOW)
    other = proxy_notes.annotate(InstanceView("alpha", "/m/a.gguf", "ready", pid=5555), notes, NOW)  # relaunched by hand
    assert (same.ttl_s, same.ttl_left_s, same.in_flight, same.queued) == (600.0, pytest.approx(590.0), 0, 0)
    assert (other.ttl_s, other.ttl_left_s, other.in_flight) == (None, None, None)
    assert proxy_notes.spoken_for(notes) == {"alpha", "busy"}


@pytest.mark.parametrize("changes", [
    {"schema": 2}, {"pid": "1234"}, {"pid": True}, {"pid": 1}, {"pid": 2**22 + 7},  # the last: no such process
    {"create_time": 12.0},  # the pid runs, but started at another time: a reused pid
    {"at": NOW - 3600},  # not rewritten for an hour: a hung proxy's
    {"at": float("nan")}, {"poll_interval_s": float("inf")}, {"url": 5}, {"instances": []}, {"events": {}},
])
def test_notes_that_fail_a_check_are_absent(changes: dict) -> None:
    assert proxy_notes.parse(_notes(**changes), NOW) is None


def test_bad_entries_are_left_out_one_by_one() -> None:
    data = _notes()
    data["instances"]["forged"] = {"pid": 1, "ttl_s": "forever", "ttl_deadline": None, "in_flight": 0, "queued": 0}
    data["instances"]["neg"] = {"pid": 9, "ttl_s": -1, "ttl_deadline": None, "in_flight": 0, "queued": 0}
    data["events"] += [{"at": NOW, "kind": 5, "model": "x"}, "text", {"at": NOW, "kind": "k" * 99, "model": "m\x1b"}]
    notes = proxy_notes.parse(data, NOW)
    assert set(notes.instances) == {"alpha", "busy"}
    assert [e.kind for e in notes.events] == ["launch", "ready", "k" * 20]  # cut; drawn escaped by the viewer


def _plant_fifo(path: Path) -> None:
    os.mkfifo(path)


def _plant_link(path: Path) -> None:
    real = path.with_name("elsewhere.json")
    real.write_text(json.dumps(_notes()))
    path.symlink_to(real)


def _plant_big(path: Path) -> None:
    data = _notes()
    data["padding"] = "x" * proxy_notes.MAX_BYTES
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("plant", [_plant_fifo, _plant_link, _plant_big, lambda p: p.mkdir(),
                                   lambda p: p.write_text("{not json"), lambda p: p.write_text("[" * 100_000)])
def test_planted_files_are_absent(tmp_path: Path, plant) -> None:
    plant(proxy_notes.path_for(tmp_path, 8080))
    assert proxy_notes.read_all(tmp_path, NOW) == []


def test_the_proxy_rewrites_its_file_through_a_planted_link_without_following_it(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    path = proxy_notes.path_for(tmp_path, 8080)
    path.symlink_to(target)
    proxy_notes.write(path, _notes())
    assert target.read_text() == "keep" and not path.is_symlink()
    proxy_notes.remove(path)
    assert not path.exists() and target.exists()
