"""`llamactl plan` as a CI fit check: exit codes, JSON, the command it renders."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.test_cli import run
from tests.synth import REALISTIC, write_model

KEYS = {"fit", "gpu_ids", "tensor_split", "n_gpu_layers", "n_cpu_moe", "argv", "env", "devices", "evict", "reasons", "calibration"}


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = replace(REALISTIC["llama3-8b"], weight_type="Q4_0", tokenizer="llama", n_merges=0)
    return write_model(tmp_path_factory.mktemp("m") / "llama3-8b-q4_0.gguf", spec, sparse=True)


@pytest.mark.parametrize(("gpus", "extra", "code", "fit", "ids"), [
    ("24GiB", [], 0, "gpu", [0]),
    ("24GiB,16GiB", ["--strategy", "pack"], 0, "gpu", [1]),
    ("8GiB,3GiB", ["-c", "32768"], 0, "gpu", [0, 1]),
    ("8GiB,3GiB", ["-c", "32768", "--max-gpus", "1"], 3, "partial", [0]),
    ("2GiB", ["--no-partial"], 3, "cpu", []),
    ("none", [], 3, "cpu", []),
    ("none", ["--host-memory", "2GiB"], 4, "none", []),
])
def test_fit_by_exit_code(llama8b: Path, gpus, extra, code, fit, ids) -> None:
    out = run("plan", str(llama8b), "--gpus", gpus, "--json", *extra)
    assert out.returncode == code, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == KEYS
    assert data["fit"] == fit and data["gpu_ids"] == ids
    if fit == "none":
        assert data["argv"] == [] and data["reasons"]
        return
    argv = data["argv"]
    assert argv[argv.index("--n-gpu-layers") + 1] == str(data["n_gpu_layers"])
    assert data["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, ids))
    if len(ids) > 1:
        split = argv[argv.index("--tensor-split") + 1].split(",")
        assert len(split) == len(ids) and data["tensor_split"] is not None
    else:
        assert "--tensor-split" not in argv and data["tensor_split"] is None
    for dev in data["devices"]:
        if dev["device"].startswith("GPU"):
            assert dev["total_bytes"] <= dev["capacity_bytes"]


def test_ci_fit_check_from_an_inventory_file(llama8b: Path, tmp_path: Path) -> None:
    inv = [{"index": 0, "uuid": "GPU-11111111-2222", "name": "NVIDIA L4", "memory_total_bytes": 24 * 2**30,
            "memory_used_bytes": 20 * 2**30, "memory_free_bytes": 4 * 2**30, "utilization_gpu": 3,
            "utilization_memory": 1, "processes": []},
           {"index": 1, "uuid": "GPU-33333333-4444", "name": "NVIDIA L4", "memory_total_bytes": 24 * 2**30,
            "memory_used_bytes": 1 * 2**30, "memory_free_bytes": 23 * 2**30, "utilization_gpu": 0,
            "utilization_memory": 0, "processes": []}]
    path = tmp_path / "prod.json"
    path.write_text(json.dumps(inv))
    out = run("plan", str(llama8b), "--gpus-file", str(path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["gpu_ids"] == [1]  # GPU 0 is 83 % used by other programs
    assert data["env"] == {"CUDA_VISIBLE_DEVICES": "GPU-33333333-4444"}  # pinned by UUID
    assert any("other programs use" in r for r in data["reasons"])


def test_human_output(llama8b: Path) -> None:
    out = run("plan", str(llama8b), "--gpus", "24GiB")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].endswith("fits on GPU 0.")
    assert "CAPACITY" in out.stdout and "HEADROOM" in out.stdout
    assert "--n-gpu-layers 33" in out.stdout and "--fit off" in out.stdout


def test_extra_args_pass_through_and_memory_flags_are_refused(llama8b: Path) -> None:
    out = run("plan", str(llama8b), "--gpus", "24GiB", "--json", "--", "--temp", "0.5")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["argv"][-2:] == ["--temp", "0.5"]
    refused = run("plan", str(llama8b), "--gpus", "24GiB", "--", "-sm", "row")
    assert refused.returncode == 2 and "split mode row" in refused.stderr
    own = run("plan", str(llama8b), "--gpus", "24GiB", "--", "--mmproj", "x.gguf")  # modelled: llamactl's own flag
    assert own.returncode == 2 and "use llamactl's own --mmproj" in own.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "24GiB", "--margin", "lots"], "--margin"),
    (["--gpus", "24GiB", "--gpu-ids", "a,b"], "--gpu-ids"),
    (["--gpus", "24GiB", "--gpu-mem-threshold", "2"], "--gpu-mem-threshold"),
    (["--gpus", "24GiB", "--strategy", "random"], "random"),
])
def test_bad_input_exits_2(llama8b: Path, args, message) -> None:
    out = run("plan", str(llama8b), *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_plan_with_real_server_probe(llama8b: Path) -> None:
    # with --server-bin pointing nowhere the plan must fail loudly, not assume
    out = run("plan", str(llama8b), "--gpus", "24GiB", "--server-bin", "/nonexistent/llama-server")
    assert out.returncode == 5 and "not found" in out.stderr


def test_plan_honours_a_given_tensor_split(llama8b: Path) -> None:
    data = json.loads(run("plan", str(llama8b), "-c", "32768", "--gpus", "8GiB,8GiB", "-ts", "1,3", "--json").stdout)
    assert data["fit"] == "gpu" and data["tensor_split"] == [1.0, 3.0]
    argv = data["argv"]
    assert argv[argv.index("--tensor-split") + 1] == "1,3"
    gpu0, gpu1 = [d for d in data["devices"] if d["device"].startswith("GPU")]
    assert gpu1["weights_bytes"] > 2 * gpu0["weights_bytes"]


def test_ngl_0_says_so(llama8b: Path) -> None:
    data = json.loads(run("plan", str(llama8b), "--gpus", "24GiB", "-ngl", "0", "--json").stdout)
    assert data["fit"] == "cpu" and "-ngl 0 asks for the CPU" in data["reasons"]
    assert not any("not even one layer" in r for r in data["reasons"])


@pytest.fixture(scope="module")
def qwen3moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = replace(REALISTIC["qwen3-30b-a3b"], weight_type="Q4_K")
    return write_model(tmp_path_factory.mktemp("m") / "qwen3-30b-a3b-q4_k.gguf", spec, sparse=True)


def test_moe_plan_keeps_layers_on_gpu_and_moves_experts(qwen3moe: Path) -> None:
    out = run("plan", str(qwen3moe), "--gpus", "16GiB", "--json")
    assert out.returncode == 3, out.stderr  # partial: some weights on the host
    data = json.loads(out.stdout)
    argv = data["argv"]
    assert data["n_gpu_layers"] == 49 and argv[argv.index("--n-gpu-layers") + 1] == "49"
    assert 0 < data["n_cpu_moe"] < 48 and argv[argv.index("--n-cpu-moe") + 1] == str(data["n_cpu_moe"])
    text = run("plan", str(qwen3moe), "--gpus", "16GiB")
    assert f"experts of {data['n_cpu_moe']} layers on the CPU" in text.stdout
    # the same flag given by hand: an estimate that follows it, and no flag twice in the command
    given = run("plan", str(qwen3moe), "--gpus", "24GiB", "--n-cpu-moe", "8", "--json")
    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout)["argv"].count("--n-cpu-moe") == 1
    refused = run("plan", str(qwen3moe), "--gpus", "24GiB", "--", "--n-cpu-moe", "8")
    assert refused.returncode == 2 and "--n-cpu-moe" in refused.stderr
    bad = run("estimate", str(qwen3moe), "--n-cpu-moe", "-1")
    assert bad.returncode == 2 and "--n-cpu-moe: expected a number >= 0" in bad.stderr


def test_tensor_overrides_reach_the_command_and_bad_ones_exit_2(llama8b: Path) -> None:
    out = run("plan", str(llama8b), "--gpus", "24GiB", "-ot", r"blk\.(0|1)\.ffn_up=CPU", "--json")
    assert out.returncode == 0, out.stderr  # fits as asked (an override the user gives is kept, as --n-cpu-moe)
    data = json.loads(out.stdout)
    argv = data["argv"]
    assert argv[argv.index("--override-tensor") + 1] == r"blk\.(0|1)\.ffn_up=CPU"
    host = next(d for d in data["devices"] if d["device"] == "CPU")
    assert host["weights_bytes"] > 2 * 58 * 2**20  # two ffn_up matrices of Llama-3-8B Q4_0 (~56 MiB each) and token_embd
    for bad, message in (("ffn_up", "expected REGEX=BUFFER"), ("ffn_up=CUDA3", "does not exist with 1 GPU")):
        refused = run("plan", str(llama8b), "--gpus", "24GiB", "-ot", bad)
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_launch_takes_the_same_placement_flags_as_plan(llama8b: Path) -> None:
    out = run("launch", str(llama8b), "--gpus", "24GiB,16GiB", "--gpu-ids", "1", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["env"]["CUDA_VISIBLE_DEVICES"] == "1"  # the allow-list, as plan honours it
    bad = run("launch", str(llama8b), "--gpus", "24GiB", "--gpu-mem-threshold", "2", "--dry-run")
    assert bad.returncode == 2 and "--gpu-mem-threshold must be in (0, 1]" in bad.stderr
    none = run("launch", str(llama8b), "--gpus", "none", "--host-memory", "1GiB", "--dry-run")
    assert none.returncode == 4 and "does not fit" in none.stderr  # the same exit code as plan's "none"


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "gemma3-4b.gguf", REALISTIC["gemma3-4b"], sparse=True)


@pytest.mark.parametrize(("model", "gpus", "given", "offered"), [
    # partial: a -c for 2 GPUs, a smaller one and a cache type for 1
    ("llama8b", "8GiB,3GiB", ["-c", "65536"], {"-c", "-ctk"}),
    ("llama8b", "8GiB", ["-c", "32768", "-fa", "off"], {"-c", "-ctk"}),  # a quantized cache needs -fa on
    ("llama8b", "24GiB", ["-ngl", "10"], {"-ngl"}),
    ("qwen3moe", "16GiB", [], {"-ncmoe"}),
    ("gemma3", "12GiB", ["-c", "32768", "-np", "32", "-kvu"], {"-c", "-ctk", "-np"}),  # its window grows with slots
])
def test_explain_what_ifs_applied_fit(request: pytest.FixtureRequest, model, gpus, given, offered) -> None:
    """Every what-if `plan --explain` offers, its flags added to the same command, plans as it promised."""
    path = str(request.getfixturevalue(model))
    out = run("plan", path, "--gpus", gpus, *given, "--explain", "--json")
    assert out.returncode == 3, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == KEYS | {"explain"}
    what_ifs = data["explain"]["what_ifs"]
    assert what_ifs and all(w["flags"] and not w["evict"] for w in what_ifs)
    for w in what_ifs:
        applied = run("plan", path, "--gpus", gpus, *given, *w["flags"], "--json")
        assert applied.returncode == (0 if w["fit"] == "gpu" else 3), (w["text"], applied.stderr)
        result = json.loads(applied.stdout)
        assert (result["fit"], result["gpu_ids"]) == (w["fit"], w["gpu_ids"]), w["text"]
    assert {w["flags"][0] for w in what_ifs} == offered, what_ifs


def test_explain_text_says_why_each_gpu_was_left(llama8b: Path, tmp_path: Path) -> None:
    gib = 2**30
    inv = [{"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA L4", "memory_total_bytes": total * gib,
            "memory_used_bytes": (total - free) * gib, "memory_free_bytes": free * gib, "utilization_gpu": util,
            "utilization_memory": 0, "processes": []}
           for i, (total, free, util) in enumerate(((24, 4, 3), (24, 23, 95), (8, 6, 0)))]
    path = tmp_path / "prod.json"
    path.write_text(json.dumps(inv))
    out = run("plan", str(llama8b), "--gpus-file", str(path), "-c", "32768", "--explain")
    assert out.returncode == 3, out.stderr
    section = out.stdout[out.stdout.index("\nexplain:\n"):]
    assert "rejected: GPU 0: other programs use 20.00 GiB of 24.00 GiB (threshold 50%)" in section
    assert "rejected: GPU 1 is 95% busy (threshold 50%)" in section
    assert "GPU 2 taken:" in section and "short by" in section
    assert "what would make it fit better" in section and "- -c " in section
    plain = run("plan", str(llama8b), "--gpus-file", str(path), "-c", "32768")
    assert "explain:" not in plain.stdout and plain.stdout == out.stdout[:len(plain.stdout)]
    fits = run("plan", str(llama8b), "--gpus", "24GiB", "--explain")
    assert fits.returncode == 0 and "it fits on one GPU: nothing to change" in fits.stdout


def test_explain_evict_what_if_applied_fits(tmp_path: Path) -> None:
    """`llamactl evict` of the instances the what-if names, then the same plan runs wholly on the GPU."""
    from tests.integration.test_bounds import _estimate, _write_models

    config, env = _write_models(tmp_path, "abc")
    env["LLAMACTL_GPUS"] = f"1x{math.ceil(2.5 * _estimate(config, env, 'a') / 1024)}KiB"
    cli = lambda *argv: run("--config", str(config), *argv, env=env)  # noqa: E731
    try:
        for name in "ab":
            assert cli("launch", name).returncode == 0
        planned = cli("plan", "c", "--explain", "--json")
        assert planned.returncode == 3, planned.stdout
        (w,) = [w for w in json.loads(planned.stdout)["explain"]["what_ifs"] if w["evict"]]
        assert w["evict"] == ["a"] and w["flags"] == [] and w["text"].startswith("llamactl evict a:")
        assert cli("evict", *w["evict"]).returncode == 0
        after = cli("plan", "c", "--json")
        assert after.returncode == 0 and json.loads(after.stdout)["gpu_ids"] == w["gpu_ids"]
    finally:
        cli("evict", "--all")
