"""Shell completion: the committed scripts are current, the app completes what users type, and bash, zsh
and fish, running the committed scripts, offer instance names (nothing when none run) and files for a MODEL."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "completions"


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """The app's answer (bash protocol): plain values as they are, a path request as `file:PREFIX`."""
    parts = words.split(" ")
    out = subprocess.run([sys.executable, "-m", "llamactl"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **(env or {}), "_LLAMACTL_COMPLETE": "complete_bash",
                              "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)})
    assert out.returncode == 0, out.stderr
    kinds_values = [line.split("\t")[:2] for line in out.stdout.splitlines() if line]
    return [value if kind == "plain" else f"{kind}:{value}" for kind, value in kinds_values]


def test_committed_scripts_are_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "completions" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    bash = (SCRIPTS / "llamactl.bash").read_text()
    assert "complete -F _llamactl_completion llamactl" in bash
    assert "-o default" not in bash  # files only where llamactl asks for them
    assert (SCRIPTS / "_llamactl").read_text().startswith("#compdef llamactl")
    assert "complete --command llamactl --no-files" in (SCRIPTS / "llamactl.fish").read_text()


def test_subcommands_and_flags() -> None:
    assert complete("llamactl es") == ["estimate"]
    assert "--gpus-file" in complete("llamactl plan --gpus")


def test_model_and_instance_names(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[models.qwen-7b]\npath = "{tmp_path}/q.gguf"\naliases = ["gpt-4o-mini"]\n')
    assert complete(f"llamactl --config {cfg} launch q") == ["qwen-7b", "file:q"]
    assert complete(f"llamactl --config {cfg} launch gpt") == ["gpt-4o-mini", "file:gpt"]
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


@pytest.mark.parametrize(("words", "expected"), [
    ("llamactl --config ./c", ["file:./c"]),
    ("llamactl --state-dir /v", ["dir:/v"]),
    ("llamactl calibration import ", ["file:"]),
    ("llamactl launch m -- --mmproj ./p", ["file:./p"]),  # llama-server's own flags take paths
    ("llamactl evict ", []),
    ("llamactl ps ", []),
    ("llamactl launch m --port ", []),
])
def test_paths_only_where_a_path_is_taken(words: str, expected: list[str], tmp_path: Path) -> None:
    assert complete(words, {"LLAMACTL_STATE_DIR": str(tmp_path)}) == expected


# Each shell runs its committed script and answers the candidates for COMMAND LINE WORDS (the last one the
# word being completed), one a line. zsh's completion builtins work only inside its line editor: there
# _files and _describe stand in, listing what compsys would be asked to offer.
def _bash(words: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    ask = 'source "$0"; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _llamactl_completion llamactl; ' \
          'printf "%s\\n" "${COMPREPLY[@]}"'
    return _run(["bash", "--norc", "-c", ask, str(SCRIPTS / "llamactl.bash"), *words], env, cwd)


def _zsh(words: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    ask = ('fpath=("$1" $fpath); autoload -Uz _llamactl; shift; '
           '_files() { if [[ $1 == -/ ]]; then print -rl -- $words[CURRENT]*(N/); '
           'else print -rl -- $words[CURRENT]*(N); fi }; '
           '_describe() { local d; for d in "${(@P)${@[-1]}}"; do print -r -- "${d%%:*}"; done }; '
           'words=("$@"); CURRENT=$#; _llamactl || :')  # no candidates: status 1, as compsys expects
    return _run(["zsh", "-f", "-c", ask, "zsh", str(SCRIPTS), *words], env, cwd)


def _fish(words: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    ask = "source $argv[1]; complete -C $argv[2]"
    lines = _run(["fish", "--no-config", "-c", ask, str(SCRIPTS / "llamactl.fish"), " ".join(words)], env, cwd)
    return [line.split("\t")[0] for line in lines]


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return sorted(line for line in out.stdout.splitlines() if line)


SHELLS: dict[str, Callable[[list[str], dict[str, str], Path], list[str]]] = {"bash": _bash, "zsh": _zsh, "fish": _fish}


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest) -> Callable[[list[str], dict[str, str], Path], list[str]]:
    if shutil.which(request.param) is None:
        pytest.fail(f"{request.param} is not installed (.ci/run installs it): its completion script would go "
                    "untested", pytrace=False)
    return SHELLS[request.param]


def _user_env(tmp_path: Path, state: Path) -> dict[str, str]:
    """The scripts call `llamactl` by name: one on PATH that runs this checkout, with its own state dir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "llamactl"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(sys.executable)} "
                   '-m llamactl "$@"\n')
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LLAMACTL_STATE_DIR": str(state),
            "LLAMACTL_CONFIG": str(tmp_path / "config.toml"), "HOME": str(tmp_path)}


def test_the_shells_offer_names_where_names_are_taken_and_files_for_a_model(shell, tmp_path: Path) -> None:
    from llamactl.servers.state import Instance, StateStore, Status

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    for name in ("qwen.gguf", "llama.gguf"):
        (work / "models" / name).write_bytes(b"")
    (work / "q3.gguf").write_bytes(b"")
    (tmp_path / "config.toml").write_text('[models.qwen-7b]\npath = "/m/q.gguf"\n')
    env = _user_env(tmp_path, tmp_path / "state")

    assert shell(["llamactl", "evict", ""], env, work) == []
    assert shell(["llamactl", "logs", ""], env, work) == []
    assert shell(["llamactl", "estimate", "models/"], env, work) == ["models/llama.gguf", "models/qwen.gguf"]
    assert shell(["llamactl", "launch", "q"], env, work) == ["q3.gguf", "qwen-7b"]
    assert shell(["llamactl", "estimate", "m.gguf", "-ctk", "q8"], env, work) == ["q8_0"]

    with StateStore(tmp_path / "state").edit() as instances:
        instances["chat-a"] = Instance(name="chat-a", model="m", port=1, status=Status.DEAD)
        instances["chat-b"] = Instance(name="chat-b", model="m", port=2, status=Status.DEAD)
    assert shell(["llamactl", "evict", ""], env, work) == ["chat-a", "chat-b"]
    assert shell(["llamactl", "logs", "chat-b"], env, work) == ["chat-b"]
