"""The fleet plan, pure: Llama-3-8B Q4_0 at 8k (~5.45 GiB with overhead) as every model, on simulated GPUs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llamactl.fleet import Entry, plan_fleet
from llamactl.gpu.inventory import parse_gpus_spec
from llamactl.model.gguf import read_header
from llamactl.model.params import model_params
from llamactl.model.registry import Residency
from llamactl.model.settings import ServerSettings
from llamactl.placement import Fit, Policy, Strategy
from tests.synth import REALISTIC, write_model


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("m") / "llama3-8b.gguf"
    write_model(path, replace(REALISTIC["llama3-8b"], weight_type="Q4_0", tokenizer="llama", n_merges=0), sparse=True)
    return model_params(read_header(path))


def entries(params, **residency: dict) -> list[Entry]:
    return [Entry(name, Residency(**keys), params, ServerSettings(ctx_size=8192), Policy()) for name, keys in residency.items()]


def test_order_is_preload_and_pin_then_priority_then_config(llama8b) -> None:
    got = plan_fleet(entries(llama8b, a={}, b={"priority": 5}, c={"pin": True}, d={"preload": True, "priority": 1},
                             e={"preload": True}), parse_gpus_spec("4x24GiB").gpus)
    assert [p.name for p in got.models] == ["d", "c", "e", "b", "a"]
    assert all(p.resident for p in got.models) and got.ok and got.preload_order() == ("d", "e")


def test_two_fit_per_gpu_the_rest_run_by_evicting_the_lowest_ranked(llama8b) -> None:
    got = plan_fleet(entries(llama8b, a={"preload": True}, b={"pin": True}, c={}, d={"priority": -1}),
                     parse_gpus_spec("12GiB").gpus)
    by = {p.name: p for p in got.models}
    assert [p.name for p in got.models if p.resident] == ["a", "b"] and got.ok
    # c would fit alone; a is the only one that may go (b is pinned)
    assert by["c"].evict == ("a",) and not by["c"].resident
    assert got.free_after[0] < 12 * 2**30 - 2 * 5 * 2**30


def test_a_preload_that_does_not_fit_fails_the_plan(llama8b) -> None:
    got = plan_fleet(entries(llama8b, a={"preload": True}, b={"preload": True}), parse_gpus_spec("8GiB").gpus)
    assert [p.resident for p in got.models] == [True, False] and not got.ok and got.preload_order() == ("a",)


def test_spill_false_is_never_resident_off_the_gpus(llama8b) -> None:
    got = plan_fleet(entries(llama8b, a={"spill": False}, b={}), parse_gpus_spec("4GiB").gpus)
    by = {p.name: p for p in got.models}
    assert not by["a"].resident and "spill = false" in by["a"].reasons[0]
    assert by["b"].resident and by["b"].plan.fit is Fit.PARTIAL  # spill allowed: partial offload is fine


def test_max_instances_bounds_the_residents(llama8b) -> None:
    got = plan_fleet(entries(llama8b, a={"pin": True}, b={}, c={}), parse_gpus_spec("80GiB").gpus, max_instances=2)
    by = {p.name: p for p in got.models}
    assert [p.resident for p in got.models] == [True, True, False]
    assert by["c"].evict == ("b",) and "max_instances (2)" in by["c"].reasons[0]


@pytest.mark.parametrize(("whole", "gpus_of"), [
    (False, {"a": (0,), "b": (0,), "c": (0,)}),  # pack: the fullest GPU that still fits, shared
    (True, {"a": (0,), "b": (1,)}),  # a pod's GPUs are its own: c finds none left
])
def test_whole_gpus_give_each_resident_its_gpus_alone(llama8b, whole: bool, gpus_of: dict) -> None:
    pack = [replace(e, policy=Policy(strategy=Strategy.PACK)) for e in entries(llama8b, a={}, b={}, c={})]
    got = plan_fleet(pack, parse_gpus_spec("2x24GiB").gpus, whole_gpus=whole)
    assert {p.name: p.plan.gpu_ids for p in got.models if p.resident} == gpus_of
    assert all(p.plan.fit is Fit.GPU for p in got.models if p.resident)
