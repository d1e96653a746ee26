"""The real CLI as a process: output shapes, one-line errors and documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.synth import ModelSpec, write_model


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", ModelSpec(n_vocab=1024, n_layer=3))


def test_estimate_json_schema(model: Path) -> None:
    out = run("estimate", str(model), "--gpus", "none", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"model", "settings", "devices", "total_bytes"}
    assert data["model"]["architecture"] == "llama" and data["model"]["layers"] == 3
    assert [d["device"] for d in data["devices"]] == ["CPU"]
    keys = {"device", "weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes",
            "overhead_bytes", "total_bytes"}
    assert set(data["devices"][0]) == keys
    assert data["total_bytes"] == sum(d["total_bytes"] for d in data["devices"])


def test_global_json_flag_and_several_files(model: Path) -> None:
    out = run("--json", "estimate", str(model), str(model), "--gpus", "none")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert isinstance(data, list) and len(data) == 2


def test_estimate_on_simulated_gpus(model: Path) -> None:
    data = json.loads(run("estimate", str(model), "--gpus", "2x24GiB", "-ts", "3,1", "--json").stdout)
    assert [d["device"] for d in data["devices"]] == ["CPU", "GPU0", "GPU1"]
    assert data["settings"]["n_gpu_layers"] == 4
    assert data["layers"] == {"GPU0": 3, "GPU1": 1}  # -ts 3,1 over 3 layers + output
    assert all(d["overhead_bytes"] > 0 for d in data["devices"][1:])
    assert data["pipeline_copies"] == 4  # every layer on two GPUs: llama.cpp pipelines
    one = json.loads(run("estimate", str(model), "--gpus", "2x24GiB", "-ngl", "2", "--json").stdout)
    assert one["pipeline_copies"] == 1  # a layer on the CPU: no pipeline
    assert "pipeline parallelism: llama.cpp keeps 4 copies" in run("estimate", str(model), "--gpus", "2x24GiB").stdout


def test_env_gpus_is_used(model: Path) -> None:
    data = json.loads(run("estimate", str(model), "--json", env={"LLAMACTL_GPUS": "16GiB"}).stdout)
    assert [d["device"] for d in data["devices"]] == ["CPU", "GPU0"]


def test_human_output_has_summary_and_table(model: Path) -> None:
    out = run("estimate", str(model), "--gpus", "none", "-c", "2048")
    assert out.returncode == 0
    assert "llama" in out.stdout and "DEVICE" in out.stdout and "TOTAL" in out.stdout
    assert "-c 2048" in out.stdout


@pytest.mark.parametrize(("args", "code", "message"), [
    (["estimate", "{missing}"], 2, "no such file"),
    (["estimate", "{garbage}"], 2, "not a GGUF file"),
    (["estimate", "{model}", "--gpus", "24XB"], 2, "unknown unit"),
    (["estimate", "{model}", "--gpus", "24"], 2, "missing unit"),
    (["estimate", "{model}", "--gpus", "2x24GiB", "-ts", "50:50"], 2, "commas"),
    (["estimate", "{model}", "--gpus", "none", "-ctk", "q3_k"], 2, "unknown cache type"),
    (["estimate", "{model}", "--gpus", "none", "-ctv", "q8_0", "-fa", "off"], 2, "requires flash attention"),
    (["estimate", "{model}", "--gpus", "none", "-ngl", "many"], 2, "-ngl"),
    (["estimate", "{model}", "--gpus-file", "{missing}"], 2, "no such GPU inventory file"),
    (["estimate", "{model}", "--bogus-flag"], 2, "No such option"),
    (["proxy", "--log-format", "xml"], 2, "--log-format"),
])
def test_errors_are_one_line_with_exit_codes(model: Path, tmp_path: Path, args, code, message) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model at all" * 10)
    subst = {"{missing}": str(tmp_path / "missing.gguf"), "{garbage}": str(garbage), "{model}": str(model)}
    out = run(*[subst.get(a, a) for a in args])
    assert out.returncode == code, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    if code != 2 or "No such option" not in message:
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_gpus_file_round_trip(tmp_path: Path, model: Path) -> None:
    inv = run("gpus", "--gpus", "24GiB,16GiB", "--json")
    assert inv.returncode == 0
    path = tmp_path / "inv.json"
    path.write_text(inv.stdout)
    data = json.loads(run("estimate", str(model), "--gpus-file", str(path), "--json").stdout)
    assert [d["device"] for d in data["devices"]] == ["CPU", "GPU0", "GPU1"]


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and "llamactl" in out.stdout and "llamactl-gpu" in out.stdout


def test_demo_without_llama_server_says_how_to_get_one(tmp_path: Path) -> None:
    out = run("demo", env={"LLAMA_SERVER": str(tmp_path / "no-such-llama-server"), "LLAMACTL_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 5, out.stderr
    assert "llama-server not found" in out.stderr and "llamactl install-server" in out.stderr
    assert "estimate (CPU): weights" in out.stdout


def test_gpus_watch_refreshes_as_json_lines() -> None:
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "llamactl", "gpus", "--gpus", "24GiB", "--watch", "0.2", "--json"],
                            stdout=subprocess.PIPE, text=True, env=os.environ,
                            # a background test run (`cmd &`) inherits SIGINT ignored: restore it for the child
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    first = [proc.stdout.readline(), proc.stdout.readline()]  # two refreshes seen, however slow the start
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in first + out.splitlines()]
    assert proc.returncode == 0
    assert len(lines) >= 2 and all(doc[0]["memory_total_bytes"] == 24 * 2**30 for doc in lines)


@pytest.mark.parametrize("args", [["gpus", "--watch", "0"], ["gpus", "--watch", "-1"]])
def test_gpus_watch_needs_positive_seconds(args) -> None:
    out = run(*args, "--gpus", "8GiB")
    assert out.returncode == 2


def test_empty_gpus_env_means_no_gpus() -> None:
    out = run("gpus", "--json", env={"LLAMACTL_GPUS": ""})
    assert out.returncode == 0 and json.loads(out.stdout) == []


def test_demo_rewrites_a_damaged_cached_model(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "demo").mkdir(parents=True)
    (cache / "demo" / "llamactl-demo.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    out = run("demo", env={"LLAMA_SERVER": str(tmp_path / "none"), "LLAMACTL_CACHE_DIR": str(cache)})
    assert out.returncode == 5 and "estimate (CPU): weights" in out.stdout  # the model was written again


@pytest.mark.parametrize(("args", "message"), [
    (["estimate", "{model}", "--gpus", "2x8GiB", "-ts", "nan,1"], "-ts"),
    (["estimate", "{model}", "--gpus", "2x8GiB", "-ts", "inf,1"], "-ts"),
    (["estimate", "{model}", "--gpus", "none", "-np", "300"], "1..256"),
    (["estimate", "{model}", "--gpus", "none", "-c", "99999999999"], "-c/--ctx-size: expected a number in 0..2147483647"),
    (["estimate", "{model}", "--gpus", ""], "--gpus needs a value"),
    (["estimate", "{model}", "-c", "abc"], "-c/--ctx-size: expected a number"),
    (["estimate", "{model}", "-ngl", "-2"], "-ngl/--n-gpu-layers: expected a number >= 0 or 'all'"),
    (["nosuchcommand"], "No such command"),
    (["plan", "{model}", "--gpus", "24GiB", "--gpu-ids", "7"], "no GPU 7"),
    (["plan", "{model}", "--gpus", "24GiB", "--port", "99999"], "--port"),
    (["gpus", "--gpus", "8GiB", "--watch", "nan"], "--watch"),
])
def test_more_bad_input_is_one_line_exit_2(model: Path, args, message) -> None:
    out = run(*[str(model) if a == "{model}" else a for a in args])
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("processes", [[{"pid": "abc"}], [{"pid": None}], [{"pid": 1, "used_memory_bytes": "x"}], "no"])
def test_gpus_file_with_bad_processes_is_a_usage_error(tmp_path: Path, processes) -> None:
    path = tmp_path / "inv.json"
    path.write_text(json.dumps([{"index": 0, "memory_total_bytes": 8 * 2**30, "processes": processes}]))
    out = run("gpus", "--gpus-file", str(path))
    assert out.returncode == 2 and "process" in out.stderr


def test_gpus_file_duplicate_index_and_lost_gpu(tmp_path: Path, model: Path) -> None:
    path = tmp_path / "inv.json"
    path.write_text(json.dumps([{"index": 0, "memory_total_bytes": 8 * 2**30}, {"index": 0, "memory_total_bytes": 8 * 2**30}]))
    assert run("gpus", "--gpus-file", str(path)).returncode == 2
    path.write_text(json.dumps([{"index": 0, "memory_total_bytes": 24 * 2**30, "error": "GPU is lost"},
                                {"index": 1, "memory_total_bytes": 24 * 2**30}]))
    data = json.loads(run("plan", str(model), "--gpus-file", str(path), "--json").stdout)
    assert data["gpu_ids"] == [1]  # the lost GPU round-trips as lost, not as a healthy empty one


# a failure of each subcommand: (global options, the command's argv, exit code, error type); {missing} is a
# GGUF path that does not exist, {file} a regular file, {bad_config} a config naming a missing model
FAILURES: dict[str, tuple[list[str], list[str], int, str]] = {
    "gpus": ([], ["gpus", "--gpus", "bogus"], 2, "usage"),
    "estimate": ([], ["estimate", "{missing}", "--gpus", "none"], 2, "usage"),
    "plan": ([], ["plan", "{missing}", "--gpus", "none"], 2, "usage"),
    "launch": ([], ["launch", "{missing}", "--gpus", "none", "--dry-run"], 2, "usage"),
    "ps": (["--state-dir", "{file}"], ["ps"], 1, "state"),
    "evict": ([], ["evict", "--idle", "bogus"], 2, "usage"),
    "logs": ([], ["logs", "nosuch"], 2, "usage"),
    "proxy": (["--config", "{bad_config}"], ["proxy", "--check"], 2, "usage"),
    "install-server": ([], ["install-server", "--jobs", "0"], 2, "usage"),
    "demo": ([], ["demo", "--ctx-size", "many"], 2, "usage"),
    "calibration": ([], ["calibration", "import", "{missing}"], 2, "usage"),
    "top": ([], ["top", "--url", "ftp://127.0.0.1:9", "--once"], 1, "remote"),
    "k8s": ([], ["k8s", "render", "{missing}", "--gpus-file", "{file}"], 2, "usage"),
    "worker": ([], ["worker", "--api-key-file", "{missing}", "--cpu-memory", "1GiB"], 2, "usage"),
    "ctl": ([], ["ctl", "running", "--url", "ftp://127.0.0.1:9"], 1, "remote"),
}


def has_own_json(command: str) -> bool:
    from llamactl.cli.commands import load

    return any("--json" in getattr(p, "opts", ()) for p in load(command).params)


def test_every_command_has_a_json_failure_case() -> None:
    from llamactl.cli.commands import COMMANDS

    assert set(FAILURES) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(FAILURES))
def test_json_errors_are_one_object_on_stdout_with_the_same_exit_code(command: str, tmp_path: Path) -> None:
    """Under --json (global, and the command's own where it has one) a failure is exactly one JSON object on
    stdout, `error.exit_code` the process's exit code, the same code and message the text form gives on stderr."""
    import os

    (tmp_path / "file").write_text("")
    (tmp_path / "bad.toml").write_text(f'[models.gone]\npath = "{tmp_path / "gone.gguf"}"\n')
    fill = {"missing": str(tmp_path / "none.gguf"), "file": str(tmp_path / "file"), "bad_config": str(tmp_path / "bad.toml")}
    before, argv, code, kind = (
        [a.format(**fill) for a in part] if isinstance(part, list) else part for part in FAILURES[command])
    env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("LLAMACTL_CONFIG", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=60,
                              env=env)

    text = run(*before, *argv)
    assert text.returncode == code, (text.stdout, text.stderr)
    forms = [["--json", *before, *argv]] + ([[*before, *argv, "--json"]] if has_own_json(command) else [])
    for form in forms:
        out = run(*form)
        doc = json.loads(out.stdout)  # one document: a second one, or text around it, fails to parse
        assert isinstance(doc, dict), out.stdout
        error = doc["error"]
        assert (error["type"], error["exit_code"], out.returncode) == (kind, code, code), (form, out.stdout, out.stderr)
        assert error["message"] and "\n" not in error["message"]
        assert f"llamactl: error: {error['message']}" in text.stderr, (error, text.stderr)
        assert out.stderr == "", (form, out.stderr)


def test_help_reads_like_a_unix_tool(tmp_path) -> None:
    """Every command's help at 80 columns: flags show no value, value options a name for it, no Python type
    tags (`<str>`, `<int range>`, `<list[str]>`, `<bool>`), no boxes, no line over 80 columns."""
    import os as _os
    import re as _re
    import subprocess as _sp
    import sys as _sys

    from llamactl.cli.commands import COMMANDS

    for command in ["", *COMMANDS]:
        argv = [_sys.executable, "-m", "llamactl", *([command] if command else []), "--help"]
        out = _sp.run(argv, capture_output=True, text=True, timeout=60, env={**_os.environ, "COLUMNS": "80"})
        assert out.returncode == 0, (command, out.stderr)
        text = out.stdout
        assert not _re.search(r"<(str|int|float|bool|list|Path|path)[^>]*>", text), (command, text)
        assert "╭" not in text and "│" not in text, command
        assert all(len(line) <= 80 for line in text.splitlines()), (command, [l for l in text.splitlines() if len(l) > 80])
        flags = [line for line in text.splitlines() if _re.match(r"\s+--(all|json|dry-run|once|replace)\b", line)]
        assert all(not _re.match(r"\s+--[\w-]+ [A-Z<]", line) for line in flags), (command, flags)


def test_every_command_module_is_listed_with_its_own_summary() -> None:
    """The root lists commands from a table without importing them (start-up): every module that registers a
    command is in it, under the command's own name, with the first paragraph of the command's own help, and
    `--help` lists them all."""
    import ast

    from llamactl.cli.commands import COMMANDS, load

    cli_dir = Path(__file__).resolve().parents[2] / "llamactl" / "cli"
    registering = {path.stem for path in cli_dir.glob("*.py")
                   if any(isinstance(node, ast.FunctionDef) and node.name == "register"
                          for node in ast.parse(path.read_text()).body)}
    assert registering == {module for module, _ in COMMANDS.values()}
    for name, (_, summary) in COMMANDS.items():
        command = load(name)
        assert (command.name, command.get_short_help_str(10_000)) == (name, summary)
    listed = run("--help").stdout.split("Commands:\n")[1].splitlines()
    assert [line.split()[0] for line in listed] == list(COMMANDS)


def test_no_arguments_prints_the_usage_and_exits_2() -> None:
    import subprocess as _sp
    import sys as _sys

    out = _sp.run([_sys.executable, "-m", "llamactl"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Usage: llamactl" in (out.stdout + out.stderr)
