"""Placement scenarios on simulated inventories: one GPU first, proportional splits, partial, CPU, eviction."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llamactl.gpu.inventory import Gpu, parse_gpus_spec
from llamactl.model.gguf import read_header
from llamactl.model.memory import Placement, estimate
from llamactl.model.params import model_params
from llamactl.model.settings import ServerSettings, resolve
from llamactl.placement import Fit, Policy, RunningInstance, Strategy, plan
from llamactl.units import GiB
from tests.synth import REALISTIC, write_model

CTX8K = ServerSettings(ctx_size=8192)  # Llama-3-8B Q4_0 at 8k: ~5.45 GiB on one GPU with 400 MiB overhead


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("m") / "llama3-8b.gguf"
    write_model(path, replace(REALISTIC["llama3-8b"], weight_type="Q4_0", tokenizer="llama", n_merges=0), sparse=True)
    return model_params(read_header(path))


def gpus(spec: str) -> tuple[Gpu, ...]:
    return parse_gpus_spec(spec).gpus


@pytest.mark.parametrize(("spec", "policy", "fit", "ids"), [
    ("24GiB", Policy(), Fit.GPU, (0,)),
    ("24GiB,16GiB", Policy(), Fit.GPU, (0,)),  # spread: the most free memory
    ("24GiB,16GiB", Policy(strategy=Strategy.PACK), Fit.GPU, (1,)),  # pack: the smallest that fits
    ("16GiB,24GiB,8GiB", Policy(strategy=Strategy.PACK), Fit.GPU, (2,)),
    ("8GiB,4GiB", Policy(), Fit.GPU, (0,)),  # one GPU whenever one is enough
    ("2x4GiB", Policy(), Fit.GPU, (0, 1)),  # neither alone: both, split
    ("2x4GiB", Policy(max_gpus=1), Fit.PARTIAL, (0,)),
    ("2x4GiB", Policy(max_gpus=1, allow_partial=False), Fit.CPU, ()),
    ("2GiB", Policy(), Fit.PARTIAL, (0,)),
    ("none", Policy(), Fit.CPU, ()),
    ("none", Policy(host_memory_bytes=4 * GiB), Fit.NONE, ()),
    ("24GiB,16GiB", Policy(allowed_gpus=(1,)), Fit.GPU, (1,)),
])
def test_scenarios(llama8b, spec, policy, fit, ids) -> None:
    result = plan(llama8b, CTX8K, gpus(spec), policy)
    assert result.fit is fit, result.reasons
    assert result.gpu_ids == ids
    assert (result.tensor_split is None) == (len(ids) < 2)
    if fit is Fit.GPU:
        assert result.n_gpu_layers == llama8b.n_layer + 1
    if fit is Fit.PARTIAL:
        assert 0 < result.n_gpu_layers < llama8b.n_layer + 1
    if fit in (Fit.CPU, Fit.NONE):
        assert result.n_gpu_layers == 0


def test_plan_never_exceeds_a_device(llama8b) -> None:
    for spec in ("2x4GiB", "6GiB,2GiB", "2GiB", "3x3GiB"):
        result = plan(llama8b, ServerSettings(ctx_size=16384), gpus(spec))
        for i, gpu_id in enumerate(result.gpu_ids):
            cap = next(c for c in result.capacities if c.gpu.index == gpu_id)
            assert result.estimate.device(f"GPU{i}").total_bytes <= cap.capacity_bytes


def test_split_follows_what_each_gpu_can_hold(llama8b) -> None:
    settings = ServerSettings(ctx_size=32768)  # ~8.5 GiB: more than the 8 GiB GPU holds
    result = plan(llama8b, settings, gpus("8GiB,3GiB"))
    assert result.fit is Fit.GPU and result.gpu_ids == (0, 1)
    assert result.tensor_split[0] > 2 * result.tensor_split[1]
    # an even split would overflow the small GPU
    even = estimate(llama8b, resolve(settings, llama8b, 2), Placement(n_gpus=2, tensor_split=(1.0, 1.0)))
    assert even.device("GPU1").total_bytes > 2.5 * GiB


def test_per_device_costs_decide_not_the_sum(llama8b) -> None:
    # 3 × 2 GiB of capacity (after the 512 MiB margin) exceeds weights + KV (~4.9 GiB),
    # but every GPU pays its own compute buffer and CUDA overhead
    result = plan(llama8b, CTX8K, gpus("3x2560MiB"))
    weights_kv = sum(t.n_bytes for t in llama8b.tensors) + 1 * GiB
    assert 3 * 2 * GiB > weights_kv
    assert result.fit is Fit.PARTIAL


def _gpu(total: int, free: int, util: int | None = None, index: int = 0) -> Gpu:
    return Gpu(index=index, name="test", memory_total_bytes=total, memory_free_bytes=free,
               memory_used_bytes=total - free, utilization_gpu=util, simulated=True)


def test_busy_gpu_is_skipped(llama8b) -> None:
    result = plan(llama8b, CTX8K, (_gpu(24 * GiB, 24 * GiB, util=90, index=0), _gpu(16 * GiB, 16 * GiB, util=10, index=1)))
    assert result.gpu_ids == (1,)
    assert any("90% busy" in r for r in result.reasons)


def test_memory_threshold_counts_other_programs_only(llama8b) -> None:
    crowded = (_gpu(24 * GiB, 10 * GiB),)
    assert plan(llama8b, CTX8K, crowded).fit is Fit.CPU  # 14 of 24 GiB used by someone else
    ours = RunningInstance("big", {0: 14 * GiB}, last_used=0, idle=False)
    assert plan(llama8b, CTX8K, crowded, instances=[ours]).fit is Fit.GPU  # our own instance: shared GPU
    assert plan(llama8b, CTX8K, crowded, Policy(mem_threshold=0.9)).fit is Fit.GPU


def test_starting_instances_count_as_used(llama8b) -> None:
    gpu = (_gpu(8 * GiB, 8 * GiB),)
    starting = RunningInstance("loading", {0: 4 * GiB}, last_used=0, starting=True)
    assert plan(llama8b, CTX8K, gpu).fit is Fit.GPU
    assert plan(llama8b, CTX8K, gpu, instances=[starting]).fit is Fit.PARTIAL


@pytest.mark.parametrize(("instances", "evict"), [
    ([RunningInstance("old", {0: 6 * GiB}, last_used=100)], ("old",)),
    ([RunningInstance("newer", {0: 3 * GiB}, last_used=200), RunningInstance("old", {0: 3 * GiB}, last_used=100)],
     ("old", "newer")),
    ([RunningInstance("a", {0: 1 * GiB}, last_used=50), RunningInstance("b", {0: 5 * GiB}, last_used=60)], ("a", "b")),
    ([RunningInstance("busy", {0: 6 * GiB}, last_used=100, idle=False)], ()),
])
def test_eviction_proposals_are_lru_and_idle_only(llama8b, instances, evict) -> None:
    gpu = (_gpu(8 * GiB, 2 * GiB),)
    result = plan(llama8b, CTX8K, gpu, instances=instances)
    assert result.fit is not Fit.GPU
    assert result.evict == evict


def test_no_eviction_when_it_fits(llama8b) -> None:
    result = plan(llama8b, CTX8K, (_gpu(24 * GiB, 18 * GiB),), instances=[RunningInstance("x", {0: 6 * GiB}, last_used=1)])
    assert result.fit is Fit.GPU and result.evict == ()


def test_explicit_ngl_is_respected(llama8b) -> None:
    result = plan(llama8b, ServerSettings(ctx_size=8192, n_gpu_layers=10), gpus("24GiB"))
    assert result.fit is Fit.PARTIAL and result.n_gpu_layers == 10


@pytest.fixture(scope="module")
def qwen3moe(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("m") / "qwen3-30b-a3b.gguf"
    write_model(path, replace(REALISTIC["qwen3-30b-a3b"], weight_type="Q4_K"), sparse=True)
    return model_params(read_header(path))


def _expert_bytes(params, layers: int) -> int:
    return sum(t.n_bytes for t in params.tensors if "_exps" in t.name and int(t.name.split(".")[1]) < layers)


def test_moe_prefers_experts_on_the_cpu_to_dropping_layers(qwen3moe) -> None:
    # Qwen3-30B-A3B Q4_K is ~17 GiB: on a 16 GiB GPU every layer stays there, the fewest experts move out
    result = plan(qwen3moe, CTX8K, gpus("16GiB"), Policy())
    assert result.fit is Fit.PARTIAL, result.reasons
    assert result.n_gpu_layers == qwen3moe.n_layer + 1
    n = result.n_cpu_moe
    assert 0 < n < qwen3moe.n_layer
    capacity = result.capacities[0].capacity_bytes
    assert result.estimate.device("GPU0").total_bytes <= capacity
    # minimal: one layer fewer on the CPU would overflow the GPU
    fewer = resolve(replace(CTX8K, n_cpu_moe=n - 1), qwen3moe, 1)
    over = estimate(qwen3moe, fewer, Placement(n_gpus=1)).device("GPU0").total_bytes
    assert over > capacity
    assert any("--n-cpu-moe" in r for r in result.reasons)


def test_n_cpu_moe_moves_exactly_the_expert_tensors(qwen3moe) -> None:
    base = estimate(qwen3moe, resolve(CTX8K, qwen3moe, 1), Placement(n_gpus=1))
    moved = estimate(qwen3moe, resolve(replace(CTX8K, n_cpu_moe=10), qwen3moe, 1), Placement(n_gpus=1))
    gone = base.device("GPU0").weights_bytes - moved.device("GPU0").weights_bytes
    assert abs(gone - _expert_bytes(qwen3moe, 10)) <= 30 * 128  # GPU tensors are padded to 128 bytes
    # mapped from the file on the host, and the host now computes those experts
    assert moved.device("CPU").weights_bytes - base.device("CPU").weights_bytes >= _expert_bytes(qwen3moe, 10)
    assert moved.device("CPU").compute_bytes > base.device("CPU").compute_bytes
    assert moved.layer_devices == base.layer_devices  # no layer moved


def test_dense_models_never_get_n_cpu_moe(llama8b) -> None:
    result = plan(llama8b, CTX8K, gpus("2GiB"), Policy())
    assert result.fit is Fit.PARTIAL and result.n_cpu_moe == 0
    assert resolve(replace(CTX8K, n_cpu_moe=5), llama8b, 1).n_cpu_moe == 0  # nothing to move


def test_given_n_cpu_moe_is_kept(qwen3moe) -> None:
    result = plan(qwen3moe, replace(CTX8K, n_cpu_moe=48), gpus("24GiB"), Policy())
    assert result.fit is Fit.GPU and result.n_cpu_moe == 48


def _inst(name: str, gib: int, status: str = "ready", pid: int = 4242):
    from llamactl.servers.state import Instance, Status

    return Instance(name=name, model="/m.gguf", port=9000, pid=pid, create_time=1.0, gpu_ids=(0,),
                    estimated_bytes={"GPU0": gib * GiB}, status=Status(status), last_used=1.0)


def _nvml_gpu(total: int, free: int, pids: tuple[int, ...] = ()) -> Gpu:
    from llamactl.gpu.inventory import GpuProcess

    return replace(_gpu(total, free), processes=tuple(GpuProcess(p, None) for p in pids))


@pytest.mark.parametrize(("source", "gpu", "status", "fit"), [
    # a simulated GPU shows nothing of what runs: every live instance is promised memory there
    ("simulated", _gpu(8 * GiB, 8 * GiB), "ready", Fit.PARTIAL),
    ("simulated", _gpu(8 * GiB, 8 * GiB), "busy", Fit.PARTIAL),
    ("simulated", _gpu(8 * GiB, 8 * GiB), "stopping", Fit.PARTIAL),  # until its process is gone
    ("simulated", _gpu(8 * GiB, 8 * GiB), "starting", Fit.PARTIAL),
    # NVML: its process on the GPU means its memory is in `used` already: not counted twice
    ("nvml", _nvml_gpu(8 * GiB, 4 * GiB, pids=(4242,)), "ready", Fit.PARTIAL),
    ("nvml", _nvml_gpu(8 * GiB, 8 * GiB, pids=(4242,)), "ready", Fit.GPU),
    # NVML lists processes, not ours yet: promised on top of what it shows
    ("nvml", _nvml_gpu(8 * GiB, 8 * GiB, pids=(1,)), "ready", Fit.PARTIAL),
    ("nvml", _nvml_gpu(8 * GiB, 8 * GiB), "ready", Fit.GPU),  # NVML lists no process at all: its figures stand
    ("nvml", _nvml_gpu(8 * GiB, 8 * GiB), "starting", Fit.PARTIAL),
    # a --gpus-file is another box as it was measured: this box's instances are not added
    ("/tmp/inv.json", _gpu(8 * GiB, 8 * GiB), "ready", Fit.GPU),
])
def test_what_runs_counts_where_the_inventory_is_this_box(llama8b, source, gpu, status, fit) -> None:
    from llamactl.gpu.inventory import Inventory
    from llamactl.servers.launcher import running_for_placement

    inv = Inventory((gpu,), source)
    running = running_for_placement({"other": _inst("other", 4, status)}, inv=inv)
    assert plan(llama8b, CTX8K, inv.gpus, Policy(), running).fit is fit


def test_an_eviction_on_a_simulated_gpu_relieves_the_promise_once(llama8b) -> None:
    """Evicting an instance that the inventory does not show frees its promise, not free memory on top."""
    from llamactl.gpu.inventory import Inventory
    from llamactl.placement import fits_beside
    from llamactl.servers.launcher import running_for_placement

    inv = Inventory((_gpu(8 * GiB, 8 * GiB),), "simulated")
    both = running_for_placement({"a": _inst("a", 1), "b": _inst("b", 3)}, inv=inv)  # a: least recently used
    result = plan(llama8b, CTX8K, inv.gpus, Policy(), both)
    # ~5.5 GiB needed: without a, 8 - 3 = 5 GiB is still short, so b must go too (counting a's 1 GiB as freed
    # on top of removing its promise would have said a alone is enough)
    assert result.fit is Fit.PARTIAL and result.evict == ("a", "b")
    alone = plan(llama8b, CTX8K, inv.gpus, Policy(), [])
    assert alone.fit is Fit.GPU
    assert fits_beside(alone, inv.gpus, [], Policy())
    assert not fits_beside(alone, inv.gpus, both[1:], Policy())  # a claim recorded meanwhile: plan again
