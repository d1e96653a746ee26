"""Pure edges: size parsing, simulated GPUs, help parsing, argv building."""

from __future__ import annotations

import pytest

from llamactl.errors import ServerBinaryError, UsageError
from llamactl.gpu.inventory import parse_gpus_spec
from llamactl.model.settings import Resolved
from llamactl.servers.command import build_command
from llamactl.servers.probe import ServerCaps, parse_help, parse_version
from llamactl.units import GiB, MiB, format_bytes, parse_size

HELP = """
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM, either an exact number,
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
-kvu,  --kv-unified, -no-kvu, --no-kv-unified
                                        use single unified KV buffer shared across all sequences
-ts,   --tensor-split N0,N1,N2,...      fraction of the model to offload to each GPU, comma-separated list of
--repack, -nr, --no-repack              whether to enable weight repacking (default: enabled)
-lv,   --verbosity, --log-verbosity N   Set the verbosity threshold. Messages with a higher verbosity will be
                                        ignored. -1 would mean --not-a-flag
"""


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * GiB), ("24gib", 24 * GiB), ("512 MiB", 512 * MiB), ("1.5GiB", int(1.5 * GiB)),
    ("80GB", 80 * 10**9), ("1TiB", 1024 * GiB), ("0", 0), ("16G", 16 * GiB),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24", "GiB", "24 XiB", "-1GiB", "", "1e3GiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize(("spec", "sizes"), [
    ("none", []), ("24GiB", [24 * GiB]), ("24GiB,16GiB", [24 * GiB, 16 * GiB]),
    ("2x80GiB", [80 * GiB] * 2), ("2x80GiB,24GiB", [80 * GiB, 80 * GiB, 24 * GiB]),
])
def test_gpus_spec(spec: str, sizes: list[int]) -> None:
    inv = parse_gpus_spec(spec)
    assert [g.memory_total_bytes for g in inv.gpus] == sizes
    assert all(g.memory_free_bytes == g.memory_total_bytes for g in inv.gpus)


@pytest.mark.parametrize("spec", ["24XB", "0x24GiB", "24GiB,,", "lots"])
def test_gpus_spec_refuses(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_gpus_spec(spec)


def test_parse_help_reads_every_spelling() -> None:
    flags = parse_help(HELP)
    for flag in ("-c", "--ctx-size", "-ngl", "--gpu-layers", "--n-gpu-layers", "-kvu", "--kv-unified", "-no-kvu",
                 "--no-kv-unified", "--repack", "-nr", "--no-repack", "-ts", "--tensor-split", "-fa", "-lv"):
        assert flag in flags, flag
    assert "--not-a-flag" not in flags


def test_parse_version() -> None:
    assert parse_version("version: 0.6.0-dev (build 0, commit unknown)\nbuilt with GNU 12.2.0 for Linux x86_64") == (
        "0.6.0-dev (build 0, commit unknown)", "GNU 12.2.0 for Linux x86_64")


def _resolved(**kw) -> Resolved:
    base = dict(ctx_size=4096, n_ctx=4096, n_ctx_seq=4096, n_seq_max=4, n_stream=1, kv_unified=True, n_batch=2048, n_ubatch=512,
                flash_attn=True, n_gpu_layers=33, cache_type_k="f16", cache_type_v="f16", swa_full=False,
                kv_offload=True, mmap=True, repack=True, embedding=False)
    base.update(kw)
    return Resolved(**base)


CAPS = ServerCaps("/bin/llama-server", "test", None, parse_help(HELP) | {
    "--parallel", "--cache-type-k", "--cache-type-v", "--batch-size", "--ubatch-size", "--port", "--host",
    "--fit", "--metrics", "--load-mode"})


def test_argv_is_explicit() -> None:
    cmd = build_command("/bin/llama-server", "m.gguf", _resolved(), CAPS, port=9000, tensor_split=(3, 1),
                        cuda_devices=("GPU-a", "GPU-b"))
    argv = list(cmd.argv)
    pairs = dict(zip(argv, argv[1:]))
    assert pairs["--ctx-size"] == "4096" and pairs["--n-gpu-layers"] == "33" and pairs["--flash-attn"] == "on"
    assert pairs["--parallel"] == "4" and "--kv-unified" in argv and pairs["--fit"] == "off"
    assert pairs["--tensor-split"] == "3,1" and "--metrics" in argv and pairs["--host"] == "127.0.0.1"
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}


def test_cpu_plan_hides_gpus_and_maps_no_mmap() -> None:
    cmd = build_command("llama-server", "m.gguf", _resolved(n_gpu_layers=0, mmap=False, kv_unified=False, n_stream=4),
                        CAPS)
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": ""}
    assert "--no-kv-unified" in cmd.argv and "--load-mode" in cmd.argv


def test_missing_flag_is_named() -> None:
    caps = ServerCaps("/old/llama-server", "old", None, frozenset({"--ctx-size"}))
    with pytest.raises(ServerBinaryError, match="does not support --n-gpu-layers"):
        build_command("llama-server", "m.gguf", _resolved(), caps)


