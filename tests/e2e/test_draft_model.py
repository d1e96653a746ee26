"""A draft model beside the main one (-md, speculative decoding), per device against llama-server's logs:
on the CPU, and with RPC devices standing in for GPUs (its layers follow -ngld and the same -ts). Weights
and KV must match exactly; compute may not be under; after one launch the plan is exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.estimate import load_params
from llamactl.learn.observe import device_buffers, logged_terms
from llamactl.model.memory import Placement, estimate
from llamactl.model.settings import ServerSettings, resolve
from llamactl.servers.buffers import free_port, measure
from llamactl.servers.command import build_command
from llamactl.units import MiB
from tests.e2e.test_rpc_devices import rpc_endpoints  # noqa: F401  (module fixture: the RPC servers)
from tests.e2e.launch_then_plan import launch_then_plan
from tests.synth import ModelSpec, draft_spec, write_model

MAIN = ModelSpec(n_vocab=4096, n_embd=512, n_layer=6, n_head=8, n_head_kv=4, n_ff=1024)
CASES = {  # GPUs, -ngl, -ngld, -ts, -np
    "cpu": (0, None, None, None, 1),
    "cpu-4-slots": (0, None, None, None, 4),
    "one-gpu": (1, None, None, None, 1),
    "two-gpus": (2, None, None, (1.0, 1.0), 1),
    "partial-main-and-draft": (2, 4, 1, (1.0, 1.0), 1),
    "draft-on-the-host": (1, 3, 0, None, 2),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("draft")
    return write_model(root / "main.gguf", MAIN), write_model(root / "draft.gguf", draft_spec(MAIN))


@pytest.mark.parametrize("case", list(CASES))
def test_main_and_draft_per_device(server_binary, server_caps, rpc_endpoints, models, case) -> None:  # noqa: F811
    n_gpus, ngl, ngld, split, slots = CASES[case]
    main, draft = models
    settings = ServerSettings(ctx_size=4096, parallel=slots, n_gpu_layers=ngl, draft_model=str(draft),
                              draft_n_gpu_layers=ngld)
    params = load_params(main, settings)
    resolved = resolve(settings, params, n_gpus)
    est = estimate(params, resolved, Placement(n_gpus=n_gpus, tensor_split=split or (), gpu_overhead_bytes=0))
    assert est.draft is not None and est.draft.total_bytes > 0
    extra = ["--rpc", ",".join(rpc_endpoints[:n_gpus])] if n_gpus else []
    port = free_port()
    cmd = build_command(server_binary, main, resolved, server_caps, port=port, tensor_split=split,
                        verbose_buffers=True, extra=extra)
    assert "--model-draft" in cmd.argv and "--n-gpu-layers-draft" in cmd.argv
    got = measure(list(cmd.argv), cmd.env, port, timeout_s=120)
    assert got.log.count("llama_model_loader: loaded meta data") == 2  # the draft was loaded
    names = device_buffers(got.buffers, n_gpus, "RPC" if n_gpus else "CPU", extra)
    for dev in est.devices:
        logged = logged_terms(got.buffers, names[dev.device])
        where = f"{case} {dev.device}"
        for term, ours in (("weights", dev.weights_bytes), ("kv", dev.kv_bytes)):
            assert abs(ours - logged[term]) <= max(0.005 * logged[term], 0.03 * MiB), \
                f"{where} {term}: ours {ours / MiB:.2f}, logged {logged[term] / MiB:.2f} MiB"
        assert dev.compute_bytes >= 0.95 * logged["compute"] - 0.05 * MiB, \
            f"{where} compute under: ours {dev.compute_bytes / MiB:.2f}, logged {logged['compute'] / MiB:.2f}"


def test_launch_with_a_draft_then_the_plan_is_exact(server_binary, models, tmp_path: Path) -> None:
    main, draft = models
    log = launch_then_plan(server_binary, tmp_path / "state", main,
                           ["--gpus", "none", "-c", "4096", "-np", "1", "-md", str(draft)], "--model-draft")
    assert "loading draft model" in log and "draft-simple" in log  # loaded, and used (--spec-type)
