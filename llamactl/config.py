"""The config file and model registry: TOML (or the seed's config.json) → a frozen Config.

Every key is checked; a bad one is reported once with its key and line and
exit code 2. Models come from `[models.NAME]` tables and from every `*.gguf` in
`models_dir` (split files count once, named by their stem); settings in
`[defaults]` apply to every model unless the model sets its own.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from llamactl.errors import ConfigError, UsageError
from llamactl.model import registry
from llamactl.model.registry import Residency, ServerSettings
from llamactl.placement import PlacementSpec, Strategy
from llamactl.units import parse_duration, parse_size
from llamactl.servers.names import name_for, valid_name

DEFAULT_PORT = 8080
DEFAULT_PORT_START = 8081
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})$")
_CACHE_BITS = {32: "f32", 16: "f16", 8: "q8_0", 4: "q4_0"}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    settings: ServerSettings
    args: tuple[str, ...] = ()
    ttl_s: float | None = None
    placement: PlacementSpec = PlacementSpec()
    aliases: tuple[str, ...] = ()
    residency: Residency = Residency()  # preload, pin, spill, min_resident, priority, queues, keep_cache, cache_max
    env: tuple[tuple[str, str], ...] = ()  # (NAME, value) set in its llama-server's environment
    request: RequestRules = field(default_factory=lambda: RequestRules())  # merged into each request's body


@dataclass(frozen=True)
class RequestRules:
    """`[models.NAME.request]`: what the proxy merges into a request's body before it goes to llama-server."""

    defaults: tuple[tuple[str, Any], ...] = ()  # set only where the client did not
    force: tuple[tuple[str, Any], ...] = ()  # always set
    strip: tuple[str, ...] = ()  # removed

    def __bool__(self) -> bool:
        return bool(self.defaults or self.force or self.strip)

    def apply(self, payload: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in payload.items() if k not in self.strip}
        for key, value in self.defaults:
            out.setdefault(key, value)
        out.update(self.force)
        return out


@dataclass(frozen=True)
class Variant:
    """`[models.NAME]` with `of = "OTHER"`: another name for a configured model, with its own request rules,
    served by that model's instance (no second load)."""

    name: str
    of: str
    request: RequestRules = RequestRules()


@dataclass(frozen=True)
class WorkerConfig:
    """A `llamactl worker` whose devices this host's llama-server may use over RPC ([workers.NAME])."""

    name: str
    url: str  # http://HOST:PORT of its /inventory
    api_key_file: Path


@dataclass(frozen=True)
class Remote:
    """A model served on another box (`[models.NAME]` with `url`), or a box whose models the proxy imports
    (`[upstreams.NAME]`): never started, stopped or planned here. `api_key` is sent to it and shown nowhere."""

    name: str
    url: str  # http://HOST:PORT, no trailing slash
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Config:
    source: Path | None = None
    server_bin: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    port_start: int = DEFAULT_PORT_START
    max_instances: int | None = None
    idle_ttl_s: float | None = None
    poll_interval_s: float = 5.0
    load_timeout_s: float = 300.0
    header_timeout_s: float = 30.0  # a client's request line and headers, and the idle time between requests
    body_timeout_s: float = 60.0  # a request body, plus a second per MiB it declares
    max_queue: int = 64
    batching: bool = True  # a freed seat goes to the model with the most requests waiting (one load serves them)
    max_wait_s: float = 60.0  # ...unless a request has waited this long: the starvation bound
    max_body_bytes: int = 64 * 1024 * 1024
    api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names (besides addresses, localhost, the bound name) served
    allowed_origins: tuple[str, ...] = ()  # pages (scheme://host:port) that may call the proxy (CORS)
    instance_api_keys: bool = False
    adopt: bool = False
    models_dir: Path | None = None
    models: dict[str, ModelConfig] = field(default_factory=dict)
    # what a model path that is not configured runs with: [defaults] over llamactl's own
    defaults: ServerSettings = ServerSettings()
    default_args: tuple[str, ...] = ()
    residency: Residency = Residency()  # [defaults]' residency keys
    placement: PlacementSpec = PlacementSpec()  # the machine's keys and [defaults]' placement keys
    variants: dict[str, Variant] = field(default_factory=dict)
    remotes: dict[str, Remote] = field(default_factory=dict)  # [models.NAME] with url: a model on another box
    upstreams: tuple[Remote, ...] = ()  # [upstreams.NAME]: boxes whose /v1/models are imported, in the file's order

    def route(self, name: str) -> tuple[ModelConfig, RequestRules] | None:
        """What a request for `name` runs on, and the request rules it gets: a model (by name or alias) with
        its own, or a variant's model with the variant's."""
        variant = self.variants.get(name)
        if variant is not None:
            return self.models[variant.of], variant.request
        model = self.lookup(name)
        return (model, model.request) if model is not None else None
    workers: tuple[WorkerConfig, ...] = ()  # in the file's order: it numbers their devices (gpu/remote.py)

    def lookup(self, name: str) -> ModelConfig | None:
        """A model by its name or one of its aliases (never a path: clients do not pick files)."""
        if name in self.models:
            return self.models[name]
        for model in self.models.values():
            if name in model.aliases:
                return model
        return None


