"""`llamactl estimate --gpus none` against the buffers the real llama-server logs (-lv 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from llamactl.errors import UsageError
from llamactl.estimate import host_repack_types, load_params
from llamactl.model.demo_model import write_demo_model
from llamactl.model.gguf import read_header
from llamactl.model.memory import Placement, estimate
from llamactl.model.params import model_params
from llamactl.model.settings import ServerSettings, resolve
from llamactl.servers.buffers import free_port, measure
from llamactl.servers.client import wait_healthy
from llamactl.servers.command import build_command
from llamactl.units import MiB
from tests.synth import REALISTIC, ModelSpec, write_lora, write_model

BASE = ModelSpec(n_vocab=4096, n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=768)
MODELS = {
    "gqa-f16": BASE,
    "mha-f32": replace(BASE, n_head_kv=8, weight_type="F32"),
    "tied-q8_0": replace(BASE, tied_output=True, weight_type="Q8_0"),
    "q4_0": replace(BASE, weight_type="Q4_0"),
    "tied-q4_0": replace(BASE, tied_output=True, weight_type="Q4_0"),
    "kv-array": replace(BASE, n_head_kv=(4, 4, 4, 4)),
    "qwen2-32k-vocab": replace(BASE, arch="qwen2", n_vocab=32000, n_layer=2),
    "qwen3-qknorm": replace(BASE, arch="qwen3", head_dim=64),  # q width 2 x n_embd, as Qwen3-0.6B
    "gemma3-swa": replace(BASE, arch="gemma3", head_dim=64, n_swa=128, tied_output=True, n_layer=6),
    "qwen3moe": replace(BASE, arch="qwen3moe", head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=256),
    "mamba2": replace(BASE, arch="mamba2", n_head=0, n_head_kv=0, ssm_d_conv=4, ssm_d_inner=512, ssm_d_state=64,
                      ssm_n_group=1, ssm_dt_rank=8),
    # MLA: the cache holds the compressed K only (kv_lora_rank + n_rot per cell); a dense first layer, then experts
    "deepseek2-mla": replace(BASE, arch="deepseek2", n_head_kv=1, n_ff=1536, head_dim=32, n_rot=16, kv_lora_rank=64,
                             n_dense_lead=1, n_expert=8, n_expert_used=2, n_ff_exp=64, n_shared_expert=1),
    # per-layer heads and FFN widths (Llama-3.1-Nemotron): GQA 2 and 4, a linear-attention layer (no KV), an
    # attention-free layer, a layer without FFN, MHA
    "deci-per-layer": replace(BASE, arch="deci", n_layer=6, n_head=(8, 8, 8, 0, 8, 8), n_head_kv=(4, 2, 0, 0, 8, 1),
                              n_ff=(768, 512, 0, 768, 1024, 768)),
    # Qwen3.5: gated delta-net layers (conv + per-head state) and every 4th layer gated full attention
    "qwen35-deltanet": replace(BASE, arch="qwen35", head_dim=64, full_attention_interval=4, ssm_d_conv=4, ssm_d_state=32,
                               ssm_n_group=2, ssm_dt_rank=4, ssm_d_inner=128),
    # Qwen3-Next: the same layers with experts and a gated shared expert everywhere
    "qwen3next-moe": replace(BASE, arch="qwen3next", head_dim=64, full_attention_interval=4, ssm_d_conv=4,
                             ssm_d_state=32, ssm_n_group=2, ssm_dt_rank=4, ssm_d_inner=128, n_expert=8, n_expert_used=2,
                             n_ff_exp=256, n_ff_shexp=256),
    # short-convolution layers (0 KV heads, a conv state per slot) between attention layers with QK norms
    "lfm2": replace(BASE, arch="lfm2", n_layer=6, n_head_kv=(0, 0, 4, 0, 4, 0), shortconv_l_cache=3, tied_output=True),
    # hybrid: Mamba-2 layers (0 KV heads) between attention layers; state on the first, KV on the others
    "granitehybrid": replace(BASE, arch="granitehybrid", n_head_kv=(0, 4, 0, 4), ssm_d_conv=4, ssm_d_inner=512,
                             ssm_d_state=64, ssm_n_group=1, ssm_dt_rank=8),
    "granitehybrid-moe": replace(BASE, arch="granitehybrid", n_head_kv=(0, 4, 0, 4), ssm_d_conv=4, ssm_d_inner=512,
                                 ssm_d_state=64, ssm_n_group=1, ssm_dt_rank=8, n_expert=8, n_expert_used=2,
                                 n_ff_exp=256, n_ff_shexp=512),
}
SETTINGS = {
    "default": ServerSettings(ctx_size=4096),
    "fa-off": ServerSettings(ctx_size=1024, flash_attn="off"),
    "q8-cache": ServerSettings(ctx_size=8192, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on"),
    "q4-k-cache": ServerSettings(ctx_size=2048, cache_type_k="q4_0", flash_attn="off"),
    "np3": ServerSettings(ctx_size=2048, parallel=3),
    "np2-kvu": ServerSettings(ctx_size=3000, parallel=2, kv_unified=True, flash_attn="off"),
    "small-batch": ServerSettings(ctx_size=4096, ubatch_size=128, batch_size=256),
    "ctx-below-ubatch": ServerSettings(ctx_size=300, ubatch_size=1024, batch_size=1024, flash_attn="off"),
    "no-mmap": ServerSettings(ctx_size=2048, mmap=False),
    "no-repack": ServerSettings(ctx_size=2048, repack=False),
    "swa-full": ServerSettings(ctx_size=4096, swa_full=True),
}


def compare(binary: Path, caps, path: Path, settings: ServerSettings, *, timeout_s: float = 120) -> None:
    params = load_params(path, settings)
    resolved = resolve(settings, params, 0)
    est = estimate(params, resolved, Placement(cpu_repack_types=host_repack_types())).device("CPU")
    port = free_port()
    cmd = build_command(binary, path, resolved, caps, port=port, verbose_buffers=True)
    got = measure(list(cmd.argv), cmd.env, port, timeout_s=timeout_s).buffers
    logged = {t: got.term(t) for t in ("weights", "kv", "recurrent", "compute", "output")}
    logged["weights"] += got.term("lora")  # adapters are weights to the estimate
    assert logged["weights"] and logged["compute"] and logged["output"], f"llama-server logged no buffer sizes: {logged}"
    mib = 0.01 * MiB  # llama.cpp logs two decimals
    assert est.weights_bytes == pytest.approx(logged["weights"], rel=0.005, abs=mib)
    assert est.kv_bytes == pytest.approx(logged["kv"], rel=0.005, abs=mib)
    assert est.recurrent_bytes == pytest.approx(logged["recurrent"], rel=0.005, abs=mib)
    assert est.output_bytes == pytest.approx(logged["output"], rel=0.01, abs=mib)
    # the calibrated term on its own: a total bound alone would hide it behind the weights
    assert est.compute_bytes == pytest.approx(logged["compute"], rel=0.05, abs=0.6 * MiB)
    total, logged_total = est.total_bytes - est.overhead_bytes, sum(logged.values())  # buffers only
    assert abs(total - logged_total) <= max(0.03 * logged_total, 8 * MiB), (est, logged)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _model(model_dir: Path, name: str, spec: ModelSpec, sparse: bool = False) -> Path:
    path = model_dir / f"{name}.gguf"
    if not path.exists():
        write_model(path, spec, sparse=sparse)
    return path


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model", list(MODELS))
def test_tiny_models_match_logged_buffers(server_binary, server_caps, model_dir, model, setting) -> None:
    path = _model(model_dir, model, MODELS[model])
    try:
        compare(server_binary, server_caps, path, SETTINGS[setting])
    except UsageError as exc:
        # llamactl refused the settings before starting anything: llama-server must refuse them too
        refusal = "does not divide" if "does not divide" in str(exc) else "different K"
        assert refusal in str(exc), exc
        s = SETTINGS[setting]
        out = subprocess.run([str(server_binary), "-m", str(path), "--port", str(free_port()), "-c", str(s.ctx_size),
                              "-ctk", s.cache_type_k, "-ctv", s.cache_type_v, "-fa", s.flash_attn, "--fit", "off"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and refusal in out.stdout + out.stderr


@pytest.mark.parametrize(("model", "setting", "adapters"), [
    ("gqa-f16", "default", [dict(rank=16)]),
    ("q4_0", "no-mmap", [dict(rank=8)]),  # base weights repacked: their adapters fall back to plain CPU
    ("qwen3moe", "np3", [dict(rank=4, targets=("attn_q", "attn_v")), dict(rank=32, weight_type="F32")]),
])
def test_lora_adapters_match_logged_buffers(server_binary, server_caps, model_dir, model, setting, adapters) -> None:
    path = _model(model_dir, model, MODELS[model])
    loras = tuple(str(write_lora(model_dir / f"{model}-lora{i}.gguf", MODELS[model], **kw)) for i, kw in enumerate(adapters))
    compare(server_binary, server_caps, path, replace(SETTINGS[setting], lora=loras))


def test_lora_for_another_model_is_refused(model_dir) -> None:
    lora = write_lora(model_dir / "qwen3-lora.gguf", MODELS["qwen3-qknorm"])
    out = subprocess.run([sys.executable, "-m", "llamactl", "estimate", str(_model(model_dir, "gqa-f16", MODELS["gqa-f16"])),
                          "--lora", str(lora)], capture_output=True, text=True)
    assert out.returncode == 2 and "adapter for 'qwen3', the model is 'llama'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("key", "weight_type", "settings"), [
    ("llama3-8b", "Q4_0", ServerSettings(ctx_size=8192)),
    ("qwen2.5-0.5b", "F16", ServerSettings(ctx_size=8192, flash_attn="off")),
    ("qwen2.5-7b", "Q8_0", ServerSettings(ctx_size=4096, parallel=2)),
    ("qwen3-8b", "Q4_0", ServerSettings(ctx_size=8192)),
    ("gemma3-4b", "Q4_0", ServerSettings(ctx_size=8192)),  # 29 sliding-window layers, 5 global
    # 128 experts, 8 used; without repacking: a 16 GiB repacked copy would not fit a 24 GiB CI machine
    ("qwen3-30b-a3b", "Q4_0", ServerSettings(ctx_size=8192, repack=False)),
    ("mamba2-2.7b", "Q8_0", ServerSettings(ctx_size=8192)),  # recurrent state, no KV
    ("deepseek-v2-lite", "Q4_0", ServerSettings(ctx_size=4096, repack=False)),  # MLA, 64 experts
    # hybrid: 36 Mamba-2 layers, 4 attention layers, 64 experts + a shared one
    ("granite-4.0-h-tiny", "Q4_0", ServerSettings(ctx_size=16384, parallel=2)),
    ("lfm2-1.2b", "Q8_0", ServerSettings(ctx_size=32768)),  # 10 conv layers, 6 attention layers
])
def test_realistic_shapes_match_logged_buffers(server_binary, server_caps, model_dir, key, weight_type, settings) -> None:
    path = _model(model_dir, f"{key}-{weight_type}", replace(REALISTIC[key], weight_type=weight_type), sparse=True)
    compare(server_binary, server_caps, path, settings, timeout_s=300)


@pytest.mark.parametrize("model", ["gqa-f16", "tied-q4_0", "qwen2-32k-vocab"])
def test_generated_models_generate_text(server_binary, server_caps, model_dir, model) -> None:
    path = _model(model_dir, model, MODELS[model])
    params = model_params(read_header(path))
    resolved = resolve(ServerSettings(ctx_size=512), params, 0)
    port = free_port()
    cmd = build_command(server_binary, path, resolved, server_caps, port=port)
    proc = subprocess.Popen(list(cmd.argv), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**__import__("os").environ, **cmd.env})
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 30, alive=lambda: proc.poll() is None, interval_s=0.01), \
            "llama-server exited or did not load"
        with httpx.Client(timeout=30) as client:
            reply = client.post(f"http://127.0.0.1:{port}/completion", json={"prompt": "hello", "n_predict": 8, "ignore_eos": True})
            assert reply.status_code == 200
            assert reply.json()["tokens_predicted"] == 8
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_estimate_json_matches_server(server_binary, server_caps, tmp_path: Path) -> None:
    path = write_demo_model(tmp_path / "demo.gguf")
    out = subprocess.run([sys.executable, "-m", "llamactl", "estimate", str(path), "--gpus", "none", "-c", "2048", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    (cpu,) = data["devices"]
    assert cpu["device"] == "CPU"
    port = free_port()
    params = model_params(read_header(path))
    cmd = build_command(server_binary, path, resolve(ServerSettings(ctx_size=2048), params, 0), server_caps,
                        port=port, verbose_buffers=True)
    got = measure(list(cmd.argv), cmd.env, port).buffers
    assert cpu["weights_bytes"] == pytest.approx(got.term("weights"), abs=0.01 * MiB)
    assert cpu["kv_bytes"] == pytest.approx(got.term("kv"), abs=0.01 * MiB)
    assert data["settings"]["ctx_size"] == 2048 and data["settings"]["parallel"] == 4


def test_demo_runs_end_to_end(server_binary, tmp_path: Path) -> None:
    import os

    out = subprocess.run([sys.executable, "-m", "llamactl", "demo", "--server-bin", str(server_binary)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "LLAMACTL_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "LLAMA-SERVER LOGGED" in out.stdout and "ready; a random-weight model says" in out.stdout
    assert "started on demand, streamed" in out.stdout and "16 streamed pieces" in out.stdout
    assert (tmp_path / "demo" / "llamactl-demo.gguf").exists()


BERT = ModelSpec(arch="bert", n_vocab=4096, n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=1024, n_ctx_train=2048)


@pytest.mark.parametrize("settings", [
    ServerSettings(ctx_size=2048, embedding=True),
    ServerSettings(ctx_size=2048, embedding=True, flash_attn="off"),
    ServerSettings(ctx_size=2048, embedding=True, ubatch_size=1024, batch_size=1024),
    ServerSettings(ctx_size=512, embedding=True, parallel=1),
], ids=["default", "fa-off", "ub1024", "np1"])
def test_embedding_encoder_matches_logged_buffers(server_binary, server_caps, model_dir, settings) -> None:
    compare(server_binary, server_caps, _model(model_dir, "bert", BERT), settings)


RERANKER = replace(BERT, n_cls_out=1)


@pytest.mark.parametrize("settings", [
    ServerSettings(ctx_size=2048, reranking=True),
    ServerSettings(ctx_size=1024, reranking=True, flash_attn="off", parallel=2),
])
def test_reranker_matches_logged_buffers(server_binary, server_caps, model_dir, settings) -> None:
    compare(server_binary, server_caps, _model(model_dir, "reranker", RERANKER), settings)


def _check_embeddings(reply: dict) -> None:
    assert len(reply["data"][0]["embedding"]) == 256


def _check_ranking(reply: dict) -> None:
    assert sorted(r["index"] for r in reply["results"]) == [0, 1]
    assert all(isinstance(r["relevance_score"], float) for r in reply["results"])


@pytest.mark.parametrize(("spec", "settings", "flag", "endpoint", "payload", "check"), [
    (BERT, ServerSettings(ctx_size=512, embedding=True), "--embedding", "/v1/embeddings",
     {"input": "hello world"}, _check_embeddings),
    (RERANKER, ServerSettings(ctx_size=512, reranking=True), "--reranking", "/v1/rerank",
     {"query": "hello", "documents": ["hello world", "goodbye"]}, _check_ranking),
], ids=["embeddings", "rerank"])
def test_encoder_servers_answer(server_binary, server_caps, tmp_path: Path, spec, settings, flag, endpoint, payload,
                                check) -> None:
    path = write_model(tmp_path / "encoder.gguf", spec)
    params = model_params(read_header(path))
    port = free_port()
    cmd = build_command(server_binary, path, resolve(settings, params, 0), server_caps, port=port)
    assert {"--embedding", "--reranking"} & set(cmd.argv) == {flag}  # a reranker is not also an embeddings server
    replies: list[dict] = []
    measure(list(cmd.argv), cmd.env, port,
            while_ready=lambda base: replies.append(httpx.post(f"{base}{endpoint}", json=payload, timeout=30).json()))
    check(replies[0])
