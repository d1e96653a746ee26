"""Every registered llama-server setting, given as a flag and given as a config key, reaches llama-server's
argv the same way (through `plan`, the door that prints it), and changes it: a new entry without an example
here fails the coverage test."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.cli.root import main
from llamactl.model.registry import SETTINGS
from tests.synth import ModelSpec, draft_spec, write_lora, write_model, write_projector

TEXT = ModelSpec(arch="gemma3", n_vocab=4096, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, head_dim=64,
                 n_swa=128, tied_output=True)
MOE = ModelSpec(n_vocab=4096, n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=768, arch="qwen3moe", head_dim=64,
                n_expert=8, n_expert_used=2, n_ff_exp=256)

# field → (model, command-line flags, config lines); {draft}, {lora}, {mmproj} name files written below
EXAMPLES = {
    "ctx_size": ("text", ["-c", "2048"], "ctx_size = 2048"),
    "n_gpu_layers": ("text", ["-ngl", "2"], "n_gpu_layers = 2"),
    "flash_attn": ("text", ["-fa", "off"], 'flash_attn = "off"'),
    "parallel": ("text", ["-np", "3"], "parallel = 3"),
    "cache_type_k": ("text", ["-ctk", "q8_0"], 'cache_type_k = "q8_0"'),
    "cache_type_v": ("text", ["-ctv", "Q8_0", "-fa", "on"], 'cache_type_v = "q8_0"\nflash_attn = true'),
    "batch_size": ("text", ["-b", "512"], "batch_size = 512"),
    "ubatch_size": ("text", ["-ub", "128"], "ubatch_size = 128"),
    "kv_unified": ("text", ["-np", "2", "--kv-unified"], "parallel = 2\nkv_unified = true"),
    "tensor_split": ("text", ["-ts", "3,1"], "tensor_split = [3, 1]"),
    "swa_full": ("text", ["--swa-full"], "swa_full = true"),
    "reranking": ("text", ["--rerank"], "reranking = true"),
    "embedding": ("text", ["--embeddings"], "embedding = true"),
    "kv_offload": ("text", ["-nkvo"], "kv_offload = false"),
    "mmap": ("text", ["--no-mmap"], "no_mmap = true"),
    "repack": ("text", ["-nr"], "repack = false"),
    "lora": ("text", ["--lora", "{lora}"], 'lora = ["{lora}"]'),
    "tensor_overrides": ("text", ["-ot", "blk\\.0\\.ffn_up=CPU"], 'override_tensor = ["blk\\\\.0\\\\.ffn_up=CPU"]'),
    "n_cpu_moe": ("moe", ["--cpu-moe"], 'n_cpu_moe = "all"'),
    "draft_model": ("text", ["-md", "{draft}"], 'model_draft = "{draft}"'),
    "draft_n_gpu_layers": ("text", ["-md", "{draft}", "-ngld", "1"], 'model_draft = "{draft}"\nn_gpu_layers_draft = 1'),
    "draft_cache_type_k": ("text", ["-md", "{draft}", "-ctkd", "q8_0"], 'model_draft = "{draft}"\ncache_type_k_draft = "q8_0"'),
    "draft_cache_type_v": ("text", ["-md", "{draft}", "-ctvd", "q8_0", "-fa", "on"],
                           'model_draft = "{draft}"\ncache_type_v_draft = "q8_0"\nflash_attn = "on"'),
    "mmproj": ("text", ["--mmproj", "{mmproj}"], 'mmproj = "{mmproj}"'),
    "mmproj_offload": ("text", ["-mm", "{mmproj}", "--no-mmproj-offload"], 'mmproj = "{mmproj}"\nno_mmproj_offload = true'),
}
# what a setting's example needs besides it: the baseline its argv must differ from
BASELINE = {"cache_type_v": ["-fa", "on"], "kv_unified": ["-np", "2"], "draft_n_gpu_layers": ["-md", "{draft}"],
            "draft_cache_type_k": ["-md", "{draft}"], "draft_cache_type_v": ["-md", "{draft}", "-fa", "on"],
            "mmproj_offload": ["-mm", "{mmproj}"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry")
    return {"text": write_model(root / "text.gguf", TEXT), "moe": write_model(root / "moe.gguf", MOE),
            "draft": write_model(root / "draft.gguf", draft_spec(replace(TEXT, n_swa=0, arch="llama"))),
            "lora": write_lora(root / "lora.gguf", TEXT), "mmproj": write_projector(root / "mmproj.gguf", TEXT)}


def _fill(text: str, files: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in files.items()})


def plan_argv(monkeypatch, capsys, tmp_path: Path, *args: str) -> list[str]:
    monkeypatch.setenv("LLAMACTL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LLAMACTL_GPUS", "2x24GiB")
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "absent"))  # a current build assumed: flags alike
    monkeypatch.setattr(sys, "argv", ["llamactl", *args, "--json"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    assert info.value.code in (0, 3), out.out + out.err
    argv = json.loads(out.out)["argv"]
    return argv[1:]  # argv[0] names the binary


def test_every_setting_has_an_example() -> None:
    assert set(EXAMPLES) == {s.field for s in SETTINGS}


@pytest.mark.parametrize("field", sorted(EXAMPLES))
def test_flag_and_config_key_give_the_same_argv(field: str, files, monkeypatch, capsys, tmp_path: Path) -> None:
    model, flags, lines = EXAMPLES[field]
    flags = [_fill(f, files) for f in flags]
    config = tmp_path / "config.toml"
    config.write_text(f'[models.{model}]\npath = "{files[model]}"\n{_fill(lines, files)}\n')  # named as its file
    by_flag = plan_argv(monkeypatch, capsys, tmp_path, "plan", str(files[model]), *flags)
    by_key = plan_argv(monkeypatch, capsys, tmp_path, "--config", str(config), "plan", model)
    baseline = plan_argv(monkeypatch, capsys, tmp_path, "plan", str(files[model]),
                         *[_fill(f, files) for f in BASELINE.get(field, [])])
    assert by_flag == by_key
    assert by_flag != baseline, f"{field}'s example does not reach llama-server's argv"
