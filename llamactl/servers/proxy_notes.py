"""What a running proxy leaves in the state dir for local viewers: `proxy-PORT.json`.

`llamactl top` and `ps` read the state file, which knows the instances but not what only their proxy knows:
when an idle one's TTL runs out, requests in flight and queued, what happened to it (launch, ready, evict and
why). The proxy writes that here at each poll (atomically, 0600 — 0660 in a group's dir) and removes it at
exit; `read_all()` gives the notes of every proxy still running.

The file is input like the state file: anyone who can write the dir could plant one. It is opened as a
regular file of ours (`files.open_regular`), read within a size bound, every field typed; a file that fails
any check, or whose proxy is gone (its pid not running since the time written), or that its proxy has not
rewritten for a while, counts as absent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

from llamactl.errors import PlantedFileError
from llamactl.servers import files
from llamactl.views import Event, InstanceView

SCHEMA = 1
PREFIX, SUFFIX = "proxy-", ".json"
MAX_BYTES = 1 << 20  # 200 events and hundreds of models are far below this
MAX_FILES = 16  # proxies on one state dir (one per port) read at most
EVENTS_KEPT = 50
STALE_AFTER_POLLS = 5  # a proxy that has not rewritten its notes in this many polls (at least 30 s) is not believed
MIN_STALE_S = 30.0


class NoteJson(TypedDict):
    pid: int
    ttl_s: float | None
    ttl_deadline: float | None  # epoch; None: no countdown now (requests in flight or queued, or no TTL)
    in_flight: int
    queued: int


class NotesJson(TypedDict):
    schema: int
    pid: int
    create_time: float
    url: str
    at: float
    poll_interval_s: float
    instances: dict[str, NoteJson]
    events: list[dict[str, Any]]


@dataclass(frozen=True)
class Note:
    """One instance as its proxy sees it."""

    pid: int
    ttl_s: float | None
    ttl_deadline: float | None
    in_flight: int
    queued: int

    def ttl_left_s(self, now: float) -> float | None:
        if self.ttl_s is None:
            return None
        return self.ttl_s if self.ttl_deadline is None else max(self.ttl_deadline - now, 0.0)


@dataclass(frozen=True)
class Notes:
    url: str
    at: float
    instances: Mapping[str, Note]
    events: tuple[Event, ...]


def path_for(state_dir: Path, port: int) -> Path:
    return state_dir / f"{PREFIX}{port}{SUFFIX}"


# --- the proxy's side ---------------------------------------------------------------------------------------

def to_json(url: str, pid: int, create_time: float, poll_interval_s: float, instances: tuple[InstanceView, ...],
            events: tuple[Event, ...], now: float) -> NotesJson:
    """The notes of a proxy's snapshot: its running instances (pid known) and its last events."""
    notes: dict[str, NoteJson] = {}
    for inst in instances:
        if inst.pid is None:
            continue
        counting = inst.ttl_left_s is not None and not inst.in_flight and not inst.queued
        notes[inst.name] = {"pid": inst.pid, "ttl_s": inst.ttl_s,
                            "ttl_deadline": now + inst.ttl_left_s if counting else None,  # type: ignore[operator]
                            "in_flight": inst.in_flight or 0, "queued": inst.queued or 0}
    return {"schema": SCHEMA, "pid": pid, "create_time": create_time, "url": url, "at": now,
            "poll_interval_s": poll_interval_s, "instances": notes,
            "events": [e.to_json() for e in events[-EVENTS_KEPT:]]}


def write(path: Path, notes: NotesJson) -> None:
    """Replace the proxy's notes (it is their one writer: one proxy per port); not fsynced, they are live."""
    files.write_atomic(path, json.dumps(notes).encode(), durable=False)


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- the viewer's side --------------------------------------------------------------------------------------

