"""Shell completion: what each argument completes (model names, instance names, paths) and the scripts
that ask for it.

Completion runs inside the shell's key press: it must be quick and must never fail loudly, so every
lookup is best-effort and returns nothing on any error.

llamactl answers a Tab with one line per candidate, `KIND<TAB>VALUE<TAB>HELP`: a `plain` value is offered
as it is; `file` and `dir` ask the shell for its own completion of paths starting with VALUE. Only
arguments that take a path answer `file`/`dir` (a MODEL, a value named FILE or DIR in --help, what follows
`--` for llama-server), so a Tab after `evict` offers instance names, and nothing when none run.
"""

from __future__ import annotations

import typer
from typer._click.core import Parameter  # Typer 0.29 vendors Click
from typer import _completion_classes as typer_shells
from typer import _completion_shared
from typer._click.shell_completion import CompletionItem, ShellComplete, add_completion_class
from typer._click.shell_completion import _resolve_context, _resolve_incomplete
from typer.core import TyperOption

# value names (as --help shows them) that take a path, and what the shell completes for them: a MODEL is a
# configured name or a GGUF file; llama-server's flags after `--` (EXTRA) take paths too (--mmproj, --lora)
PATH_VALUES = {"FILE": "file", "DIR": "dir", "MODEL": "file", "EXTRA": "file"}


def _root_params(ctx: typer.Context) -> dict[str, object]:
    root = ctx.find_root()
    return dict(root.params or {})


def instance_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Instance names from the state file; nothing (not files) when none is recorded."""
    try:
        from llamactl import paths
        from llamactl.servers.state import StateStore

        state_dir = _root_params(ctx).get("state_dir")
        store = StateStore(paths.state_dir(state_dir if isinstance(state_dir, str) else None))
        return sorted(n for n in store.snapshot() if n.startswith(incomplete))
    except Exception:
        return []


def model_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Configured model names and aliases (a MODEL's paths come from PATH_VALUES)."""
    try:
        from llamactl import config, paths

        explicit = _root_params(ctx).get("config")
        cfg = config.load(paths.config_file(explicit if isinstance(explicit, str) else None))
        names = set(cfg.models) | {a for m in cfg.models.values() for a in m.aliases}
        return sorted(n for n in names if n.startswith(incomplete))
    except Exception:
        return []


def path_kind(param: Parameter) -> str | None:
    """`file` or `dir` when the parameter's value name says it takes a path, else None."""
    if isinstance(param, TyperOption):
        from llamactl.cli.helpfmt import shown_value_name

        name = shown_value_name(param) or ""
    else:
        name = (param.metavar or param.name or "").upper()
    return PATH_VALUES.get(name.split()[-1] if name.split() else "")


def candidates(shell: ShellComplete, args: list[str], incomplete: str) -> list[CompletionItem]:
    """What the parameter (or command) at the cursor completes, and paths when it takes one."""
    ctx = _resolve_context(shell.cli, shell.ctx_args, shell.prog_name, args)
    obj, incomplete = _resolve_incomplete(ctx, args, incomplete)
    items = obj.shell_complete(ctx, incomplete)
    if isinstance(obj, Parameter) and (kind := path_kind(obj)):
        items.append(CompletionItem(incomplete, type=kind))
    return items


class _Typed:
    """One line per candidate with its kind (Typer's own scripts drop the kind and complete files for all)."""

    def get_completions(self, args: list[str], incomplete: str) -> list[CompletionItem]:
        return candidates(self, args, incomplete)  # type: ignore[arg-type]

    def format_completion(self, item: CompletionItem) -> str:
        help_text = " ".join((item.help or "").split())
        return f"{item.type}\t{item.value}\t{help_text}"

    def complete(self) -> str:
        return ShellComplete.complete(self)  # type: ignore[arg-type]


class BashComplete(_Typed, typer_shells.BashComplete):
    pass


class ZshComplete(_Typed, typer_shells.ZshComplete):
    pass


class FishComplete(_Typed, typer_shells.FishComplete):
    pass


# %(prog_name)s, %(complete_func)s and %(autocomplete_var)s are filled by Typer (`--show-completion`,
# `--install-completion`); completions/generate.py writes the results to completions/
BASH = r"""
# llamactl's bash completion (completions/README.md says where it goes). llamactl answers KIND<TAB>VALUE
# lines: plain values are offered as they are, file and dir complete paths starting with VALUE.
%(complete_func)s() {
    local IFS=$'\n' line kind value
    COMPREPLY=()
    for line in $(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD="$COMP_CWORD" \
                      %(autocomplete_var)s=complete_bash "$1" 2>/dev/null); do
        IFS=$'\t' read -r kind value _ <<<"$line"
        case $kind in
            plain) COMPREPLY+=("$value") ;;
            file) compopt -o filenames 2>/dev/null; COMPREPLY+=($(compgen -f -- "$value")) ;;
            dir) compopt -o filenames 2>/dev/null; COMPREPLY+=($(compgen -d -- "$value")) ;;
        esac
    done
    return 0
}

complete -F %(complete_func)s %(prog_name)s
"""

ZSH = r"""
#compdef %(prog_name)s
# llamactl's zsh completion: a file named _%(prog_name)s in a directory on $fpath, loaded by compinit on the
# first Tab (completions/README.md). llamactl answers KIND<TAB>VALUE<TAB>HELP lines: plain values are
# offered with their help, file and dir complete paths.
local line
local -a fields described
for line in "${(@f)$(_TYPER_COMPLETE_ARGS="${words[1,CURRENT]}" %(autocomplete_var)s=complete_zsh %(prog_name)s 2>/dev/null)}"; do
  fields=("${(@ps:\t:)line}")
  case $fields[1] in
    plain) described+=("${fields[2]//:/\\:}${fields[3]:+:$fields[3]}") ;;
    file) _files ;;
    dir) _files -/ ;;
  esac
done
(( $#described )) && _describe -t values value described
"""

FISH = r"""
# llamactl's fish completion: ~/.config/fish/completions/%(prog_name)s.fish (completions/README.md).
# llamactl answers KIND<TAB>VALUE<TAB>HELP lines: plain values are offered with their help, file and dir
# complete paths.
function %(complete_func)s
    env _TYPER_COMPLETE_ARGS=(commandline -cp) %(autocomplete_var)s=complete_fish %(prog_name)s 2>/dev/null |
    while read -l --delimiter \t kind value help
        switch $kind
            case plain
                printf '%%s\t%%s\n' $value "$help"
            case file
                __fish_complete_path $value
            case dir
                __fish_complete_directories $value
        end
    end
end

complete --command %(prog_name)s --no-files --arguments '(%(complete_func)s)'
"""


def use_typed_shells() -> None:
    """Complete with the classes and scripts above. Typer registers its own while it builds the app, so
    the root group calls this when it starts (before it completes, shows or installs a script)."""
    for cls, script in ((BashComplete, BASH), (ZshComplete, ZSH), (FishComplete, FISH)):
        add_completion_class(cls, cls.name)
        _completion_shared._completion_scripts[cls.name] = script