_GLOBAL_KEYS = {"server_bin", "host", "port", "port_start", "max_instances", "idle_ttl", "poll_interval",
                "load_timeout", "header_timeout", "body_timeout", "max_queue", "batching", "max_wait", "max_body", "api_keys", "allowed_hosts", "allowed_origins", "instance_api_keys", "adopt", "models_dir",
                "gpu_util_threshold", "gpu_mem_threshold", "gpu_overhead", "host_memory", "calibration", "defaults",
                "models", "workers", "upstreams"}
# every llama-server setting of the registry, the placement keys and extra arguments
_PLACEMENT_KEYS = {"strategy", "max_gpus", "gpus", "no_partial", "margin", "calibration"}
_RESIDENCY_KEYS = {k.key for k in registry.RESIDENCY}
_SETTING_KEYS = set(registry.config_keys(model=False)) | _PLACEMENT_KEYS | _RESIDENCY_KEYS | {"args"}
_MODEL_KEYS = (set(registry.config_keys(model=True)) | _PLACEMENT_KEYS | _RESIDENCY_KEYS
               | {"args", "path", "ttl", "aliases", "env", "request"})
_REMOTE_KEYS = {"url", "api_key", "api_key_file"}


class _Reader:
    """Typed access to the parsed file that reports the offending key with its line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.lines = path, text.splitlines()

    def line_of(self, key: str) -> int | None:
        leaf = key.rsplit(".", 1)[-1]
        pattern = re.compile(rf'^\s*"?{re.escape(leaf)}"?\s*[=:]')
        section = key.rsplit(".", 1)[0] if "." in key else None
        in_section = section is None
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            if section is not None and stripped.startswith("["):
                in_section = stripped.strip("[] ").replace('"', "") == section
            if in_section and pattern.match(line):
                return number
        for number, line in enumerate(self.lines, 1):  # JSON, or a key in an inline table
            if f'"{leaf}"' in line or re.match(rf"^\s*{re.escape(leaf)}\s*=", line):
                return number
        return None

    def fail(self, key: str, message: str) -> ConfigError:
        line = self.line_of(key)
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {message}")

    def get(self, table: dict[str, Any], key: str, full: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in table:
            return default
        value = table[key]
        if kind is int or kind == (int, float):
            if isinstance(value, bool) or not isinstance(value, kind):
                raise self.fail(full, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
            return value
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(full, f"expected {names}, got {value!r}")
        return value

    def duration(self, table: dict[str, Any], key: str, full: str) -> float | None:
        """A duration key: "30m", "1h30m", or a number of seconds; "none"/"off"/0 = unset. Finite and >= 0."""
        if key not in table or table[key] in (None, "none", "off", 0):
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.fail(full, f"expected a duration like \"30m\", got {value!r}")
        try:
            return parse_duration(repr(float(value)) if not isinstance(value, str) else value, what=full)
        except UsageError as exc:
            raise self.fail(full, str(exc)) from None
        except (OverflowError, ValueError):  # an integer too large for a float
            raise self.fail(full, "out of range") from None


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
# what llamactl itself sets in an instance's environment (its GPUs, its key, the tags that prove it is ours),
# and llama-server's own LLAMA_ARG_* settings, which would override the planned command
_ENV_RESERVED = ("LLAMA_API_KEY", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
_ENV_RESERVED_PREFIXES = ("LLAMACTL_", "LLAMA_ARG_")
ENV_VALUE_MAX = 4096


def _env(r: _Reader, table: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    """A model's `env = {NAME = "value"}`: names as shells write them, printable values, nothing llamactl sets."""
    env = r.get(table, "env", where, dict, {})
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name) or len(name) > 128:
            raise r.fail(where, f"{name[:128]!r} is not an environment variable name (A-Z, 0-9 and _, not starting "
                                "with a digit)")
        if name in _ENV_RESERVED or name.startswith(_ENV_RESERVED_PREFIXES):
            raise r.fail(where, f"{name} is set by llamactl (GPUs, the instance key, its own tags) or overrides "
                                "the planned command; use the model's settings or args")
        if not isinstance(value, str) or not value.isprintable() or len(value) > ENV_VALUE_MAX:
            raise r.fail(f"{where}.{name}", f"expected a printable string of at most {ENV_VALUE_MAX} characters")
    return tuple(sorted(env.items()))


