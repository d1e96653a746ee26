"""synth's newer architectures (qwen3, qwen3moe, gemma3, mamba2, bert, deepseek2, granitehybrid): headers hold what llama.cpp's loaders read."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.model.gguf import GGUFHeader, read_header
from tests.synth import REALISTIC, ModelSpec, write_model

QWEN3 = ModelSpec(arch="qwen3", n_embd=256, n_head=4, n_head_kv=2, head_dim=128, n_ff=512)
QWEN3MOE = ModelSpec(arch="qwen3moe", n_embd=128, n_head=4, n_head_kv=2, head_dim=64, n_ff=256,
                     n_expert=8, n_expert_used=2, n_ff_exp=64)
GEMMA3 = ModelSpec(arch="gemma3", n_layer=6, n_embd=128, n_head=4, n_head_kv=2, head_dim=64, n_ff=256,
                   n_swa=128, tied_output=True)
MAMBA2 = ModelSpec(arch="mamba2", n_embd=128, ssm_d_conv=4, ssm_d_inner=256, ssm_d_state=16, ssm_n_group=1,
                   ssm_dt_rank=4, tied_output=True)
BERT = ModelSpec(arch="bert", n_embd=128, n_head=4, n_head_kv=4, n_ff=256, n_ctx_train=512)
DEEPSEEK2 = ModelSpec(arch="deepseek2", n_vocab=4096, n_embd=256, n_layer=4, n_head=4, head_dim=32, n_ff=512,
                      kv_lora_rank=64, n_rot=16, n_dense_lead=1, n_expert=8, n_expert_used=2, n_ff_exp=64,
                      n_shared_expert=1)
GRANITE_H = ModelSpec(arch="granitehybrid", n_embd=128, n_layer=4, n_head=4, n_head_kv=(0, 2, 0, 2), n_ff=256,
                      ssm_d_conv=4, ssm_d_inner=256, ssm_d_state=16, ssm_n_group=1, ssm_dt_rank=4, tied_output=True)


def write(tmp_path: Path, spec: ModelSpec, **kwargs: object) -> GGUFHeader:
    return read_header(write_model(tmp_path / f"{spec.arch}.gguf", spec, **kwargs))


def shapes(header: GGUFHeader) -> dict[str, tuple[int, ...]]:
    return {t.name: t.shape for t in header.tensors}  # ggml order: ne[0] first


def test_qwen3_has_qk_norms_and_explicit_head_dim(tmp_path: Path) -> None:
    header = write(tmp_path, QWEN3)
    assert header.architecture == "qwen3"
    assert header.get("qwen3.attention.key_length") == 128
    assert header.get("qwen3.attention.value_length") == 128
    assert header.get("qwen3.rope.dimension_count") == 128
    t = shapes(header)
    assert t["blk.0.attn_q_norm.weight"] == (128,) and t["blk.1.attn_k_norm.weight"] == (128,)
    assert t["blk.0.attn_q.weight"] == (256, 4 * 128)  # q width differs from n_embd
    assert t["blk.0.attn_k.weight"] == (256, 2 * 128)
    assert t["blk.0.attn_output.weight"] == (4 * 128, 256)
    assert not any(name.endswith(".bias") for name in t)
    assert "output.weight" in t


def test_qwen3_without_head_dim_still_writes_key_length(tmp_path: Path) -> None:
    header = write(tmp_path, ModelSpec(arch="qwen3"))
    assert header.get("qwen3.attention.key_length") == 16


def test_qwen3moe_experts(tmp_path: Path) -> None:
    header = write(tmp_path, QWEN3MOE)
    assert header.architecture == "qwen3moe"
    assert header.get("qwen3moe.expert_count") == 8
    assert header.get("qwen3moe.expert_used_count") == 2
    assert header.get("qwen3moe.expert_feed_forward_length") == 64
    t = shapes(header)
    assert t["blk.0.ffn_gate_inp.weight"] == (128, 8)
    assert t["blk.0.ffn_gate_exps.weight"] == (128, 64, 8)
    assert t["blk.0.ffn_up_exps.weight"] == (128, 64, 8)
    assert t["blk.1.ffn_down_exps.weight"] == (64, 128, 8)
    assert "blk.0.attn_q_norm.weight" in t and "blk.0.ffn_gate.weight" not in t
    types = {ti.name: ti.ggml_type.name for ti in header.tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_up_exps.weight"] == "F16"


def test_gemma3_swa_and_sandwich_norms(tmp_path: Path) -> None:
    header = write(tmp_path, GEMMA3)
    assert header.architecture == "gemma3"
    assert header.get("gemma3.attention.sliding_window") == 128
    assert header.get("gemma3.attention.sliding_window_pattern") is None  # llama.cpp's default: period 6
    assert header.get("gemma3.attention.key_length") == 64
    t = shapes(header)
    for name in ("post_attention_norm", "post_ffw_norm", "ffn_norm", "attn_norm", "attn_q_norm", "attn_k_norm"):
        assert f"blk.5.{name}.weight" in t
    assert "output.weight" not in t  # tied


def test_gemma3_without_window_writes_no_swa_key(tmp_path: Path) -> None:
    header = write(tmp_path, replace(GEMMA3, n_swa=0))
    assert header.get("gemma3.attention.sliding_window") is None


def test_mamba2_ssm_layout(tmp_path: Path) -> None:
    header = write(tmp_path, MAMBA2)
    assert header.architecture == "mamba2"
    assert header.get("mamba2.ssm.conv_kernel") == 4
    assert header.get("mamba2.ssm.inner_size") == 256
    assert header.get("mamba2.ssm.state_size") == 16
    assert header.get("mamba2.ssm.time_step_rank") == 4
    assert header.get("mamba2.ssm.group_count") == 1
    assert header.get("mamba2.attention.head_count") == 0
    t = shapes(header)
    conv_dim = 256 + 2 * 1 * 16
    assert t["blk.0.ssm_in.weight"] == (128, 256 + conv_dim + 4)
    assert t["blk.0.ssm_conv1d.weight"] == (4, conv_dim)
    assert t["blk.0.ssm_conv1d.bias"] == (conv_dim,)
    assert t["blk.0.ssm_dt.bias"] == (4,)
    assert t["blk.1.ssm_a"] == (1, 4) and t["blk.1.ssm_d"] == (1, 4)
    assert t["blk.0.ssm_norm.weight"] == (256, 1)
    assert t["blk.0.ssm_out.weight"] == (256, 128)
    assert not any("attn_q" in name for name in t)


def test_bert_encoder_layout(tmp_path: Path) -> None:
    header = write(tmp_path, BERT)
    assert header.architecture == "bert"
    assert header.get("bert.attention.causal") is False
    assert header.get("bert.pooling_type") == 1  # mean
    assert header.get("tokenizer.ggml.token_type_count") == 2
    t = shapes(header)
    assert t["position_embd.weight"] == (128, 512)
    assert t["token_types.weight"] == (128, 2)
    assert "token_embd_norm.bias" in t and "blk.1.layer_output_norm.bias" in t
    assert t["blk.0.ffn_up.bias"] == (256,)
    assert "output.weight" not in t and "output_norm.weight" not in t


def test_deepseek2_mla_layout(tmp_path: Path) -> None:
    header = write(tmp_path, DEEPSEEK2)
    assert header.architecture == "deepseek2"
    # MQA form of MLA, as llama.cpp's converter writes it.
    expected = {
        "attention.head_count": 4, "attention.head_count_kv": 1, "rope.dimension_count": 16,
        "attention.q_lora_rank": 0, "attention.kv_lora_rank": 64,
        "attention.key_length": 64 + 16, "attention.value_length": 64,
        "attention.key_length_mla": 32 + 16, "attention.value_length_mla": 32,
        "leading_dense_block_count": 1, "feed_forward_length": 512, "expert_feed_forward_length": 64,
        "expert_count": 8, "expert_used_count": 2, "expert_shared_count": 1,
    }
    for key, value in expected.items():
        assert header.get(f"deepseek2.{key}") == value, key
    t = shapes(header)
    assert t["blk.0.attn_q.weight"] == (256, 4 * 48)
    assert t["blk.0.attn_kv_a_mqa.weight"] == (256, 64 + 16)
    assert t["blk.0.attn_kv_a_norm.weight"] == (64,)
    assert t["blk.0.attn_k_b.weight"] == (32, 64, 4)
    assert t["blk.0.attn_v_b.weight"] == (64, 32, 4)
    assert t["blk.0.attn_output.weight"] == (4 * 32, 256)
    assert t["blk.0.ffn_gate.weight"] == (256, 512) and "blk.0.ffn_gate_inp.weight" not in t  # dense lead
    assert t["blk.1.ffn_gate_inp.weight"] == (256, 8) and "blk.1.ffn_gate.weight" not in t
    assert t["blk.3.ffn_down_exps.weight"] == (64, 256, 8)
    assert t["blk.1.ffn_gate_shexp.weight"] == (256, 64) and t["blk.1.ffn_down_shexp.weight"] == (64, 256)
    assert "blk.0.attn_q_a.weight" not in t and "blk.0.attn_kv_b.weight" not in t


def test_deepseek2_q_lora(tmp_path: Path) -> None:
    header = write(tmp_path, replace(DEEPSEEK2, q_lora_rank=96, n_shared_expert=2))
    assert header.get("deepseek2.attention.q_lora_rank") == 96
    t = shapes(header)
    assert t["blk.2.attn_q_a.weight"] == (256, 96)
    assert t["blk.2.attn_q_a_norm.weight"] == (96,)
    assert t["blk.2.attn_q_b.weight"] == (96, 4 * 48)
    assert t["blk.2.ffn_up_shexp.weight"] == (256, 128)
    assert "blk.2.attn_q.weight" not in t


def test_granitehybrid_layers_follow_their_kv_heads(tmp_path: Path) -> None:
    header = write(tmp_path, GRANITE_H)
    kv = header.get("granitehybrid.attention.head_count_kv")
    assert list(kv.values) == [0, 2, 0, 2]
    assert header.get("granitehybrid.rope.scaling.finetuned") is False  # NoPE, as Granite 4.0 H
    t = shapes(header)
    assert t["blk.0.ssm_in.weight"] == (128, 256 + 256 + 2 * 16 + 4)  # z, x, B, C, dt
    assert t["blk.1.attn_k.weight"] == (128, 2 * 32) and "blk.1.ssm_in.weight" not in t
    assert "blk.0.attn_q.weight" not in t
    assert all(t[f"blk.{il}.ffn_up.weight"] == (128, 256) for il in range(4))  # every layer has an FFN


def test_granitehybrid_moe_writes_expert_width_as_ffn_length(tmp_path: Path) -> None:
    header = write(tmp_path, replace(GRANITE_H, n_expert=8, n_expert_used=2, n_ff_exp=64, n_ff_shexp=96))
    assert header.get("granitehybrid.feed_forward_length") == 64  # what llama.cpp sizes the experts by
    assert header.get("granitehybrid.expert_shared_feed_forward_length") == 96
    assert header.get("granitehybrid.expert_feed_forward_length") is None
    t = shapes(header)
    assert t["blk.3.ffn_up_exps.weight"] == (128, 64, 8)
    assert t["blk.3.ffn_down_shexp.weight"] == (96, 128)
    assert "blk.3.ffn_up.weight" not in t


def test_deci_writes_per_layer_arrays_and_skips_what_a_layer_lacks(tmp_path: Path) -> None:
    spec = ModelSpec(arch="deci", n_embd=128, n_layer=4, n_head=(4, 4, 0, 4), n_head_kv=(2, 0, 0, 4),
                     n_ff=(256, 0, 128, 256))
    header = write(tmp_path, spec)
    assert list(header.get("deci.attention.head_count").values) == [4, 4, 0, 4]
    assert list(header.get("deci.feed_forward_length").values) == [256, 0, 128, 256]
    t = shapes(header)
    assert t["blk.0.attn_k.weight"] == (128, 64) and t["blk.3.attn_k.weight"] == (128, 128)
    assert t["blk.1.attn_output.weight"] == (128, 128) and "blk.1.attn_q.weight" not in t  # linear attention
    assert not any(name.startswith("blk.2.attn") for name in t)  # attention-free
    assert "blk.1.ffn_up.weight" not in t and "blk.1.ffn_norm.weight" not in t


def test_bert_reranker_has_a_classification_head(tmp_path: Path) -> None:
    header = write(tmp_path, replace(BERT, n_cls_out=2))
    t = shapes(header)
    assert t["cls.weight"] == (128, 128) and t["cls.output.weight"] == (128, 2) and "cls.output.bias" in t
    assert header.get("bert.pooling_type") == 4  # rank
    assert header.get("bert.classifier.output_labels").length == 2  # llama.cpp counts them as n_cls_out


def test_qwen35_delta_net_and_gated_attention_layers(tmp_path: Path) -> None:
    from llamactl.model.params import model_params

    spec = ModelSpec(arch="qwen35", n_embd=128, n_layer=4, n_head=4, n_head_kv=2, head_dim=32, n_ff=256,
                     full_attention_interval=2, ssm_d_conv=4, ssm_d_state=16, ssm_n_group=2, ssm_dt_rank=4,
                     ssm_d_inner=64)
    header = write(tmp_path, spec)
    t = shapes(header)
    assert t["blk.1.attn_q.weight"] == (128, 2 * 4 * 32)  # query and its gate
    assert t["blk.0.attn_qkv.weight"] == (128, 2 * 32 + 64) and t["blk.0.attn_gate.weight"] == (128, 64)
    assert t["blk.0.ssm_conv1d.weight"] == (4, 2 * 32 + 64) and "blk.1.attn_qkv.weight" not in t
    params = model_params(header)
    assert params.recurrent_layers == (True, False, True, False) and params.q_gated
    assert params.n_embd_r == 3 * (2 * 32 + 64) and params.n_embd_s == 16 * 64  # conv rows, per-head 16x16 states


def test_lfm2_conv_and_attention_layers(tmp_path: Path) -> None:
    spec = ModelSpec(arch="lfm2", n_embd=128, n_layer=3, n_head=4, n_head_kv=(0, 2, 0), n_ff=256, shortconv_l_cache=3)
    header = write(tmp_path, spec)
    assert header.get("lfm2.shortconv.l_cache") == 3
    t = shapes(header)
    assert t["blk.0.shortconv.conv.weight"] == (3, 128) and t["blk.0.shortconv.in_proj.weight"] == (128, 384)
    assert t["blk.1.attn_q_norm.weight"] == (32,) and "blk.1.shortconv.conv.weight" not in t
    assert "token_embd_norm.weight" in t and "output_norm.weight" not in t  # lfm2's final norm
    assert all(f"blk.{il}.ffn_up.weight" in t for il in range(3))


@pytest.mark.parametrize(("key", "weight_type"), [
    ("qwen3-next-80b-a3b", "Q4_K"), ("lfm2-1.2b", "Q8_0"), ("granite-4.0-h-tiny", "Q4_0"), ("qwen3-8b", "Q4_0"), ("qwen3-30b-a3b", "Q4_K"), ("gemma3-4b", "Q4_0"), ("gemma3-27b", "Q8_0"),
    ("mamba2-2.7b", "Q4_0"), ("deepseek-v2-lite", "Q4_0"),
])
def test_new_realistic_specs_write_sparse_fast(tmp_path: Path, key: str, weight_type: str) -> None:
    spec = replace(REALISTIC[key], weight_type=weight_type)
    start = time.perf_counter()
    header = write(tmp_path, spec, sparse=True)
    assert time.perf_counter() - start < 5
    assert header.architecture == spec.arch
    assert header.get(f"{spec.arch}.block_count") == spec.n_layer
    if key == "qwen3-30b-a3b":
        down = next(t for t in header.tensors if t.name == "blk.47.ffn_down_exps.weight")
        assert down.shape == (768, 2048, 128) and down.ggml_type.name == "Q4_K"
        assert header.file_bytes > 15 * 2**30  # logical size; the file is sparse on disk
    if key == "deepseek-v2-lite":
        assert header.get("deepseek2.attention.kv_lora_rank") == 512
        assert header.get("deepseek2.attention.key_length") == 576
        assert shapes(header)["blk.26.attn_k_b.weight"] == (128, 512, 16)
    if key == "granite-4.0-h-tiny":
        attention = [il for il, kv in enumerate(header.get("granitehybrid.attention.head_count_kv").values) if kv]
        assert attention == [5, 15, 25, 35]


@pytest.mark.parametrize(("spec", "message"), [
    (ModelSpec(n_swa=64), "n_swa only applies"),
    (ModelSpec(n_expert=4), "only apply to deepseek2, granitehybrid, qwen3moe"),
    (ModelSpec(n_ff_shexp=64), "only applies to granitehybrid"),
    (replace(GRANITE_H, ssm_d_inner=384), "ssm_d_inner == 2 \\* n_embd"),
    (replace(GRANITE_H, n_ff_shexp=64), "needs n_expert"),
    (replace(GRANITE_H, n_head_kv=(0, -1, 0, 2)), ">= 0"),
    (replace(QWEN3, n_head_kv=(0, 2)), "must be > 0"),
    (replace(QWEN3, n_head=(4, 4)), "per-layer n_head and n_ff only apply to deci"),
    (ModelSpec(arch="lfm2", n_head_kv=(0, 2)), "shortconv_l_cache >= 2"),
    (ModelSpec(arch="qwen35", head_dim=16, full_attention_interval=4, ssm_d_conv=4, ssm_d_state=16, ssm_n_group=2,
               ssm_dt_rank=4, ssm_d_inner=48), "ssm_d_inner == ssm_d_state"),
    (ModelSpec(shortconv_l_cache=3), "shortconv_l_cache only applies to lfm2"),
    (ModelSpec(n_cls_out=1), "n_cls_out only applies to bert"),
    (ModelSpec(arch="deci", n_head=(0, 4), n_head_kv=(0, 2)), "layer 0 needs attention heads"),
    (ModelSpec(arch="deci", n_head=(4, 4), n_head_kv=(2, 3)), "not a multiple of n_head_kv"),
    (ModelSpec(arch="deci", n_head=(4, 4, 4), n_head_kv=2), "n_head has 3 entries"),
    (ModelSpec(ssm_d_inner=64), "ssm_"),
    (replace(QWEN3MOE, n_expert_used=0), "n_expert_used"),
    (replace(QWEN3MOE, n_expert_used=9), "exceeds n_expert"),
    (replace(MAMBA2, ssm_dt_rank=3), "divisible by ssm_dt_rank"),
    (replace(MAMBA2, ssm_d_state=0), "ssm_"),
    (replace(BERT, head_dim=64), "head_dim=None"),
    (replace(QWEN3MOE, n_ff_exp=48, weight_type="Q8_0"), "row size 48"),
    (ModelSpec(kv_lora_rank=64), "only apply to deepseek2"),
    (replace(DEEPSEEK2, head_dim=None), "needs head_dim"),
    (replace(DEEPSEEK2, kv_lora_rank=0), "kv_lora_rank"),
    (replace(DEEPSEEK2, n_rot=15), "n_rot must be even"),
    (replace(DEEPSEEK2, n_shared_expert=0), "n_shared_expert"),
    (replace(DEEPSEEK2, n_dense_lead=5), "n_dense_lead"),
    (replace(DEEPSEEK2, n_expert=0), "n_expert"),
    (replace(DEEPSEEK2, kv_lora_rank=48, weight_type="Q8_0"), "row size 48"),
])
def test_rejects_inconsistent_specs(tmp_path: Path, spec: ModelSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_model(tmp_path / "bad.gguf", spec)