def read_all(state_dir: Path, now: float | None = None) -> list[Notes]:
    """The notes of every proxy still running on this state dir, newest first; none that fail a check."""
    now = time.time() if now is None else now
    try:
        paths = sorted(p for p in state_dir.iterdir() if p.name.startswith(PREFIX) and p.name.endswith(SUFFIX))
    except OSError:
        return []
    found = [n for n in (read(p, now) for p in paths[:MAX_FILES]) if n is not None]
    return sorted(found, key=lambda n: -n.at)


def read(path: Path, now: float) -> Notes | None:
    try:
        fd = files.open_regular(path, os.O_RDONLY)
    except (OSError, PlantedFileError):
        return None
    try:
        if os.fstat(fd).st_size > MAX_BYTES:
            return None
        raw = os.pread(fd, MAX_BYTES + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return parse(json.loads(raw), now)
    except (ValueError, RecursionError):
        return None


def parse(data: object, now: float) -> Notes | None:
    """Typed notes from a file's JSON, or None: not notes, from a proxy that is gone, or stale."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    pid, started, at, poll = data.get("pid"), data.get("create_time"), data.get("at"), data.get("poll_interval_s")
    url, instances, events = data.get("url"), data.get("instances"), data.get("events")
    if not (_int(pid) and pid > 1 and _num(started) and _num(at) and _num(poll) and isinstance(url, str)  # type: ignore[operator]
            and isinstance(instances, dict) and isinstance(events, list)):
        return None
    if now - at > max(STALE_AFTER_POLLS * poll, MIN_STALE_S) or not _running_since(pid, started):  # type: ignore[arg-type,operator]
        return None
    notes = {name: note for name, note in ((n, _note(v)) for n, v in instances.items() if isinstance(n, str))
             if note is not None}
    return Notes(url=url[:200], at=at, instances=notes,  # type: ignore[arg-type]
                 events=tuple(e for e in (_event(v) for v in events[-EVENTS_KEPT:]) if e is not None))


def annotate(view: InstanceView, notes: list[Notes], now: float) -> InstanceView:
    """An instance from the state file with what a running proxy knows of this very process (same name and
    pid): its TTL left, requests in flight and queued."""
    for proxy in notes:
        note = proxy.instances.get(view.name)
        if note is not None and note.pid == view.pid:
            return replace(view, ttl_s=note.ttl_s, ttl_left_s=note.ttl_left_s(now), in_flight=note.in_flight,
                           queued=note.queued)
    return view


def spoken_for(notes: list[Notes]) -> frozenset[str]:
    """Instances whose events a running proxy tells (a local viewer need not guess them from differences)."""
    return frozenset(name for proxy in notes for name in (*proxy.instances, *(e.model for e in proxy.events)))


def _running_since(pid: int, create_time: float) -> bool:
    """The proxy that wrote the file still runs: its pid exists with the start time it wrote (not a reused pid)."""
    from llamactl.servers.procs import create_time_of

    seen = create_time_of(pid)
    return seen is not None and abs(seen - create_time) < 0.01


def _note(value: object) -> Note | None:
    if not isinstance(value, dict):
        return None
    pid, ttl, deadline = value.get("pid"), value.get("ttl_s"), value.get("ttl_deadline")
    in_flight, queued = value.get("in_flight"), value.get("queued")
    if not (_int(pid) and (ttl is None or _num(ttl)) and (deadline is None or _num(deadline))
            and _int(in_flight) and _int(queued)):
        return None
    return Note(pid=pid, ttl_s=ttl, ttl_deadline=deadline, in_flight=max(in_flight, 0), queued=max(queued, 0))  # type: ignore[arg-type]


def _event(value: object) -> Event | None:
    if not isinstance(value, dict) or not _num(value.get("at")):
        return None
    kind, model, detail = value.get("kind"), value.get("model"), value.get("detail", "")
    if not (isinstance(kind, str) and isinstance(model, str) and isinstance(detail, str)):
        return None
    return Event(at=float(value["at"]), kind=kind[:20], model=model[:80], detail=detail[:200])


def _num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 2**40  # finite, sane


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40
