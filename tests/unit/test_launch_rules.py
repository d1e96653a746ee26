"""The launcher's decisions (launch_rules.py) as tables, and launch() driven through them with fake effects:
the name already live (--replace), out of memory while loading (retry once with more room), a wait for
readiness that failed or was interrupted. No processes: every effect is a fake that records what it was asked."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.errors import (ExitedEarly, KilledWhileLoading, LaunchError, LaunchInterrupted, NameTaken, NotReadyInTime,
                             OutOfMemoryAtLoad, StateError)
from llamactl.gpu.inventory import parse_gpus_spec
from llamactl.learn import observe
from llamactl.model.settings import ServerSettings
from tests.synth import ModelSpec, write_model
from llamactl.placement import Policy
from llamactl.servers import launch_rules, launcher
from llamactl.servers.launch_rules import Answer, Entry, OnName
from llamactl.servers.probe import ServerCaps
from llamactl.servers.state import Instance, StateStore, Status

PID = 4242


def inst(status: Status = Status.READY, pid: int = PID) -> Instance:
    return Instance(name="m", model="/m.gguf", port=9100, pid=pid, create_time=1.0, status=status)


# --- the name already live ------------------------------------------------------------------------

@pytest.mark.parametrize("existing, free, replace_existing, want", [
    (None, True, False, OnName.START),
    (inst(), True, False, OnName.START),  # an entry the scheduler does not count (not live)
    (inst(), False, True, OnName.REPLACE),
    (inst(Status.STARTING), False, True, OnName.REPLACE),
    (inst(), False, False, NameTaken),
    (inst(Status.STOPPING), False, False, NameTaken),
])
def test_on_name(existing, free, replace_existing, want) -> None:
    if want is NameTaken:
        with pytest.raises(NameTaken, match=r"'m' is already .* use --replace"):
            launch_rules.on_name("m", existing, free, replace_existing)
    else:
        assert launch_rules.on_name("m", existing, free, replace_existing) is want


# --- out of memory while loading ------------------------------------------------------------------

OOM = OutOfMemoryAtLoad("llama-server exited with code 1 (out of memory while loading)", "tail")
KILLED = KilledWhileLoading(3.0, "tail")


@pytest.mark.parametrize("exc, host_tight, tried, learn, retry, error, says", [
    (OOM, False, ("A",), True, True, None, None),
    (OOM, True, ("A",), True, True, None, None),
    (OOM, False, ("A", "B"), True, False, OutOfMemoryAtLoad, "m: out of memory while loading, twice; tried A, then B"),
    (KILLED, True, ("A",), True, True, None, None),  # little room: the OOM killer, most likely
    (KILLED, True, ("A", "B"), True, False, OutOfMemoryAtLoad, "twice"),
    # room to spare: someone else killed it; nothing to learn, no retry, not an out-of-memory failure
    (KILLED, False, ("A",), False, False, ExitedEarly, "after 3.0 s while loading (not for lack of memory"),
])
def test_after_oom(exc, host_tight, tried, learn, retry, error, says) -> None:
    verdict = launch_rules.after_oom("m", exc, host_tight, tried)
    assert (verdict.learn, verdict.retry) == (learn, retry)
    if error is None:
        assert verdict.error is None
    else:
        assert type(verdict.error) is error and says in str(verdict.error)
        assert verdict.error.log_tail == "tail"


# --- the wait failed, or was interrupted ----------------------------------------------------------

CTRL_C = KeyboardInterrupt()
LATE = NotReadyInTime("not ready after 1 s")
EXITED = ExitedEarly("exited with code 1")


@pytest.mark.parametrize("failure, ended_by, entry, want", [
    (CTRL_C, None, inst(Status.STARTING), (Entry.DROP, Answer.INTERRUPTED)),
    (CTRL_C, -signal.SIGTERM, inst(Status.DEAD), (Entry.DROP, Answer.INTERRUPTED)),  # ours to drop still
    (CTRL_C, None, None, (Entry.KEEP, Answer.INTERRUPTED)),
    (LATE, None, inst(Status.STARTING), (Entry.FAIL, Answer.FAILURE)),
    (EXITED, 1, inst(Status.DEAD), (Entry.FAIL, Answer.FAILURE)),  # an exit code: its own failure
    (OOM, 1, inst(Status.STARTING), (Entry.DROP, Answer.FAILURE)),  # learned from instead
    (KILLED, -signal.SIGKILL, inst(Status.DEAD), (Entry.DROP, Answer.FAILURE)),  # SIGKILL: not how we stop
    # taken by whoever stopped it: gone, another pid's, stopping, or dead by our SIGTERM
    (EXITED, -signal.SIGTERM, inst(Status.DEAD), (Entry.KEEP, Answer.ENTRY_REMOVED)),
    (EXITED, 1, None, (Entry.KEEP, Answer.ENTRY_REMOVED)),
    (LATE, None, inst(Status.STARTING, pid=PID + 1), (Entry.KEEP, Answer.ENTRY_REMOVED)),
    (OOM, 1, inst(Status.STOPPING), (Entry.KEEP, Answer.ENTRY_REMOVED)),
])
def test_after_failed_wait(failure, ended_by, entry, want) -> None:
    after = launch_rules.after_failed_wait(failure, ended_by, entry, PID)
    assert (after.entry, after.answer) == want
    state = {"m": entry} if entry is not None else {}  # the fake state the decision is applied to
    launch_rules.apply_entry(state, "m", after.entry)
    if after.entry is Entry.FAIL:
        assert state["m"].status is Status.FAILED and state["m"].pid == PID
    else:
        assert state == ({} if after.entry is Entry.DROP or entry is None else {"m": entry})
    error = launch_rules.answer(after.answer, failure, "m", PID)
    wanted = {Answer.INTERRUPTED: LaunchInterrupted, Answer.ENTRY_REMOVED: LaunchError}.get(after.answer)
    assert error is failure if wanted is None else type(error) is wanted


@pytest.mark.parametrize("failure, want, says", [
    (StateError("cannot write state.json: No space left"), StateError, "the llama-server just started was stopped"),
    (OSError(28, "No space left on device"), StateError, "the llama-server just started was stopped"),
    (CTRL_C, LaunchInterrupted, f"interrupted: stopped m (pid {PID}) before it was ready"),
    (NameTaken("started meanwhile"), None, "started meanwhile"),  # goes on as it is
])
def test_after_failed_record(failure, want, says) -> None:
    error = launch_rules.after_failed_record(failure, "m", PID)
    assert (error is failure) if want is None else type(error) is want
    assert says in str(error)


# --- launch() through the decisions, with fake effects --------------------------------------------

CAPS = ServerCaps("llama-server", "0.0.0-test (build 1)", None, frozenset())
CUDA_OOM = "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 2048.00 MiB on device 0: cudaMalloc failed: out of memory\n"


class FakeEffects:
    def __init__(self, failures: list[BaseException], instances: dict[str, Instance] | None = None,
                 host_tight: bool = True) -> None:
        self.failures = failures  # what each start raises, in turn; then it succeeds
        self.state = dict(instances or {})
        self.host_tight = host_tight
        self.calls: list[tuple[str, object]] = []

    def instances(self):
        return dict(self.state)

    def snapshot(self):
        return dict(self.state)

    def stop(self, names):
        self.calls.append(("stop", tuple(names)))
        for name in names:
            self.state.pop(name, None)
        return list(names)

    def start(self, req, the_plan, ctx, inv, api_key, evicted):
        self.calls.append(("start", req.policy.margin_bytes))
        if self.failures:
            raise self.failures.pop(0)
        return launcher.Launched(inst(), the_plan, None, 1.0, evicted)  # type: ignore[arg-type]

    def record_oom(self, ctx, exc):
        self.calls.append(("record_oom", type(exc).__name__))
        return observe.observe_oom(ctx, exc.log_text, killed=isinstance(exc, KilledWhileLoading))

    def host_memory_tight(self, the_plan, policy):
        return self.host_tight


def run_launch(tmp_path: Path, fake: FakeEffects, **req):
    model = write_model(tmp_path / "tiny.gguf", ModelSpec(n_vocab=300))
    request = launcher.LaunchRequest(model=model, name="m", settings=ServerSettings(ctx_size=256), policy=Policy(), **req)
    return launcher.launch(StateStore(tmp_path / "state"), request, "llama-server", CAPS,
                           lambda: parse_gpus_spec("24GiB"), effects=fake)


def test_an_out_of_memory_failure_is_learned_and_retried_once_with_the_shortfall_left_free(tmp_path: Path) -> None:
    fake = FakeEffects([OutOfMemoryAtLoad("exited with code 1 (out of memory while loading)", CUDA_OOM)])
    launched = run_launch(tmp_path, fake)
    assert launched.instance.name == "m"
    (_, first), record, (_, second) = fake.calls
    assert record == ("record_oom", "OutOfMemoryAtLoad")
    assert second == first + 2048 * 2**20  # the failed allocation, left free on the retry


def test_out_of_memory_twice_gives_up_naming_both_plans(tmp_path: Path) -> None:
    oom = OutOfMemoryAtLoad("exited with code 1 (out of memory while loading)", CUDA_OOM)
    fake = FakeEffects([oom, replace_error(oom)])
    with pytest.raises(OutOfMemoryAtLoad, match=r"m: out of memory while loading, twice; tried -ngl .*, then -ngl "):
        run_launch(tmp_path, fake)
    assert [c[0] for c in fake.calls] == ["start", "record_oom", "start", "record_oom"]


def test_a_sigkill_with_memory_to_spare_is_not_learned_nor_retried(tmp_path: Path) -> None:
    fake = FakeEffects([KilledWhileLoading(2.0, "loading")], host_tight=False)
    with pytest.raises(ExitedEarly, match="not for lack of memory") as info:
        run_launch(tmp_path, fake)
    assert not isinstance(info.value, OutOfMemoryAtLoad)
    assert [c[0] for c in fake.calls] == ["start"]


@pytest.mark.parametrize("replace_existing", [True, False])
def test_a_live_name_is_stopped_first_with_replace_and_refused_without(tmp_path: Path, replace_existing: bool) -> None:
    fake = FakeEffects([], instances={"m": inst()})
    if not replace_existing:
        with pytest.raises(NameTaken):
            run_launch(tmp_path, fake)
        assert fake.calls == []
        return
    run_launch(tmp_path, fake, replace_existing=True)
    assert [c[0] for c in fake.calls] == ["stop", "start"] and fake.calls[0] == ("stop", ("m",))


def replace_error(exc: OutOfMemoryAtLoad) -> OutOfMemoryAtLoad:
    """Another failure like `exc` (an exception object is raised once)."""
    return OutOfMemoryAtLoad(str(exc), exc.log_tail)