def _placement(r: _Reader, table: dict[str, Any], where: str, base: PlacementSpec) -> PlacementSpec:
    updates: dict[str, Any] = {}
    if "strategy" in table:
        value = r.get(table, "strategy", f"{where}.strategy", str)
        if value not in {s.value for s in Strategy}:
            raise r.fail(f"{where}.strategy", f"expected spread or pack, got {value!r}")
        updates["strategy"] = Strategy(value)
    if "max_gpus" in table:
        value = r.get(table, "max_gpus", f"{where}.max_gpus", int)
        if not 1 <= value <= 1024:
            raise r.fail(f"{where}.max_gpus", f"must be in 1..1024, got {value}")
        updates["max_gpus"] = value
    if "gpus" in table:
        gpus = r.get(table, "gpus", f"{where}.gpus", list)
        if not gpus or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 1024 for g in gpus):
            raise r.fail(f"{where}.gpus", "expected a non-empty list of GPU indices")
        updates["allowed_gpus"] = tuple(gpus)
    if "no_partial" in table:
        updates["allow_partial"] = not r.get(table, "no_partial", f"{where}.no_partial", bool)
    if "margin" in table:
        updates["margin_bytes"] = _size(r, table, "margin", f"{where}.margin")
    if "calibration" in table:
        updates["calibration"] = r.get(table, "calibration", f"{where}.calibration", bool)
    return replace(base, **updates)


