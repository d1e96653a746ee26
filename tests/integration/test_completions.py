"""Shell completion: the committed scripts are current, and the app completes what users type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    parts = words.split(" ")
    out = subprocess.run([sys.executable, "-m", "llamactl"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **(env or {}), "_LLAMACTL_COMPLETE": "complete_bash",
                              "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)})
    return out.stdout.split()


def test_committed_scripts_are_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "completions" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    scripts = ROOT / "completions"
    assert "complete -o default -F _llamactl_completion llamactl" in (scripts / "llamactl.bash").read_text()
    assert (scripts / "_llamactl").read_text().startswith("#compdef llamactl")
    assert (scripts / "llamactl.fish").read_text().startswith("complete --command llamactl")


def test_subcommands_and_flags() -> None:
    assert complete("llamactl es") == ["estimate"]
    assert "--gpus-file" in complete("llamactl plan --gpus")


def test_model_and_instance_names(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[models.qwen-7b]\npath = "{tmp_path}/q.gguf"\naliases = ["gpt-4o-mini"]\n')
    assert complete(f"llamactl --config {cfg} launch q") == ["qwen-7b"]
    assert complete(f"llamactl --config {cfg} launch gpt") == ["gpt-4o-mini"]
    state = tmp_path / "state"
    sys.path.insert(0, str(ROOT))
    from llamactl.servers.state import Instance, StateStore, Status

    with StateStore(state).edit() as instances:
        instances["chat-a"] = Instance(name="chat-a", model="m", port=1, status=Status.DEAD)
        instances["chat-b"] = Instance(name="chat-b", model="m", port=2, status=Status.DEAD)
    assert complete("llamactl evict chat", {"LLAMACTL_STATE_DIR": str(state)}) == ["chat-a", "chat-b"]
    assert complete(f"llamactl --state-dir {state} logs chat-b") == ["chat-b"]


def test_setting_values_complete_from_the_registry() -> None:
    assert complete("llamactl estimate m.gguf -ctk q8") == ["q8_0"]
    assert complete("llamactl plan m.gguf --flash-attn ") == ["on", "off", "auto"]
    assert complete("llamactl launch m.gguf -ngl a") == ["all", "auto"]