def test_format_bytes() -> None:
    assert format_bytes(1536 * MiB) == "1.50 GiB" and format_bytes(512) == "512 B"


def test_indices_need_pci_bus_order() -> None:
    cmd = build_command("llama-server", "m.gguf", _resolved(), CAPS, cuda_devices=("1",))
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert "--tensor-split" not in cmd.argv


@pytest.mark.parametrize(("extra", "message"), [
    (["--mmproj", "p.gguf"], "use llamactl.s own --mmproj"), (["--mmproj-url", "u"], "from a URL"), (["-md", "d.gguf"], "use llamactl.s own -md"), (["-otd", "x=CPU"], "draft tensor overrides"), (["--lora=x"], "use llamactl.s own --lora"), (["--lora-scaled", "x", "1"], "scaled LoRA"),
    (["--n-cpu-moe", "4"], "use llamactl.s own --n-cpu-moe"),
    (["-c", "8"], "set by llamactl"), (["--reranking"], "use llamactl.s own --reranking"),
])
def test_extra_args_that_change_memory_are_refused(extra, message) -> None:
    from llamactl.servers.command import check_extra_args

    with pytest.raises(UsageError, match=message):
        check_extra_args(extra)


@pytest.mark.parametrize(("extra", "config", "message"), [
    (["-sm", "row"], False, r"split mode row: each layer's weights split across GPUs\) is not modelled: llamactl places "
                            r"whole layers"),
    (["--split-mode=tensor"], False, r"split mode tensor.*not modelled.*leave it out"),
    (["-sm", "none"], False, r"split mode none: one GPU\) is refused; --max-gpus 1 or --gpu-ids N instead"),
    (["-sm", "none"], True, r"max_gpus = 1 or gpus = \[N\] instead"),
    (["-sm", "rows"], False, r"expected a split mode \(none, layer, row or tensor\)"),
    (["-sm"], False, r"expected a split mode"),
    (["-mg", "1"], False, r"-mg \(main GPU\) is refused: llamactl chooses the GPUs.*--gpu-ids N instead"),
    (["--main-gpu=1"], True, r"--main-gpu \(main GPU\).*gpus = \[N\] instead"),
    (["-dev", "CUDA1"], False, r"-dev \(device list\).*--gpu-ids \(-ngl 0 for none\) instead"),
    (["--device", "none"], True, r"--device \(device list\).*n_gpu_layers = 0 for none"),
])
def test_gpu_flags_are_refused_naming_the_llama_cpp_term_and_what_to_use(extra, config, message) -> None:
    from llamactl.servers.command import check_extra_args

    with pytest.raises(UsageError, match=message):
        check_extra_args(extra, config=config)


@pytest.mark.parametrize("extra", [
    ["--temp", "0.7", "--api-key", "k", "--threads", "8"],
    ["-sm", "layer"], ["--split-mode=layer"],  # what llamactl plans anyway
    ["--mlock"],  # locks the host weights, which the estimate counts as host memory (test_memory)
])
def test_harmless_extra_args_pass(extra) -> None:
    from llamactl.servers.command import check_extra_args

    check_extra_args(extra)


def test_the_end_of_a_stream_is_seen_however_it_is_cut_and_never_inside_an_answer() -> None:
    """The proxy counts a client that hangs up after `[DONE]` as answered: the event must be found when
    the upstream's pieces cut it anywhere, and not when a model writes the same words (escaped in JSON)."""
    import json

    from llamactl.proxy.forward import done_seen

    stream = (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
              + b"data: " + json.dumps({"choices": [{"delta": {"content": "\ndata: [DONE]\n"}}]}).encode() + b"\n\n"
              + b"data: [DONE]\n\n")
    end = stream.rindex(b"[DONE]") + len(b"[DONE]")
    for size in (1, 2, 3, 5, 7, 13, len(stream)):
        carry, seen_at = b"", None
        for start in range(0, len(stream), size):
            seen, carry = done_seen(carry, stream[start:start + size])
            if seen:
                seen_at = min(start + size, len(stream))
                break
        assert seen_at is not None and seen_at >= end, (size, seen_at, end)  # found, and not in the content


def test_a_json_log_line_is_one_line_and_keeps_its_fixed_keys() -> None:
    """A record without an event is `log`; the call's fields cannot overwrite time, level or event; a
    traceback and a message with newlines stay on one line."""
    import json
    import logging
    import sys

    from llamactl.proxy.logs import JsonFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("llamactl.proxy", logging.ERROR, __file__, 1, "bad %s", ("a\nb",), sys.exc_info())
    record.__dict__.update({"time": "forged", "level": "forged", "model": "alpha"})
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert "\n" not in line and data["event"] == "log" and data["message"] == "bad a\nb" and data["model"] == "alpha"
    assert data["level"] == "error" and data["time"].endswith("+00:00") and "ValueError: boom" in data["traceback"]
