"""`plan --explain`'s pure core: per-GPU verdicts, and what-ifs that beat the plan, found by searching the planner.

Each what-if's flags are applied as the command line parses them (the registry's flags) and planned again:
it must give the fit it promised, be better than the plan, and be the most that still does (one step more
of -c, one layer fewer of --n-cpu-moe, one slot more does not)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llamactl.explain import Outcome, explain, explain_json, outcome
from llamactl.gpu.inventory import Gpu, parse_gpus_spec
from llamactl.model.gguf import read_header
from llamactl.model.params import ModelParams, model_params
from llamactl.model.registry import SETTINGS
from llamactl.model.settings import ServerSettings
from llamactl.placement import Policy, RunningInstance, plan, without
from llamactl.units import GiB, MiB
from tests.synth import REALISTIC, write_model

ONE, GPUS = Outcome.ONE_GPU, Outcome.GPUS


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelParams]:
    out = {}
    for name, spec in (("llama8b", replace(REALISTIC["llama3-8b"], weight_type="Q4_0", tokenizer="llama", n_merges=0)),
                       ("qwen3moe", replace(REALISTIC["qwen3-30b-a3b"], weight_type="Q4_K")),
                       ("gemma3", REALISTIC["gemma3-4b"])):
        path = tmp_path_factory.mktemp("m") / f"{name}.gguf"
        write_model(path, spec, sparse=True)
        out[name] = model_params(read_header(path))
    return out


def gpus(spec: str) -> tuple[Gpu, ...]:
    return parse_gpus_spec(spec).gpus


def applied(settings: ServerSettings, flags: tuple[str, ...]) -> ServerSettings:
    """The settings with `flags` given on the command line: each flag is a registry entry's, with its value."""
    by_flag = {flag: s for s in SETTINGS for flag in s.flags}
    changes = {}
    for flag, text in zip(flags[::2], flags[1::2]):
        assert flag in by_flag and by_flag[flag].flags[0] == flag, flag
        changes[by_flag[flag].field] = by_flag[flag].from_text(text)
    return replace(settings, **changes)


def idle(name: str, gib: float, last_used: float, **kw) -> RunningInstance:
    # a simulated GPU shows nothing of what runs: its memory is promised, as launcher.running_for_placement says
    return RunningInstance(name, {0: int(gib * GiB)}, last_used=last_used, visible=False, **kw)


CASES = [
    # (model, settings, GPUs, policy, running, the what-ifs expected: first flag or "evict" → outcome)
    ("llama8b", ServerSettings(ctx_size=8192), "24GiB,8GiB", Policy(), (), {}),  # on one GPU: nothing to change
    ("llama8b", ServerSettings(ctx_size=8192), "4GiB", Policy(), (), {}),  # the weights alone overflow it
    ("llama8b", ServerSettings(ctx_size=32768), "8GiB,3GiB", Policy(), (), {"-c": [ONE], "-ctk": [ONE]}),
    ("llama8b", ServerSettings(ctx_size=65536), "8GiB,3GiB", Policy(), (), {"-c": [GPUS, ONE], "-ctk": [ONE]}),
    ("llama8b", ServerSettings(ctx_size=32768, flash_attn="off"), "8GiB", Policy(), (), {"-c": [ONE], "-ctk": [ONE]}),
    ("llama8b", ServerSettings(ctx_size=8192, n_gpu_layers=10), "24GiB", Policy(), (), {"-ngl": [ONE]}),
    ("llama8b", ServerSettings(ctx_size=8192, n_gpu_layers=0), "24GiB", Policy(), (), {"-ngl": [ONE]}),  # the CPU
    ("llama8b", ServerSettings(ctx_size=8192), "2GiB", Policy(allow_partial=False), (), {}),  # no whole-GPU fit
    ("llama8b", ServerSettings(ctx_size=32768), "8GiB,3GiB", Policy(max_gpus=1, allow_partial=False), (),
     {"-c": [ONE], "-ctk": [ONE]}),
    ("qwen3moe", ServerSettings(), "16GiB", Policy(), (), {"-ncmoe": [ONE]}),
    ("qwen3moe", ServerSettings(), "16GiB,8GiB", Policy(), (), {"-ncmoe": [ONE]}),
    ("qwen3moe", ServerSettings(), "16GiB", Policy(allow_partial=False), (), {"-ncmoe": [ONE]}),
    ("gemma3", ServerSettings(ctx_size=32768, parallel=32, kv_unified=True), "12GiB", Policy(), (),
     {"-c": [ONE], "-ctk": [ONE], "-np": [ONE]}),
    ("llama8b", ServerSettings(ctx_size=8192), "8GiB", Policy(),
     (idle("b", 2, 200), idle("a", 2, 100), idle("busy", 1, 50, idle=False)), {"evict": [ONE]}),
    ("llama8b", ServerSettings(ctx_size=8192), "8GiB", Policy(), (idle("busy", 6, 50, idle=False),), {}),
]


@pytest.mark.parametrize(("model", "settings", "spec", "policy", "running", "expected"), CASES)
def test_what_ifs_applied_give_the_fit_they_promise(models, model, settings, spec, policy, running, expected) -> None:
    params = models[model]
    now = plan(params, settings, gpus(spec), policy, running)
    found = explain(params, settings, gpus(spec), policy, running)
    assert found.outcome is outcome(now)
    kinds: dict[str, list[Outcome]] = {}
    for w in found.what_ifs:
        kinds.setdefault(w.flags[0] if w.flags else "evict", []).append(outcome(w))
        if w.evict:
            gone = [i for i in running if i.name in w.evict]
            after_gpus, after_running = without(gpus(spec), running, gone)
            result = plan(params, settings, after_gpus, policy, after_running)
        else:
            result = plan(params, applied(settings, w.flags), gpus(spec), policy, running)
        assert (result.fit, result.gpu_ids) == (w.fit, w.gpu_ids), w.text
        assert outcome(result) > outcome(now), w.text
    assert kinds == expected, [w.text for w in found.what_ifs]


