"""`llamactl k8s render`: manifests valid against the Kubernetes API schemas (kubernetes-validate --strict,
offline), whose llama-server arguments are `plan --gpus-file`'s for the same node type; refusals exit 4."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.synth import REALISTIC, write_model

K8S_VERSION = "1.30.0"
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")
if not os.access(VALIDATE, os.X_OK):
    VALIDATE = shutil.which("kubernetes-validate") or ""


@pytest.fixture
def validator() -> str:
    """kubernetes-validate (the test extra installs it): missing = a loud failure, never a skip."""
    if not VALIDATE:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[test]' (the manifests' schema would "
                    "go unchecked)", pytrace=False)
    return VALIDATE


needs_validate = pytest.mark.usefixtures("validator")
POD_OWN = frozenset({"--model", "--model-draft", "--host", "--port"})  # the options whose values the pod sets


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config of Llama-3-8B Q4_0 models (~5.5 GiB at 8k tokens), one with a draft model in another directory,
    and node types written as the docs say (`llamactl --json gpus --gpus ... > node.json`)."""
    tmp = tmp_path_factory.mktemp("k8s")
    llama = replace(REALISTIC["llama3-8b"], weight_type="Q4_0", tokenizer="llama", n_merges=0)
    big = write_model(tmp / "llama3-8b-q4_0.gguf", llama, sparse=True)
    (tmp / "drafts").mkdir()
    draft = write_model(tmp / "drafts" / "llama-draft.gguf",
                        replace(llama, n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512), sparse=True)
    models = {"Chat.8b": f'model_draft = "{draft}"\nctx_size = 8192', "code": "ctx_size = 8192\npriority = 5",
              "batch": "ctx_size = 8192", "long": "ctx_size = 65536"}
    tables = {name: f'[models."{name}"]\npath = "{big}"\n{keys}\n' for name, keys in models.items()}
    (tmp / "fleet.toml").write_text("".join(tables.values()))
    (tmp / "all.toml").write_text("".join(table for name, table in tables.items() if name != "long"))
    for gpus in ("1x24GiB", "2x4GiB", "1x4GiB", "2x8GiB"):
        out = run(tmp, "--json", "gpus", "--gpus", gpus)
        assert out.returncode == 0, out.stderr
        (tmp / f"{gpus}.json").write_text(out.stdout)
    return tmp


