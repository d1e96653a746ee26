"""The calibration store and what plans learn from it: fake NVML, the fake server's out-of-memory mode,
concurrent writers, hostile store files. (The real llama-server's side: tests/e2e/test_calibration_real.py.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.estimate import load_params
from llamactl.gpu import inventory, nvml
from llamactl.learn import observe
from llamactl.learn.calibrate import DeviceObservation, Observation
from llamactl.learn.store import MAX_ROWS, CalibrationError, CalibrationStore
from llamactl.model.memory import DEFAULT_GPU_OVERHEAD_BYTES
from llamactl.model.settings import ServerSettings
from llamactl.placement import Fit, PlacementSpec, plan
from llamactl.servers import launcher
from llamactl.servers.buffers import free_port
from llamactl.servers.probe import ServerCaps
from llamactl.units import GiB, MiB
from tests.fakes.fake_pynvml import FakeGpu, make
from tests.fakes.procs import tagged_instances
from tests.fakes.binary import fake_server_binary
from tests.synth import ModelSpec, write_model

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_llama_server.py"
CAPS = ServerCaps("llama-server", "0.0.0-test (build 1)", None, frozenset())


def cuda_log(weights_mib: float, kv_mib: float, compute_mib: float) -> str:
    """llama.cpp's buffer lines for a model wholly on CUDA0, as a CUDA build logs them at -lv 4."""
    return "\n".join([
        f"0.00.100.000 I load_tensors:        CUDA0 model buffer size = {weights_mib:10.2f} MiB",
        "0.00.100.001 I load_tensors:   CPU_Mapped model buffer size =       8.00 MiB",
        "0.00.100.002 I llama_context:  CUDA_Host  output buffer size =       0.49 MiB",
        f"0.00.100.003 I llama_kv_cache:      CUDA0 KV buffer size = {kv_mib:10.2f} MiB",
        f"0.00.100.004 I sched_reserve:      CUDA0 compute buffer size = {compute_mib:10.2f} MiB",
        "0.00.100.005 I sched_reserve:  CUDA_Host compute buffer size =      12.01 MiB",
    ]) + "\n"


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """One fake H200 whose process list is set per launch."""
    card = FakeGpu(used=2 * GiB)
    monkeypatch.setitem(sys.modules, "pynvml", make([card]))
    monkeypatch.setitem(nvml._state, "done", False)
    monkeypatch.setitem(nvml._state, "error", None)
    return card


def _launch_seen(tmp: Path, model: Path, settings: ServerSettings, extra_bytes: int, card: FakeGpu) -> Observation:
    """What launcher.record_ready stores for a launch that NVML saw at logged buffers + `extra_bytes`."""
    inv = inventory.resolve(None, None)
    assert inv.source == "nvml"
    params = load_params(model, settings)
    the_plan = plan(params, settings, inv.usable, PlacementSpec().policy(frozenset({0}), None))
    assert the_plan.fit is Fit.GPU
    req = launcher.LaunchRequest(model=model, name="m", settings=settings, policy=PlacementSpec().policy(frozenset({0}), None))
    ctx = launcher.observation_context(req, params, the_plan, inv, CAPS)
    text = cuda_log(64.0, 32.0, 40.5)
    logged_gpu = round((64.0 + 32.0 + 40.5) * MiB)
    card.pids = [(os.getpid(), logged_gpu + extra_bytes)]
    obs = observe.observe_ready(ctx, text, os.getpid())
    CalibrationStore(tmp).add([obs])
    return obs


def _planned_overhead(tmp: Path, model: Path, settings: ServerSettings) -> tuple[int, tuple[str, ...]]:
    inv = inventory.resolve(None, None)
    params = load_params(model, settings)
    learned = observe.learned_for(tmp, model, params, "CUDA", default_overhead=DEFAULT_GPU_OVERHEAD_BYTES,
                                  honour_overhead=True, nvml_live=True, build=CAPS.version,
                                  gpu_names=[g.name for g in inv.usable])
    the_plan = plan(params, settings, inv.usable, PlacementSpec().policy(frozenset({0}), None, learned=learned))
    assert the_plan.estimate is not None
    return the_plan.estimate.device("GPU0").overhead_bytes, the_plan.estimate.calibration


