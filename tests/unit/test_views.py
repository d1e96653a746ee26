"""The one typed view: what a producer writes (/status, ps --json) reads back the same in `top --url`, except
what a remote snapshot may never carry (a local log path); a field of the wrong type becomes None."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest

from llamactl.errors import RemoteError
from llamactl.gpu.inventory import Gpu, GpuProcess
from llamactl.views import DeviceUse, Drift, Event, InstanceView, Snapshot

FULL = InstanceView(
    name="alpha", model="/models/alpha.gguf", state="busy", pid=4242, port=8081, url="http://127.0.0.1:8081",
    gpu_ids=(0, 1), estimated_bytes=5 * 2**30, actual_bytes=6 * 2**30,
    devices={"GPU0": DeviceUse(3 * 2**30, 4 * 2**30), "CPU": DeviceUse(2**30, None)}, drift=Drift("GPU0", 0.3333),
    slots_busy=1, slots_total=4, tokens_per_s=31.5, in_flight=2, queued=1, started_at=1.7e9, last_used=1.7e9 + 5,
    idle_s=0.0, ttl_s=300.0, ttl_left_s=120.0, aliases=("a", "gpt"), configured=True, started_by="proxy",
    started_by_proxy=True, log_path="/var/state/logs/alpha.log", upstream="box2", latency_ms=3.5)


def test_every_field_survives_the_json_round_trip_but_the_log_path() -> None:
    assert all(getattr(FULL, f.name) not in (None, (), {}) for f in fields(FULL))  # the case fills every field
    back = InstanceView.from_json(json.loads(json.dumps(FULL.to_json())))
    assert back == replace(FULL, log_path=None)


def test_a_snapshot_round_trips_with_its_gpus_and_events() -> None:
    gpu = Gpu(index=0, name="H100", memory_total_bytes=80 * 2**30, memory_free_bytes=70 * 2**30,
              memory_used_bytes=10 * 2**30, utilization_gpu=50, temperature_c=60, power_w=300.0,
              processes=(GpuProcess(4242, 4 * 2**30, "alpha"),), simulated=True)
    snap = Snapshot(source="proxy", at=1.7e9, gpus=(gpu,), instances=(FULL,), events=(Event(1.7e9, "ready", "alpha", "port 8081"),),
                    requests=({"at": 1.7e9, "model": "alpha", "status": 200, "ms": 12.5, "tokens": 30},),
                    rates={"alpha": {"per_min": 1, "p50_ms": 12.5, "p95_ms": 12.5}}, queue=1)
    back = Snapshot.from_json(json.loads(json.dumps(snap.to_json())), "http://proxy")
    assert back == replace(snap, source="http://proxy", instances=(replace(FULL, log_path=None),))


@pytest.mark.parametrize(("key", "value"), [("pid", "1"), ("tokens_per_s", float("nan")), ("in_flight", True),
                                             ("ttl_left_s", 1e30), ("aliases", "gpt"), ("drift", {"device": 1}),
                                             ("configured", "yes"), ("started_by_proxy", 1)])
def test_a_field_of_the_wrong_type_is_none(key: str, value: object) -> None:
    view = InstanceView.from_json({**FULL.to_json(), key: value})
    assert getattr(view, key) is None and view.name == "alpha"


@pytest.mark.parametrize("data", [[], {"instances": {}}, {"instances": [{"name": 1}]}, {"instances": [3]}])
def test_a_document_of_another_shape_is_refused_in_one_line(data: object) -> None:
    with pytest.raises(RemoteError, match=r"^http://proxy: /status is not a llamactl proxy's snapshot"):
        Snapshot.from_json(data, "http://proxy")


def test_a_gpu_that_fails_the_inventory_checks_is_left_out() -> None:
    good = {"index": 1, "memory_total_bytes": 2**30}
    snap = Snapshot.from_json({"instances": [], "gpus": [{"index": "0"}, 5, {**good, "memory_used_bytes": 2**31}, good]},
                              "http://proxy")
    assert [g.index for g in snap.gpus] == [1]
