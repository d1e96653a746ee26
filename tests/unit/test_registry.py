"""The settings registry: one entry per llama-server setting, consistent, and the docs table generated from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llamactl.errors import UsageError
from llamactl.model import registry
from llamactl.model.registry import SETTINGS, ServerSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_no_flag_or_key_is_declared_twice() -> None:
    registry.check()
    with pytest.raises(ValueError, match="-c is declared by both"):
        registry.check([*SETTINGS, dataclasses.replace(SETTINGS[1], field="other", flags=("-c",), key="other")])


def test_server_settings_has_one_field_per_entry_with_its_default() -> None:
    assert [f.name for f in dataclasses.fields(ServerSettings)] == [s.field for s in SETTINGS]
    defaults = ServerSettings()
    assert all(getattr(defaults, s.field) == s.default for s in SETTINGS)


def test_the_docs_table_is_the_registry_s() -> None:
    text = DOC.read_text()
    assert registry.with_docs_table(text) == text, "run: python -m llamactl.model.registry docs/configuration.md"
    assert all(f"| `{s.key}` |" in text for s in SETTINGS)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.field)
def test_the_command_line_and_the_config_refuse_the_same_values(setting: registry.Setting) -> None:
    """One parser: a value the config refuses, the command line refuses too (and -ngl -2 is refused by both)."""
    bad = {registry.Int: ["-2", "abc"], registry.Choice: ["q3"], registry.Split: ["0,0", "50:50"],
           registry.Overrides: ["ffn=Metal", "(=CPU"]}.get(type(setting.kind), [])
    for text in bad:
        with pytest.raises(UsageError):
            setting.from_text(text)
        config_value = int(text) if text.lstrip("-").isdigit() else text
        with pytest.raises(UsageError):
            setting.from_config(config_value, None)