@pytest.mark.parametrize("extra_mib", [318, 700])
def test_learned_gpu_overhead_converges_to_what_nvml_shows(tmp_path: Path, gpu: FakeGpu, extra_mib: int) -> None:
    model = write_model(tmp_path / "m.gguf", ModelSpec(n_vocab=512))
    seen_at = ServerSettings(ctx_size=2048)
    other = ServerSettings(ctx_size=4096)  # not launched: only the per-GPU overhead can apply to it
    extra = extra_mib * MiB
    overheads = []
    for _ in range(3):
        obs = _launch_seen(tmp_path, model, seen_at, extra, gpu)
        assert obs.driver == "580.65.06" and obs.cuda == "13.0" and obs.device("GPU0").gpu_name == "NVIDIA H200"
        assert obs.device("GPU0").overhead_seen == extra  # NVML minus the logged CUDA0 buffers
        assert obs.device("CPU").logged_total == round((8.0 + 0.49 + 12.01) * MiB)  # CPU_Mapped + CUDA_Host
        overheads.append(_planned_overhead(tmp_path, model, other))
    if extra > DEFAULT_GPU_OVERHEAD_BYTES:  # more than assumed: taken from the first launch
        assert [o for o, _ in overheads] == [extra] * 3
    else:  # less than assumed: only once three launches agree
        assert [o for o, _ in overheads] == [DEFAULT_GPU_OVERHEAD_BYTES] * 2 + [extra]
        assert any("1 of the 3 agreeing launches" in n for n in overheads[0][1]), overheads[0][1]
    assert any("NVIDIA H200, driver 580.65.06" in n for n in overheads[-1][1]), overheads[-1][1]
    # the launched settings themselves: the logged buffers and the overhead NVML showed
    over, notes = _planned_overhead(tmp_path, model, seen_at)
    assert over == extra and any("as llama-server logged at 3 launches" in n for n in notes)


def test_disagreeing_launches_do_not_lower_the_overhead(tmp_path: Path, gpu: FakeGpu) -> None:
    model = write_model(tmp_path / "m.gguf", ModelSpec(n_vocab=512))
    for extra in (150, 300, 220):
        _launch_seen(tmp_path, model, ServerSettings(ctx_size=2048), extra * MiB, gpu)
    over, notes = _planned_overhead(tmp_path, model, ServerSettings(ctx_size=4096))
    assert over == DEFAULT_GPU_OVERHEAD_BYTES and any("disagree" in n for n in notes), notes


def _plain() -> Observation:
    cpu = DeviceObservation("CPU", formula={"weights": MiB}, logged={"weights": MiB})
    return Observation(model_key="k", model_path="/m", arch="llama", backend="CPU", settings_key="s", settings={},
                       partial=False, devices=(cpu,), build="b")


def _writer(args: tuple[str, int, object]) -> int:
    state, n, barrier = args
    store = CalibrationStore(Path(state))
    obs = _plain()
    barrier.wait(60)  # type: ignore[attr-defined]  # all six make their first write to the new file at once
    for i in range(n):
        store.add([replace(obs, at=time.time(), uid=f"{os.getpid()}-{i}")])
    return n


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(6) as pool:
        barrier = manager.Barrier(6)
        written = sum(pool.map(_writer, [(str(tmp_path), 40, barrier)] * 6, chunksize=1))
    store = CalibrationStore(tmp_path)
    assert written == 240 and store.count() == 240
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"


def test_the_first_write_waits_for_another_writer(tmp_path: Path) -> None:
    """SQLite answers the change to WAL at once with "database is locked" (no busy handler) while another
    connection writes the new file; the first write waits for it, as every other write does."""
    other = sqlite3.connect(tmp_path / "calibration.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE theirs (x)")
    done = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    done.start()
    try:
        started = time.monotonic()
        assert CalibrationStore(tmp_path).add([_plain()]) == 1
        assert time.monotonic() - started >= 0.4  # it waited for the other writer
    finally:
        done.join()
        other.close()
    assert CalibrationStore(tmp_path).count() == 1


