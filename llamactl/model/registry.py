"""Every llama-server setting llamactl models, declared once, as data.

Each `Setting` says what the setting is (its `ServerSettings` field, llama-server's flag names, which the
command line takes as they are, its config key, its kind of value with bounds, its default and help) and how
it reaches llama-server (`argv`, from the resolved value). The command line's flag group (cli/options.py), the
config reader (config.py), the argv builder (servers/command.py), the JSON of `estimate`, the flags refused in
extra arguments and the settings table in docs/configuration.md are all derived from `SETTINGS`: a new
llama-server flag is one entry here (and, where it changes memory, the memory model's handling of it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl.errors import UsageError

if TYPE_CHECKING:
    from llamactl.model.settings import Resolved
    from llamactl.servers.probe import ServerCaps

LLAMACTL_DEFAULT_CTX = 4096  # llamactl's own default; llama-server's -c 0 means the trained context
MAX_SEQ = 256  # LLAMA_MAX_SEQ: llama.cpp refuses more slots
MAX_CTX = 2**31 - 1  # llama-server parses -c as a 32-bit int
MAX_BATCH = 2**20
MAX_LAYERS = 100_000  # more than any model has: "all layers" for --cpu-moe
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
FLASH_ATTN_MODES = ("on", "off", "auto")


# --- kinds of value: each parses the command line's text and the config's value alike --------------------

@dataclass(frozen=True)
class Kind:
    metavar: str = "VALUE"
    doc: str = ""  # the value's form, for the docs table

    def text(self, text: str) -> Any:  # a command-line value
        return self.value(text)

    def value(self, value: Any) -> Any:  # a config value (a command-line one after text())
        raise NotImplementedError

    def choices(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class Int(Kind):
    """A whole number in lo..hi; `words` are named values ("all") and their meaning."""

    lo: int = 0
    hi: int = MAX_CTX
    words: tuple[tuple[str, Any], ...] = ()
    metavar: str = "N"

    def text(self, text: str) -> Any:
        named = dict(self.words)
        if text.strip().lower() in named:
            return named[text.strip().lower()]
        try:
            number = int(text)
        except ValueError:
            raise UsageError(f"expected {self._what()}, got {text!r}") from None
        return self.value(number)

    def value(self, value: Any) -> Any:
        named = dict(self.words)
        if isinstance(value, str) and value.lower() in named:
            return named[value.lower()]
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"expected {self._what()}, got {value!r}")
        if str(value) in named:
            return named[str(value)]
        if not self.lo <= value <= self.hi:
            raise UsageError(f"expected {self._what()}, got {value}")
        return value

    def _what(self) -> str:
        bounds = f">= {self.lo}" if self.hi >= MAX_LAYERS and self.hi < MAX_CTX else f"in {self.lo}..{self.hi}"
        words = [w for w, _ in self.words if not w.lstrip("-").isdigit()]
        return f"a number {bounds}" + (f" or {' or '.join(repr(w) for w in words)}" if words else "")

    def choices(self) -> tuple[str, ...]:
        return tuple(w for w, _ in self.words if not w.lstrip("-").isdigit())


@dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...] = ()
    booleans: tuple[str, str] | None = None  # what true and false mean in a config (flash_attn = true)
    metavar: str = "TYPE"
    noun: str = ""  # what a value is, for errors: "unknown cache type 'q3'"

    def value(self, value: Any) -> Any:
        if isinstance(value, bool) and self.booleans is not None:
            return self.booleans[0] if value else self.booleans[1]
        text = str(value).lower() if isinstance(value, str) else None
        if text not in self.options:
            if self.noun:
                raise UsageError(f"unknown {self.noun} {value!r} (allowed: {', '.join(self.options)})")
            raise UsageError(f"expected {', '.join(self.options[:-1])} or {self.options[-1]}, got {value!r}")
        return text

    def choices(self) -> tuple[str, ...]:
        return self.options


@dataclass(frozen=True)
class Flag(Kind):
    """On or off: a bare flag on the command line, true or false in a config."""

    def value(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise UsageError(f"expected true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class File(Kind):
    """A file; in a config, relative to the config file."""

    metavar: str = "FILE"

    def value(self, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise UsageError(f"expected a file path, got {value!r}")
        return value


@dataclass(frozen=True)
class Files(File):
    """Files, one per flag (repeatable); in a config, a list."""

    def text(self, text: str) -> Any:
        return (File.value(self, text),)

    def value(self, value: Any) -> Any:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise UsageError("expected a list of file paths")
        return tuple(value)


@dataclass(frozen=True)
class Split(Kind):
    """`-ts 3,1` (llama.cpp also takes `/`); a config gives a list [3, 1] or the same text."""

    metavar: str = "N,N,..."

    def text(self, text: str) -> Any:
        return parse_tensor_split(text)

    def value(self, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return parse_tensor_split(",".join(str(v) for v in value))
        if isinstance(value, str):
            return parse_tensor_split(value)
        raise UsageError(f"expected a list of shares like [3, 1], got {value!r}")


@dataclass(frozen=True)
class Overrides(Kind):
    """`-ot REGEX=BUFFER,...` (repeatable); a config gives a list of such strings."""

    metavar: str = "REGEX=BUFFER"

    def text(self, text: str) -> Any:
        return tuple(parse_tensor_overrides(text))

    def value(self, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise UsageError("expected a list of \"REGEX=BUFFER\" strings")
        return tuple(o for item in items for o in parse_tensor_overrides(item))


def parse_tensor_overrides(value: str) -> list[tuple[str, str]]:
    """llama-server's `-ot PATTERN=BUFFER[,PATTERN=BUFFER...]`, patterns checked as regular expressions."""
    out = []
    for item in value.split(","):
        pattern, sep, target = item.partition("=")
        if not sep or not pattern or not target:
            raise UsageError(f"{item!r}: expected REGEX=BUFFER, e.g. 'ffn_.*_exps=CPU'")
        if target != "CPU" and not (target.startswith("CUDA") and target[4:].isdigit()):
            raise UsageError(f"{item!r}: buffer {target!r} is not modelled (use CPU or CUDA<i>)")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"{item!r}: bad regular expression ({exc})") from None
        out.append((pattern, target))
    return out


