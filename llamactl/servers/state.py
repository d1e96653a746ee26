"""The shared state file: every llama-server llamactl started, versioned, locked, atomic, reconciled.

One JSON file (`state.json` in the state dir) with a lock file beside it. Every
change takes the lock, reads, modifies, writes a temp file, fsyncs and
`os.replace`s it, so a reader (or a CLI killed mid-write) never sees half a
file. Reads are tolerant: a corrupt or unknown-version file is moved aside with
a warning. The file is input: every entry is validated on load (a bad one is
dropped, the original copied aside, with a warning) and no path is read from it.
Reconciling with the live processes: a pid that is gone, or reused (create time
differs), makes the instance `dead`; a pid that runs a process without our env
tag drops the entry (procs.check); a llama-server carrying our tag that was
never recorded is adopted.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import math
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypedDict

import psutil

from llamactl.errors import LlamactlError, PlantedFileError, StateError
from llamactl import lifecycle
from llamactl.lifecycle import LIVE, Status
from llamactl.servers import files, procs
from llamactl.servers.names import check_name, name_for, valid_name
from llamactl.servers.procs import INSTANCE_ENV, STATE_DIR_ENV, Claim, Ownership

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATE_NAME = "state.json"
LOCK_NAME = "state.lock"
UNSPAWNED_GRACE_S = 120.0  # a reservation with no pid older than this was abandoned
MAX_STATE_BYTES = 16 * 1024 * 1024  # far above any real state file; a bigger one is not ours
STARTED_BY = ("cli", "proxy", "adopted", "worker")
KINDS = ("server", "rpc")  # a llama-server, or a worker's ggml-rpc-server (llamactl worker)

__all__ = ["INSTANCE_ENV", "STATE_DIR_ENV", "Instance", "StateStore", "Status", "check_name", "name_for", "valid_name"]




class InstanceJSON(TypedDict, total=False):
    name: str
    model: str
    host: str
    port: int
    pid: int | None
    create_time: float | None
    argv: list[str]
    env: dict[str, str]
    gpu_ids: list[int]
    estimated_bytes: dict[str, int]
    actual_bytes: dict[str, int]
    started_at: float
    last_used: float
    started_by: str
    status: str
    activity: int
    kind: str


@dataclass(frozen=True)
class Instance:
    name: str
    model: str
    port: int
    pid: int | None = None
    create_time: float | None = None
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    gpu_ids: tuple[int, ...] = ()
    estimated_bytes: dict[str, int] = field(default_factory=dict)  # "CPU", "GPU0"… (GPUk = gpu_ids[k])
    actual_bytes: dict[str, int] = field(default_factory=dict)  # the same devices, observed once ready (learn/)
    started_at: float = 0.0
    last_used: float = 0.0
    started_by: str = "cli"  # cli, proxy, adopted
    status: Status = Status.STARTING
    activity: int = 0  # llama-server's token counters at the last poll: a change means it was used
    host: str = "127.0.0.1"
    kind: str = "server"  # "rpc": a worker's ggml-rpc-server, never planned around, polled or evicted for room

    @property
    def serves_http(self) -> bool:
        """A llama-server (polled over HTTP, a seat of the scheduler), not a worker's rpc-server."""
        return self.kind == "server"

    def moved(self, status: Status, **changes: object) -> "Instance":
        """This entry with a new status (checked against the lifecycle's transitions) and other changes."""
        return replace(self, status=lifecycle.check(self.status, status), **changes)  # type: ignore[arg-type]

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def gpu_bytes(self) -> dict[int, int]:
        """Bytes per NVML GPU index: observed once ready, else estimated."""
        return {gpu: self.actual_bytes.get(f"GPU{k}") or self.estimated_bytes.get(f"GPU{k}", 0)
                for k, gpu in enumerate(self.gpu_ids)}

    def claim(self, state_dir: Path) -> Claim:
        """What this entry says about its process, to be checked before anything signals it."""
        return Claim(self.pid, self.create_time, self.name, str(state_dir.resolve()))

    def to_json(self) -> InstanceJSON:
        data = asdict(self)
        data["status"] = self.status.value
        data["argv"] = list(self.argv)
        data["gpu_ids"] = list(self.gpu_ids)
        return InstanceJSON(**data)  # type: ignore[typeddict-item]

    @classmethod
    def from_json(cls, key: str, data: object) -> Instance:
        """A validated entry; ValueError naming the first bad field. The file is input: trust nothing in it."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        if not valid_name(key) or data.get("name") != key:
            raise ValueError("name is not a valid instance name equal to its key")
        pid = data.get("pid")
        create_time = data.get("create_time")
        status = data.get("status", "starting")
        if not isinstance(status, str) or status not in {s.value for s in Status} or status == Status.STOPPED.value:
            raise ValueError(f"unknown status {status!r}")  # (a stopped instance has no entry)
        if pid is None:
            if create_time is not None:
                raise ValueError("create_time without a pid")
        elif not (_is_int(pid) and pid > 1):
            raise ValueError(f"pid {pid!r} is not an integer > 1")
        elif not procs.plausible_create_time(create_time):
            raise ValueError(f"create_time {create_time!r} is not a finite time")
        port = data.get("port")
        if not (_is_int(port) and 0 < port < 65536):
            raise ValueError(f"port {port!r} out of range")
        host = data.get("host", "127.0.0.1")
        try:
            ipaddress.ip_address(host if host != "localhost" else "127.0.0.1")
        except (ValueError, TypeError):
            raise ValueError(f"host {host!r} is not an IP address") from None
        started_by = data.get("started_by", "cli")
        if started_by not in STARTED_BY:
            raise ValueError(f"started_by {started_by!r} unknown")
        argv, env = data.get("argv", []), data.get("env", {})
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise ValueError("argv is not a list of strings")
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise ValueError("env is not a mapping of strings")
        gpu_ids = data.get("gpu_ids", [])
        if not (isinstance(gpu_ids, list) and all(_is_int(g) and 0 <= g < 4096 for g in gpu_ids)):
            raise ValueError("gpu_ids is not a list of GPU indices")
        est = data.get("estimated_bytes", {})
        if not _byte_map(est):
            raise ValueError("estimated_bytes is not a mapping of byte counts")
        actual = data.get("actual_bytes", {})
        if not _byte_map(actual):
            raise ValueError("actual_bytes is not a mapping of byte counts")
        times = {k: data.get(k, 0.0) for k in ("started_at", "last_used")}
        for k, v in times.items():
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} {v!r} is not a finite time")
        activity = data.get("activity", 0)
        if not (_is_int(activity) and activity >= 0):
            raise ValueError(f"activity {activity!r} is not a count")
        model = data.get("model", "")
        if not isinstance(model, str):
            raise ValueError("model is not a string")
        if pid is None and status not in ("starting", "dead", "failed"):
            raise ValueError(f"status {status!r} without a pid")
        kind = data.get("kind", "server")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} unknown")
        return cls(
            name=key, model=model, port=port, pid=pid, create_time=None if pid is None else float(create_time),
            argv=tuple(argv), env=dict(env), gpu_ids=tuple(gpu_ids), estimated_bytes=dict(est), actual_bytes=dict(actual),
            started_at=float(times["started_at"]), last_used=float(times["last_used"]), started_by=started_by,
            status=Status(status), activity=activity, host=host, kind=kind,
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _byte_map(value: object) -> bool:
    """{"CPU" | "GPU<k>": bytes} with at most 65 devices."""
    return (isinstance(value, dict) and len(value) <= 65
            and all(isinstance(k, str) and len(k) <= 8 and _is_int(v) and 0 <= v < 2**62 for k, v in value.items()))


def _flag_value(argv: tuple[str, ...], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


_warned: dict[str, bool] = {}  # state dirs already warned about in this process


class StateStore:
    """The state file of one state dir.

    Files follow the dir: a private dir (the default, created 0700) gets 0600 files; a dir the user made
    group-writable (`install -d -m 2770 -g GROUP DIR`) gets 0660 files of the dir's group, so every
    member can lock and rewrite them, root's cron job included.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / STATE_NAME
        self.lock_path = directory / LOCK_NAME
        self.logs_dir = directory / "logs"
        self._dropped = False  # the last read dropped bad entries: the next edit writes the file back

    def _ensure_dir(self) -> os.stat_result:
        try:
            if not self.dir.exists():
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.dir)
        except OSError as exc:
            raise StateError(f"cannot use state dir {self.dir}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"cannot use state dir {self.dir}: not a directory")
        if st.st_mode & stat.S_IWOTH and not _warned.get(str(self.dir)):
            _warned[str(self.dir)] = True
            log.warning("state dir %s is writable by every user (mode %o): anyone on this machine can plant "
                        "entries and files in it; `chmod o-w` it (a dir shared by a group is group-writable only, "
                        "see docs/operations.md)", self.dir, stat.S_IMODE(st.st_mode))
        return st

    @property
    def shared(self) -> bool:
        """A group-writable state dir: several users share its instances."""
        try:
            return bool(os.stat(self.dir).st_mode & stat.S_IWGRP)
        except OSError:
            return False

    @property
    def file_mode(self) -> int:
        return 0o660 if self.shared else 0o600

    @contextmanager
    def _locked(self) -> Iterator[None]:
        dir_st = self._ensure_dir()
        try:
            try:
                fd = files.open_regular(self.lock_path, os.O_RDWR | os.O_CREAT, self.file_mode)
            except PlantedFileError as exc:  # not a lock of ours: set it aside and take a real one
                self._planted(self.lock_path, exc)
                fd = files.open_regular(self.lock_path, os.O_RDWR | os.O_CREAT, self.file_mode)
        except OSError as exc:
            raise StateError(f"cannot use state dir {self.dir}: {self.lock_path.name}: {exc.strerror or exc}") from None
        try:
            files.share(fd, dir_st)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read(self, *, keep_aside: bool = True) -> dict[str, Instance]:
        """The recorded instances, each validated; bad entries dropped and the file copied aside, with a warning
        (`keep_aside=False`, for lock-free readers: skipped quietly, left for the next writer to handle)."""
        try:
            fd = files.open_regular(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return {}
        except PlantedFileError as exc:
            # a FIFO, link or directory in its place: moved aside like a corrupt file, so ps and evict go on
            if keep_aside:
                self._planted(self.path, exc)
            return {}
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError(f"larger than {MAX_STATE_BYTES // 2**20} MiB")
            data = json.loads(raw.decode("utf-8"))  # NaN/Infinity parse; the entry holding one is dropped
        except (ValueError, RecursionError) as exc:
            if keep_aside:
                self._set_aside(f"unreadable ({_short(exc)})", move=True)
            return {}
        version = data.get("version") if isinstance(data, dict) else None
        if _is_int(version) and version > SCHEMA_VERSION:
            raise StateError(f"{self.path} was written by a newer llamactl (schema {version}, this one reads "
                             f"{SCHEMA_VERSION}); upgrade llamactl or use another --state-dir")
        entries = data.get("instances", {}) if isinstance(data, dict) else None
        if version != SCHEMA_VERSION or not isinstance(entries, dict):
            why = f"unknown schema version {version!r}" if isinstance(data, dict) else "not a JSON object"
            if keep_aside:
                self._set_aside(why if version != SCHEMA_VERSION else "'instances' is not an object", move=True)
            return {}
        good: dict[str, Instance] = {}
        bad: list[str] = []
        for key, entry in entries.items():
            try:
                good[key] = Instance.from_json(key, entry)
            except ValueError as exc:
                bad.append(f"{_printable(key)}: {exc}")
        if bad and keep_aside:
            self._dropped = True
            self._set_aside("bad entries dropped: " + "; ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""),
                            move=False)
        return good

    def _planted(self, path: Path, exc: PlantedFileError) -> None:
        try:
            aside = files.move_aside(path)
        except OSError as err:
            raise StateError(f"{exc}; could not move it aside ({err.strerror or err})") from None
        log.warning("%s: %s, not a regular file; moved aside to %s", path, exc.what, aside.name,
                    extra={"event": "planted_file", "path": str(path), "what": exc.what, "aside": aside.name})

    def _set_aside(self, why: str, *, move: bool) -> None:
        aside = files.aside_name(self.path)
        try:
            if move:
                os.replace(self.path, aside)
            else:
                shutil.copyfile(self.path, aside, follow_symlinks=False)
                os.chmod(aside, 0o600)
        except OSError as exc:
            log.warning("state file %s: %s; could not keep a copy (%s)", self.path, why, exc.strerror or exc)
            return
        log.warning("state file %s: %s; %s moved aside to %s", self.path, _short(why, 400),
                    "the file" if move else "the original", aside.name,
                    extra={"event": "state_file_bad", "path": str(self.path), "reason": _short(why, 400),
                           "aside": aside.name})

    def _write(self, instances: dict[str, Instance]) -> None:
        payload = {"version": SCHEMA_VERSION, "instances": {n: i.to_json() for n, i in sorted(instances.items())}}
        files.write_atomic(self.path, json.dumps(payload, indent=1).encode())  # under the lock: its one writer

    @contextmanager
    def edit(self) -> Iterator[dict[str, Instance]]:
        """Lock, read and reconcile, let the caller change the mapping, write it back atomically."""
        with self._locked():
            self._dropped = False
            before = self._read()
            instances = reconcile(before, self.dir)
            yield instances
            if instances != before or self._dropped:
                try:
                    self._write(instances)
                except OSError as exc:
                    raise StateError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def instances(self) -> dict[str, Instance]:
        """A reconciled view (dead marked, foreign entries dropped, untracked children adopted), persisted.

        For the commands that act on instances (ps, evict, launch, the proxy); it takes the lock and scans
        every process's environment for untracked children, so a view that only looks uses snapshot()."""
        with self.edit() as instances:
            return dict(instances)

    def snapshot(self) -> dict[str, Instance]:
        """The state as it is, without the lock (the file is replaced atomically, so a reader never sees half
        of it): entries validated, each recorded process checked (gone → dead; not ours → left out), nothing
        adopted and nothing written. For plan's accounting and shell completion."""
        try:
            recorded = self._read(keep_aside=False)
        except StateError:
            return {}
        return reconcile(recorded, self.dir, adopt=False, quiet=True)

    def log_path(self, name: str) -> Path:
        """Always derived from a validated name, inside the state dir; never read from the file."""
        return self.logs_dir / f"{check_name(name)}.log"


def _printable(text: str, limit: int = 60) -> str:
    return repr(text[:limit])


def _short(exc: object, limit: int = 160) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def reconcile(instances: dict[str, Instance], state_dir: Path, now: float | None = None, *,
              adopt: bool = True, quiet: bool = False) -> dict[str, Instance]:
    """Mark instances whose process is gone `dead`; drop entries whose pid runs something not ours;
    adopt tagged children never recorded."""
    now = time.time() if now is None else now
    out: dict[str, Instance] = {}
    for name, inst in instances.items():
        if inst.status in (Status.DEAD, Status.FAILED):
            out[name] = inst
        elif inst.pid is None:
            stale = now - inst.started_at > UNSPAWNED_GRACE_S
            out[name] = inst.moved(Status.DEAD) if stale else inst
        else:
            verdict = procs.check(inst.claim(state_dir))
            if verdict.ownership is Ownership.OURS:
                out[name] = inst
            elif verdict.ownership is Ownership.GONE:
                out[name] = inst.moved(Status.DEAD)
            elif not quiet:
                log.warning("state entry %r dropped: %s (not ours, left alone)", name, verdict.reason,
                            extra={"event": "not_ours", "instance": name, "reason": verdict.reason})
    for proc in _tagged_processes(state_dir) if adopt else ():
        name = proc["name"]
        known = out.get(name)
        if known is not None and known.pid == proc["pid"]:
            continue
        if known is not None and known.live and known.pid is not None:
            continue  # a live recorded instance owns the name; the stray is reported by ps via NVML
        argv = tuple(proc["argv"])
        port = _flag_value(argv, "--port")
        out[name] = Instance(
            name=name, model=_flag_value(argv, "--model", "-m") or "",
            port=int(port) if port and port.isdigit() and 0 < int(port) < 65536 else 8080,
            pid=proc["pid"], create_time=proc["create_time"], argv=argv,
            started_at=proc["create_time"], last_used=proc["create_time"],
            started_by="adopted" if known is None else known.started_by,
            status=Status.READY if known is None else (Status.STARTING if known.status is Status.STARTING else Status.READY),
            env=known.env if known else {}, gpu_ids=known.gpu_ids if known else (),
            estimated_bytes=known.estimated_bytes if known else {},
            kind="rpc" if procs.is_rpc_server(argv[0] if argv else "") else "server",
        )
    return out


def _tagged_processes(state_dir: Path) -> list[dict]:
    """Processes whose environment names a valid instance of this state dir (never pid 1 or ourselves)."""
    wanted = str(state_dir.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not procs.plausible_pid(proc.pid):
                continue
            env = proc.environ()
            name = env.get(INSTANCE_ENV)
            if not valid_name(name) or env.get(STATE_DIR_ENV) != wanted or not procs.is_server(proc.exe()):
                continue
            found.append({"pid": proc.pid, "name": name, "create_time": proc.info["create_time"], "argv": proc.cmdline()})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
