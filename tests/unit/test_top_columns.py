"""`top`'s instance table in a narrow terminal: what goes, what shortens, and in which order, before rich cuts."""

from __future__ import annotations

import pytest

from llamactl.cli.top import COLUMNS, fit_columns

HEADERS = [c[0] for c in COLUMNS]
ROW = ["alpha", "Qwen3-30B-A3B-Instruct-2507-Q4_K_M.gguf", "ready", "0,1", "17.00 GiB", "18.20 GiB", "0/4", "42.5", "0",
       "3s", "9m57s"]


def _row(**cells: str) -> list[str]:
    row = list(ROW)
    for header, value in cells.items():
        row[HEADERS.index(header.replace("_", "/"))] = value
    return row


def _width(headers: list[str], rows: list[list[str]], gap: int) -> int:
    return sum(max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)) + gap * (len(headers) - 1)


@pytest.mark.parametrize(("rows", "width", "headers", "gap"), [
    ([ROW], 200, HEADERS, 2),  # room: everything, as it is
    ([_row(TOK_S="-"), _row(TOK_S="")], 200, [h for h in HEADERS if h != "TOK/S"], 2),  # an empty column goes
    ([_row(TOK_S="-", QUEUE="-", TTL="-")], 200, ["NAME", "MODEL", "STATE", "GPUS", "EST", "ACTUAL", "SLOTS", "IDLE"], 2),
    ([_row(NAME="-", STATE="-")], 200, HEADERS, 2),  # never NAME or STATE
    # this row takes 82 cells with the long headers, 75 with the short ones, 65 one cell apart
    ([_row(MODEL="m.gguf")], 82, HEADERS, 2),
    ([_row(MODEL="m.gguf")], 81, [c[1] for c in COLUMNS], 2),  # short headers first
    ([_row(MODEL="m.gguf")], 75, [c[1] for c in COLUMNS], 2),
    ([_row(MODEL="m.gguf")], 74, [c[1] for c in COLUMNS], 1),  # then one cell between columns
])
def test_columns_go_and_shorten_before_anything_is_cut(rows, width, headers, gap) -> None:
    keep, shown, out, got_gap = fit_columns(rows, width)
    assert (shown, got_gap) == (headers, gap)
    assert out == [[row[i] for i in keep] for row in rows]  # nothing cut


def test_the_model_name_is_cut_in_the_middle_last_and_only_as_far_as_needed() -> None:
    keep, headers, rows, gap = fit_columns([ROW, _row(NAME="beta", MODEL="tiny.gguf")], 76)
    model = rows[0][headers.index("MODEL")]
    assert gap == 1 and "…" in model and model.startswith("Qwen3") and model.endswith(".gguf")
    assert _width(headers, rows, gap) == 76  # cut to the width, not below it
    assert rows[1][headers.index("MODEL")] == "tiny.gguf"  # a name that fits stays whole
    assert all("…" not in cell for row in rows for i, cell in enumerate(row) if headers[i] != "MODEL")


def test_a_remote_row_shows_its_box_and_latency_where_a_local_one_shows_gpus() -> None:
    from llamactl.cli.top import _cells
    from llamactl.views import InstanceView

    remote = _cells(InstanceView(name="m@back", model="m", state="ready", in_flight=1, upstream="back", latency_ms=12.4))
    assert remote[HEADERS.index("STATE")] == "ready 12ms" and remote[HEADERS.index("GPUS")] == "@back"
    down = _cells(InstanceView(name="m@back", model="m", state="unreachable", upstream="back"))
    assert down[HEADERS.index("STATE")] == "unreachable"
    local = _cells(InstanceView(name="m", model="m", state="ready", pid=7, gpu_ids=(0, 1)))
    assert local[HEADERS.index("STATE")] == "ready" and local[HEADERS.index("GPUS")] == "0,1"
