"""Our copy of ggml's type table (read without importing gguf, so without numpy) against gguf's own."""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llamactl.model import quants
from tests.importprobe import run_and_list


def test_every_type_we_know_is_gguf_s_with_the_same_sizes() -> None:
    for kind in quants.GGMLType:
        theirs = GGMLQuantizationType(kind.value)
        assert theirs.name == kind.name
        assert quants.sizes(kind) == GGML_QUANT_SIZES[theirs], kind.name


def test_every_gguf_type_is_answered_ours_or_looked_up() -> None:
    for theirs in GGMLQuantizationType:  # a newer gguf's type is still read (through gguf, paying numpy then)
        assert quants.by_value(theirs.value).name == theirs.name
        assert quants.by_name(theirs.name.lower()).value == theirs.value
        assert quants.sizes(theirs.value) == GGML_QUANT_SIZES[theirs]
    for ftype in LlamaFileType:
        assert quants.file_type_name(ftype.value) == ftype.name


def test_unknown_types_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError):
        quants.by_value(9999)
    with pytest.raises(KeyError):
        quants.by_name("q9_9")
    with pytest.raises(ValueError):
        quants.file_type_name(9999)


def test_light_commands_import_no_heavy_library_nor_other_commands(tmp_path) -> None:
    """What a Tab of completion, --version, ps, gpus, evict and logs load: no heavy library (pydantic is Typer's,
    see llamactl/cli/coerce.py), and no other command's module."""
    heavy = ("numpy", "aiohttp", "httpx", "llamactl.model.demo_model", "gguf", "pydantic", "llamactl.cli.estimate",
             "llamactl.cli.demo", "llamactl.cli.proxy", "llamactl.cli.top")
    env = {"LLAMACTL_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "LLAMA_SERVER": str(tmp_path / "no-llama-server")}
    complete = {"_LLAMACTL_COMPLETE": "complete_bash", "COMP_WORDS": "llamactl ev", "COMP_CWORD": "1"}
    for argv, extra in ((["--version"], {}), (["ps"], {}), (["ps", "--help"], {}), (["gpus", "--gpus", "none"], {}),
                        (["evict", "--all"], {}), (["logs", "--help"], {}), ([], complete)):
        stdout, loaded, out = run_and_list(argv, heavy, env={**env, **extra})
        assert loaded == [], (argv, stdout[-500:], out.stderr[-500:])
    assert "evict" in stdout  # the completion answered
