"""The one resolver: command line > [models.NAME] > [defaults] > built-in, field by field, for every door."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.config import DEFAULT_PORT_START, load
from llamactl.errors import UsageError
from llamactl.model.settings import ServerSettings
from llamactl.placement import PlacementSpec, Strategy
from llamactl.resolve import Overrides, resolve

CONFIG = """
port_start = 9500
gpu_mem_threshold = 0.25
[defaults]
ctx_size = 8192
cache_type_k = "q8_0"
args = ["--jinja"]
strategy = "pack"
[models.chat]
path = "chat.gguf"
aliases = ["gpt-4o-mini"]
ctx_size = 16384
max_gpus = 1
args = ["--no-warmup"]
"""


@pytest.fixture
def cfg(tmp_path: Path):
    (tmp_path / "chat.gguf").write_bytes(b"")
    (tmp_path / "loose model+v2.gguf").write_bytes(b"")
    (tmp_path / "config.toml").write_text(CONFIG)
    return load(tmp_path / "config.toml")


@pytest.mark.parametrize(("model", "given", "expect"), [
    # a configured name: its own keys, then [defaults], then built-ins
    ("chat", Overrides(), dict(ctx_size=16384, cache_type_k="q8_0", batch_size=2048, max_gpus=1,
                               strategy=Strategy.PACK, mem_threshold=0.25, port_start=9500, name="chat",
                               args=("--no-warmup",))),
    # an alias is the same model
    ("gpt-4o-mini", Overrides(), dict(ctx_size=16384, name="chat")),
    # the command line wins where given, and only there
    ("chat", Overrides(settings={"ctx_size": 2048}, placement={"max_gpus": 2}, port_start=7000,
                       extra_args=("--seed", "1"), name="chat2"),
     dict(ctx_size=2048, cache_type_k="q8_0", max_gpus=2, strategy=Strategy.PACK, port_start=7000, name="chat2",
          args=("--no-warmup", "--seed", "1"))),
    # a bare path: [defaults] and the machine keys apply, named by its stem made a valid name
    ("{tmp}/loose model+v2.gguf", Overrides(), dict(ctx_size=8192, cache_type_k="q8_0", max_gpus=None,
                                                    strategy=Strategy.PACK, mem_threshold=0.25,
                                                    name="loose-model-v2", args=("--jinja",))),
])
def test_precedence(cfg, tmp_path: Path, model: str, given: Overrides, expect: dict) -> None:
    spec = resolve(cfg, model.format(tmp=tmp_path), given)
    for key, value in expect.items():
        holder = (spec.settings if hasattr(spec.settings, key) else
                  spec.placement if hasattr(spec.placement, key) else spec)
        assert getattr(holder, key) == value, key


def test_no_config_is_the_built_in_defaults(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    spec = resolve(load(None), str(tmp_path / "m.gguf"))
    assert spec.settings == ServerSettings() and spec.placement == PlacementSpec()
    assert spec.port_start == DEFAULT_PORT_START and spec.args == () and not spec.configured


def test_unknown_names_say_what_is_configured(cfg) -> None:
    with pytest.raises(UsageError, match=r"nope: no such file, and no model of that name in .*config.toml \(configured: chat\)"):
        resolve(cfg, "nope")


def test_a_remote_model_is_refused_naming_its_box(cfg) -> None:
    from dataclasses import replace

    from llamactl.config import Remote

    remote = replace(cfg, remotes={"far": Remote("far", "http://gpu-box:8080", "secret")})
    with pytest.raises(UsageError, match=r"far: served by another box \(http://gpu-box:8080\), not run here") as caught:
        resolve(remote, "far")
    assert "secret" not in str(caught.value)


def test_a_bad_name_override_is_refused(cfg) -> None:
    with pytest.raises(UsageError, match="not a valid instance name"):
        resolve(cfg, "chat", Overrides(name="../x"))