def test_the_store_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llamactl.learn.store.MAX_ROWS", 50)
    store = CalibrationStore(tmp_path)
    obs = _plain()
    store.add([replace(obs, at=float(i + 1), uid=str(i)) for i in range(120)])
    kept = store.all()
    assert len(kept) == 50 and min(o.at for o in kept) == 71.0  # the oldest went first
    assert MAX_ROWS >= 10_000


def test_a_planted_link_is_refused_and_a_damaged_store_moved_aside(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "calibration.db").symlink_to(target)
    with pytest.raises(CalibrationError, match="not a regular file"):
        CalibrationStore(tmp_path / "state").count()
    assert target.read_text() == "precious"
    (tmp_path / "state" / "calibration.db").unlink()
    (tmp_path / "state" / "calibration.db").write_bytes(b"not a database, just bytes" * 100)
    assert CalibrationStore(tmp_path / "state").count() == 0  # moved aside; the read goes on with no store
    assert list((tmp_path / "state").glob("calibration.db.bad-*"))
    assert CalibrationStore(tmp_path / "state").count() == 0


@pytest.mark.parametrize("kind", ["garbage", "wrong-schema"])
def test_a_damaged_or_foreign_store_is_moved_aside_and_the_command_succeeds(env: "Env", kind: str) -> None:
    import sqlite3

    env.state.mkdir()
    db = env.state / "calibration.db"
    if kind == "garbage":
        db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    else:  # a database of the right user_version with other tables: "no such column" at the first query
        conn = sqlite3.connect(db)
        conn.executescript("CREATE TABLE observations (id INTEGER, other TEXT); PRAGMA user_version = %d;"
                           % __import__("llamactl.learn.store", fromlist=["SCHEMA"]).SCHEMA)
        conn.close()
    out = env.run("calibration", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["models"] == [] and "moved aside" in out.stderr
    assert list(env.state.glob("calibration.db.bad-*"))


def test_an_import_that_would_push_observations_out_is_refused(env: "Env", monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.learn.calibrate import observation_to_row

    store = CalibrationStore(env.state)
    env.state.mkdir(exist_ok=True)
    base = _plain()
    store.add([replace(base, at=1.7e9 + i, uid=f"old{i}") for i in range(5)])
    rows = [observation_to_row(replace(base, at=1.75e9 + i, uid=f"new{i}")) for i in range(MAX_ROWS)]
    rows += [observation_to_row(replace(base, at=at, uid=f"bad{i}")) for i, at in enumerate((1e308, -1e308, 0.0))]
    path = env.tmp / "import.json"
    path.write_text(json.dumps({"format": "llamactl-calibration", "observations": rows}))
    out = env.run("calibration", "import", str(path))
    assert out.returncode == 2, out.stderr
    assert f"importing {MAX_ROWS} new observations would push 5 of the 5" in out.stderr and "--replace" in out.stderr
    assert store.count() == 5  # nothing changed
    out = env.run("calibration", "import", str(path), "--replace")
    assert out.returncode == 0 and "3 invalid skipped" in out.stdout, (out.stdout, out.stderr)
    assert store.count() == MAX_ROWS and not [o for o in store.all() if o.uid.startswith(("old", "bad"))]


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        wrapper = fake_server_binary()  # an executable named llama-server
        self.model = write_model(tmp / "tiny.gguf", ModelSpec(n_vocab=300))
        self.env = {**os.environ, "LLAMACTL_STATE_DIR": str(self.state), "LLAMACTL_CACHE_DIR": str(tmp / "cache"),
                    "LLAMA_SERVER": str(wrapper)}
        self.env.pop("LLAMACTL_GPUS", None)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=90,
                              env=self.env)


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path)
    yield e
    leftovers = tagged_instances(e.state)
    for proc in leftovers:
        proc.kill()
    assert not leftovers


