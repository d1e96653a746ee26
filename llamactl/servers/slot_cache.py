"""Prompt caches kept across a stop (`keep_cache`): where a model's saved slots live, which launch they
belong to, how many are kept, and saving and restoring them through the instance's slot API.

llama-server writes a slot's KV cache to a file in its `--slot-save-path` (`POST /slots/ID?action=save`) and
reads it back into a slot (`action=restore`); a request whose prompt shares the restored prefix then
evaluates only the rest. A file is valid only for the same model file and the same settings, so its name
starts with a key of the instance's command line (the port aside) and the model file's size and mtime: a
start with other settings, another binary or a changed file restores nothing, and its files are removed as
stale. A model's files are bounded by `cache_max`, the newest kept. Saving and restoring are bounded in
time, and a failure is the caller's to log: a stop or a start never fails for a cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llamactl.servers import client

CACHE_DIR = "slot-cache"  # in the state dir, one directory per model name
IO_TIMEOUT_S = 10.0  # saving (or restoring) every slot of one instance, in total
_FILE_RE = re.compile(r"^([0-9a-f]{16})-(\d{1,3})\.bin$")


@dataclass(frozen=True)
class Cache:
    """A model's saved slots: its directory and the bound on their bytes."""

    directory: Path
    max_bytes: int


@dataclass(frozen=True)
class Outcome:
    """What one save or restore did: files done, slots that failed (with why), the model's bytes on disk after."""

    files: int = 0
    failures: tuple[str, ...] = ()
    disk_bytes: int = 0


@dataclass(frozen=True)
class CacheFile:
    """A file in a model's cache directory."""

    name: str
    size_bytes: int
    mtime: float


def cache_dir(state_dir: Path, model: str) -> Path:
    return state_dir / CACHE_DIR / model


def launch_key(argv: Sequence[str], model_id: tuple[int, int]) -> str:
    """The same launch: every argument but the port's value (binary, model path, settings, extra args), and the
    model file's (size, mtime_ns). 16 hex digits."""
    kept = [arg for i, arg in enumerate(argv) if not (i > 0 and argv[i - 1] == "--port")]
    text = "\0".join([*kept, f"{model_id[0]}:{model_id[1]}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_name(key: str, slot_id: int) -> str:
    return f"{key}-{slot_id}.bin"


def holding_prompt(slots: object) -> tuple[int, ...]:
    """The ids of the slots in a /slots reply that hold a prompt (a task left its tokens there)."""
    if not isinstance(slots, list):
        return ()
    return tuple(s["id"] for s in slots if isinstance(s, dict) and isinstance(s.get("id"), int)
                 and 0 <= s["id"] < 1000 and isinstance(s.get("n_prompt_tokens"), int) and s["n_prompt_tokens"] > 0)


def saved_slots(files: Sequence[CacheFile], key: str) -> tuple[int, ...]:
    """The slot ids this launch's key has a file for, in order."""
    return tuple(sorted(int(m[2]) for f in files if (m := _FILE_RE.match(f.name)) and m[1] == key))


def to_remove(files: Sequence[CacheFile], key: str, max_bytes: int) -> tuple[str, ...]:
    """Which files go: every file of another launch (stale) or not named as ours, then this launch's oldest
    until the rest fit in `max_bytes`."""
    stale = [f.name for f in files if not ((m := _FILE_RE.match(f.name)) and m[1] == key)]
    mine = sorted((f for f in files if f.name not in stale), key=lambda f: (-f.mtime, f.name))
    kept_bytes, over = 0, []
    for f in mine:
        kept_bytes += f.size_bytes
        if kept_bytes > max_bytes:
            over.append(f.name)
    return tuple(stale + over)


# --- effects: the directory, and the instance's slot API ----------------------------------------------------

def ensure_dir(directory: Path) -> None:
    """The model's cache directory, created 0700 (its parent too); a link or another user's directory is refused
    with OSError, so llama-server never writes through a planted path."""
    for path in (directory.parent, directory):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"{path} is not a directory of this user")


def listing(directory: Path) -> list[CacheFile]:
    """The regular files in the directory (none when it is missing)."""
    out = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            out.append(CacheFile(entry.name, st.st_size, st.st_mtime))
    return out


def prune(cache: Cache, key: str) -> int:
    """Remove stale files and this launch's oldest beyond the bound; the bytes left."""
    files = listing(cache.directory)
    gone = set(to_remove(files, key, cache.max_bytes))
    for name in gone:
        try:
            os.unlink(cache.directory / name)
        except FileNotFoundError:
            pass
    return sum(f.size_bytes for f in files if f.name not in gone)


def model_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def save(base_url: str, api_key: str | None, argv: Sequence[str], model_path: str, cache: Cache,
         timeout_s: float = IO_TIMEOUT_S) -> Outcome:
    """Save every slot that holds a prompt into the cache, within `timeout_s` in all; then bound the files."""
    ident = model_id(model_path)
    if ident is None:
        return Outcome(failures=(f"model file {model_path} is gone",))
    key = launch_key(argv, ident)
    deadline = time.monotonic() + timeout_s
    failures: list[str] = []
    saved = 0
    with client.session(timeout_s) as http:
        slots = client.slots_json(http, base_url, api_key, timeout_s)
        if isinstance(slots, str):
            return Outcome(failures=(slots,), disk_bytes=prune(cache, key))
        for slot_id in holding_prompt(slots):
            left = deadline - time.monotonic()
            if left <= 0:
                failures.append(f"slot {slot_id}: out of time ({timeout_s:g} s)")
                continue
            name = file_name(key, slot_id)
            done = client.slot_file(http, base_url, api_key, slot_id, "save", name, left)
            if isinstance(done, str) or done.tokens == 0:  # half-written, or nothing worth a restore
                _discard(cache.directory / name)
                if isinstance(done, str):
                    failures.append(done)
                continue
            saved += 1
    return Outcome(saved, tuple(failures), prune(cache, key))


def restore(base_url: str, api_key: str | None, argv: Sequence[str], model_path: str, cache: Cache,
            timeout_s: float = IO_TIMEOUT_S) -> Outcome:
    """Remove stale files, then restore this launch's saved slots, within `timeout_s` in all. A file that
    fails is removed (a refused or half-written file would fail again)."""
    ident = model_id(model_path)
    if ident is None:
        return Outcome(failures=(f"model file {model_path} is gone",))
    key = launch_key(argv, ident)
    disk_bytes = prune(cache, key)
    deadline = time.monotonic() + timeout_s
    failures: list[str] = []
    restored = 0
    with client.session(timeout_s) as http:
        for slot_id in saved_slots(listing(cache.directory), key):
            left = deadline - time.monotonic()
            if left <= 0:
                failures.append(f"slot {slot_id}: out of time ({timeout_s:g} s)")
                continue
            done = client.slot_file(http, base_url, api_key, slot_id, "restore", file_name(key, slot_id), left)
            if isinstance(done, str):  # refused, damaged or too slow: the next stop saves the slot afresh
                failures.append(done)
                disk_bytes -= _discard(cache.directory / file_name(key, slot_id))
                continue
            restored += 1
    return Outcome(restored, tuple(failures), disk_bytes)


def _discard(path: Path) -> int:
    """Remove a file; its bytes (0 when there was none)."""
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
        return size
    except FileNotFoundError:
        return 0
