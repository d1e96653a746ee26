"""Property tests of the state file loader: `StateStore.snapshot()` / `.instances()` and `Instance.from_json`.

Contract: whatever state.json holds (random bytes, random JSON, entries with random field types and names),
reading it raises nothing but a LlamactlError (StateError: a state file from a newer llamactl), and no byte of
it is lost: snapshot() changes nothing on disk; instances() keeps the file, or moves it aside whole
(unreadable / not our schema), or copies it aside before dropping bad entries (state.json.bad-*), and every
valid entry survives the rewrite.

Only snapshot() and instances() are called (never evict/stop), every state dir is a fresh temporary one, and
the pids of the valid entries are pids that do not exist, so reconciling has nothing to adopt or to signal.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
from pathlib import Path

import psutil
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llamactl.servers.names import NAME_RE
from llamactl.servers.state import LOCK_NAME, SCHEMA_VERSION, STATE_NAME, Instance, StateError, StateStore
from tests.property.contract import (KNOWN, STATE_UNHASHABLE_STATUS, counted, examples, one_line, outcome,
                                     tolerate)

_base = Path(tempfile.mkdtemp(prefix="llamactl-state-props-"))
atexit.register(shutil.rmtree, _base, ignore_errors=True)

# --- strategies -------------------------------------------------------------------------------------------

text = st.text(max_size=10)
json_scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from([2**62, 2**64, -(2**63), 10**30])
                | st.floats() | text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=8)
names = st.from_regex(NAME_RE, fullmatch=True)
hostile_names = names | st.sampled_from(["", "../../etc", ".hidden", "a/b", "x" * 129, "sp ace", "-x", "é"]) | text


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 2**22


# pids no process has: above the kernel's pid_max when it is below llamactl's bound (2**22), else unused ones
absent_pids = (st.integers(_pid_max() + 1, 2**22) if _pid_max() < 2**22
               else st.integers(2**21, 2**22).filter(lambda pid: not psutil.pid_exists(pid)))
times = st.floats(0, 2e9) | st.integers(0, 2**31)
FIELDS = ["name", "model", "host", "port", "pid", "create_time", "argv", "env", "gpu_ids", "estimated_bytes",
          "actual_bytes", "started_at", "last_used", "started_by", "status", "activity"]


@st.composite
def valid_entries(draw, name: str) -> dict:
    """An entry from_json accepts and reconcile keeps (its pid, if any, does not exist: it is marked dead)."""
    pid = draw(st.none() | absent_pids)
    statuses = ["starting", "dead", "failed"] if pid is None else ["starting", "ready", "busy", "stopping", "dead", "failed"]
    entry = {"name": name, "model": draw(text), "port": draw(st.integers(1, 65535)), "pid": pid,
             "create_time": None if pid is None else draw(st.floats(1e-3, 2e9) | st.integers(1, 2**31)),
             "status": draw(st.sampled_from(statuses))}
    optional = {"host": st.sampled_from(["127.0.0.1", "::1", "localhost", "10.1.2.3", "0.0.0.0"]),
                "argv": st.lists(text, max_size=3), "env": st.dictionaries(text, text, max_size=2),
                "gpu_ids": st.lists(st.integers(0, 4095), max_size=3),
                "estimated_bytes": st.dictionaries(st.sampled_from(["CPU", "GPU0", "GPU1"]), st.integers(0, 2**62 - 1),
                                                   max_size=3),
                "started_at": times, "last_used": times, "started_by": st.sampled_from(["cli", "proxy", "adopted"]),
                "activity": st.integers(0, 2**40)}
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        entry[key] = draw(optional[key])
    return entry


@st.composite
def mutated_entries(draw, name: str) -> object:
    """A valid entry with 1..3 fields replaced by random JSON, deleted, or added; or any JSON value at all."""
    if draw(st.integers(0, 9)) == 5:
        return draw(json_values)
    entry = draw(valid_entries(name))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS) | text)
        if draw(st.booleans()) and key in entry:
            del entry[key]
        else:
            entry[key] = draw(json_values)
    return entry


@st.composite
def state_documents(draw) -> tuple[bytes, set[str], set[str]]:
    """(file bytes, names of pristine valid entries, names of mutated entries) of a version-1 state file."""
    pristine = draw(st.lists(names, unique=True, max_size=3))
    mutated = draw(st.lists(hostile_names.filter(lambda n: n not in pristine), unique=True, max_size=4))
    instances: dict[str, object] = {name: draw(valid_entries(name)) for name in pristine}
    for name in mutated:
        instances[name] = draw(mutated_entries(name))
    order = draw(st.permutations(sorted(instances)))
    doc = {"version": SCHEMA_VERSION, "instances": {k: instances[k] for k in order}}
    for key in draw(st.lists(text, max_size=1)):
        doc.setdefault(key, draw(json_values))  # unknown top-level keys are tolerated
    return json.dumps(doc, indent=draw(st.sampled_from([None, 1]))).encode(), set(pristine), set(mutated)


def hostile_files() -> st.SearchStrategy[bytes]:
    """Files that are not a version-1 state: random bytes, random JSON, other versions, a cut or flipped file."""
    def cut(data: bytes, at: int) -> bytes:
        return data[: at % (len(data) + 1)]

    def flip(data: bytes, at: int, bit: int) -> bytes:
        if not data:
            return data
        buf = bytearray(data)
        buf[at % len(buf)] ^= 1 << bit
        return bytes(buf)

    documents = state_documents().map(lambda d: d[0])
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda v, i: json.dumps({"version": v, "instances": i}).encode(),
                  json_values | st.sampled_from([0, 2, 99, 1.0, True, "1"]), json_values),
        st.builds(cut, documents, st.integers(0, 2**16)),
        st.builds(flip, documents, st.integers(0, 2**16), st.integers(0, 7)),
        st.just(b'{"version": 1, "instances": ' * 5000 + b"{}" + b"}" * 5000),  # deeper than json's recursion limit
        st.just(b'{"version": 1, "instances": {"a": {"port": ' + b"9" * 5000 + b"}}}"),  # past int()'s digit limit
    )


# --- helpers ----------------------------------------------------------------------------------------------

class Dir:
    """A fresh state dir for one example, removed after it."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(dir=_base))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def files(directory: Path) -> dict[str, bytes]:
    """Every file in the state dir but the lock file (instances() creates it, empty)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != LOCK_NAME}


def asides(directory: Path) -> list[bytes]:
    return [data for name, data in files(directory).items() if name.startswith(f"{STATE_NAME}.bad-")]


def parse(data: bytes) -> object:
    """What _read sees, or a marker for a file it cannot parse."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return ValueError


