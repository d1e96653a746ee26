"""Placement on several devices, checked against llama.cpp itself, with RPC devices standing in for GPUs.

llama-server treats a `ggml-rpc-server` endpoint as a GPU (device type GPU, async compute, events): it
places layers, their KV and recurrent state, the output layer, `-ts` shares, `--n-cpu-moe` overrides
and pipeline-parallel copies on it by the same code as on CUDA devices. Only the kernels differ (the
remote runs the CPU backend; RPC has no pinned host buffer and no op offload). So per-device weights,
KV and state must match the estimate exactly; the compute buffers of the host and of a GPU holding
layers must match within bounds, and no device may be underestimated. F16 weights keep CPU_REPACK
(which an RPC host would use and a CUDA host would not) out of the comparison.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.model.gguf import read_header
from llamactl.model.memory import Placement, estimate, pipeline_parallel
from llamactl.model.params import model_params
from llamactl.model.settings import ServerSettings, resolve
from llamactl.estimate import load_params
from llamactl.servers.buffers import free_port, measure
from llamactl.servers.command import build_command
from llamactl.units import MiB
from tests.synth import ModelSpec, write_lora, write_model

N_DEVICES = 3
RPC_NAMES = ("ggml-rpc-server", "rpc-server")

BASE = ModelSpec(n_vocab=4096, n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=768)
MODELS = {
    "llama": BASE,
    "llama-8l-tied": replace(BASE, n_layer=8, tied_output=True),
    "qwen3moe": replace(BASE, arch="qwen3moe", head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=256),
    "gemma3-swa": replace(BASE, arch="gemma3", head_dim=64, n_swa=128, tied_output=True, n_layer=6),
    "mamba2": replace(BASE, arch="mamba2", n_head=0, n_head_kv=0, ssm_d_conv=4, ssm_d_inner=512, ssm_d_state=64,
                      ssm_n_group=1, ssm_dt_rank=8),
    "granitehybrid": replace(BASE, arch="granitehybrid", n_head_kv=(0, 4, 0, 4), ssm_d_conv=4, ssm_d_inner=512,
                             ssm_d_state=64, ssm_n_group=1, ssm_dt_rank=8),
}
C4K = ServerSettings(ctx_size=4096)
CASES = {  # model, GPUs, settings, -ts
    "one-gpu": ("llama", 1, C4K, None),
    "two-gpus-pipeline": ("llama", 2, C4K, None),
    "two-gpus-8k": ("llama", 2, ServerSettings(ctx_size=8192, parallel=2), None),
    "output-alone-on-gpu1": ("llama", 2, C4K, (3.0, 1.0)),
    "uneven-split": ("llama", 2, C4K, (1.0, 3.0)),
    "three-gpus": ("llama-8l-tied", 3, C4K, (1.0, 1.0, 2.0)),
    "partial-over-two": ("llama", 2, replace(C4K, n_gpu_layers=3), None),
    "partial-tied": ("llama-8l-tied", 2, replace(C4K, n_gpu_layers=5), None),
    "no-kv-offload": ("llama", 2, replace(C4K, kv_offload=False), None),
    "fa-off-pipeline": ("llama", 2, replace(C4K, flash_attn="off"), None),
    "moe-pipeline": ("qwen3moe", 2, C4K, None),
    "moe-experts-on-cpu": ("qwen3moe", 1, replace(C4K, n_cpu_moe=2), None),
    "moe-experts-on-cpu-two-gpus": ("qwen3moe", 2, replace(C4K, n_cpu_moe=3), None),
    # -ot: the FFN of two layers on the host, first match wins over --n-cpu-moe; no pipeline with overrides
    "override-ffn-to-host": ("llama", 2, replace(C4K, tensor_overrides=((r"blk\.[12]\.ffn_(up|down)", "CPU"),)), None),
    "override-then-experts": ("qwen3moe", 2, replace(C4K, n_cpu_moe=1, tensor_overrides=((r"blk\.3\.ffn_up_exps", "CPU"),)),
                              None),
    "swa-pipeline": ("gemma3-swa", 2, C4K, None),
    "recurrent-pipeline": ("mamba2", 2, ServerSettings(ctx_size=4096, parallel=2), None),
    "recurrent-one-gpu": ("mamba2", 1, ServerSettings(ctx_size=4096, parallel=2), None),
    "hybrid-pipeline": ("granitehybrid", 2, ServerSettings(ctx_size=4096, parallel=2), None),
}


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def rpc_endpoints(server_binary: Path) -> Iterator[list[str]]:
    found = [server_binary.parent / name for name in RPC_NAMES if (server_binary.parent / name).is_file()]
    if not found:
        pytest.fail(f"no ggml-rpc-server next to {server_binary}: these tests need a llama.cpp build with "
                    "-DGGML_RPC=ON (`llamactl install-server` builds one)", pytrace=False)
    procs, endpoints = [], []
    try:
        for _ in range(N_DEVICES):
            port = free_port()
            procs.append(subprocess.Popen([str(found[0]), "--host", "127.0.0.1", "--port", str(port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoints.append(f"127.0.0.1:{port}")
            deadline = time.monotonic() + 20
            while not _port_open(port):
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ggml-rpc-server did not listen on port {port}", pytrace=False)
                time.sleep(0.05)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rpc-models")
    return {name: write_model(root / f"{name}.gguf", spec) for name, spec in MODELS.items()}


def _close(ours: int, got: int, rel: float, abs_mib: float) -> bool:
    return abs(ours - got) <= max(rel * got, abs_mib * MiB)


@pytest.mark.parametrize("case", list(CASES))
def test_devices_hold_what_the_estimate_says(server_binary, server_caps, rpc_endpoints, models, case) -> None:
    model, n_gpus, settings, split = CASES[case]
    _compare_devices(server_binary, server_caps, rpc_endpoints, models[model], n_gpus, settings, split, case)


def test_lora_adapters_follow_their_layers(server_binary, server_caps, rpc_endpoints, models, tmp_path) -> None:
    lora = write_lora(tmp_path / "lora.gguf", MODELS["llama-8l-tied"], rank=16)
    for ngl in (None, 5):  # all layers over two GPUs, then some on the host
        _compare_devices(server_binary, server_caps, rpc_endpoints, models["llama-8l-tied"], 2,
                         ServerSettings(ctx_size=2048, n_gpu_layers=ngl, lora=(str(lora),)), None, f"lora -ngl {ngl}")


def _compare_devices(server_binary, server_caps, rpc_endpoints, path, n_gpus, settings, split, case) -> None:
    params = load_params(path, settings)
    resolved = resolve(settings, params, n_gpus)
    est = estimate(params, resolved, Placement(n_gpus=n_gpus, tensor_split=split or (), gpu_overhead_bytes=0))
    port = free_port()
    cmd = build_command(server_binary, path, resolved, server_caps, port=port, tensor_split=split,
                        verbose_buffers=True, extra=["--rpc", ",".join(rpc_endpoints[:n_gpus])])
    got = measure(list(cmd.argv), cmd.env, port, timeout_s=120)
    log = got.buffers
    devices = {"CPU": "CPU", **{f"GPU{i}": f"RPC0[{ep}]" for i, ep in enumerate(rpc_endpoints[:n_gpus])}}

    assert ("pipeline parallelism enabled" in got.log) == pipeline_parallel(resolved, n_gpus, est.layer_devices)
    copies = re.search(r"sched copies = (\d+)", got.log)
    assert copies and int(copies[1]) == est.pipeline_copies
    for ours_name, logged_name in devices.items():
        dev = est.device(ours_name)
        where = f"{case} {ours_name}"
        # exact terms: llama.cpp rounds its log to 0.01 MiB; GPU tensors are padded to 128 bytes here, 32 there
        for term, ours in (("weights", dev.weights_bytes), ("kv", dev.kv_bytes), ("recurrent", dev.recurrent_bytes)):
            logged = log.term(term, device=logged_name)
            if term == "weights":
                logged += log.term("lora", device=logged_name)  # adapters are weights to the estimate
            assert _close(ours, logged, 0.005, 0.02), f"{where} {term}: ours {ours / MiB:.2f}, logged {logged / MiB:.2f} MiB"
        logged = log.term("compute", device=logged_name)
        ours = dev.compute_bytes
        assert ours >= logged * 0.95 - 0.05 * MiB, f"{where} compute under: ours {ours / MiB:.2f}, logged {logged / MiB:.2f}"
        holds_layers = ours_name == "CPU" or ours_name in est.layer_devices[:params.n_layer]
        first_gpu = ours_name == next((d for d in est.layer_devices if d != "CPU"), None)
        partial = "CPU" in est.layer_devices or resolved.n_cpu_moe or resolved.tensor_overrides
        if not partial and (ours_name == "CPU" or first_gpu or not holds_layers):
            # the host's inputs, the first stage of a pipeline, a device with the output layer alone
            # (a GPU's own graph is calibrated on the CPU backend, where it is a little larger)
            assert _close(ours, logged, 0.05, 0.6 if ours_name == "CPU" else 1.0), \
                f"{where} compute: ours {ours / MiB:.2f}, logged {logged / MiB:.2f}"


# llama.cpp's own estimator (`llama-fit-params --fit-print on`: a dry run that allocates nothing, so
# realistic layouts of 8-30B models cost no RAM) on the same RPC devices: per device it prints the
# weights, the KV cache and state, and the compute buffer, in whole MiB.
FIT_CASES = {
    "llama3-8b-pipeline": ("llama3-8b", "Q4_0", 2, ServerSettings(ctx_size=8192, parallel=1), None),
    "llama3-8b-partial": ("llama3-8b", "Q4_0", 2, ServerSettings(ctx_size=8192, parallel=1, n_gpu_layers=20), None),
    "qwen3-30b-a3b-experts-on-cpu": ("qwen3-30b-a3b", "Q4_K", 2,
                                     ServerSettings(ctx_size=8192, parallel=1, n_cpu_moe=20), None),
    "gemma3-27b-three-gpus": ("gemma3-27b", "Q4_0", 3, ServerSettings(ctx_size=16384, parallel=1), None),
    "deepseek-v2-lite-uneven": ("deepseek-v2-lite", "Q4_0", 2, ServerSettings(ctx_size=4096, parallel=1), (1.0, 3.0)),
    "granite-4.0-h-tiny": ("granite-4.0-h-tiny", "Q4_0", 2, ServerSettings(ctx_size=16384, parallel=1), None),
    "mamba2-2.7b": ("mamba2-2.7b", "Q8_0", 2, ServerSettings(ctx_size=8192, parallel=1), None),
    # 80B: weights and state per device from llama.cpp's own estimator; too big to load here
    "qwen3-next-80b-a3b": ("qwen3-next-80b-a3b", "Q4_K", 3, ServerSettings(ctx_size=32768, parallel=1), None),
}


def _fit_args(resolved, split) -> list[str]:
    args = ["-c", str(resolved.ctx_size), "-ngl", str(resolved.n_gpu_layers), "-np", str(resolved.n_seq_max),
            "-fa", "on" if resolved.flash_attn else "off", "-b", str(resolved.n_batch), "-ub", str(resolved.n_ubatch),
            "-ctk", resolved.cache_type_k, "-ctv", resolved.cache_type_v]
    if resolved.n_cpu_moe:
        args += ["--n-cpu-moe", str(resolved.n_cpu_moe)]
    if split:
        args += ["-ts", ",".join(f"{s:g}" for s in split)]
    return args


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_llama_fit_params_agrees_per_device(server_binary, rpc_endpoints, tmp_path, case) -> None:
    from tests.synth import REALISTIC

    key, weight_type, n_gpus, settings, split = FIT_CASES[case]
    fit = server_binary.parent / "llama-fit-params"
    if not fit.is_file():
        pytest.fail(f"no llama-fit-params next to {server_binary}", pytrace=False)
    path = write_model(tmp_path / f"{key}.gguf", replace(REALISTIC[key], weight_type=weight_type), sparse=True)
    params = model_params(read_header(path))
    resolved = resolve(settings, params, n_gpus)
    est = estimate(params, resolved, Placement(n_gpus=n_gpus, tensor_split=split or (), gpu_overhead_bytes=0))
    out = subprocess.run([str(fit), "-m", str(path), "--rpc", ",".join(rpc_endpoints[:n_gpus]), "--fit-print", "on",
                          *_fit_args(resolved, split)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert [r[0] for r in rows] == [f"RPC{i}" for i in range(n_gpus)] + ["Host"], out.stdout
    partial = "CPU" in est.layer_devices or resolved.n_cpu_moe
    for i, (_, model_mib, context_mib, compute_mib) in enumerate(rows[:-1]):
        dev = est.device(f"GPU{i}")
        where = f"{case} GPU{i}"
        for what, ours, theirs in (("weights", dev.weights_bytes, int(model_mib)),
                                   ("KV + state", dev.kv_bytes + dev.recurrent_bytes, int(context_mib))):
            assert abs(ours / MiB - theirs) <= max(1.0, 0.001 * theirs), f"{where} {what}: ours {ours / MiB:.1f}, theirs {theirs}"
        holds_output = est.layer_devices[params.n_layer] == f"GPU{i}"
        # fit-params reserves n_ubatch outputs where llama-server reserves one per slot, so only stages
        # without the output layer compare: the first closely, later ones never below llama.cpp's figure
        if i == 0 and not partial and not holds_output:
            assert abs(dev.compute_bytes / MiB - int(compute_mib)) <= max(2.0, 0.05 * int(compute_mib)), \
                f"{where} compute: ours {dev.compute_bytes / MiB:.1f}, theirs {compute_mib}"
        elif not partial and not holds_output:
            assert dev.compute_bytes / MiB >= int(compute_mib) - 1, \
                f"{where} compute under: ours {dev.compute_bytes / MiB:.1f}, theirs {compute_mib}"
    host_compute, ours_host = int(rows[-1][3]), est.device("CPU").compute_bytes / MiB
    where = f"{case} host compute: ours {ours_host:.1f}, theirs {host_compute}"
    if partial:  # the host runs CPU layers or experts: never less than llama.cpp reckons
        assert ours_host >= host_compute * 0.95, where
    else:  # the graph inputs it keeps
        assert abs(ours_host - host_compute) <= max(2.0, 0.05 * host_compute), where
