"""The pure memory model: settings resolution, KV, placement, weights per device (table-driven)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llamactl.errors import UsageError
from llamactl.model.gguf import read_header
from llamactl.model.memory import Placement, estimate, layer_devices
from llamactl.model.params import model_params
from llamactl.model.settings import ServerSettings, resolve
from llamactl.units import GiB, MiB
from tests.synth import REALISTIC, ModelSpec, write_model


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("m") / "llama3-8b.gguf"
    write_model(path, replace(REALISTIC["llama3-8b"], weight_type="Q4_0"), sparse=True)
    return model_params(read_header(path))


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("m") / "tied.gguf"
    write_model(path, ModelSpec(n_vocab=1024, n_embd=64, n_layer=4, tied_output=True, weight_type="Q4_0"))
    return model_params(read_header(path))


@pytest.mark.parametrize(("settings", "n_ctx", "n_ctx_seq", "n_stream", "unified"), [
    (ServerSettings(ctx_size=4096), 4096, 4096, 1, True),  # -np unset: 4 slots, unified
    (ServerSettings(ctx_size=4000), 4096, 4096, 1, True),  # padded to 256
    (ServerSettings(ctx_size=4096, parallel=3), 4608, 1536, 3, False),  # pad256(4096//3)=1536, ×3
    (ServerSettings(ctx_size=4096, parallel=3, kv_unified=True), 4096, 4096, 1, True),
    (ServerSettings(ctx_size=4096, parallel=1), 4096, 4096, 1, False),
    (ServerSettings(ctx_size=0), 8192, 8192, 1, True),  # -c 0: the trained context
])
def test_resolve_slots_and_cells(llama8b, settings, n_ctx, n_ctx_seq, n_stream, unified) -> None:
    res = resolve(settings, llama8b, 0)
    assert (res.n_ctx, res.n_ctx_seq, res.n_stream, res.kv_unified) == (n_ctx, n_ctx_seq, n_stream, unified)


@pytest.mark.parametrize(("settings", "kv_mib"), [
    (ServerSettings(ctx_size=8192), 1024.0),  # 32 layers × 8192 × 8 heads × 128 × (2+2) bytes
    (ServerSettings(ctx_size=8192, cache_type_k="q8_0", cache_type_v="q8_0"), 544.0),  # 34/32 bytes per element
    (ServerSettings(ctx_size=8192, cache_type_k="q4_0", cache_type_v="f16", flash_attn="on"), 512.0 + 144.0),
    (ServerSettings(ctx_size=4096, parallel=3), 4608 / 8192 * 1024),
])
def test_kv_bytes(llama8b, settings, kv_mib) -> None:
    est = estimate(llama8b, resolve(settings, llama8b, 0))
    assert est.device("CPU").kv_bytes == pytest.approx(kv_mib * MiB)


def test_quantized_v_needs_flash_attention(llama8b) -> None:
    with pytest.raises(UsageError, match="requires flash attention"):
        resolve(ServerSettings(cache_type_v="q8_0", flash_attn="off"), llama8b, 0)


@pytest.mark.parametrize(("ngl", "split", "expected"), [
    (33, (1.0,), ["GPU0"] * 33),
    (0, (1.0,), ["CPU"] * 33),
    (1, (1.0,), ["CPU"] * 32 + ["GPU0"]),  # -ngl 1 offloads only the output layer
    (5, (1.0,), ["CPU"] * 28 + ["GPU0"] * 5),  # the last layers go first
    (33, (3.0, 1.0), ["GPU0"] * 25 + ["GPU1"] * 8),  # -ts 3,1: layers 0-24 on GPU0, rest and output on GPU1
    (33, (1.0, 1.0), ["GPU0"] * 17 + ["GPU1"] * 16),
])
def test_layer_placement(llama8b, ngl, split, expected) -> None:
    res = resolve(ServerSettings(n_gpu_layers=ngl), llama8b, len(split))
    assert list(layer_devices(llama8b, res, Placement(n_gpus=len(split), tensor_split=split))) == expected


def test_full_offload_puts_weights_and_kv_on_gpu(llama8b) -> None:
    res = resolve(ServerSettings(ctx_size=8192), llama8b, 1)
    est = estimate(llama8b, res, Placement(n_gpus=1, tensor_split=(1.0,), gpu_overhead_bytes=300 * MiB))
    gpu, cpu = est.device("GPU0"), est.device("CPU")
    embd = next(t for t in llama8b.tensors if t.name == "token_embd.weight")
    assert gpu.kv_bytes == 1024 * MiB and cpu.kv_bytes == 0
    assert cpu.weights_bytes == embd.n_bytes  # the input layer stays on the host
    assert gpu.weights_bytes == pytest.approx(sum(t.n_bytes for t in llama8b.tensors) - embd.n_bytes, rel=1e-4)
    assert gpu.overhead_bytes == 300 * MiB
    assert est.total_bytes > 4.5 * GiB


def test_no_kv_offload_keeps_kv_on_host(llama8b) -> None:
    res = resolve(ServerSettings(ctx_size=8192, kv_offload=False), llama8b, 1)
    est = estimate(llama8b, res, Placement(n_gpus=1, tensor_split=(1.0,)))
    assert est.device("GPU0").kv_bytes == 0 and est.device("CPU").kv_bytes == 1024 * MiB


def test_tied_output_is_copied_to_the_output_device(tiny_tied) -> None:
    embd = next(t for t in tiny_tied.tensors if t.name == "token_embd.weight")
    on_gpu = estimate(tiny_tied, resolve(ServerSettings(n_gpu_layers=1), tiny_tied, 1), Placement(n_gpus=1))
    on_cpu = estimate(tiny_tied, resolve(ServerSettings(), tiny_tied, 0), Placement(cpu_repack_types=frozenset({"Q4_0"})))
    no_repack = estimate(tiny_tied, resolve(ServerSettings(), tiny_tied, 0), Placement())
    norm = next(t for t in tiny_tied.tensors if t.name == "output_norm.weight")
    # -ngl 1 offloads the output layer only: its norm and a copy of the tied embedding
    assert on_gpu.device("GPU0").weights_bytes == embd.n_bytes + max(norm.n_bytes, 128)
    # on the CPU a repackable tied output gets a repacked copy for its MUL_MAT; otherwise it is shared
    assert on_cpu.host_weights.repack_bytes - embd.n_bytes == pytest.approx(
        sum(t.n_bytes for t in tiny_tied.tensors if t.name.endswith(("q.weight", "k.weight", "v.weight", "output.weight",
                                                                     "gate.weight", "up.weight", "down.weight"))), abs=512)
    assert no_repack.host_weights.repack_bytes == 0


def test_repack_only_without_gpus(llama8b) -> None:
    types = frozenset({"Q4_0"})
    cpu = estimate(llama8b, resolve(ServerSettings(), llama8b, 0), Placement(cpu_repack_types=types))
    gpu = estimate(llama8b, resolve(ServerSettings(n_gpu_layers=10), llama8b, 1), Placement(n_gpus=1, cpu_repack_types=types))
    assert cpu.host_weights.repack_bytes > 3 * GiB
    assert gpu.host_weights.repack_bytes == 0


def test_mapped_host_weights_are_charged_to_the_host(llama8b) -> None:
    """--mlock passes as an extra argument because what it locks (the mapped weights of host layers, or the
    copies with --no-mmap) is already charged to the host device, which placement checks against RAM."""
    est = estimate(llama8b, resolve(ServerSettings(n_gpu_layers=10), llama8b, 1), Placement(n_gpus=1))
    host = est.device("CPU")
    assert est.host_weights.mapped_bytes > 3 * GiB
    assert host.weights_bytes >= est.host_weights.mapped_bytes and host.total_bytes >= est.host_weights.mapped_bytes


def test_no_mmap_loads_copies(llama8b) -> None:
    est = estimate(llama8b, resolve(ServerSettings(mmap=False), llama8b, 0), Placement())
    assert est.host_weights.mapped_bytes == 0
    assert est.host_weights.copy_bytes == pytest.approx(sum(t.n_bytes for t in llama8b.tensors), rel=1e-4)


@pytest.mark.parametrize(("settings", "bigger_than"), [
    (ServerSettings(ctx_size=16384, flash_attn="off"), ServerSettings(ctx_size=16384, flash_attn="on")),
    (ServerSettings(ctx_size=8192, ubatch_size=1024), ServerSettings(ctx_size=8192, ubatch_size=256)),
    (ServerSettings(ctx_size=32768, flash_attn="off"), ServerSettings(ctx_size=8192, flash_attn="off")),
])
def test_compute_grows_with_what_llama_cpp_reserves(llama8b, settings, bigger_than) -> None:
    big = estimate(llama8b, resolve(settings, llama8b, 0)).device("CPU").compute_bytes
    small = estimate(llama8b, resolve(bigger_than, llama8b, 0)).device("CPU").compute_bytes
    assert big > small


def test_output_buffer_scales_with_slots(llama8b) -> None:
    one = estimate(llama8b, resolve(ServerSettings(parallel=1), llama8b, 0)).device("CPU").output_bytes
    four = estimate(llama8b, resolve(ServerSettings(), llama8b, 0)).device("CPU").output_bytes
    assert one == 4 * 128256 and four == 4 * one


def _params(tmp_path, spec):
    return model_params(read_header(write_model(tmp_path / "m.gguf", spec)))


def test_gemma3_sliding_window_layers_and_cells(tmp_path) -> None:
    spec = ModelSpec(arch="gemma3", n_vocab=512, n_embd=64, n_layer=12, n_head=4, n_head_kv=2, n_ff=128,
                     head_dim=32, n_swa=128, tied_output=True)
    params = _params(tmp_path, spec)
    assert [il for il, swa in enumerate(params.swa_layers) if not swa] == [5, 11]  # il % 6 == 5 is global
    per_cell_layer = 2 * 32 * 2 * 2  # kv heads x head size x (K + V) x f16
    est = estimate(params, resolve(ServerSettings(ctx_size=8192), params, 0))
    window = 1024  # pad256(min(8192, 128 x 4 slots + 512))
    assert est.device("CPU").kv_bytes == per_cell_layer * (2 * 8192 + 10 * window)
    full = estimate(params, resolve(ServerSettings(ctx_size=8192, swa_full=True), params, 0))
    assert full.device("CPU").kv_bytes == per_cell_layer * 12 * 8192


def test_mamba2_state_does_not_grow_with_context(tmp_path) -> None:
    spec = ModelSpec(arch="mamba2", n_vocab=512, n_embd=64, n_layer=3, n_head=0, n_head_kv=0, ssm_d_conv=4,
                     ssm_d_inner=128, ssm_d_state=16, ssm_n_group=1, ssm_dt_rank=4)
    params = _params(tmp_path, spec)
    small = estimate(params, resolve(ServerSettings(ctx_size=1024), params, 0)).device("CPU")
    big = estimate(params, resolve(ServerSettings(ctx_size=65536), params, 0)).device("CPU")
    per_seq_layer = 4 * (3 * (128 + 2 * 16) + 16 * 128)  # f32 x (conv + ssm state)
    assert small.kv_bytes == big.kv_bytes == 0
    assert small.recurrent_bytes == big.recurrent_bytes == 3 * 4 * per_seq_layer  # 3 layers x 4 slots


def test_granitehybrid_splits_state_and_kv_by_layer(tmp_path) -> None:
    spec = ModelSpec(arch="granitehybrid", n_vocab=512, n_embd=64, n_layer=4, n_head=4, n_head_kv=(0, 2, 0, 0),
                     n_ff=128, ssm_d_conv=4, ssm_d_inner=128, ssm_d_state=16, ssm_n_group=1, ssm_dt_rank=4,
                     n_expert=4, n_expert_used=2, n_ff_exp=32, n_ff_shexp=48)
    params = _params(tmp_path, spec)
    assert params.recurrent_layers == (True, False, True, True)
    assert (params.n_ff_exp, params.n_ff_shexp) == (32, 48)  # the experts' width from their tensors
    est = estimate(params, resolve(ServerSettings(ctx_size=4096, parallel=2), params, 0)).device("CPU")
    assert est.kv_bytes == 4096 * 2 * 16 * 2 * 2  # one attention layer: cells x kv heads x head x (K+V) x f16
    per_seq_layer = 4 * (3 * (128 + 2 * 16) + 16 * 128)
    assert est.recurrent_bytes == 3 * 2 * per_seq_layer  # three Mamba-2 layers x 2 slots
    # the mixer is a phase of its own: a wider SSM must raise the compute buffer
    (tmp_path / "w").mkdir()
    wide = _params(tmp_path / "w", replace(spec, n_embd=128, ssm_d_inner=256, n_head=8))
    assert (estimate(wide, resolve(ServerSettings(ctx_size=4096, parallel=2), wide, 0)).device("CPU").compute_bytes
            > est.compute_bytes)


def test_lora_tensors_land_with_their_base_layers(tmp_path) -> None:
    from llamactl.errors import UnsupportedModelError
    from llamactl.estimate import load_params
    from tests.synth import write_lora

    spec = ModelSpec(n_vocab=512, n_embd=64, n_layer=4, n_head=4, n_head_kv=2, n_ff=128)
    model = write_model(tmp_path / "m.gguf", spec)
    lora = write_lora(tmp_path / "a.gguf", spec, rank=8, targets=("attn_q", "ffn_down"))
    plain = ServerSettings(ctx_size=1024, n_gpu_layers=3)  # layers 2, 3 and the output on the GPU
    with_lora = replace(plain, lora=(str(lora),))
    params = load_params(model, with_lora)
    assert len(params.adapters) == 4 * 2 * 2  # layers x targets x (a, b)
    per_layer = {il: sum(t.n_bytes for t in params.adapters if t.name.startswith(f"blk.{il}.")) for il in range(4)}
    base = estimate(params := load_params(model, plain), resolve(plain, params, 1), Placement(n_gpus=1))
    adapted = load_params(model, with_lora)
    est = estimate(adapted, resolve(with_lora, adapted, 1), Placement(n_gpus=1))
    assert est.device("GPU0").weights_bytes - base.device("GPU0").weights_bytes == per_layer[2] + per_layer[3]
    assert est.host_weights.adapter_bytes == per_layer[0] + per_layer[1]  # anonymous copies beside the mapped file
    with pytest.raises(UnsupportedModelError, match="not a LoRA adapter"):
        load_params(model, replace(plain, lora=(str(model),)))
    bigger = write_lora(tmp_path / "b.gguf", replace(spec, n_layer=6), rank=8)
    with pytest.raises(UnsupportedModelError, match=r"blk\.4\.attn_q\.weight is not in the model"):
        load_params(model, replace(plain, lora=(str(bigger),)))


def test_tensor_overrides_move_matching_tensors(tmp_path) -> None:
    from llamactl.errors import UsageError
    from llamactl.model.settings import parse_tensor_overrides

    params = _params(tmp_path, ModelSpec(n_vocab=512, n_embd=64, n_layer=4, n_head=4, n_head_kv=2, n_ff=128))
    ffn = {il: sum(t.n_bytes for t in params.tensors if t.name.startswith(f"blk.{il}.ffn_") and len(t.shape) == 2)
           for il in range(4)}
    base = estimate(params, resolve(ServerSettings(ctx_size=1024), params, 2), Placement(n_gpus=2))
    assert base.pipeline_copies == 4
    moved = ServerSettings(ctx_size=1024, tensor_overrides=tuple(
        parse_tensor_overrides(r"blk\.0\.ffn_(gate|up|down)=CPU,blk\.3\.ffn_.*=CUDA0")))
    est = estimate(params, resolve(moved, params, 2), Placement(n_gpus=2))
    assert est.pipeline_copies == 1  # llama.cpp turns the pipeline off with any override
    gpu0 = est.device("GPU0").weights_bytes - base.device("GPU0").weights_bytes
    gpu1 = est.device("GPU1").weights_bytes - base.device("GPU1").weights_bytes
    layer3 = sum(t.n_bytes for t in params.tensors if t.name.startswith("blk.3.ffn_"))  # its ffn_norm too
    assert (gpu0, gpu1) == (layer3 - ffn[0], -layer3)  # layer 0's FFN matrices to the host, all of layer 3's to GPU0
    from llamactl.model.memory import compute_graph_bytes

    # the host computes what it holds: the whole graph, conservatively (not just the graph inputs)
    assert est.device("CPU").compute_bytes == compute_graph_bytes(params, est.resolved)
    with pytest.raises(UsageError, match="'CUDA2' does not exist with 2 GPU"):
        resolve(ServerSettings(tensor_overrides=(("ffn", "CUDA2"),)), params, 2)
    for bad, message in (("ffn_up", "expected REGEX=BUFFER"), ("x=Metal", "not modelled"), ("(=CPU", "bad regular")):
        with pytest.raises(UsageError, match=message):
            parse_tensor_overrides(bad)
