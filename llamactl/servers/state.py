"""The shared state file: every llama-server llamactl started, versioned, locked, atomic, reconciled.

One JSON file (`state.json` in the state dir) with a lock file beside it. Every
change takes the lock, reads, modifies, writes a temp file, fsyncs and
`os.replace`s it, so a reader (or a CLI killed mid-write) never sees half a
file. Reads are tolerant: a corrupt or unknown-version file is moved aside with
a warning. Every read reconciles with the live processes: a pid that is gone,
or reused by another process (create time differs), makes the instance `dead`;
a llama-server carrying our env tag that was never recorded is adopted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TypedDict

import psutil

from llamactl.errors import LlamactlError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATE_NAME = "state.json"
LOCK_NAME = "state.lock"
INSTANCE_ENV = "LLAMACTL_INSTANCE"  # every child carries its instance name ...
STATE_DIR_ENV = "LLAMACTL_STATE_DIR"  # ... and the state dir that records it
UNSPAWNED_GRACE_S = 120.0  # a reservation with no pid older than this was abandoned


class Status(str, Enum):
    """The closed set of instance states used by the state file, `ps` and the proxy."""

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    DEAD = "dead"
    FAILED = "failed"


LIVE = frozenset({Status.STARTING, Status.READY, Status.BUSY, Status.STOPPING})


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
    started_at: float
    last_used: float
    log_path: str
    started_by: str
    status: str
    activity: int


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
    started_at: float = 0.0
    last_used: float = 0.0
    log_path: str = ""
    started_by: str = "cli"  # cli, proxy, adopted
    status: Status = Status.STARTING
    activity: int = 0  # llama-server's token counters at the last poll: a change means it was used
    host: str = "127.0.0.1"

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def gpu_bytes(self) -> dict[int, int]:
        """Estimated bytes per NVML GPU index."""
        return {gpu: self.estimated_bytes.get(f"GPU{k}", 0) for k, gpu in enumerate(self.gpu_ids)}

    def to_json(self) -> InstanceJSON:
        data = asdict(self)
        data["status"] = self.status.value
        data["argv"] = list(self.argv)
        data["gpu_ids"] = list(self.gpu_ids)
        return InstanceJSON(**data)  # type: ignore[typeddict-item]

    @classmethod
    def from_json(cls, data: InstanceJSON) -> Instance:
        return cls(
            name=str(data["name"]), model=str(data.get("model", "")), port=int(data["port"]),
            pid=data.get("pid"), create_time=data.get("create_time"), argv=tuple(data.get("argv", ())),
            env=dict(data.get("env", {})), gpu_ids=tuple(int(g) for g in data.get("gpu_ids", ())),
            estimated_bytes={str(k): int(v) for k, v in data.get("estimated_bytes", {}).items()},
            started_at=float(data.get("started_at", 0.0)), last_used=float(data.get("last_used", 0.0)),
            log_path=str(data.get("log_path", "")), started_by=str(data.get("started_by", "cli")),
            status=Status(data.get("status", "starting")), activity=int(data.get("activity", 0)),
            host=str(data.get("host", "127.0.0.1")),
        )


class StateError(LlamactlError):
    """The state dir cannot be used (permissions, not a directory)."""


def process_matches(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` runs and is the very process we started (a reused pid has another create time)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def create_time_of(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _flag_value(argv: tuple[str, ...], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


class StateStore:
    """The state file of one state dir."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / STATE_NAME
        self.lock_path = directory / LOCK_NAME
        self.logs_dir = directory / "logs"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot use state dir {self.dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read(self) -> dict[str, Instance]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise StateError(f"{self.path} was written by a newer llamactl (schema {version}, this one reads "
                             f"{SCHEMA_VERSION}); upgrade llamactl or use another --state-dir")
        try:
            if not isinstance(data, dict) or version != SCHEMA_VERSION:
                raise ValueError(f"unknown schema version {version!r}" if isinstance(data, dict) else "not JSON")
            entries = data.get("instances", {})
            if not isinstance(entries, dict):
                raise ValueError("'instances' is not an object")
            return {name: Instance.from_json(entry) for name, entry in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{STATE_NAME}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(self.path, aside)
            log.warning("state file %s was unreadable (%s); moved aside to %s", self.path, exc, aside.name)
            return {}

    def _write(self, instances: dict[str, Instance]) -> None:
        payload = {"version": SCHEMA_VERSION, "instances": {n: i.to_json() for n, i in sorted(instances.items())}}
        tmp = self.path.with_name(f".{STATE_NAME}.{os.getpid()}.tmp")
        # 0600: argv may carry an instance's --api-key
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @contextmanager
    def edit(self) -> Iterator[dict[str, Instance]]:
        """Lock, read and reconcile, let the caller change the mapping, write it back atomically."""
        with self._locked():
            before = self._read()
            instances = reconcile(before, self.dir)
            yield instances
            if instances != before:
                self._write(instances)

    def instances(self) -> dict[str, Instance]:
        """A reconciled snapshot (dead marked, untracked children adopted), persisted."""
        with self.edit() as instances:
            return dict(instances)

    def log_path(self, name: str) -> Path:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        return self.logs_dir / f"{name}.log"


def reconcile(instances: dict[str, Instance], state_dir: Path, now: float | None = None) -> dict[str, Instance]:
    """Mark instances whose process is gone or reused `dead`; adopt tagged children never recorded."""
    now = time.time() if now is None else now
    out: dict[str, Instance] = {}
    for name, inst in instances.items():
        if inst.status in (Status.DEAD, Status.FAILED):
            out[name] = inst
        elif inst.pid is None:
            stale = now - inst.started_at > UNSPAWNED_GRACE_S
            out[name] = replace(inst, status=Status.DEAD) if stale else inst
        elif not process_matches(inst.pid, inst.create_time):
            out[name] = replace(inst, status=Status.DEAD)
        else:
            out[name] = inst
    for proc in _tagged_processes(state_dir):
        name = proc["name"]
        known = out.get(name)
        if known is not None and known.pid == proc["pid"]:
            continue
        if known is not None and known.live and known.pid is not None:
            continue  # a live recorded instance owns the name; the stray is reported by ps via NVML
        argv = tuple(proc["argv"])
        port = _flag_value(argv, "--port")
        out[name] = Instance(
            name=name, model=_flag_value(argv, "--model", "-m") or "", port=int(port) if port and port.isdigit() else 0,
            pid=proc["pid"], create_time=proc["create_time"], argv=argv,
            started_at=proc["create_time"], last_used=proc["create_time"],
            log_path=known.log_path if known else "", started_by="adopted" if known is None else known.started_by,
            status=Status.READY if known is None else (Status.STARTING if known.status is Status.STARTING else Status.READY),
            env=known.env if known else {}, gpu_ids=known.gpu_ids if known else (),
            estimated_bytes=known.estimated_bytes if known else {},
        )
    return out


def _tagged_processes(state_dir: Path) -> list[dict]:
    """Processes whose environment names an instance of this state dir."""
    wanted = str(state_dir.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            name = env.get(INSTANCE_ENV)
            if not name or env.get(STATE_DIR_ENV) != wanted:
                continue
            found.append({"pid": proc.pid, "name": name, "create_time": proc.info["create_time"], "argv": proc.cmdline()})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