def run(tmp: Path, *args: str, config: str = "fleet.toml") -> subprocess.CompletedProcess[str]:
    # no llama-server anywhere: `plan` assumes a current build, as the image's is taken to be
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp / "state"), "LLAMA_SERVER": str(tmp / "no-llama-server")}
    return subprocess.run([sys.executable, "-m", "llamactl", "--config", str(tmp / config), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def render(tmp: Path, *args: str, config: str = "fleet.toml") -> list[dict]:
    """The YAML documents `k8s render` prints: a Deployment and a Service per model."""
    out = run(tmp, "k8s", "render", *args, config=config)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"] * (len(docs) // 2)
    return docs


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VALIDATE, "--strict", "-k", K8S_VERSION, str(path)], capture_output=True, text=True,
                          timeout=120)


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def split_own(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The argv without the options the pod sets itself, and those options' values."""
    rest, own = [], {}
    i = 0
    while i < len(argv):
        if argv[i] in POD_OWN:
            own[argv[i]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return rest, own


@pytest.mark.parametrize(("node", "gpus"), [("1x24GiB", 1), ("2x4GiB", 2)])
def test_the_pod_runs_plans_argv_on_as_many_gpus_as_the_plan(fleet: Path, node: str, gpus: int) -> None:
    docs = render(fleet, "Chat.8b", "--gpus-file", str(fleet / f"{node}.json"), "--gpu-product", "NVIDIA-L4",
                     "--model-volume", "host:/srv/models")
    plan = json.loads(run(fleet, "plan", "Chat.8b", "--gpus-file", str(fleet / f"{node}.json"), "--json").stdout)
    assert len(plan["gpu_ids"]) == gpus and plan["fit"] == "gpu"
    deployment, service = docs
    pod = container(deployment)
    assert pod["resources"]["limits"] == {"nvidia.com/gpu": gpus}
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    # token for token plan's argv, but for argv[0] (the image's entrypoint), the paths, --host and --port
    plan_rest, plan_own = split_own(plan["argv"][1:])
    pod_rest, pod_own = split_own(pod["args"])
    assert pod_rest == plan_rest
    assert ("--tensor-split" in pod_rest) == (gpus > 1)
    assert pod_own == {"--model": "/models/llama3-8b-q4_0.gguf", "--model-draft": "/models/llama-draft.gguf",
                       "--host": "0.0.0.0", "--port": "8080"}
    assert {Path(plan_own["--model"]).name, Path(plan_own["--model-draft"]).name} == {"llama3-8b-q4_0.gguf",
                                                                                    "llama-draft.gguf"}
    assert "env" not in pod  # CUDA_VISIBLE_DEVICES is the device plugin's
    assert deployment["spec"]["template"]["spec"]["volumes"] == [
        {"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}}]
    # the estimate per device, as plan has it; the probes on llama-server's /health; the Service in front
    notes = deployment["metadata"]["annotations"]
    assert {d["device"]: d["total_bytes"] for d in plan["devices"]} == {
        key.split("/estimate-")[1].removesuffix("-bytes").upper(): int(v) for key, v in notes.items()
        if "/estimate-" in key}
    assert pod["startupProbe"]["httpGet"] == pod["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["type"] == "ClusterIP" and deployment["metadata"]["name"] == "chat-8b"


def test_a_model_that_would_not_run_wholly_on_the_gpus_is_refused_with_the_reasons(fleet: Path) -> None:
    out = run(fleet, "k8s", "render", "Chat.8b", "--gpus-file", str(fleet / "1x4GiB.json"))
    assert out.returncode == 4 and out.stdout == ""
    assert "Chat.8b would not run wholly on the GPUs of 1x" in out.stderr
    assert "partial offload" in out.stderr and "--allow-partial" in out.stderr
    doc = json.loads(run(fleet, "--json", "k8s", "render", "Chat.8b", "--gpus-file", str(fleet / "1x4GiB.json")).stdout)
    assert doc["error"]["type"] == "no_fit" and doc["error"]["exit_code"] == 4


def test_allow_partial_requests_the_host_memory_the_cpu_layers_need(fleet: Path) -> None:
    whole = render(fleet, "Chat.8b", "--gpus-file", str(fleet / "1x24GiB.json"))
    partial = render(fleet, "Chat.8b", "--gpus-file", str(fleet / "1x4GiB.json"), "--allow-partial")

    def request_bytes(docs: list[dict]) -> int:
        text = container(docs[0])["resources"]["requests"]["memory"]
        assert text.endswith("Mi")
        return int(text[:-2]) * 2**20

    notes = partial[0]["metadata"]["annotations"]
    assert notes["llamactl/fit"] == "partial"
    assert container(partial[0])["resources"]["limits"] == {"nvidia.com/gpu": 1}
    host = int(notes["llamactl/estimate-cpu-bytes"])
    assert request_bytes(partial) >= host + 512 * 2**20
    assert request_bytes(partial) > request_bytes(whole) + 2 * 2**30  # a third of the layers' weights, and their KV


def test_all_packs_the_fleet_onto_nodes_each_pod_with_gpus_of_its_own(fleet: Path) -> None:
    docs = render(fleet, "--all", "--gpus-file", str(fleet / "2x8GiB.json"), config="all.toml")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    by_node: dict[str, list[tuple[str, int]]] = {}
    for d in deployments:
        by_node.setdefault(d["metadata"]["annotations"]["llamactl/node"], []).append(
            (d["metadata"]["annotations"]["llamactl/model"], container(d)["resources"]["limits"]["nvidia.com/gpu"]))
    # code first (priority 5), then in config order: two on the first node's two GPUs, the third on the next
    assert by_node == {"1": [("code", 1), ("Chat.8b", 1)], "2": [("batch", 1)]}
    services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    assert services == ["code", "chat-8b", "batch"]


def test_all_refuses_every_model_that_never_fits_and_renders_nothing(fleet: Path) -> None:
    out = run(fleet, "k8s", "render", "--all", "--gpus-file", str(fleet / "2x4GiB.json"))
    assert out.returncode == 4 and out.stdout == ""
    assert out.stderr.count("would not run wholly") == 1 and "long would not run wholly" in out.stderr


def test_the_node_selector_comes_from_the_gpu_name_in_the_file(fleet: Path, tmp_path: Path) -> None:
    node = [{"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 80 * 2**30,
             "memory_used_bytes": 0, "memory_free_bytes": 80 * 2**30, "processes": []} for i in range(2)]
    (tmp_path / "a100.json").write_text(json.dumps(node))
    out = run(fleet, "--json", "k8s", "render", "code", "--gpus-file", str(tmp_path / "a100.json"))
    assert out.returncode == 0, out.stderr
    deployment, _ = json.loads(out.stdout)
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    node[1]["name"] = "NVIDIA A100-SXM4-40GB"
    (tmp_path / "mixed.json").write_text(json.dumps(node))
    out = run(fleet, "k8s", "render", "code", "--gpus-file", str(tmp_path / "mixed.json"))
    assert out.returncode == 2 and "the GPUs differ" in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus-file", "{node}"], "give a model NAME or --all"),
    (["code", "--all", "--gpus-file", "{node}"], "give a model NAME or --all"),
    (["code", "--gpus-file", "{node}", "--model-volume", "nfs:x"], "--model-volume"),
    (["code"], "--gpus-file"),
])
def test_bad_input_is_one_line_and_exit_2(fleet: Path, args: list[str], message: str) -> None:
    out = run(fleet, "k8s", "render", *(a.format(node=fleet / "1x24GiB.json") for a in args))
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@needs_validate
@pytest.mark.parametrize(("config", "args"), [
    ("fleet.toml", ["Chat.8b", "--gpus-file", "2x4GiB.json", "--model-volume", "host:/srv/models"]),
    ("fleet.toml", ["Chat.8b", "--gpus-file", "1x4GiB.json", "--allow-partial"]),
    ("all.toml", ["--all", "--gpus-file", "2x8GiB.json", "--image", "registry.local/llama:cuda"]),
])
def test_the_manifests_are_valid_against_the_kubernetes_api_schemas(fleet: Path, tmp_path: Path, config: str,
                                                                     args: list[str]) -> None:
    out = run(fleet, "k8s", "render", *(str(fleet / a) if a.endswith(".json") else a for a in args), config=config)
    assert out.returncode == 0, out.stderr
    (tmp_path / "ok.yaml").write_text(out.stdout)
    check = validate(tmp_path / "ok.yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("passed") == out.stdout.count("\nkind: ") and "did not validate" not in check.stdout
    # the check can fail: a field the API does not know is refused under --strict
    (tmp_path / "bad.yaml").write_text(out.stdout.replace("  replicas: 1\n", "  replicas: 1\n  replica: 1\n", 1))
    assert validate(tmp_path / "bad.yaml").returncode != 0