def test_each_what_if_is_the_most_that_still_fits(models) -> None:
    params, settings, inv = models["llama8b"], ServerSettings(ctx_size=65536), gpus("8GiB,3GiB")
    for w in explain(params, settings, inv).what_ifs:
        if w.flags[0] == "-c":
            more = applied(settings, ("-c", str(int(w.flags[1]) + 256)))
            assert outcome(plan(params, more, inv)) < outcome(w), w.text
    moe, one = models["qwen3moe"], gpus("16GiB")
    (w,) = explain(moe, ServerSettings(), one).what_ifs
    assert w.flags[0] == "-ncmoe"
    fewer = applied(ServerSettings(), ("-ncmoe", str(int(w.flags[1]) - 1)))
    assert outcome(plan(moe, fewer, one)) < ONE
    gemma, slots = models["gemma3"], ServerSettings(ctx_size=32768, parallel=32, kv_unified=True)
    (w,) = [w for w in explain(gemma, slots, gpus("12GiB")).what_ifs if w.flags[0] == "-np"]
    assert 1 <= int(w.flags[1]) < 32
    assert outcome(plan(gemma, applied(slots, ("-np", str(int(w.flags[1]) + 1))), gpus("12GiB"))) < ONE


def test_a_quantized_cache_turns_flash_attention_on_only_when_it_is_off(models) -> None:
    params = models["llama8b"]
    off = explain(params, ServerSettings(ctx_size=32768, flash_attn="off"), gpus("8GiB")).what_ifs
    auto = explain(params, ServerSettings(ctx_size=32768), gpus("8GiB")).what_ifs
    assert [w.flags for w in off if w.flags[0] == "-ctk"] == [("-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on")]
    assert [w.flags for w in auto if w.flags[0] == "-ctk"] == [("-ctk", "q8_0", "-ctv", "q8_0")]
    # already q8_0: only the smaller q4_0 is worth trying
    q8 = explain(params, ServerSettings(ctx_size=65536, cache_type_k="q8_0", cache_type_v="q8_0"), gpus("8GiB"))
    assert all(w.flags[1] == "q4_0" for w in q8.what_ifs if w.flags[0] == "-ctk")


def test_evictions_name_the_least_recently_used_idle_instances(models) -> None:
    running = (idle("new", 1, 300), idle("old", 3, 100), idle("busy", 0.5, 50, idle=False))
    found = explain(models["llama8b"], ServerSettings(ctx_size=8192), gpus("8GiB"), Policy(), running)
    (w,) = [w for w in found.what_ifs if w.evict]
    assert w.evict == ("old",) and w.flags == () and w.text.startswith("llamactl evict old:")


def _gpu(index: int, total_gib: int, free_gib: float, util: int | None = None) -> Gpu:
    total, free = total_gib * GiB, int(free_gib * GiB)
    return Gpu(index=index, name="test", memory_total_bytes=total, memory_free_bytes=free,
               memory_used_bytes=total - free, utilization_gpu=util, simulated=True)


def test_verdicts_say_why_each_gpu_was_taken_or_left(models) -> None:
    params, settings = models["llama8b"], ServerSettings(ctx_size=8192)
    inv = (_gpu(0, 24, 24, util=90), _gpu(1, 24, 4), _gpu(2, 24, 23), _gpu(3, 8, 4.5), _gpu(4, 16, 16), _gpu(5, 16, 16))
    found = explain(params, settings, inv, Policy(allowed_gpus=(0, 1, 2, 3, 4)))
    by_index = {v.index: v for v in found.gpus}
    assert [v.verdict for v in found.gpus] == ["rejected", "rejected", "taken", "short", "spare", "rejected"]
    assert "90% busy" in by_index[0].text
    assert "other programs use" in by_index[1].text
    assert "allow-list" in by_index[5].text
    assert by_index[2].share_bytes is not None and by_index[2].short_bytes is None
    assert "GPU 2 preferred" in by_index[4].text
    # short by exactly what it lacks: that much more memory and it holds the model alone, a MiB less and not
    short = by_index[3]
    assert short.short_bytes is not None and short.short_bytes > 0
    margin = Policy().margin_bytes
    enough = replace(inv[3], index=0, memory_free_bytes=short.capacity_bytes + short.short_bytes + margin)
    assert outcome(plan(params, settings, (enough,))) is ONE
    less = replace(enough, memory_free_bytes=enough.memory_free_bytes - MiB)
    assert outcome(plan(params, settings, (less,))) < ONE


def test_json_carries_flags_as_argv_tokens(models) -> None:
    data = explain_json(explain(models["llama8b"], ServerSettings(ctx_size=32768), gpus("8GiB,3GiB")))
    assert data["outcome"] == "gpus"
    assert {tuple(w["flags"]) for w in data["what_ifs"]} >= {("-ctk", "q8_0", "-ctv", "q8_0")}
    assert all(isinstance(t, str) for w in data["what_ifs"] for t in w["flags"])
    assert [g["verdict"] for g in data["gpus"]] == ["taken", "taken"]
    assert all(g["short_bytes"] > 0 for g in data["gpus"])
