"""The hostile corpus of the proxy and `top --url`: request bodies of any JSON shape, and remote /status
documents of any JSON shape. Contract: the body reader answers with one of its verdicts and never raises;
a remote snapshot is either refused with RemoteError (one line) or drawn by top without an exception, with
nothing in the drawing that could drive a terminal."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llamactl.errors import RemoteError
from llamactl.proxy import bodies
from tests.property.contract import counted, examples

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                                                            max_size=6), max_leaves=40)
fields = st.sampled_from(["name", "model", "state", "pid", "port", "in_flight", "queued", "idle_s", "ttl_left_s",
                          "tokens_per_s", "slots_busy", "slots_total", "estimated_bytes", "actual_bytes", "gpu_ids",
                          "devices", "log", "index", "memory_total_bytes", "memory_used_bytes", "utilization_gpu",
                          "temperature_c", "power_w", "error", "kind", "detail", "at"])
entries = st.dictionaries(fields, values | st.text(alphabet="\x1b\x07\x9b\u202e[]0;abc", max_size=12), max_size=10)
snapshots = st.fixed_dictionaries({}, optional={
    "instances": st.lists(entries, max_size=4) | values, "gpus": st.lists(entries, max_size=3) | values,
    "events": st.lists(entries, max_size=3) | values, "requests": values, "history": values, "queue": values})


@settings(max_examples=examples(300))
@given(payload=values, raw=st.binary(max_size=200))
@counted
def test_any_body_gets_a_verdict(payload, raw) -> None:
    for body in (json.dumps(payload).encode(), raw, b'{"model": ' + raw + b"}"):
        verdict, model = bodies.model_of(body, max_values=50)
        assert verdict in ("ok", "too_many", "invalid", "deep")
        assert model is None or (verdict == "ok" and isinstance(model, str))
    if isinstance(payload, dict) and isinstance(payload.get("model"), str):
        verdict, model = bodies.model_of(json.dumps(payload).encode(), max_values=10**9)
        assert (verdict, model) == ("ok", payload["model"])


@settings(max_examples=examples(200), deadline=None)
@given(data=snapshots | values)
@counted
def test_any_remote_snapshot_is_refused_or_drawn_safely(data) -> None:
    from rich.console import Console

    from llamactl.cli.top import Screen, render
    from llamactl.render import safe_tree
    from llamactl.views import checked_snapshot

    try:
        snap = checked_snapshot(data, "http://remote")
    except RemoteError as exc:
        assert str(exc).startswith("http://remote: ") and "\n" not in str(exc)
        return
    console = Console(width=120, record=True, color_system=None, force_terminal=False)
    console.print(render(Screen(snapshot=safe_tree(snap)), width=120))  # type: ignore[arg-type]
    text = console.export_text()
    assert not any(c in text for c in "\x1b\x07\x9b\u202e")
