"""The Typer root: global options, subcommand registration, and the one place errors become exit codes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import typer

from llamactl import DIST_NAME, __version__
from llamactl.cli import coerce, helpfmt
from llamactl.cli.commands import COMMANDS, LazyGroup
from llamactl.errors import ExitCode, LlamactlError

app = typer.Typer(
    name="llamactl",
    help="Run llama.cpp's llama-server on NVIDIA GPUs: estimate, plan, launch, track, evict, proxy.",
    cls=LazyGroup,  # subcommands are listed from a table and imported when they run
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help, as git and ripgrep print it: no type column, no boxes
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Globals:
    """Options given before the subcommand; read by subcommands through ctx.obj."""

    json: bool = False
    state_dir: Optional[str] = None
    config: Optional[str] = None
    debug: bool = False


_debug = {"on": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llamactl {__version__} ({DIST_NAME} on PyPI)")
        from llamactl.servers.probe import find_server, probe

        try:
            binary = find_server()
            typer.echo(f"llama-server {probe(binary).version} at {binary}")
        except LlamactlError as exc:
            typer.echo(f"llama-server: {exc}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    state_dir: Optional[str] = typer.Option(None, "--state-dir", envvar="LLAMACTL_STATE_DIR", help="State directory."),
    config: Optional[str] = typer.Option(None, "--config", envvar="LLAMACTL_CONFIG", help="Config file (TOML)."),
    debug: bool = typer.Option(False, "--debug", help="Log details and show tracebacks."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    import logging  # here, not at the top: `--version` and a Tab of completion never log

    _debug["on"] = debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s", force=True)
    else:
        logging.basicConfig(level=logging.WARNING, format="llamactl: warning: %(message)s", force=True)
    ctx.obj = Globals(json=json_output, state_dir=state_dir, config=config, debug=debug)


helpfmt.install()
coerce.install()


def _optional_values(argv: list[str]) -> list[str]:
    """Let `--watch` stand alone (`--watch [SECONDS]`): Click options cannot make their value optional."""
    if "--watch" not in argv:
        return argv
    from llamactl.cli.gpus import WATCH_DEFAULT_S

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == "--watch":
            following = out[i + 1] if i + 1 < len(out) else None
            try:
                float(following)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                out.insert(i + 1, f"{WATCH_DEFAULT_S:g}")
            break
    return out


HOISTED = ("--config", "--state-dir")  # global options with a value, users also write them after the subcommand


def hoist_globals(argv: list[str]) -> list[str]:
    """`llamactl proxy --config F` means `llamactl --config F proxy` (as llama-swap's `--config`): move the
    global options given after the subcommand's name before it, up to a literal `--`."""
    names = set(COMMANDS)
    i = 0
    while i < len(argv) and argv[i] not in names:
        if argv[i] == "--":
            return argv
        i += 2 if argv[i] in HOISTED else 1
    if i >= len(argv):
        return argv
    before, command, rest = argv[:i], argv[i], argv[i + 1:]
    moved: list[str] = []
    kept: list[str] = []
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg == "--":
            kept += rest[j:]
            break
        if arg in HOISTED and j + 1 < len(rest):
            moved += rest[j:j + 2]
            j += 2
            continue
        if arg.split("=", 1)[0] in HOISTED and "=" in arg:
            moved.append(arg)
        else:
            kept.append(arg)
        j += 1
    return before + moved + [command] + kept


def _json_asked(argv: list[str]) -> bool:
    """`--json` anywhere before a literal `--` (global or the subcommand's)."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def _fail(message: str, code: int, kind: str, as_json: bool) -> None:
    """One failure, rendered once: a line on stderr, or under --json a JSON object on stdout; then exit."""
    if as_json:
        import json

        from llamactl.render import error_json

        try:
            sys.stdout.write(json.dumps(error_json(kind, message, code)) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass
    else:
        print(f"llamactl: {message}" if kind == "internal" else f"llamactl: error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console entry point: run the app, map errors to one line (or one JSON object) and an exit code."""
    as_json = _json_asked(sys.argv[1:])
    try:
        code = app(args=_optional_values(hoist_globals(sys.argv[1:])), prog_name="llamactl", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("llamactl: interrupted", file=sys.stderr)
        sys.exit(int(ExitCode.INTERRUPTED))
    except typer.TyperException as exc:  # bad usage: one line, like our own UsageError
        if type(exc).__name__ == "NoArgsIsHelpError":  # `llamactl` alone: the usage, and a usage error (as rg)
            print(exc.format_message() if hasattr(exc, "format_message") else str(exc), file=sys.stderr)
            sys.exit(int(ExitCode.USAGE))
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"{message} (see --help)", int(getattr(exc, "exit_code", ExitCode.USAGE)), "usage", as_json)
    except LlamactlError as exc:
        _traceback_if_debug()
        _fail(str(exc), int(exc.exit_code), _kind(exc), as_json)
    except KeyboardInterrupt:
        print("llamactl: interrupted", file=sys.stderr)
        sys.exit(int(ExitCode.INTERRUPTED))
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): not an error
        sys.exit(int(ExitCode.OK))
    except Exception as exc:  # a bug: one line unless --debug
        _traceback_if_debug()
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
              int(ExitCode.FAILURE), "internal", as_json)


def _traceback_if_debug() -> None:
    if _debug["on"]:
        import traceback  # loaded only when asked for

        traceback.print_exc()


def _kind(exc: LlamactlError) -> str:
    """The error's type for JSON (errors.type_name: UsageError → usage, as docs/usage.md lists them)."""
    from llamactl.errors import type_name

    return type_name(exc)
