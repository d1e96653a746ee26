"""Find the llama-server binary and learn what it supports, once per binary.

The probe runs `--version` and `--help`, records the flags the help lists and
caches the result keyed by the binary's real path, size and mtime. Decisions
are taken on flags, never on build numbers (the PyPI build says `build 0`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from llamactl import paths
from llamactl.errors import ServerBinaryError

SERVER_ENV = "LLAMA_SERVER"
PROBE_TIMEOUT_S = 20.0
CACHE_VERSION = 1
_FLAG_TOKEN_RE = re.compile(r"^-{1,2}[A-Za-z][A-Za-z0-9-]*$")
_METAVAR_RE = re.compile(r"^(?:[A-Z0-9_.,|<>{}\[\]:=+-]+|\[[^ ]*\]|<[^ ]*>)$")
_VERSION_RE = re.compile(r"version:\s*(.+)")
_BUILD_RE = re.compile(r"built with (.+)")


@dataclass(frozen=True)
class ServerCaps:
    """What one llama-server binary is and supports."""

    path: str
    version: str  # e.g. "0.6.0-dev (build 0, commit unknown)"
    built_with: str | None
    flags: frozenset[str]

    def supports(self, flag: str) -> bool:
        return flag in self.flags

    def require(self, *flags: str) -> None:
        """Refuse a binary that lacks a flag llamactl needs, naming the flag."""
        for flag in flags:
            if flag not in self.flags:
                raise ServerBinaryError(f"{self.path} does not support {flag} (llama-server {self.version}); use a newer build")


def find_server(explicit: str | None = None, configured: str | None = None) -> Path:
    """--server-bin, config `server_bin`, $LLAMA_SERVER, llama-server on PATH, then `llamactl install-server`'s build."""
    for source, value in (("--server-bin", explicit), ("server_bin", configured), (SERVER_ENV, os.environ.get(SERVER_ENV))):
        if value:
            candidate = Path(value).expanduser()
            if not candidate.is_file():
                found = shutil.which(value)
                if not found:
                    raise ServerBinaryError(f"llama-server not found at {value} (from {source})")
                candidate = Path(found)
            if not os.access(candidate, os.X_OK):
                raise ServerBinaryError(f"{candidate} (from {source}) is not executable")
            return candidate
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    from llamactl.servers.install import installed_binary

    built = installed_binary()
    if built is not None:
        return built
    raise ServerBinaryError(
        "llama-server not found: pass --server-bin, set LLAMA_SERVER, put llama-server on PATH, "
        "or run `llamactl install-server`"
    )


def parse_help(text: str) -> frozenset[str]:
    """Every flag named in the help's option lines (short and long spellings).

    An option line starts with flags and metavars (`-kvu,  --kv-unified, -no-kvu, --no-kv-unified`,
    `-ctk,  --cache-type-k TYPE`); the first other word starts the description.
    """
    flags: set[str] = set()
    for line in text.splitlines():
        tokens = line.split()
        if not tokens or not tokens[0].startswith("-"):
            continue
        for token in tokens:
            token = token.rstrip(",")
            if _FLAG_TOKEN_RE.match(token):
                flags.add(token)
            elif not _METAVAR_RE.match(token):
                break
    return frozenset(flags)


def parse_version(text: str) -> tuple[str, str | None]:
    version = _VERSION_RE.search(text)
    built = _BUILD_RE.search(text)
    return (version[1].strip() if version else "unknown", built[1].strip() if built else None)


def _run(binary: Path, arg: str) -> str:
    from llamactl.servers.runner import run_capture

    try:
        code, out, err = run_capture([str(binary), arg], timeout_s=PROBE_TIMEOUT_S,
                                     env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    except TimeoutError:
        raise ServerBinaryError(f"{binary} {arg} did not answer within {PROBE_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise ServerBinaryError(f"{binary} cannot be run: {exc.strerror or exc}") from None
    if code != 0:
        last = (err or out).strip().splitlines()[-1:] or ["no output"]
        raise ServerBinaryError(f"{binary} {arg} failed with exit code {code}: {last[0]}")
    return out + err


def _cache_key(binary: Path) -> str:
    real = binary.resolve()
    stat = real.stat()
    return f"{real}|{stat.st_size}|{stat.st_mtime_ns}"


def probe(binary: Path, *, use_cache: bool = True) -> ServerCaps:
    """Version and flags of `binary`, from the cache when the binary has not changed."""
    cache_file = paths.cache_dir() / "server-probe.json"
    key = _cache_key(binary)
    cache: dict[str, dict[str, object]] = {}
    if use_cache:
        try:
            loaded = json.loads(cache_file.read_text())
            if isinstance(loaded, dict) and loaded.get("version") == CACHE_VERSION:
                cache = loaded.get("binaries", {})
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("flags"), list):
            return ServerCaps(str(binary), str(entry.get("version")), entry.get("built_with"),  # type: ignore[arg-type]
                              frozenset(entry["flags"]))  # type: ignore[arg-type]
    version, built_with = parse_version(_run(binary, "--version"))
    flags = parse_help(_run(binary, "--help"))
    if "--model" not in flags and "-m" not in flags:
        raise ServerBinaryError(f"{binary} does not look like llama-server (its --help lists no --model)")
    caps = ServerCaps(str(binary), version, built_with, flags)
    cache[key] = {"version": version, "built_with": built_with, "flags": sorted(flags)}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "binaries": cache}))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a cache we cannot write only costs a re-probe next time
    return caps


@dataclass(frozen=True)
class Server:
    """The llama-server a door runs: its argv[0], what it supports, and why a current build is assumed
    when none was found (`note`)."""

    binary: str
    caps: ServerCaps
    note: str | None = None

    @property
    def build(self) -> str | None:
        """The build to key calibration by: None when assumed (what any build measured applies)."""
        return None if self.note else self.caps.version


def locate(explicit: str | None = None, configured: str | None = None, *, required: bool = True) -> Server:
    """The binary and its capabilities; where not `required` and none is found (a plan on a CI runner), a
    current llama-server is assumed and the note says so. An explicit --server-bin is always required."""
    from llamactl.errors import LlamactlError
    from llamactl.servers.command import ASSUMED_FLAGS

    try:
        binary = find_server(explicit, configured)
        return Server(str(binary), probe(binary))
    except LlamactlError as exc:
        if required or explicit:
            raise
        return Server("llama-server", ServerCaps("llama-server", "assumed", None, ASSUMED_FLAGS),
                      f"{exc}; the command assumes a current llama-server")