def _expand(r: _Reader, text: str, key: str) -> Path:
    """A path with `~` and `~user` expanded; a user that does not exist is the key's error."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise r.fail(key, f"cannot expand {text.split('/', 1)[0]!r}: no such user") from None


def _size(r: _Reader, table: dict[str, Any], key: str, full: str, limit: int = 2**50) -> int:
    value = table[key]
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UsageError(f"expected a size like \"512MiB\" or a number of bytes, got {value!r}")
        size = value if isinstance(value, int) else parse_size(value, what=full)
    except UsageError as exc:
        raise r.fail(full, str(exc)) from None
    if not 0 <= size <= limit:
        raise r.fail(full, f"out of range: {value!r}")
    return size


def _settings(r: _Reader, table: dict[str, Any], where: str, base: ServerSettings,
              model: bool = False) -> tuple[ServerSettings, tuple[str, ...]]:
    settings = registry.from_config(table, base, r.path.parent, model=model,
                                    fail=lambda key, message: r.fail(f"{where}.{key}", message))
    args = r.get(table, "args", f"{where}.args", list, None)
    if args is not None and not all(isinstance(a, str) for a in args):
        raise r.fail(f"{where}.args", "expected a list of strings")
    if args:
        from llamactl.servers.command import check_extra_args

        try:
            check_extra_args(args, config=True)
        except UsageError as exc:
            raise r.fail(f"{where}.args", str(exc)) from None
    return settings, tuple(args or ())


def _request(r: _Reader, table: dict[str, Any], where: str) -> RequestRules:
    """`[models.NAME.request]`: `defaults` and `force` tables of body fields, `strip` a list of field names."""
    rules = r.get(table, "request", f"{where}.request", dict, {})
    _check_keys(r, rules, {"defaults", "force", "strip"}, f"{where}.request")
    parts: dict[str, Any] = {}
    for key in ("defaults", "force"):
        fields_ = r.get(rules, key, f"{where}.request.{key}", dict, {})
        if "model" in fields_:
            raise r.fail(f"{where}.request.{key}", "may not set the body's model (a variant routes by its name)")
        parts[key] = tuple(fields_.items())
    strip = r.get(rules, "strip", f"{where}.request.strip", list, [])
    if not all(isinstance(k, str) and k and k != "model" for k in strip):
        raise r.fail(f"{where}.request.strip", "expected a list of body field names (not model)")
    return RequestRules(parts["defaults"], parts["force"], tuple(strip))


def _check_keys(r: _Reader, table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            import difflib

            full = f"{where}.{key}" if where else key
            near = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
            raise r.fail(full, f"unknown key; did you mean `{near[0]}`?" if near else
                         f"unknown key (known: {', '.join(sorted(allowed))})")


def _from_seed_json(data: dict[str, Any]) -> dict[str, Any]:
    """Map the seed spec's config.json keys onto ours."""
    out: dict[str, Any] = {k: v for k, v in data.items() if k in _GLOBAL_KEYS - {"models", "defaults"}}
    pool = data.get("server_pool", {})
    if not isinstance(pool, dict):
        raise ConfigError(f"server_pool: expected an object, got {pool!r}")
    if "size" in pool:
        out["max_instances"] = pool["size"]
    if "port_start" in pool:
        out["port_start"] = pool["port_start"]
    defaults: dict[str, Any] = {}
    if "ctx_size" in data:
        defaults["ctx_size"] = data["ctx_size"]
    if "gpu_layers" in data:
        defaults["n_gpu_layers"] = data["gpu_layers"]
    if "cache_type_bits" in data:
        bits = data["cache_type_bits"]
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in _CACHE_BITS:
            raise ConfigError(f"cache_type_bits: expected one of {sorted(_CACHE_BITS)}, got {bits!r}")
        defaults["cache_type_k"] = defaults["cache_type_v"] = _CACHE_BITS[bits]
        if bits < 16:
            defaults["flash_attn"] = "on"  # a quantized V cache needs flash attention
    out["defaults"] = defaults
    out["models"] = {}
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError(f"models: expected an object of models, got {type(models).__name__}")
    for name, model in models.items():
        if not isinstance(model, dict):
            raise ConfigError(f"models.{name}: expected an object, got {model!r}")
        out["models"][name] = {k: v for k, v in model.items() if k in _MODEL_KEYS}
    return out


def _scan_models_dir(directory: Path, base: ServerSettings, args: tuple[str, ...],
                     placement: PlacementSpec, residency: Residency) -> dict[str, ModelConfig]:
    found: dict[str, ModelConfig] = {}
    for path in sorted(directory.glob("*.gguf")):
        stem = path.name[: -len(".gguf")]
        split = _SPLIT_RE.search(stem)
        if split:
            if split[1] != "00001":
                continue  # a split model counts once, by its first shard
            stem = stem[: split.start()]
        name = name_for(Path(stem + ".gguf"))  # a valid instance name, whatever the file is called
        found[name] = ModelConfig(name=name, path=path, settings=base, args=args, placement=placement,
                                  residency=residency)
    return found


MAX_WORKERS = 48  # their devices are numbered from 1000 in blocks of 64, below the state file's 4096
_WORKER_URL_RE = re.compile(r"https?://(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}/?")


