"""keep_cache's pure parts: which launch a saved file belongs to, which slots hold a prompt, which files go;
and the cache directory refusing a planted path. Saving and restoring against the real llama-server:
tests/e2e/test_prompt_cache_real.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamactl.servers.slot_cache import CacheFile, ensure_dir, file_name, holding_prompt, launch_key, saved_slots, to_remove

ARGV = ("llama-server", "--model", "/m/a.gguf", "--host", "127.0.0.1", "--port", "8200", "--ctx-size", "4096")
MODEL = (1000, 17)


@pytest.mark.parametrize(("argv", "model", "same"), [
    (("llama-server", "--model", "/m/a.gguf", "--host", "127.0.0.1", "--port", "8311", "--ctx-size", "4096"), MODEL, True),
    (("llama-server", "--model", "/m/a.gguf", "--host", "127.0.0.1", "--port", "8200", "--ctx-size", "8192"), MODEL, False),
    (("llama-server", "--model", "/m/b.gguf", "--host", "127.0.0.1", "--port", "8200", "--ctx-size", "4096"), MODEL, False),
    (("/other/llama-server", "--model", "/m/a.gguf", "--host", "127.0.0.1", "--port", "8200", "--ctx-size", "4096"), MODEL, False),
    (ARGV, (1000, 18), False),  # the file was replaced
    (ARGV, (1001, 17), False),
])
def test_the_launch_key_ignores_the_port_only(argv, model, same: bool) -> None:
    assert (launch_key(argv, model) == launch_key(ARGV, MODEL)) is same


@pytest.mark.parametrize(("reply", "want"), [
    ([{"id": 0, "n_ctx": 1024}, {"id": 1, "id_task": 3, "n_prompt_tokens": 664}], (1,)),
    ([{"id": 0, "n_prompt_tokens": 0}, {"id": 2, "n_prompt_tokens": 5}, {"id": 3, "n_prompt_tokens": 9}], (2, 3)),
    ([{"id": "0", "n_prompt_tokens": 9}, {"id": -1, "n_prompt_tokens": 9}, {"id": 4, "n_prompt_tokens": "9"}], ()),
    ({"error": {"message": "Invalid API Key"}}, ()),
    (None, ()),
])
def test_slots_holding_a_prompt(reply, want) -> None:
    assert holding_prompt(reply) == want


KEY, OLD = "0123456789abcdef", "fedcba9876543210"


def files(*spec: tuple[str, int, float]) -> list[CacheFile]:
    return [CacheFile(name, size, mtime) for name, size, mtime in spec]


@pytest.mark.parametrize(("listing", "max_bytes", "gone"), [
    (files((file_name(KEY, 0), 100, 1.0), (file_name(KEY, 1), 100, 2.0)), 1000, ()),
    (files((file_name(OLD, 0), 100, 5.0), (file_name(KEY, 0), 100, 1.0)), 1000, (file_name(OLD, 0),)),  # stale
    (files((file_name(KEY, 0), 600, 1.0), (file_name(KEY, 1), 600, 2.0)), 1000, (file_name(KEY, 0),)),  # oldest
    (files((file_name(KEY, 0), 600, 1.0), (file_name(KEY, 1), 600, 2.0), (file_name(KEY, 2), 100, 3.0)), 800,
     (file_name(KEY, 0),)),  # newest kept within the bound: 2 and 1 take 700
    (files((file_name(KEY, 0), 2000, 1.0),), 1000, (file_name(KEY, 0),)),  # larger than the bound alone
    (files(("notes.txt", 1, 1.0), (f"{KEY}-0.bin.tmp", 1, 1.0)), 1000, ("notes.txt", f"{KEY}-0.bin.tmp")),
])
def test_stale_files_go_and_the_newest_are_kept_within_the_bound(listing, max_bytes: int, gone) -> None:
    assert set(to_remove(listing, KEY, max_bytes)) == set(gone)


def test_only_this_launch_s_files_are_restored() -> None:
    listing = files((file_name(KEY, 3), 1, 1.0), (file_name(OLD, 0), 1, 1.0), (file_name(KEY, 0), 1, 1.0), ("x", 1, 1.0))
    assert saved_slots(listing, KEY) == (0, 3)


def test_the_cache_directory_is_private_and_never_a_planted_link(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "slot-cache" / "demo"
    (tmp_path / "state").mkdir()
    ensure_dir(directory)
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.stat(directory.parent).st_mode & 0o777 == 0o700
    ensure_dir(directory)  # again: it is there already
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (directory.parent / "planted").symlink_to(elsewhere)
    with pytest.raises(OSError, match="not a directory of this user"):
        ensure_dir(directory.parent / "planted")
