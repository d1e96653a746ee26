"""The calibration store: observations in SQLite (`calibration.db` in the state dir).

WAL, a busy timeout and one short IMMEDIATE transaction per write, so several CLI processes and a proxy
write at once and lose nothing. Schema versioned with `PRAGMA user_version`; bounded to MAX_ROWS (the
oldest go first). The file is input like the state file: a planted symlink is refused, a file that is not
a database is moved aside with a warning, and a reader that cannot open it plans with the formula.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llamactl.errors import CalibrationError
from llamactl.learn.calibrate import SCHEMA, Observation, observation_from_row, observation_to_row

log = logging.getLogger(__name__)


FILE_NAME = "calibration.db"
MAX_ROWS = 20_000
BUSY_TIMEOUT_S = 30.0

_CREATE = """
CREATE TABLE IF NOT EXISTS observations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    model_key TEXT NOT NULL,
    arch TEXT NOT NULL,
    backend TEXT NOT NULL,
    settings_key TEXT NOT NULL,
    gpu_names TEXT NOT NULL,
    driver TEXT,
    build TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_model ON observations (model_key, id);
CREATE INDEX IF NOT EXISTS observations_arch ON observations (arch, id);
CREATE TABLE IF NOT EXISTS observation_gpus (
    gpu_name TEXT NOT NULL,
    obs_id INTEGER NOT NULL REFERENCES observations (id) ON DELETE CASCADE,
    PRIMARY KEY (gpu_name, obs_id)
) WITHOUT ROWID;
"""


class CalibrationStore:
    def __init__(self, state_dir: Path, *, file_mode: int = 0o600) -> None:
        self.dir = state_dir
        self.path = state_dir / FILE_NAME
        self.file_mode = file_mode

    @contextmanager
    def _connect(self, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        """A connection, or None when there is no store (and `create` is False). A damaged file, or one
        with another schema, is moved aside and (when creating) a new one begun: the command goes on."""
        conn = None
        for attempt in range(2):
            conn = self._open(create=create)
            if conn is None:
                break
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                self._prepare(conn)
                break
            except sqlite3.DatabaseError as exc:
                conn.close()
                conn = None
                if attempt == 0 and _damaged(exc):
                    self._set_aside(exc)
                    continue
                raise CalibrationError(f"calibration store {self.path}: {exc}") from None
        if conn is None:
            yield None
            return
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            if _damaged(exc):
                self._set_aside(exc)
                raise CalibrationError(f"calibration store damaged ({exc}); moved aside") from None
            raise CalibrationError(f"calibration store {self.path}: {exc}") from None
        finally:
            conn.close()

    def _open(self, *, create: bool) -> sqlite3.Connection | None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            if not create:
                return None
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:  # created here, with our mode and never through a planted link
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 self.file_mode))
            except FileExistsError:
                pass
            st = os.lstat(self.path)
        if not stat.S_ISREG(st.st_mode):
            from llamactl.servers.files import what_is

            raise CalibrationError(f"{self.path}: {what_is(st.st_mode)}, not a regular file; calibration not used")
        return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)

    def _set_aside(self, exc: BaseException) -> None:
        from llamactl.servers import files

        try:
            aside = files.move_aside(self.path)
        except FileNotFoundError:
            return  # another llamactl moved it first
        except OSError as err:
            raise CalibrationError(f"calibration store {self.path}: {exc}; could not move it aside ({err})") from None
        log.warning("%s was not a usable calibration store (%s); moved aside to %s, starting afresh",
                    self.path, exc, aside.name)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Create the schema on a new file. SQLite answers a journal-mode change that meets another writer
        with "database is locked" at once, without its busy handler, so two first writers racing here retry
        (with a random pause) until BUSY_TIMEOUT_S, as the busy timeout does everywhere else."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == SCHEMA:
                    have = {row[1] for row in conn.execute("PRAGMA table_info(observations)")}
                    if have != _COLUMNS:  # the right number, the wrong tables: someone else's database
                        raise sqlite3.DatabaseError(f"wrong schema (observations has {sorted(have) or 'no columns'})")
                    return
                if version > SCHEMA:
                    raise CalibrationError(f"{self.path} has schema {version}, newer than this llamactl ({SCHEMA}); "
                                           "upgrade llamactl")
                conn.execute("PRAGMA journal_mode = WAL")  # kept by the file from now on
                conn.executescript(_CREATE)  # idempotent: two first writers both succeed
                conn.execute(f"PRAGMA user_version = {SCHEMA}")
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not _busy(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def add(self, observations: Iterable[Observation]) -> int:
        """Insert observations (a uid already present is skipped); returns how many were new."""
        rows = []
        for o in observations:
            body = observation_to_row(o)
            uid = o.uid or uuid.uuid4().hex
            body["uid"] = uid
            rows.append((uid, o.at or time.time(), o.outcome, o.model_key, o.arch, o.backend, o.settings_key,
                         json.dumps(list(o.gpu_names)), o.driver, o.build, json.dumps(body, separators=(",", ":"))))
        if not rows:
            return 0
        with self._connect(create=True) as conn:
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                added = 0
                for row in rows:
                    cur = conn.execute("INSERT OR IGNORE INTO observations (uid, at, outcome, model_key, arch, backend, "
                                       "settings_key, gpu_names, driver, build, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
                    if cur.rowcount:
                        added += 1
                        conn.executemany("INSERT OR IGNORE INTO observation_gpus (gpu_name, obs_id) VALUES (?, ?)",
                                         [(name, cur.lastrowid) for name in set(json.loads(row[7])) if name])
                horizon = conn.execute("SELECT MAX(id) FROM observations").fetchone()[0] - MAX_ROWS
                conn.execute("DELETE FROM observation_gpus WHERE obs_id <= ?", (horizon,))
                conn.execute("DELETE FROM observations WHERE id <= ?", (horizon,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return added

    def relevant(self, model_key: str, arch: str, gpu_names: Iterable[str] = ()) -> list[Observation]:
        """What bears on one model, newest first: its own launches (up to 500), its architecture's (the
        newest 200: compute corrections) and those on these GPU models (the newest 200: their overhead).
        Each kind uses only its newest RECENT, so the rest is not read: a plan stays fast on a full store."""
        with self._connect(create=False) as conn:
            if conn is None:
                return []
            ids = {i for (i,) in conn.execute("SELECT id FROM observations WHERE model_key = ? ORDER BY id DESC LIMIT 500",
                                              (model_key,))}
            ids |= {i for (i,) in conn.execute("SELECT id FROM observations WHERE arch = ? ORDER BY id DESC LIMIT 200",
                                               (arch,))}
            for name in sorted(set(gpu_names)):
                ids |= {i for (i,) in conn.execute("SELECT obs_id FROM observation_gpus WHERE gpu_name = ? "
                                                   "ORDER BY obs_id DESC LIMIT 200", (name,))}
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return self._select(f"SELECT body FROM observations WHERE id IN ({marks}) ORDER BY id DESC", tuple(sorted(ids)))

    def all(self) -> list[Observation]:
        return self._select("SELECT body FROM observations ORDER BY id", ())

    def _select(self, sql: str, args: tuple[object, ...]) -> list[Observation]:
        with self._connect(create=False) as conn:
            if conn is None:
                return []
            out = []
            for (body,) in conn.execute(sql, args):
                try:
                    out.append(observation_from_row(json.loads(body)))
                except (ValueError, TypeError) as exc:
                    log.debug("calibration row skipped: %s", exc)
            return out

    def new_among(self, uids: Iterable[str]) -> int:
        """How many of these uids the store does not hold yet."""
        wanted = list(dict.fromkeys(uids))
        with self._connect(create=False) as conn:
            if conn is None:
                return len(wanted)
            held = 0
            for i in range(0, len(wanted), 500):
                part = wanted[i:i + 500]
                held += conn.execute(f"SELECT COUNT(*) FROM observations WHERE uid IN ({','.join('?' * len(part))})",
                                     part).fetchone()[0]
            return len(wanted) - held

    def count(self) -> int:
        with self._connect(create=False) as conn:
            return 0 if conn is None else int(conn.execute("SELECT COUNT(*) FROM observations").fetchone()[0])

    def reset(self, *, model_key: str | None = None) -> int:
        """Delete every observation (or one model's); returns how many."""
        with self._connect(create=False) as conn:
            if conn is None:
                return 0
            conn.execute("BEGIN IMMEDIATE")
            if model_key is None:
                cur = conn.execute("DELETE FROM observations")
            else:
                cur = conn.execute("DELETE FROM observations WHERE model_key = ?", (model_key,))
            conn.execute("COMMIT")
            return cur.rowcount


_COLUMNS = {"id", "uid", "at", "outcome", "model_key", "arch", "backend", "settings_key", "gpu_names", "driver",
            "build", "body"}
_DAMAGE = ("not a database", "malformed", "wrong schema", "no such table", "no such column", "file is not")


def _damaged(exc: BaseException) -> bool:
    return any(words in str(exc) for words in _DAMAGE)


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY, in any of its extended forms ("database is locked")."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY
