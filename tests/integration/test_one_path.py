"""One path from a model to a running instance: every door resolves a configured model the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.servers.buffers import free_port
from tests.integration.test_instances import Env, env  # noqa: F401  (the fixture)


@pytest.fixture
def configured(env: Env, tmp_path: Path):  # noqa: F811
    port_start = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'port_start = {port_start}\n[defaults]\nctx_size = 1024\n'
                   f'[models.tiny]\npath = "{env.model}"\nctx_size = 768\naliases = ["small"]\n')
    return env, cfg, port_start


def test_plan_estimate_and_launch_take_a_configured_name(configured) -> None:
    e, cfg, port_start = configured
    out = e.run("--config", str(cfg), "plan", "small", "--json")
    assert out.returncode == 3, out.stderr  # CPU only: the fit-check exit code, not "no such file"
    argv = json.loads(out.stdout)["argv"]
    assert argv[argv.index("--ctx-size") + 1] == "768" and argv[argv.index("--port") + 1] == str(port_start)
    out = e.run("--config", str(cfg), "estimate", "tiny", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["settings"]["ctx_size"] == 768, out.stderr
    # the command line wins where given
    out = e.run("--config", str(cfg), "estimate", "tiny", "-c", "256", "--json")
    assert json.loads(out.stdout)["settings"]["ctx_size"] == 256
    out = e.run("--config", str(cfg), "launch", "small", "--json")
    assert out.returncode == 0, out.stderr
    launched = json.loads(out.stdout)
    assert launched["name"] == "tiny" and port_start <= launched["port"] < port_start + 20  # the config's port_start (or the next free), not 8081
    (inst,) = e.ps()
    assert inst["name"] == "tiny"
    assert e.run("evict", "tiny").returncode == 0


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_and_state_dir_go_before_or_after_the_subcommand(configured, where: str, tmp_path: Path) -> None:
    e, cfg, _ = configured
    opts = ["--config", str(cfg), "--state-dir", str(tmp_path / "elsewhere")]
    args = [*opts, "proxy", "--check", "--json"] if where == "before" else ["proxy", "--check", "--json", *opts]
    out = e.run(*args)
    assert out.returncode == 0, out.stderr
    assert [m["name"] for m in json.loads(out.stdout)["models"]] == ["tiny"]
    args = [*opts, "ps", "--json"] if where == "before" else ["ps", "--json", *opts]
    assert e.run(*args).returncode == 0 and (tmp_path / "elsewhere").is_dir()


def test_a_bare_path_gets_the_config_defaults(configured) -> None:
    e, cfg, _ = configured
    out = e.run("--config", str(cfg), "estimate", str(e.model), "--json")
    assert json.loads(out.stdout)["settings"]["ctx_size"] == 1024
