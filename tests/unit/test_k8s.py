"""llamactl/k8s.py, pure: node types, names, the pod's argv and resources, and packing models onto nodes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llamactl import k8s
from llamactl.errors import UsageError
from llamactl.fleet import Entry
from llamactl.gpu.inventory import Gpu, Inventory, parse_gpus_spec
from llamactl.model.gguf import read_header
from llamactl.model.params import model_params
from llamactl.model.registry import Residency
from llamactl.model.settings import ServerSettings
from llamactl.placement import Policy
from tests.synth import REALISTIC, write_model

GiB = 2**30


def gpu(index: int, name: str = "NVIDIA L4", total: int = 24 * GiB) -> Gpu:
    return Gpu(index, name, total, total, 0)


@pytest.mark.parametrize(("name", "label"), [
    ("NVIDIA A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"),
    ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
    ("Tesla T4", "Tesla-T4"),
    ("NVIDIA RTX (TM) 6000 ", "NVIDIA-RTX-TM-6000"),
    ("x" * 80, "x" * 63),
])
def test_product_label_is_a_label_value_from_the_gpu_name(name: str, label: str) -> None:
    assert k8s.product_label(name) == label


def test_node_type_takes_the_product_from_the_gpus_or_the_flag() -> None:
    inv = Inventory((gpu(0), gpu(1)), "node.json")
    assert k8s.node_type(inv) == k8s.NodeType(2, "NVIDIA L4", 24 * GiB, "NVIDIA-L4")
    assert k8s.node_type(inv, "NVIDIA-L4-custom").product == "NVIDIA-L4-custom"


@pytest.mark.parametrize(("gpus", "product", "message"), [
    ((gpu(0), gpu(1, total=16 * GiB)), None, "the GPUs differ"),
    ((gpu(0), gpu(1, "Tesla T4")), None, "the GPUs differ"),
    ((), None, "no usable GPU"),
    ((replace(gpu(0), error="GPU is lost"),), None, "no usable GPU"),
    ((gpu(0),), "has space", "not a Kubernetes label value"),
    ((gpu(0),), "-L4", "not a Kubernetes label value"),
])
def test_node_type_refuses_what_no_node_selector_can_mean(gpus, product, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        k8s.node_type(Inventory(gpus, "node.json"), product)


@pytest.mark.parametrize(("model", "name"), [
    ("chat", "chat"), ("Llama-3.1_8B", "llama-3-1-8b"), ("qwen2.5:7b", "qwen2-5-7b"), ("7b", "llm-7b"),
    ("--x--", "x"), ("a" * 70, "a" * 63),
])
def test_object_names_are_dns_labels(model: str, name: str) -> None:
    assert k8s.object_name(model) == name


@pytest.mark.parametrize(("text", "volume"), [
    ("pvc:models", {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}),
    ("host:/srv/models", {"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}}),
])
def test_model_volume(text: str, volume: dict) -> None:
    assert k8s.Volume.parse(text).to_json() == volume


@pytest.mark.parametrize("text", ["models", "nfs:server", "pvc:", "pvc:Models", "host:srv/models"])
def test_model_volume_refused(text: str) -> None:
    with pytest.raises(UsageError, match="--model-volume"):
        k8s.Volume.parse(text)


def test_pod_args_move_every_file_into_the_volume_and_drop_argv0() -> None:
    files = k8s.pod_files(["/a/m.gguf", "/b/draft.gguf", "/c/proj.gguf", "/d/l1.gguf"])
    argv = ["/usr/bin/llama-server", "--model", "/a/m.gguf", "--model-draft", "/b/draft.gguf", "--mmproj",
            "/c/proj.gguf", "--lora", "/d/l1.gguf", "--alias", "/a/m.gguf", "-c", "4096"]
    assert k8s.pod_args(argv, files) == (
        "--model", "/models/m.gguf", "--model-draft", "/models/draft.gguf", "--mmproj", "/models/proj.gguf",
        "--lora", "/models/l1.gguf", "--alias", "/a/m.gguf", "-c", "4096")  # an alias is not a file


def test_two_files_of_one_name_cannot_share_the_volume() -> None:
    assert k8s.pod_files(["/a/m.gguf", "/a/m.gguf"]) == {"/a/m.gguf": "/models/m.gguf"}
    with pytest.raises(UsageError, match="share the file name m.gguf"):
        k8s.pod_files(["/a/m.gguf", "/b/m.gguf"])


@pytest.mark.parametrize("host_bytes", [0, 1, 300 * 2**20, 5 * GiB + 1, 100 * GiB])
def test_memory_request_covers_the_host_estimate_with_a_margin_in_whole_mib(host_bytes: int) -> None:
    request = k8s.memory_request_bytes(host_bytes)
    assert request % 2**20 == 0
    assert request >= host_bytes + 512 * 2**20 and request * 10 >= host_bytes * 11
    assert request * 10 < host_bytes * 11 + 10 * (512 + 1) * 2**20


@pytest.mark.parametrize(("load_bytes", "at_least_s"), [(0, 60), (10 * 10**9, 60), (100 * 10**9, 500)])
def test_startup_probe_outlasts_the_load(load_bytes: int, at_least_s: int) -> None:
    assert k8s.startup_failures(load_bytes) * k8s.STARTUP_PERIOD_S >= at_least_s


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("m") / "llama3-8b.gguf"
    write_model(path, replace(REALISTIC["llama3-8b"], weight_type="Q4_0", tokenizer="llama", n_merges=0), sparse=True)
    return model_params(read_header(path))


def entry(params, name: str, ctx: int = 8192, **residency) -> Entry:
    return Entry(name, Residency(**residency), params, ServerSettings(ctx_size=ctx), Policy())


@pytest.mark.parametrize(("gpus", "models", "nodes"), [
    # ~5.45 GiB each: one per 8 GiB GPU, two per node, the third on a node of its own
    ("2x8GiB", [("a", {}), ("b", {}), ("c", {})], (("a", "b"), ("c",))),
    # the fleet plan's order: priority first
    ("2x8GiB", [("a", {}), ("b", {"priority": 5}), ("c", {})], (("b", "a"), ("c",))),
    # two fit on one 12 GiB GPU's memory, but a pod's GPU is its own
    ("1x12GiB", [("a", {}), ("b", {})], (("a",), ("b",))),
    ("4x24GiB", [("a", {}), ("b", {}), ("c", {})], (("a", "b", "c"),)),
])
def test_pack_places_models_on_as_few_nodes_as_whole_gpus_allow(llama8b, gpus: str, models, nodes) -> None:
    got = k8s.pack([entry(llama8b, name, **keys) for name, keys in models], parse_gpus_spec(gpus).gpus)
    assert got == nodes


def test_pack_gives_a_model_split_over_gpus_as_many_as_its_plan(llama8b) -> None:
    # at 64k tokens the model needs both 8 GiB GPUs: nothing else fits beside it
    models = [entry(llama8b, "big", ctx=65536), entry(llama8b, "a"), entry(llama8b, "b")]
    assert k8s.pack(models, parse_gpus_spec("2x8GiB").gpus) == (("big",), ("a", "b"))


def test_pack_gives_a_model_no_fleet_plan_makes_resident_a_node_of_its_own(llama8b) -> None:
    # spill = false and only partially on a 4 GiB GPU: the fleet plan never makes it resident, not even
    # alone; a (spill allowed) takes the first node, partially offloaded
    models = [entry(llama8b, "gpuonly", spill=False), entry(llama8b, "a")]
    assert k8s.pack(models, parse_gpus_spec("1x4GiB").gpus) == (("a",), ("gpuonly",))
