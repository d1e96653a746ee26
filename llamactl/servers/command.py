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
) -> ServerCommand:
    caps.require(*REQUIRED_FLAGS)
    argv = [
        str(binary), "--model", str(model), "--host", host, "--port", str(port),
        "--ctx-size", str(resolved.ctx_size),
        "--n-gpu-layers", str(resolved.n_gpu_layers),
        "--flash-attn", "on" if resolved.flash_attn else "off",
        "--parallel", str(resolved.n_seq_max),
        "--cache-type-k", resolved.cache_type_k,
        "--cache-type-v", resolved.cache_type_v,
        "--batch-size", str(resolved.n_batch),
        "--ubatch-size", str(resolved.n_ubatch),
    ]
    if resolved.kv_unified or resolved.n_seq_max > 1:
        caps.require("--kv-unified", "--no-kv-unified")
        argv.append("--kv-unified" if resolved.kv_unified else "--no-kv-unified")
    if caps.supports("--fit"):
        argv += ["--fit", "off"]  # its dry run would otherwise rewrite the flags we left unset
    if caps.supports("--metrics"):
        argv.append("--metrics")
    if resolved.swa_full:
        argv.append("--swa-full")
    if resolved.reranking:  # the server's /v1/rerank: embeddings with rank pooling
        caps.require("--reranking")
        argv.append("--reranking")
    elif resolved.embedding:
        argv.append("--embedding")
    if not resolved.kv_offload:
        argv.append("--no-kv-offload")
    if not resolved.mmap:
        caps.require("--load-mode")
        argv += ["--load-mode", "none"]
    if not resolved.repack:
        caps.require("--no-repack")
        argv.append("--no-repack")
    for adapter in resolved.lora:
        caps.require("--lora")
        argv += ["--lora", str(adapter)]
    if resolved.tensor_overrides:  # before --n-cpu-moe: llama.cpp takes the first matching override
        caps.require("--override-tensor")
        argv += ["--override-tensor", ",".join(f"{p}={t}" for p, t in resolved.tensor_overrides)]
    if resolved.n_cpu_moe:
        caps.require("--n-cpu-moe")
        argv += ["--n-cpu-moe", str(resolved.n_cpu_moe)]
    if resolved.draft_model is not None:
        caps.require("--model-draft", "--n-gpu-layers-draft")
        argv += ["--model-draft", str(resolved.draft_model), "--n-gpu-layers-draft", str(resolved.draft_n_gpu_layers)]
        if caps.supports("--cache-type-k-draft"):
            argv += ["--cache-type-k-draft", resolved.draft_cache_type_k, "--cache-type-v-draft", resolved.draft_cache_type_v]
        if caps.supports("--spec-type"):  # a draft model is there to be used: this build needs it said
            argv += ["--spec-type", "draft-simple"]
    if resolved.mmproj is not None:
        caps.require("--mmproj")
        argv += ["--mmproj", str(resolved.mmproj)]
        if not resolved.mmproj_offload:
            caps.require("--no-mmproj-offload")
            argv.append("--no-mmproj-offload")
    if tensor_split and len(tensor_split) > 1:
        argv += ["--tensor-split", ",".join(_fmt_share(s) for s in tensor_split)]
    if alias and caps.supports("--alias"):
        argv += ["--alias", alias]  # responses name the model as clients asked for it, not by its file path
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
    "-sm": "split modes other than layer", "--split-mode": "split modes other than layer",
    "-mg": "a main GPU", "--main-gpu": "a main GPU",
    "-dev": "device selection", "--device": "device selection",
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
    "--mlock": "weights locked in RAM",
}
# llama-server's presets (--fim-qwen-7b-spec, --gpt-oss-20b-default, ...) pick models and drafts
_PRESET_PREFIXES = ("--fim-", "--gpt-oss-", "--embd-", "--vision-")
# flags llamactl sets itself: (its own option, the config key) to use instead
_OWN = {
    ("-m", "--model"): ("MODEL", "path"), ("--host",): ("--host", "host"), ("--port",): ("--port", "port_start"),
    ("-c", "--ctx-size"): ("-c", "ctx_size"), ("-ngl", "--gpu-layers", "--n-gpu-layers"): ("-ngl", "n_gpu_layers"),
    ("-fa", "--flash-attn"): ("-fa", "flash_attn"), ("-np", "--parallel"): ("-np", "parallel"),
    ("-ctk", "--cache-type-k"): ("-ctk", "cache_type_k"), ("-ctv", "--cache-type-v"): ("-ctv", "cache_type_v"),
    ("-b", "--batch-size"): ("-b", "batch_size"), ("-ub", "--ubatch-size"): ("-ub", "ubatch_size"),
    ("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"): ("-kvu/-no-kvu", "kv_unified"),
    ("-ts", "--tensor-split"): ("-ts", "tensor_split"), ("-fit", "--fit"): ("plan (llamactl places the model)", "gpus, max_gpus"),
    ("--swa-full",): ("--swa-full", "swa_full"), ("-nkvo", "--no-kv-offload", "-kvo", "--kv-offload"): ("-nkvo", "kv_offload"),
    ("-lm", "--load-mode", "--no-mmap", "--mmap"): ("--no-mmap", "no_mmap"), ("-nr", "--no-repack", "--repack"): ("-nr", "repack"),
    ("--embedding", "--embeddings"): ("--embedding", "embedding"), ("--rerank", "--reranking"): ("--reranking", "reranking"),
    ("-ncmoe", "--n-cpu-moe", "-cmoe", "--cpu-moe"): ("--n-cpu-moe", "n_cpu_moe"), ("--lora",): ("--lora", "lora"),
    ("-ot", "--override-tensor"): ("-ot", "override_tensor"),
    ("-md", "--model-draft", "--spec-draft-model"): ("-md", "model_draft"),
    ("-mm", "--mmproj"): ("--mmproj", "mmproj"),
    ("--mmproj-offload", "--no-mmproj-offload"): ("--no-mmproj-offload", "no_mmproj_offload"),
    ("-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft", "--spec-draft-ngl"): ("-ngld", "n_gpu_layers_draft"),
    ("-ctkd", "--cache-type-k-draft", "--spec-draft-type-k"): ("-ctkd", "cache_type_k_draft"),
    ("-ctvd", "--cache-type-v-draft", "--spec-draft-type-v"): ("-ctvd", "cache_type_v_draft"),
    ("-a", "--alias"): ("--name (the instance name is the alias)", "the [models.NAME] name"),
}
_OWN_FLAGS = {flag: use for flags, use in _OWN.items() for flag in flags}


def check_extra_args(extra: Sequence[str], *, config: bool = False) -> None:
    """Refuse extra arguments that would make the estimate wrong, naming the flag and what to use instead
    (the option on the command line; the key in a config's `args`)."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
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


# What a current llama-server supports, assumed when planning without a binary at hand (CI fit checks).
ASSUMED_FLAGS = frozenset(REQUIRED_FLAGS) | {"--kv-unified", "--no-kv-unified", "--fit", "--metrics", "--swa-full",
                                             "--no-kv-offload", "--load-mode", "--no-repack", "--tensor-split",
                                             "--verbosity", "--model", "--n-cpu-moe", "--lora",
                                             "--override-tensor", "--reranking"}
