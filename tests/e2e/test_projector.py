"""Vision projectors (--mmproj) against llama-server's logs: the projector's weights and the compute buffer
its encoder reserves for one image, with and without flash attention, over several shapes and image
sizes; on the host, and on the first GPU when offloaded (an RPC device standing in); and the calibrated
plan after one launch."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.estimate import load_params
from llamactl.model.memory import Placement, estimate
from llamactl.model.settings import ServerSettings, resolve
from llamactl.servers.buffers import free_port, measure
from llamactl.servers.command import build_command
from llamactl.units import MiB
from tests.e2e.test_rpc_devices import rpc_endpoints  # noqa: F401  (module fixture: the RPC servers)
from tests.e2e.launch_then_plan import launch_then_plan
from tests.synth import ModelSpec, write_model, write_projector

TEXT = ModelSpec(arch="gemma3", n_vocab=4096, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, head_dim=64,
                 n_swa=128, tied_output=True)
SHAPES = {  # projector: embedding, FFN, heads, image size
    "small": (64, 128, 4, 224),
    "wide-ffn": (64, 512, 4, 224),
    "big-image": (64, 128, 4, 448),
    "larger": (256, 1024, 8, 448),
    "odd-image": (128, 256, 4, 336),
}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("vision") / "text.gguf", TEXT)


def _check(server_binary, server_caps, text_model, projector, fa, n_gpus, extra, offload=True) -> None:
    settings = ServerSettings(ctx_size=1024, parallel=1, flash_attn=fa, mmproj=str(projector), mmproj_offload=offload)
    params = load_params(text_model, settings)
    resolved = resolve(settings, params, n_gpus)
    est = estimate(params, resolved, Placement(n_gpus=n_gpus, gpu_overhead_bytes=0))
    assert est.projector is not None
    port = free_port()
    cmd = build_command(server_binary, text_model, resolved, server_caps, port=port, verbose_buffers=True, extra=extra)
    assert "--mmproj" in cmd.argv
    got = measure(list(cmd.argv), cmd.env, port, timeout_s=120)
    log = got.log
    assert "loaded multimodal model" in log
    expected_backend = "CPU" if est.projector.device == "CPU" else "RPC"
    backend = next(line for line in log.splitlines() if "CLIP using" in line)
    assert expected_backend in backend, backend
    weights = next(float(line.rsplit("=", 1)[-1].split()[0]) if "=" in line else float(line.split()[-2])
                   for line in log.splitlines() if "load_hparams: model size:" in line)
    compute = next(float(line.rsplit("=", 1)[1].split()[0]) for line in log.splitlines()
                   if "reserve_compute_meta" in line and "compute buffer size" in line)
    assert abs(est.projector.weights_bytes / MiB - weights) <= 0.01, (est.projector.weights_bytes / MiB, weights)
    assert abs(est.projector.compute_bytes / MiB - compute) <= max(0.01, 0.01 * compute), \
        (est.projector.compute_bytes / MiB, compute)


@pytest.mark.parametrize("fa", ["on", "off"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_projector_on_the_host(server_binary, server_caps, text_model, tmp_path, shape, fa) -> None:
    n_embd, n_ff, n_head, image = SHAPES[shape]
    projector = write_projector(tmp_path / "mmproj.gguf", TEXT, n_embd=n_embd, n_ff=n_ff, n_head=n_head, image_size=image)
    _check(server_binary, server_caps, text_model, projector, fa, 0, [])


def test_projector_offloaded_to_the_first_gpu_or_kept_on_the_host(server_binary, server_caps, text_model, tmp_path,
                                                                   rpc_endpoints) -> None:  # noqa: F811
    projector = write_projector(tmp_path / "mmproj.gguf", TEXT, n_embd=128, n_ff=256, image_size=336)
    _check(server_binary, server_caps, text_model, projector, "on", 1, ["--rpc", rpc_endpoints[0]])
    _check(server_binary, server_caps, text_model, projector, "on", 1, ["--rpc", rpc_endpoints[0]], offload=False)


def test_launch_with_a_projector_then_the_plan_is_exact(server_binary, text_model, tmp_path: Path) -> None:
    projector = write_projector(tmp_path / "mmproj.gguf", TEXT)
    log = launch_then_plan(server_binary, tmp_path / "state", text_model,
                           ["--gpus", "none", "-c", "1024", "-np", "1", "--mmproj", str(projector)], "--mmproj")
    assert "loaded multimodal model" in log
