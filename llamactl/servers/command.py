"""Pure: resolved settings + placement → llama-server argv and environment.

Every memory-relevant choice is passed explicitly (`-c`, integer `-ngl`,
`-fa on|off`, `-np` with `-kvu`/`-no-kvu`, comma-separated `-ts`, `--fit off`
where the binary knows it, `--metrics`), so the server does what the estimate
assumed. The argv is a list, never a shell string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import UsageError
from llamactl.model import registry
from llamactl.model.settings import Resolved
from llamactl.servers.probe import ServerCaps

# Flags llamactl cannot do without; a binary lacking one is refused by name.
REQUIRED_FLAGS = ("--ctx-size", "--n-gpu-layers", "--flash-attn", "--parallel", "--cache-type-k",
                  "--cache-type-v", "--batch-size", "--ubatch-size", "--port", "--host")


@dataclass(frozen=True)
class ServerCommand:
    argv: tuple[str, ...]
    env: dict[str, str]  # overrides on top of the caller's environment

    def shell(self) -> str:
        """A copy-pasteable rendering for display only (never executed by llamactl)."""
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def _fmt_share(share: float) -> str:
    return str(int(share)) if float(share).is_integer() else f"{share:g}"


def build_command(
    binary: str | Path,
    model: str | Path,
    resolved: Resolved,
    caps: ServerCaps,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    tensor_split: Sequence[float] | None = None,
    cuda_devices: Sequence[str] = (),
    verbose_buffers: bool = False,
    extra: Sequence[str] = (),
    alias: str | None = None,
    slot_save_path: Path | None = None,
    rpc: Sequence[str] = (),
) -> ServerCommand:
    caps.require(*REQUIRED_FLAGS)
    if rpc:
        caps.require("--rpc")
        if any(arg.split("=", 1)[0] == "--rpc" for arg in extra):
            raise UsageError("extra argument --rpc: the plan uses [workers.NAME] devices and passes --rpc itself; "
                             "leave it out (a hand-written --rpc is for devices llamactl does not place)")
    argv = [str(binary), "--model", str(model), "--host", host, "--port", str(port), *registry.argv(resolved, caps)]
    if caps.supports("--fit"):
        argv += ["--fit", "off"]  # its dry run would otherwise rewrite the flags we left unset
    if caps.supports("--metrics"):
        argv.append("--metrics")
    if tensor_split and len(tensor_split) > 1:
        argv += ["--tensor-split", ",".join(_fmt_share(s) for s in tensor_split)]
    if rpc:  # their devices come first in the model's device list, so first in -ts (placement.device_order)
        argv += ["--rpc", ",".join(rpc)]
    if alias and caps.supports("--alias"):
        argv += ["--alias", alias]  # responses name the model as clients asked for it, not by its file path
    if slot_save_path is not None:  # keep_cache: the proxy saves the slots here before a stop
        caps.require("--slot-save-path")
        argv += ["--slot-save-path", str(slot_save_path)]
    if verbose_buffers:
        argv += ["--verbosity", "4"]  # buffer sizes are logged at trace level only
    argv += list(extra)
    # pin GPUs by UUID (NVML and CUDA may number them differently); plain indices are only
    # right in PCI bus order; a CPU plan hides every GPU
    env = {"CUDA_VISIBLE_DEVICES": ",".join(cuda_devices)}
    if any(not d.startswith(("GPU-", "MIG-")) for d in cuda_devices):
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return ServerCommand(tuple(argv), env)


# Extra llama-server arguments that change memory in ways the estimate does not model yet,
# and flags llamactl sets itself from its own options.
_MEMORY_FLAGS = {
    "--mmproj-url": "a vision projector from a URL (give llamactl the file: --mmproj)",
    "--lora-scaled": "scaled LoRA adapters (give llamactl --lora)",
    "-hf": "another model", "--hf-repo": "another model", "-hff": "another model", "--hf-file": "another model",
    "-mu": "another model", "--model-url": "another model", "-hfd": "draft models", "--hf-repo-draft": "draft models",
    "--spec-draft-hf": "draft models from a hub", "-devd": "draft device selection", "--device-draft": "draft device selection",
    "--spec-draft-device": "draft device selection", "-otd": "draft tensor overrides",
    "--override-tensor-draft": "draft tensor overrides", "--spec-draft-override-tensor": "draft tensor overrides",
    "-cmoed": "draft experts on the CPU", "--cpu-moe-draft": "draft experts on the CPU",
    "-ncmoed": "draft experts on the CPU", "--n-cpu-moe-draft": "draft experts on the CPU",
    "--override-kv": "metadata overrides", "--pooling": "embedding mode", "--control-vector": "control vectors",
    "--control-vector-scaled": "control vectors", "--no-host": "host buffer placement", "-cram": "the prompt cache",
    "--cache-ram": "the prompt cache", "--kv-unified-per-slot": "slot sizes", "-sps": "slot sizes",
}
# llama.cpp's multi-GPU flags, refused with what they are called there and what llamactl does instead
# (as the option on the command line, the key in a config's `args`). --mlock passes: the pages it locks are
# the host weights (the mapped range, or the copies with --no-mmap) the estimate already counts as host memory.
_GPU_CHOICE = {
    ("-mg", "--main-gpu"): ("main GPU", "choose the GPU with --gpu-ids N", "gpus = [N]"),
    ("-dev", "--device"): ("device list", "choose GPUs with --gpu-ids (-ngl 0 for none)",
                           "gpus = [...] (n_gpu_layers = 0 for none)"),
}
_GPU_FLAGS = {flag: what for flags, what in _GPU_CHOICE.items() for flag in flags}
_SPLIT_MODE = ("-sm", "--split-mode")
# llama-server's presets (--fim-qwen-7b-spec, --gpt-oss-20b-default, ...) pick models and drafts
_PRESET_PREFIXES = ("--fim-", "--gpt-oss-", "--embd-", "--vision-")
# flags llamactl sets itself besides the registry's settings: (its own option, the config key) to use instead
_OWN = {
    ("-m", "--model"): ("MODEL", "path"), ("--host",): ("--host", "host"), ("--port",): ("--port", "port_start"),
    ("-fit", "--fit"): ("plan (llamactl places the model)", "gpus, max_gpus"),
    ("-a", "--alias"): ("--name (the instance name is the alias)", "the [models.NAME] name"),
    ("--slot-save-path",): ("the proxy's keep_cache", "keep_cache"),
}
_OWN_FLAGS = {**registry.own_flags(), **{flag: use for flags, use in _OWN.items() for flag in flags}}


def check_extra_args(extra: Sequence[str], *, config: bool = False) -> None:
    """Refuse extra arguments that would make the estimate wrong, naming the flag and what to use instead
    (the option on the command line; the key in a config's `args`)."""
    for i, arg in enumerate(extra):
        flag = arg.split("=", 1)[0]
        if flag in _SPLIT_MODE:
            _check_split_mode(flag, arg.partition("=")[2] if "=" in arg else (extra[i + 1] if i + 1 < len(extra) else ""),
                              config)
            continue
        if flag in _GPU_FLAGS:
            term, option, key = _GPU_FLAGS[flag]
            raise UsageError(f"extra argument {flag} ({term}) is refused: llamactl chooses the GPUs and hides the "
                             f"others from llama-server; {key if config else option} instead")
        if flag.startswith(_PRESET_PREFIXES):
            raise UsageError(f"extra argument {flag} is a llama-server preset that picks its own model; "
                             "give llamactl the model file instead")
        if flag in _MEMORY_FLAGS:
            raise UsageError(f"extra argument {flag} ({_MEMORY_FLAGS[flag]}) changes memory in a way llamactl does "
                             "not model yet; remove it or run llama-server by hand")
        if flag in _OWN_FLAGS:
            option, key = _OWN_FLAGS[flag]
            if config:
                raise UsageError(f"{flag} is set by llamactl; use the config key {key} instead")
            raise UsageError(f"extra argument {flag} is set by llamactl; use llamactl's own {option} instead")


def _check_split_mode(flag: str, mode: str, config: bool) -> None:
    """`-sm layer` is what llamactl plans (whole layers per GPU, shares in --tensor-split); the other split
    modes are refused naming what to do instead."""
    if mode == "layer":
        return
    if mode == "none":
        raise UsageError(f"extra argument {flag} none (split mode none: one GPU) is refused; "
                         f"{'max_gpus = 1 or gpus = [N]' if config else '--max-gpus 1 or --gpu-ids N'} instead")
    if mode in ("row", "tensor"):
        raise UsageError(f"extra argument {flag} {mode} (split mode {mode}: each layer's weights split across GPUs) "
                         "is not modelled: llamactl places whole layers per GPU (split mode layer, its shares in "
                         "--tensor-split); leave it out")
    raise UsageError(f"extra argument {flag} {mode!r}: expected a split mode (none, layer, row or tensor)")


# What a current llama-server supports (the build `llamactl install-server` makes), assumed when planning
# without a binary at hand (CI fit checks): the command printed is the one that build runs
# (tests/e2e/test_doors.py compares them).
ASSUMED_FLAGS = frozenset(REQUIRED_FLAGS) | {
    "--kv-unified", "--no-kv-unified", "--fit", "--metrics", "--swa-full", "--no-kv-offload", "--load-mode",
    "--no-repack", "--tensor-split", "--verbosity", "--model", "--n-cpu-moe", "--lora", "--override-tensor",
    "--reranking", "--embedding", "--alias", "--model-draft", "--n-gpu-layers-draft", "--cache-type-k-draft",
    "--cache-type-v-draft", "--spec-type", "--mmproj", "--no-mmproj-offload", "--slot-save-path", "--rpc"}