def test_out_of_memory_at_load_retries_once_with_more_room(env: Env) -> None:
    counter = env.tmp / "starts"
    out = env.run("launch", str(env.model), "--name", "m", "--gpus", "24GiB", "--port-start", str(free_port()),
                  "--", "--fake-oom-times", "1", str(counter))
    assert out.returncode == 0, out.stderr
    assert "ran out of memory while loading (-ngl" in out.stderr and "trying once more with 9.00 GiB more room" in out.stderr
    assert counter.read_text() == "2" and "m ready in" in out.stdout
    shown = json.loads(env.run("calibration", "--json").stdout)
    assert [m["out_of_memory"] for m in shown["models"]] == [1]
    # the failure is remembered for these settings: the next plan leaves the room that worked
    planned = json.loads(env.run("plan", str(env.model), "--gpus", "24GiB", "--json").stdout)
    assert any("after 1 out-of-memory failure" in n for n in planned["calibration"]), planned["calibration"]
    assert env.run("evict", "m").returncode == 0


def test_out_of_memory_twice_says_what_was_tried(env: Env) -> None:
    out = env.run("launch", str(env.model), "--name", "m", "--gpus", "24GiB", "--port-start", str(free_port()),
                  "--", "--fake-oom-times", "9", str(env.tmp / "starts"))
    assert out.returncode == 4, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("llamactl: error: m: out of memory while loading, twice; tried -ngl ") and ", then -ngl " in last
    assert "9.50 GiB left free" in last  # the second plan left the shortfall free as well
    assert (env.tmp / "starts").read_text() == "2"  # exactly one retry
    assert json.loads(env.run("ps", "--json").stdout) == []  # no failed entry: the failure is an observation


def test_killed_while_loading_is_out_of_memory_only_when_memory_is_tight(env: Env) -> None:
    # with little room for it (--host-memory), a SIGKILL while loading is taken for the kernel's OOM killer
    out = env.run("launch", str(env.model), "--name", "m", "--gpus", "none", "--host-memory", "100MiB",
                  "--port-start", str(free_port()), "--", "--fake-sigkill-at-load")
    assert out.returncode == 4, out.stderr
    assert "killed by SIGKILL" in out.stderr and "a plan that leaves more room does not fit" in out.stderr
    # with plenty, someone else killed it: a plain failure, nothing learned
    out = env.run("launch", str(env.model), "--name", "m", "--gpus", "none", "--port-start", str(free_port()),
                  "--", "--fake-sigkill-at-load")
    assert out.returncode == 1 and "not for lack of memory" in out.stderr, out.stderr


def test_the_settings_key_names_only_what_was_set_among_optional_settings(tmp_path: Path) -> None:
    from llamactl.learn.calibrate import settings_json
    from llamactl.model.settings import resolve

    model = write_model(tmp_path / "m.gguf", ModelSpec(n_vocab=512))
    plain = settings_json(resolve(ServerSettings(), load_params(model, ServerSettings()), 0))
    assert "n_ctx" in plain and "mmproj" not in plain and "draft_model" not in plain and "lora" not in plain
    overridden = ServerSettings(tensor_overrides=(("ffn", "CPU"),))
    data = settings_json(resolve(overridden, load_params(model, overridden), 0))
    assert data["tensor_overrides"] == [["ffn", "CPU"]]


def test_the_load_log_is_read_once_whole(tmp_path: Path) -> None:
    """llama.cpp logs from a thread of its own: the buffer lines may reach the file just after /health says
    ready. The reader waits for the load's last line rather than learn from half a load."""
    import threading

    log = tmp_path / "m.log"
    log.write_text("garbage before the spawn\n")
    offset = log.stat().st_size
    with open(log, "a") as fh:
        fh.write("load_tensors:   CPU_Mapped model buffer size =    13.01 MiB\n")
    def finish() -> None:
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write("sched_reserve:        CPU compute buffer size =     8.52 MiB\nsrv  llama_server: model loaded\n")
    writer = threading.Thread(target=finish)
    writer.start()
    text = observe.read_loaded_log(log, offset, settle_s=30)
    writer.join()
    assert "garbage" not in text and "compute buffer size" in text and "model loaded" in text
    # a log that never began a load (a fake, another build) is taken at once, as it is
    quiet = tmp_path / "quiet.log"
    quiet.write_text("fake: listening on 1234\n")
    reader = threading.Thread(target=observe.read_loaded_log, args=(quiet, 0, 30))
    reader.start()
    reader.join(10)
    assert not reader.is_alive()
