"""Files in the state dir are opened as files: never through a planted symlink, never blocking on a FIFO,
never a directory or a device, always ours.

Every open goes through `open_regular()`: O_NOFOLLOW | O_NONBLOCK (a FIFO opens at once instead of waiting
for a writer, and is then refused), then fstat on the descriptor itself (no race with a rename): a regular
file owned by this user (or group-writable, in a state dir shared by a group). Anything else raises
PlantedFileError naming the path and what it is. Reads are bounded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time
from pathlib import Path

from llamactl.errors import PlantedFileError


def what_is(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """An fd on the regular file at `path` (created with `mode` when flags say O_CREAT); PlantedFileError for
    a symlink, FIFO, directory, device or another user's file; OSError otherwise (missing, permissions)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PlantedFileError(path, "a symbolic link") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):  # a directory opened for writing; a FIFO with no reader
            raise PlantedFileError(path, what_is(os.lstat(path).st_mode)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PlantedFileError(path, what_is(st.st_mode))
        if st.st_uid != os.geteuid() and not st.st_mode & stat.S_IWGRP:
            raise PlantedFileError(path, f"a file of user {st.st_uid}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_tail(path: Path, max_bytes: int) -> bytes:
    """At most the last `max_bytes` of a regular file."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, max_bytes, max(size - max_bytes, 0))
    finally:
        os.close(fd)


def read_from(path: Path, offset: int, max_bytes: int) -> bytes:
    """At most `max_bytes` of a regular file from `offset`."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        return os.pread(fd, max_bytes, offset)
    finally:
        os.close(fd)


def share(fd: int, dir_st: os.stat_result) -> None:
    """Give a file we created the dir's group and mode 0660 when the dir is group-writable (a state dir shared
    by a group; umask would strip group write)."""
    if not dir_st.st_mode & stat.S_IWGRP:
        return
    try:
        os.fchown(fd, -1, dir_st.st_gid)
        os.fchmod(fd, 0o660)
    except OSError:
        pass


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace the file at `path` with `data` in one step: a temp file beside it (mkstemp: O_EXCL | O_NOFOLLOW,
    a random name, 0600 — nothing planted in the dir can redirect it), shared as the dir is, then os.replace;
    `durable`: fsync the file and the dir. The caller is the file's one writer (under a lock, or the only
    process that writes that name): temp files a killed writer left are removed first."""
    directory = path.parent
    dir_st = os.stat(directory)
    for stale in directory.glob(f".{path.name}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        share(fd, dir_st)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def aside_name(path: Path) -> Path:
    """Where a bad file at `path` is kept: `path.bad-STAMP-PID` beside it."""
    return path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def move_aside(path: Path) -> Path:
    """Rename whatever is at `path` to its aside name (a link is moved, not followed); the new name."""
    aside = aside_name(path)
    os.replace(path, aside)
    return aside