def parse_tensor_split(text: str | None) -> tuple[float, ...] | None:
    """Shares separated by commas; a colon is refused: llama-server parses `50:50` as one value."""
    if text is None:
        return None
    if ":" in text:
        raise UsageError(f"{text!r}: separate shares with commas (3,1); llama-server reads '50:50' as one number")
    try:
        shares = tuple(float(part) for part in text.replace("/", ",").split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{text!r}: expected numbers separated by commas") from None
    if not shares or len(shares) > 1024 or any(not math.isfinite(s) or s < 0 or s > 1e12 for s in shares) or sum(shares) <= 0:
        raise UsageError(f"{text!r}: shares must be >= 0 and not all zero")
    return shares


@dataclass(frozen=True)
class Duration(Kind):
    """"30m", "1h30m", or a number of seconds."""

    metavar: str = "DURATION"
    doc: str = 'a duration ("90s", "10m")'

    def value(self, value: Any) -> Any:
        from llamactl.units import parse_duration

        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UsageError(f"expected a duration like \"10m\", got {value!r}")
        return parse_duration(value if isinstance(value, str) else repr(float(value)), what="duration")


@dataclass(frozen=True)
class Size(Kind):
    """"4GiB", "512MiB": bytes; a number without a unit is refused (bytes or GiB?)."""

    metavar: str = "SIZE"
    doc: str = 'a size ("4GiB", "512MiB")'

    def value(self, value: Any) -> Any:
        from llamactl.units import parse_size

        if not isinstance(value, str):
            raise UsageError(f"expected a size like \"4GiB\", got {value!r}")
        return parse_size(value)


# --- how a resolved setting becomes argv ------------------------------------------------------------------

Argv = Callable[["Resolved", "ServerCaps"], list[str]]


def _value(flag: str, attr: str, show: Callable[[Any], str] = str) -> Argv:
    """`flag VALUE`, always (a memory-relevant value llama-server must not choose for itself)."""
    return lambda r, caps: [flag, show(getattr(r, attr))]


def _when(flag: str, test: Callable[["Resolved"], bool], *needs: str) -> Argv:
    """`flag` when the resolved settings ask for it; the binary must know it (and `needs`)."""
    def argv(r: "Resolved", caps: "ServerCaps") -> list[str]:
        if not test(r):
            return []
        caps.require(flag, *needs)
        return [flag]
    return argv


def _kv_unified(r: "Resolved", caps: "ServerCaps") -> list[str]:
    if not (r.kv_unified or r.n_seq_max > 1):
        return []  # one slot, not unified: the server's default either way
    caps.require("--kv-unified", "--no-kv-unified")
    return ["--kv-unified" if r.kv_unified else "--no-kv-unified"]


def _no_mmap(r: "Resolved", caps: "ServerCaps") -> list[str]:
    if r.mmap:
        return []
    caps.require("--load-mode")
    return ["--load-mode", "none"]  # llama-server's spelling of --no-mmap


def _embedding(r: "Resolved", caps: "ServerCaps") -> list[str]:
    return ["--embedding"] if r.embedding and not r.reranking else []  # --reranking implies it


def _lora(r: "Resolved", caps: "ServerCaps") -> list[str]:
    if r.lora:
        caps.require("--lora")
    return [arg for adapter in r.lora for arg in ("--lora", str(adapter))]


def _overrides(r: "Resolved", caps: "ServerCaps") -> list[str]:
    if not r.tensor_overrides:
        return []
    caps.require("--override-tensor")
    return ["--override-tensor", ",".join(f"{p}={t}" for p, t in r.tensor_overrides)]


def _n_cpu_moe(r: "Resolved", caps: "ServerCaps") -> list[str]:
    if not r.n_cpu_moe:
        return []
    caps.require("--n-cpu-moe")
    return ["--n-cpu-moe", str(r.n_cpu_moe)]


def _draft(r: "Resolved", caps: "ServerCaps") -> list[str]:
    """-md with its layers, and its cache types where the build takes them; the draft's settings go with it."""
    if r.draft_model is None:
        return []
    caps.require("--model-draft", "--n-gpu-layers-draft")
    argv = ["--model-draft", str(r.draft_model), "--n-gpu-layers-draft", str(r.draft_n_gpu_layers)]
    if caps.supports("--cache-type-k-draft"):
        argv += ["--cache-type-k-draft", r.draft_cache_type_k, "--cache-type-v-draft", r.draft_cache_type_v]
    if caps.supports("--spec-type"):  # a draft model is there to be used: this build needs it said
        argv += ["--spec-type", "draft-simple"]
    return argv


def _mmproj(r: "Resolved", caps: "ServerCaps") -> list[str]:
    if r.mmproj is None:
        return []
    caps.require("--mmproj")
    return ["--mmproj", str(r.mmproj)]


# --- the settings ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    field: str  # the ServerSettings field
    flags: tuple[str, ...]  # llama-server's names, taken by llamactl's command line as they are
    key: str  # the config key
    kind: Kind
    default: Any
    help: str
    argv: Argv | None = None  # None: another setting's argv carries it, or the plan's placement does
    invert: bool = False  # the flag says "no": --no-mmap sets the field False (so does a key named no_...)
    tristate: bool = False  # -kvu / -no-kvu: unset, on or off (flags: the on form, then the off form)
    spellings: tuple[str, ...] = ()  # llama-server's other names for it, refused in extra arguments
    shortcut: tuple[tuple[str, ...], Any, str] | None = None  # command-line flags that set a value, and help
    model_only: bool = False  # per model only, not in [defaults]
    memory: bool = True  # the memory model takes it into account
    show_default: str | None = None  # the default as the docs and help say it, when the value says it badly

    @property
    def flag(self) -> str:
        """The long flag, for messages: `-c/--ctx-size`."""
        return "/".join(self.flags[:2]) if len(self.flags) > 1 and not self.tristate else self.flags[0]

    def described_default(self) -> str:
        if self.show_default is not None:
            return self.show_default
        if isinstance(self.kind, Flag):
            return "true" if self.default else "false"
        return "" if self.default in (None, ()) else str(self.default)

    def from_text(self, text: str) -> Any:
        try:
            return self.kind.text(text)
        except UsageError as exc:
            raise UsageError(f"{self.flag}: {exc}") from None

    def from_config(self, value: Any, base: Path | None) -> Any:
        """The field's value from a config value (UsageError without the key: the reader adds key and line)."""
        parsed = self.kind.value(value)
        if isinstance(self.kind, File) and base is not None:
            parsed = _relative(parsed, base) if isinstance(parsed, str) else tuple(_relative(p, base) for p in parsed)
        return (not parsed) if self.key.startswith("no_") else parsed


def _relative(text: str, base: Path) -> str:
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        raise UsageError(f"cannot expand {text.split('/', 1)[0]!r}: no such user") from None
    return str(path if path.is_absolute() else base / path)


_LAYERS = Int(lo=0, hi=MAX_LAYERS, words=(("all", None), ("auto", None), ("-1", None)),
              doc='a number, or "all"')
_CACHE = Choice(options=KV_CACHE_TYPES, noun="cache type", doc=", ".join(KV_CACHE_TYPES))


def _is(attr: str) -> Callable[["Resolved"], bool]:
    return lambda r: bool(getattr(r, attr))


SETTINGS: tuple[Setting, ...] = (
    Setting("ctx_size", ("-c", "--ctx-size"), "ctx_size", Int(lo=0, hi=MAX_CTX, doc="0..2³¹−1"), LLAMACTL_DEFAULT_CTX,
            "Context size; 0 = the model's trained context.", _value("--ctx-size", "ctx_size")),
    Setting("n_gpu_layers", ("-ngl", "--n-gpu-layers", "--gpu-layers"), "n_gpu_layers", _LAYERS, None,
            "Layers on GPU: N or all.", _value("--n-gpu-layers", "n_gpu_layers"), show_default="all"),
    Setting("flash_attn", ("-fa", "--flash-attn"), "flash_attn",
            Choice(options=FLASH_ATTN_MODES, booleans=("on", "off"), metavar="on|off|auto", doc="on, off, auto"),
            "auto", "Flash attention (auto is resolved as the server would).",
            _value("--flash-attn", "flash_attn", lambda on: "on" if on else "off")),
    Setting("parallel", ("-np", "--parallel"), "parallel", Int(lo=1, hi=MAX_SEQ, doc="1..256"), None,
            "Slots; unset = 4 sharing one unified cache.", _value("--parallel", "n_seq_max"),
            show_default="4, unified"),
    Setting("cache_type_k", ("-ctk", "--cache-type-k"), "cache_type_k", _CACHE, "f16", "KV cache type for K.",
            _value("--cache-type-k", "cache_type_k")),
    Setting("cache_type_v", ("-ctv", "--cache-type-v"), "cache_type_v", _CACHE, "f16",
            "KV cache type for V (quantized needs -fa on).", _value("--cache-type-v", "cache_type_v")),
    Setting("batch_size", ("-b", "--batch-size"), "batch_size", Int(lo=1, hi=MAX_BATCH, doc="1..2²⁰"), 2048,
            "Logical batch size.", _value("--batch-size", "n_batch")),
    Setting("ubatch_size", ("-ub", "--ubatch-size"), "ubatch_size", Int(lo=1, hi=MAX_BATCH, doc="1..2²⁰"), 512,
            "Physical batch size.", _value("--ubatch-size", "n_ubatch")),
    Setting("kv_unified", ("-kvu", "-no-kvu", "--kv-unified", "--no-kv-unified"), "kv_unified", Flag(), None,
            "One KV cache shared by all slots.", _kv_unified, tristate=True, show_default="true without -np"),
    Setting("tensor_split", ("-ts", "--tensor-split"), "tensor_split", Split(doc="a list like [3, 1]"), None,
            "Split across GPUs, e.g. 3,1 (default: by free memory).", show_default="by free memory"),
    Setting("swa_full", ("--swa-full",), "swa_full", Flag(), False, "Full-size cache for sliding-window layers.",
            _when("--swa-full", _is("swa_full"))),
    Setting("reranking", ("--reranking", "--rerank"), "reranking", Flag(), False,
            "A reranker (llama-server --reranking: /v1/rerank).", _when("--reranking", _is("reranking"))),
    Setting("embedding", ("--embedding", "--embeddings"), "embedding", Flag(), False,
            "An embeddings server (llama-server --embedding).", _embedding),
    Setting("kv_offload", ("-nkvo", "--no-kv-offload"), "kv_offload", Flag(), True, "Keep the KV cache on the host.",
            _when("--no-kv-offload", lambda r: not r.kv_offload), invert=True, spellings=("-kvo", "--kv-offload")),
    Setting("mmap", ("--no-mmap",), "no_mmap", Flag(), True, "Load weights into RAM (llama-server --load-mode none).",
            _no_mmap, invert=True, spellings=("-lm", "--load-mode", "--mmap"), show_default="false"),
    Setting("repack", ("-nr", "--no-repack"), "repack", Flag(), True, "No CPU_REPACK copies of quantized weights.",
            _when("--no-repack", lambda r: not r.repack), invert=True, spellings=("--repack",)),
    Setting("lora", ("--lora",), "lora", Files(doc="a list of files"), (),
            "LoRA adapter loaded with the model (repeatable).", _lora, model_only=True),
    # before --n-cpu-moe: llama.cpp takes the first matching override
    Setting("tensor_overrides", ("-ot", "--override-tensor"), "override_tensor",
            Overrides(doc='a list of "REGEX=BUFFER,..."'), (),
            "Tensors matching REGEX on BUFFER: CPU or CUDA<i> (repeatable).", _overrides),
    Setting("n_cpu_moe", ("-ncmoe", "--n-cpu-moe"), "n_cpu_moe",
            Int(lo=0, hi=MAX_LAYERS, words=(("all", MAX_LAYERS),), doc='a number, or "all"'), None,
            "MoE: keep the experts of the first N layers on the CPU (plan picks N when unset).", _n_cpu_moe,
            shortcut=(("-cmoe", "--cpu-moe"), MAX_LAYERS, "MoE: keep every layer's experts on the CPU.")),
    Setting("draft_model", ("-md", "--model-draft"), "model_draft", File(doc="a file"), None,
            "Draft model for speculative decoding (same vocabulary).", _draft, spellings=("--spec-draft-model",)),
    Setting("draft_n_gpu_layers", ("-ngld", "--n-gpu-layers-draft", "--gpu-layers-draft"), "n_gpu_layers_draft",
            _LAYERS, None, "Draft layers on GPU: N or all (default: all when the model is wholly on GPUs, else 0).",
            spellings=("--spec-draft-ngl",), show_default="all if the model is wholly on GPUs, else 0"),
    Setting("draft_cache_type_k", ("-ctkd", "--cache-type-k-draft"), "cache_type_k_draft", _CACHE, "f16",
            "Draft KV cache type for K.", spellings=("--spec-draft-type-k",)),
    Setting("draft_cache_type_v", ("-ctvd", "--cache-type-v-draft"), "cache_type_v_draft", _CACHE, "f16",
            "Draft KV cache type for V.", spellings=("--spec-draft-type-v",)),
    Setting("mmproj", ("-mm", "--mmproj"), "mmproj", File(doc="a file"), None, "Vision projector (multimodal models).",
            _mmproj),
    Setting("mmproj_offload", ("--no-mmproj-offload",), "no_mmproj_offload", Flag(), True,
            "Keep the vision projector on the host.",
            _when("--no-mmproj-offload", lambda r: r.mmproj is not None and not r.mmproj_offload), invert=True,
            spellings=("--mmproj-offload",), show_default="false"),
)

BY_FIELD = {s.field: s for s in SETTINGS}
BY_KEY = {s.key: s for s in SETTINGS}


def _annotation(s: Setting) -> Any:
    return {Int: int, Choice: str, Flag: bool, File: str, Files: tuple, Split: tuple, Overrides: tuple}[type(s.kind)]


# What the user asked for, in llama-server's own terms (None: llama-server's default); one field per setting.
ServerSettings = dataclasses.make_dataclass(
    "ServerSettings", [(s.field, _annotation(s) | None, dataclasses.field(default=s.default)) for s in SETTINGS],
    frozen=True)
ServerSettings.__module__ = __name__
ServerSettings.__doc__ = "llama-server settings as given (None: llama-server's default), one field per registry entry."


def from_config(table: dict[str, Any], base: Any, relative_to: Path | None, *, model: bool,
                fail: Callable[[str, str], Exception]) -> Any:
    """`base` (a ServerSettings) with the table's setting keys applied; `fail(key, message)` makes the error."""
    updates = {}
    for s in SETTINGS:
        if s.key in table:
            if s.model_only and not model:
                raise fail(s.key, "only per model ([models.NAME])")
            try:
                updates[s.field] = s.from_config(table[s.key], relative_to)
            except UsageError as exc:
                raise fail(s.key, str(exc)) from None
    return dataclasses.replace(base, **updates)


def config_keys(*, model: bool) -> frozenset[str]:
    return frozenset(s.key for s in SETTINGS if model or not s.model_only)


def argv(resolved: "Resolved", caps: "ServerCaps") -> list[str]:
    """Every setting's part of the llama-server command line, in registry order."""
    return [arg for s in SETTINGS if s.argv is not None for arg in s.argv(resolved, caps)]


def own_flags() -> dict[str, tuple[str, str]]:
    """Every llama-server spelling of a registered setting → (llamactl's flag, the config key) to use instead:
    the same flag where llamactl's command line takes it, else its long form."""
    out = {}
    for s in SETTINGS:
        taken = (*s.flags, *(s.shortcut[0] if s.shortcut else ()))
        long = next(f for f in s.flags if f.startswith("--"))
        out.update({flag: (flag if flag in taken else long, s.key) for flag in (*taken, *s.spellings)})
    return out


def docs_table() -> str:
    """The settings table of docs/configuration.md."""
    rows = ["| config key | flags (command line and llama-server) | value | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        flags = ", ".join(f"`{f}`" for f in (*s.flags, *(s.shortcut[0] if s.shortcut else ())))
        value = "true or false" if isinstance(s.kind, Flag) else s.kind.doc
        meaning = s.help
        if s.invert and not s.key.startswith("no_"):
            meaning = f"`false` = `{s.flags[0]}`: {meaning[0].lower()}{meaning[1:]}"
        if s.shortcut:
            meaning += f" `{'`/`'.join(s.shortcut[0])}`: {s.shortcut[2]}"
        if s.model_only:
            meaning += " Per model only."
        rows.append(f"| `{s.key}` | {flags} | {value} | {s.described_default()} | {meaning} |")
    return "\n".join(rows)


def resolved_json(resolved: "Resolved") -> dict[str, Any]:
    """What llama-server runs with, by setting (`estimate --json`'s settings): the resolved value of each field
    (`ctx_size` is the padded total, as llama-server allocates it; `tensor_split` is the plan's)."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        attr = _RESOLVED_AS.get(s.field, s.field)
        if attr is None:
            continue
        value = getattr(resolved, attr)
        out[s.field] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
    out["flash_attn"] = "on" if resolved.flash_attn else "off"
    out["ctx_size_per_slot"] = resolved.n_ctx_seq
    return out


# ServerSettings field → the Resolved attribute that holds what llama-server runs with (None: the plan's)
_RESOLVED_AS: dict[str, str | None] = {"ctx_size": "n_ctx", "parallel": "n_seq_max", "batch_size": "n_batch",
                                       "ubatch_size": "n_ubatch", "tensor_split": None}


def check(settings: Sequence[Setting] = SETTINGS) -> None:
    """The registry's own consistency: no flag or key twice (a test calls it)."""
    seen: dict[str, str] = {}
    for s in settings:
        for name in (*s.flags, *s.spellings, *(s.shortcut[0] if s.shortcut else ()), "key:" + s.key):
            if name in seen:
                raise ValueError(f"{name} is declared by both {seen[name]} and {s.field}")
            seen[name] = s.field


# --- what the proxy does with a model: llamactl's own keys, per model and in [defaults] ------------------

@dataclass(frozen=True)
class ModelKey:
    field: str  # the Residency field
    key: str  # the config key
    kind: Kind
    default: Any
    help: str
    show_default: str | None = None  # the default as the docs say it, when the value says it badly


RESIDENCY: tuple[ModelKey, ...] = (
    ModelKey("preload", "preload", Flag(), False,
             "Started when the proxy starts, in the order `llamactl plan` (no model) shows."),
    ModelKey("pin", "pin", Flag(), False,
             "Never stopped by the proxy (no TTL, no eviction); only `llamactl evict` or the unload API stop it."),
    ModelKey("spill", "spill", Flag(), True,
             "May run partially or wholly on the CPU; `false`: on GPUs only, else a 503 with the reasons."),
    ModelKey("min_resident_s", "min_resident", Duration(), 0.0,
             "Once loaded, not evicted for another model before this long (the anti-thrash bound)."),
    ModelKey("priority", "priority", Int(lo=-1000, hi=1000, doc="-1000..1000"), 0,
             "Who wins memory: a model never evicts one of higher priority; its queued requests go first."),
    ModelKey("max_queue", "max_queue", Int(lo=0, hi=100_000, doc="0..100000"), None,
             "Requests that may wait for it (to load, or for a free slot) before a 429; unset: the top-level "
             "`max_queue`."),
    ModelKey("queue_timeout_s", "queue_timeout", Duration(), None,
             "How long a request waits for one of its slots (all `parallel` busy) before a 429 with Retry-After; "
             "unset: `load_timeout`."),
    ModelKey("keep_cache", "keep_cache", Flag(), False,
             "Save each slot's prompt cache when the proxy stops the model, and restore it at the next start with "
             "the same settings (llama-server --slot-save-path)."),
    ModelKey("cache_max_bytes", "cache_max", Size(), 4 * 1024**3,
             "With `keep_cache`: the most its saved prompt caches take on disk; the newest are kept.",
             show_default="4GiB"),
)

Residency = dataclasses.make_dataclass(
    "Residency", [(k.field, Any, dataclasses.field(default=k.default)) for k in RESIDENCY], frozen=True)
Residency.__module__ = __name__
Residency.__doc__ = ("What the proxy does with a model: preload, pin, spill, min_resident, priority, keep_cache, "
                     "cache_max (one field per key).")


def residency_from_config(table: dict[str, Any], base: Any, fail: Callable[[str, str], Exception]) -> Any:
    """`base` (a Residency) with the table's residency keys applied."""
    updates = {}
    for k in RESIDENCY:
        if k.key in table:
            try:
                updates[k.field] = k.kind.value(table[k.key])
            except UsageError as exc:
                raise fail(k.key, str(exc)) from None
    return dataclasses.replace(base, **updates)


def residency_table() -> str:
    rows = ["| config key | value | default | meaning |", "|---|---|---|---|"]
    for k in RESIDENCY:
        value = "true or false" if isinstance(k.kind, Flag) else k.kind.doc
        default = (("true" if k.default else "false") if isinstance(k.kind, Flag) else
                   "unset" if k.default is None else str(k.default or 0))
        default = k.show_default if k.show_default is not None else default
        rows.append(f"| `{k.key}` | {value} | {default} | {k.help} |")
    return "\n".join(rows)


DOC_BEGIN = "<!-- settings: generated by `python -m llamactl.model.registry FILE`; tests/unit/test_registry.py checks it -->"
DOC_END = "<!-- settings: end -->"


RESIDENCY_BEGIN = "<!-- residency: generated by `python -m llamactl.model.registry FILE` -->"
RESIDENCY_END = "<!-- residency: end -->"


def with_docs_table(text: str) -> str:
    """`text` (docs/configuration.md) with the generated tables between their markers."""
    for begin, end, table in ((DOC_BEGIN, DOC_END, docs_table()), (RESIDENCY_BEGIN, RESIDENCY_END, residency_table())):
        if begin in text:
            head, _, rest = text.partition(begin)
            _, _, tail = rest.partition(end)
            text = f"{head}{begin}\n{table}\n{end}{tail}"
    return text


if __name__ == "__main__":  # rewrite the table in the file named (docs/configuration.md)
    import sys

    target = Path(sys.argv[1])
    target.write_text(with_docs_table(target.read_text()))
