"""The lifecycle's transition table: every status and slot-phase change goes through lifecycle.check."""

from __future__ import annotations

import pytest

from llamactl.lifecycle import IllegalTransition, Status, check
from llamactl.servers.state import Instance

S = Status


@pytest.mark.parametrize(("old", "new"), [
    (S.STOPPED, S.STARTING), (S.STARTING, S.READY), (S.READY, S.BUSY), (S.BUSY, S.READY), (S.READY, S.STOPPING),
    (S.STOPPING, S.STOPPED), (S.STARTING, S.FAILED), (S.READY, S.DEAD), (S.STOPPING, S.DEAD),
    (S.STARTING, S.STOPPED), (S.STOPPED, S.READY), (S.READY, S.READY), (S.DEAD, S.FAILED),
])
def test_allowed(old, new) -> None:
    assert check(old, new) is new


@pytest.mark.parametrize(("old", "new"), [
    (S.STOPPED, S.STOPPING), (S.STOPPING, S.READY), (S.STOPPING, S.STARTING), (S.DEAD, S.READY),
    (S.FAILED, S.STARTING), (S.BUSY, S.STARTING), (S.STOPPED, S.BUSY),
])
def test_refused(old, new) -> None:
    with pytest.raises(IllegalTransition, match=f"{old.value} → {new.value}"):
        check(old, new)


def test_a_state_entry_moves_only_along_the_table() -> None:
    inst = Instance(name="a", model="/m.gguf", port=1, pid=2, create_time=1.0, status=S.STARTING)
    ready = inst.moved(S.READY, last_used=5.0)
    assert ready.status is S.READY and ready.last_used == 5.0
    with pytest.raises(IllegalTransition):
        ready.moved(S.DEAD).moved(S.READY)