def accepted(key: str, entry: object) -> bool | object:
    try:
        Instance.from_json(key, entry)
    except ValueError:
        return False
    except TypeError as exc:
        return KNOWN if STATE_UNHASHABLE_STATUS.matches(exc) else exc
    return True


def check_snapshot(directory: Path, data: bytes) -> dict | object:
    """snapshot() under the contract: never raises (a newer-schema file reads as empty) and writes nothing."""
    result = outcome(lambda: StateStore(directory).snapshot(), expect=(), known=(STATE_UNHASHABLE_STATUS,))
    assert files(directory) == {STATE_NAME: data}  # nothing moved, copied, created or rewritten
    return result


def check_instances(directory: Path, data: bytes, pristine: set[str] = frozenset()) -> None:
    """instances() under the contract (see the module doc); `pristine` entries must survive."""
    store = StateStore(directory)
    result = outcome(store.instances, expect=StateError, known=(STATE_UNHASHABLE_STATUS,))
    if result is KNOWN:
        assert files(directory) == {STATE_NAME: data}  # the crash at least leaves the file as it was
        return
    after = files(directory)
    doc = parse(data)
    version = doc.get("version") if isinstance(doc, dict) else None
    if isinstance(result, StateError):  # only for a file of a newer schema, which is left alone
        assert isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION, str(result)
        assert after == {STATE_NAME: data} and one_line(str(result))
        event("instances: StateError (newer schema)")
        return
    assert isinstance(result, dict)
    entries = doc.get("instances", {}) if isinstance(doc, dict) else None  # no "instances": an empty state
    if doc is ValueError or version != SCHEMA_VERSION or not isinstance(entries, dict):
        # unreadable or not our schema: the whole file moved aside, byte for byte, and nothing in its place
        assert result == {} and STATE_NAME not in after and asides(directory) == [data], sorted(after)
        event("instances: file moved aside")
        return
    verdicts = {key: accepted(key, entry) for key, entry in entries.items()}
    assert not [v for v in verdicts.values() if isinstance(v, BaseException)], verdicts
    good = {key for key, ok in verdicts.items() if ok is True}
    assert pristine <= good  # (the generator's own check: what it calls valid is valid)
    assert pristine <= set(result) <= good, (sorted(pristine), sorted(result), sorted(good))
    if len(good) < len(entries):  # bad entries dropped: the original copied aside first, the rest written back
        assert asides(directory) == [data]
        written = json.loads(after[STATE_NAME])
        assert set(written["instances"]) == set(result)
        event("instances: bad entries dropped, original copied aside")
    else:
        assert asides(directory) == []
        kept = after[STATE_NAME] == data
        assert kept or set(json.loads(after[STATE_NAME])["instances"]) == set(result)
        event("instances: all entries valid")