def _workers(r: _Reader, tables: dict[str, Any], path: Path) -> tuple[WorkerConfig, ...]:
    """[workers.NAME] tables: `url` (http://HOST:PORT) and `api_key_file` (relative to the config's folder)."""
    from llamactl.gpu.inventory import WORKER_NAME_RE

    if len(tables) > MAX_WORKERS:
        raise r.fail("workers", f"at most {MAX_WORKERS} workers")
    out = []
    for name, table in tables.items():
        where = f"workers.{name}"
        if not isinstance(table, dict):
            raise r.fail(where, "expected a table with url and api_key_file")
        if not WORKER_NAME_RE.fullmatch(name):
            raise r.fail(where, "a worker name is letters, digits, '.', '_' and '-' (at most 64)")
        _check_keys(r, table, {"url", "api_key_file"}, where)
        for key in ("url", "api_key_file"):
            if key not in table:
                raise r.fail(where, f"missing key {key}")
        url = r.get(table, "url", f"{where}.url", str)
        if not _WORKER_URL_RE.fullmatch(url):
            raise r.fail(f"{where}.url", f"expected http://HOST:PORT (the worker's --host and --port), got {url!r}")
        key_file = _expand(r, r.get(table, "api_key_file", f"{where}.api_key_file", str), f"{where}.api_key_file")
        out.append(WorkerConfig(name, url.rstrip("/"), key_file if key_file.is_absolute() else path.parent / key_file))
    return tuple(out)


MAX_UPSTREAMS = 64


def _remote_key(r: _Reader, table: dict[str, Any], where: str) -> str | None:
    """`api_key` (the text) or `api_key_file` (a file holding it, relative to the config's folder), not both."""
    if "api_key" in table and "api_key_file" in table:
        raise r.fail(f"{where}.api_key_file", "give api_key or api_key_file, not both")
    if "api_key" in table:
        key = r.get(table, "api_key", f"{where}.api_key", str)
        where = f"{where}.api_key"
    elif "api_key_file" in table:
        key_path = _expand(r, r.get(table, "api_key_file", f"{where}.api_key_file", str), f"{where}.api_key_file")
        key_path = key_path if key_path.is_absolute() else r.path.parent / key_path
        try:
            key = key_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise r.fail(f"{where}.api_key_file", f"cannot read {key_path}: {getattr(exc, 'strerror', None) or exc}") from None
        where = f"{where}.api_key_file"
    else:
        return None
    if not key or len(key) > 4096 or not key.isprintable() or any(c.isspace() for c in key):
        raise r.fail(where, "expected a non-empty key without spaces or control characters")  # never the key itself
    return key


def _remote(r: _Reader, name: str, table: dict[str, Any], where: str, what: str) -> Remote:
    """A `url` (http://HOST:PORT) with its key; any other key (a llama-server setting) is refused by name."""
    for key in table:
        if key not in _REMOTE_KEYS:
            if what == "model" and key in _MODEL_KEYS:
                raise r.fail(f"{where}.{key}", "a remote model (url) takes no llama-server settings: they belong in "
                                               "its own box's config")
            _check_keys(r, {key: None}, _REMOTE_KEYS, where)
    url = r.get(table, "url", f"{where}.url", str)
    if not _WORKER_URL_RE.fullmatch(url):
        raise r.fail(f"{where}.url", f"expected http://HOST:PORT (a llama-server or a llamactl proxy), got {url!r}")
    return Remote(name, url.rstrip("/"), _remote_key(r, table, where))


def _upstreams(r: _Reader, tables: dict[str, Any]) -> tuple[Remote, ...]:
    if len(tables) > MAX_UPSTREAMS:
        raise r.fail("upstreams", f"at most {MAX_UPSTREAMS} upstreams")
    out = []
    for name, table in tables.items():
        where = f"upstreams.{name}"
        if not isinstance(table, dict) or "url" not in table:
            raise r.fail(where, "expected a table with url (and api_key or api_key_file)")
        if not valid_name(name):
            raise r.fail(where, "an upstream name is letters, digits, '.', '_' and '-' (starting with a letter or "
                                "digit, at most 128)")
        out.append(_remote(r, name, table, where, "upstream"))
    return tuple(out)


def load(path: Path | None, *, required: bool = False) -> Config:
    """Read the config file; a missing default file is an empty config, a missing explicit one an error."""
    if path is None or not path.exists():
        if required and path is not None:
            raise ConfigError(f"{path}: no such config file")
        return Config(source=None)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None
    r = _Reader(path, text)
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # an integer of more than 4300 digits, nesting too deep
        raise ConfigError(f"{path}: invalid {'JSON' if path.suffix == '.json' else 'TOML'}: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    if path.suffix == ".json":
        try:
            data = _from_seed_json(data)
        except ConfigError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise ConfigError(f"{path}: {exc}") from None
    _check_keys(r, data, _GLOBAL_KEYS, "")
    cfg: dict[str, Any] = {"source": path}
    for key, kind in (("server_bin", str), ("host", str), ("adopt", bool), ("instance_api_keys", bool),
                      ("batching", bool)):
        if key in data:
            cfg[key] = r.get(data, key, key, kind)
    for key, low, high in (("port", 1, 65535), ("port_start", 1, 65535), ("max_instances", 1, 1024),
                           ("max_queue", 0, 100_000)):
        if key in data:
            value = r.get(data, key, key, int)
            if not low <= value <= high:
                raise r.fail(key, f"out of range: {value} (allowed: {low}..{high})")
            cfg[key] = value
    machine: dict[str, Any] = {}
    if "gpu_util_threshold" in data:
        value = r.get(data, "gpu_util_threshold", "gpu_util_threshold", int)
        if not 0 <= value <= 100:
            raise r.fail("gpu_util_threshold", f"must be in 0..100 (%), got {value}")
        machine["util_threshold"] = value
    if "gpu_mem_threshold" in data:
        value = r.get(data, "gpu_mem_threshold", "gpu_mem_threshold", (int, float))
        if not 0 < value <= 1:
            raise r.fail("gpu_mem_threshold", f"must be in (0, 1], got {value}")
        machine["mem_threshold"] = float(value)
    if "gpu_overhead" in data:
        machine["gpu_overhead_bytes"] = _size(r, data, "gpu_overhead", "gpu_overhead", limit=2**40)
    if "host_memory" in data:
        machine["host_memory_bytes"] = _size(r, data, "host_memory", "host_memory")
    if "calibration" in data:
        machine["calibration"] = r.get(data, "calibration", "calibration", bool)
    cfg["idle_ttl_s"] = r.duration(data, "idle_ttl", "idle_ttl")
    for key, attr, least in (("poll_interval", "poll_interval_s", 0.1), ("load_timeout", "load_timeout_s", 1.0),
                             ("max_wait", "max_wait_s", 0.1),
                             ("header_timeout", "header_timeout_s", 0.5), ("body_timeout", "body_timeout_s", 0.5)):
        if key in data:
            value = r.duration(data, key, key)
            if not value:
                raise r.fail(key, "must be a positive duration")
            if value < least:
                raise r.fail(key, f"must be at least {least:g} s, got {value:g} s")
            cfg[attr] = value
    if "max_body" in data:
        if isinstance(data["max_body"], bool) or not isinstance(data["max_body"], (int, str)):
            raise r.fail("max_body", f"expected a size like \"64MiB\", got {data['max_body']!r}")
        try:
            size = parse_size(str(data["max_body"]), what="max_body")
        except UsageError as exc:
            raise r.fail("max_body", str(exc)) from None
        if not 1024 <= size <= 16 * 2**30:
            raise r.fail("max_body", f"must be between 1KiB and 16GiB, got {data['max_body']!r}")
        cfg["max_body_bytes"] = size
    keys = r.get(data, "api_keys", "api_keys", list, None)
    if keys is not None:
        if not all(isinstance(k, str) and k and k.isprintable() and not any(c.isspace() for c in k) and len(k) <= 4096
                   for k in keys):
            raise r.fail("api_keys", "expected a list of non-empty keys without spaces or control characters")
        cfg["api_keys"] = tuple(keys)
    for key, what in (("allowed_hosts", "host names like \"gpu-box.lan\" (or \"*\")"),
                      ("allowed_origins", "origins like \"http://localhost:3000\" (or \"*\")")):
        values = r.get(data, key, key, list, None)
        if values is None:
            continue
        if not all(isinstance(v, str) and v and v.isprintable() and not any(c.isspace() for c in v) and len(v) <= 253
                   for v in values):
            raise r.fail(key, f"expected a list of {what}")
        if key == "allowed_origins" and not all(v == "*" or v.startswith(("http://", "https://")) for v in values):
            raise r.fail(key, f"expected a list of {what}: an origin starts with http:// or https://")
        cfg[key] = tuple(values)
    defaults_table = r.get(data, "defaults", "defaults", dict, {})
    _check_keys(r, defaults_table, _SETTING_KEYS, "defaults")
    base, base_args = _settings(r, defaults_table, "defaults", ServerSettings())
    base_placement = _placement(r, defaults_table, "defaults", replace(PlacementSpec(), **machine))
    base_residency = registry.residency_from_config(defaults_table, Residency(),
                                                    lambda key, message: r.fail(f"defaults.{key}", message))
    cfg.update(defaults=base, default_args=base_args, placement=base_placement, residency=base_residency)
    models: dict[str, ModelConfig] = {}
    if "models_dir" in data:
        directory = _expand(r, r.get(data, "models_dir", "models_dir", str), "models_dir")
        if not directory.is_absolute():
            directory = path.parent / directory
        if not directory.is_dir():
            raise r.fail("models_dir", f"{directory} is not a directory")
        cfg["models_dir"] = directory
        models.update(_scan_models_dir(directory, base, base_args, base_placement, base_residency))
    variants: dict[str, Variant] = {}
    remotes: dict[str, Remote] = {}
    for name, table in r.get(data, "models", "models", dict, {}).items():
        where = f"models.{name}"
        if not isinstance(table, dict):
            raise r.fail(where, "expected a table")
        if not valid_name(name):
            raise r.fail(where, "a model name is an instance name: letters, digits, '.', '_' and '-' (starting with "
                                "a letter or digit, at most 128); give other spellings as aliases")
        if "of" in table:  # a variant: another name for a model, with its own request rules
            _check_keys(r, table, {"of", "request"}, where)
            variants[name] = Variant(name, r.get(table, "of", f"{where}.of", str), _request(r, table, where))
            continue
        if "url" in table:  # served by another box: nothing of it runs here
            if "path" in table:
                raise r.fail(f"{where}.url", "give path (a model run here) or url (one served elsewhere), not both")
            remotes[name] = _remote(r, name, table, where, "model")
            models.pop(name, None)  # a file of that name in models_dir is not what it serves
            continue
        _check_keys(r, table, _MODEL_KEYS, where)
        settings, args = _settings(r, table, where, base, model=True)
        placement = _placement(r, table, where, base_placement)
        residency = registry.residency_from_config(table, base_residency,
                                                   lambda key, message: r.fail(f"{where}.{key}", message))
        if "path" in table:
            model_path = _expand(r, r.get(table, "path", f"{where}.path", str), f"{where}.path")
            if not model_path.is_absolute():
                model_path = path.parent / model_path
        elif name in models:
            model_path = models[name].path
        else:
            raise r.fail(where, "missing key path")
        aliases = r.get(table, "aliases", f"{where}.aliases", list, [])
        if not all(isinstance(a, str) and a and len(a) <= 256 for a in aliases):
            raise r.fail(f"{where}.aliases", "expected a list of non-empty names")
        models[name] = ModelConfig(
            name=name, path=model_path, settings=settings, args=args if "args" in table else base_args,
            ttl_s=r.duration(table, "ttl", f"{where}.ttl"), placement=placement, aliases=tuple(aliases),
            residency=residency, env=_env(r, table, f"{where}.env"), request=_request(r, table, where),
        )
    seen: dict[str, str] = {}
    for model in models.values():
        for label in (model.name, *model.aliases):
            if label in seen and seen[label] != model.name:
                raise r.fail(f"models.{model.name}.aliases", f"{label!r} already names model {seen[label]!r}")
            seen[label] = model.name
    for variant in variants.values():
        if variant.of not in models:
            raise r.fail(f"models.{variant.name}.of", f"{variant.of!r} is not a configured model (a variant names one "
                                                      "by its name)")
        if variant.name in seen:
            raise r.fail(f"models.{variant.name}", f"{variant.name!r} already names model {seen[variant.name]!r}")
    for remote in remotes.values():
        if remote.name in seen:
            raise r.fail(f"models.{remote.name}", f"{remote.name!r} already names model {seen[remote.name]!r}")
    cfg["models"] = models
    cfg["variants"] = variants
    cfg["remotes"] = remotes
    cfg["upstreams"] = _upstreams(r, r.get(data, "upstreams", "upstreams", dict, {}))
    cfg["workers"] = _workers(r, r.get(data, "workers", "workers", dict, {}), path)
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in cfg.items() if k in known})