# --- properties -------------------------------------------------------------------------------------------

@settings(max_examples=examples(150))
@given(state_documents())
@counted
def test_random_entries_read_without_error_and_valid_ones_survive(case: tuple[bytes, set[str], set[str]]) -> None:
    data, pristine, mutated = case
    with Dir() as directory:
        (directory / STATE_NAME).write_bytes(data)
        seen = check_snapshot(directory, data)
        if seen is not KNOWN:
            assert pristine <= set(seen) <= pristine | mutated
        check_instances(directory, data, pristine)


@settings(max_examples=examples(150))
@given(hostile_files())
@counted
def test_hostile_files_read_without_error_and_are_kept(data: bytes) -> None:
    with Dir() as directory:
        (directory / STATE_NAME).write_bytes(data)
        check_snapshot(directory, data)
        check_instances(directory, data)


@settings(max_examples=examples(300))
@given(hostile_names, mutated_entries("x") | valid_entries("x") | json_values)
@counted
def test_from_json_accepts_or_raises_value_error(key: str, entry: object) -> None:
    """The validator alone: an Instance whose fields are sound, or ValueError (what _read catches)."""
    if isinstance(entry, dict) and entry.get("name") == "x":
        entry = {**entry, "name": key}
    try:
        inst = Instance.from_json(key, entry)
    except ValueError as exc:
        assert one_line(str(exc)), repr(str(exc))
        return
    except TypeError as exc:
        if STATE_UNHASHABLE_STATUS.matches(exc) and tolerate(STATE_UNHASHABLE_STATUS):
            return
        raise
    assert NAME_RE.fullmatch(inst.name) and 0 < inst.port < 65536
    assert inst.pid is None or (inst.pid > 1 and inst.create_time is not None and math.isfinite(inst.create_time))
    assert all(math.isfinite(t) and t >= 0 for t in (inst.started_at, inst.last_used))
    assert Instance.from_json(key, json.loads(json.dumps(inst.to_json()))) == inst  # what _write writes reads back


# --- regression: the bug these tests found, fixed ---------------------------

def test_regression_state_unhashable_status(tmp_path: Path) -> None:
    (tmp_path / STATE_NAME).write_text(json.dumps({"version": 1, "instances": {
        "a": {"name": "a", "port": 9000, "status": []}}}))
    assert StateStore(tmp_path).snapshot() == {}
    assert StateStore(tmp_path).instances() == {}
    assert len(asides(tmp_path)) == 1
