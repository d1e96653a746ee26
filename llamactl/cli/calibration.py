"""`llamactl calibration [show|reset|export|import]`: what earlier launches measured, and what plans learn from it."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from llamactl import render
from llamactl.cli.common import state_store, wants_json
from llamactl.errors import UsageError
from llamactl.units import format_bytes, format_duration

EXPORT_FORMAT = "llamactl-calibration"
IMPORT_LIMIT_BYTES = 64 * 2**20


class Action(str, Enum):
    show = "show"
    reset = "reset"
    export = "export"
    import_ = "import"


@dataclass(frozen=True)
class Shown:
    """calibration show's result: the store's path and learn.summary's summary of its observations."""

    path: Path
    data: dict[str, Any]  # learn.summary.summary(): the JSON document's keys, as documented

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), **self.data}

    def text(self) -> Iterator[str]:
        data = self.data
        if not data["observations"]:
            yield render.Note(f"no observations yet in {self.path}: every launch adds one")
            return
        yield f"{self.path}: {data['observations']} observations"
        yield _models_table(data["models"], time.time())
        if data["gpu_overhead"]:
            yield "\nGPU overhead (NVML per process minus llama.cpp's buffers):"
            for o in data["gpu_overhead"]:
                used = format_bytes(o["used_bytes"]) if o["used_bytes"] is not None else "not used"
                yield f"  {o['gpu']}: {used} ({o['launches']} launches, median {format_bytes(o['median_bytes'])}) {o['note']}"
        if data["compute"]:
            yield "\ncompute corrections (logged / estimated):"
            for c in data["compute"]:
                yield (f"  {c['arch']} on {c['backend']}{' (partial offload)' if c['partial'] else ''}: "
                       f"× {c['factor']:.3f} ({c['launches']} launches)")


def _models_table(models: list[dict[str, Any]], now: float) -> str:
    table = []
    for row in models:
        devices = []
        for d in row["devices"]:
            est, got = d["estimated_bytes"], d["logged_bytes"]
            drift = f" ({(got - est) / est:+.1%})" if est else ""
            nvml = f", NVML {format_bytes(d['nvml_bytes'])}" if d["nvml_bytes"] is not None else ""
            devices.append(f"{d['device']} {format_bytes(est)} → {format_bytes(got)}{drift}{nvml}")
        table.append([Path(row["model"]).name, row["arch"], row["backend"] + (f" ({', '.join(row['gpus'])})" if row["gpus"] else ""),
                      row["launches"], row["out_of_memory"], format_duration(now - row["last"]) + " ago",
                      "; ".join(devices) or "-"])
    return render.table(table, ["MODEL", "ARCH", "BACKEND", "LAUNCHES", "OOM", "LAST", "ESTIMATED → LOGGED"],
                        align_right_from=3)


def _read_import(path: str) -> list[Any]:
    if path == "-":
        text = sys.stdin.read(IMPORT_LIMIT_BYTES + 1)
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise UsageError(f"{path}: not a regular file")
            text = fh.read(IMPORT_LIMIT_BYTES + 1).decode("utf-8", "replace")
    if len(text) > IMPORT_LIMIT_BYTES:
        raise UsageError(f"{path}: larger than {format_bytes(IMPORT_LIMIT_BYTES)}; not a calibration export")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"{path}: not a calibration export (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or not isinstance(data.get("observations"), list):
        raise UsageError(f"{path}: not a calibration export (expected {{\"format\": \"{EXPORT_FORMAT}\", "
                         "\"observations\": [...]}, as `llamactl calibration export` writes)")
    return data["observations"]


def command(
    ctx: typer.Context,
    action: Action = typer.Argument(Action.show, help="show (default), reset, export [FILE], import FILE."),
    file: Optional[str] = typer.Argument(None, metavar="FILE", help="export: where to write (default: stdout); import: what to read (- = stdin)."),
    model: Optional[str] = typer.Option(None, "--model", help="show/reset: only this GGUF file's observations."),
    yes: bool = typer.Option(False, "--yes", "-y", help="reset: do not ask."),
    replace_old: bool = typer.Option(False, "--replace", help="import: let the import push the oldest observations out."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """What earlier launches measured (per model, GPU overhead, compute corrections); reset, export, import.

    Every launch that becomes ready records what llama-server allocated per device (and NVML per process);
    `estimate`, `plan`, `launch` and the proxy use it unless --no-calibration. Export on one box and import
    on another to plan with what it learned (e.g. a CI job planning with the production box's figures).
    """
    from llamactl.learn import calibrate
    from llamactl.learn.calibrate import observation_from_row, observation_to_row
    from llamactl.learn.store import CalibrationStore
    from llamactl.learn.summary import summary

    as_json = wants_json(ctx, json_output)
    st = state_store(ctx)
    store = CalibrationStore(st.dir, file_mode=st.file_mode)
    key = None
    if model is not None:
        from llamactl.learn.observe import identity

        try:
            key = identity(model)
        except OSError as exc:
            raise UsageError(f"--model {model}: {exc.strerror}") from None
    if action is Action.show:
        obs = [o for o in store.all() if key is None or o.model_key == key]
        render.result(as_json, Shown(store.path, summary(obs)))
    elif action is Action.reset:
        what = f"the observations of {model}" if model else f"every observation in {store.path}"
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(f"reset would delete {what}; add --yes to confirm")
            typer.confirm(f"delete {what}?", abort=True)
        n = store.reset(model_key=key)
        render.result(as_json, render.Line(f"deleted {n} observations", {"deleted": n}))
    elif action is Action.export:
        payload = {"format": EXPORT_FORMAT, "schema": calibrate.SCHEMA, "exported_at": time.time(),
                   "observations": [observation_to_row(o) for o in store.all()]}
        text = json.dumps(payload, indent=1) + "\n"
        if file in (None, "-"):
            sys.stdout.write(text)
        else:
            Path(file).write_text(text)
            n = len(payload["observations"])
            render.result(as_json, render.Line(f"exported {n} observations to {file}", {"exported": n, "file": file},
                                               note=True))
    else:
        if file is None:
            raise UsageError("import needs a FILE (as `llamactl calibration export FILE` writes; - for stdin)")
        rows = _read_import(file)
        good, bad = [], 0
        now = time.time()
        for row in rows:
            try:
                obs = observation_from_row(row, now=now)
            except (ValueError, TypeError):
                bad += 1
                continue
            good.append(obs if obs.uid else None)
        valid = [o for o in good if o is not None]
        bad += len(good) - len(valid)
        from llamactl.learn.store import MAX_ROWS

        fresh = store.new_among(o.uid for o in valid if o.uid)
        held = store.count()
        lost = min(held, held + fresh - MAX_ROWS)
        if lost > 0 and not replace_old:
            raise UsageError(f"importing {fresh} new observations would push {lost} of the {held} in the store out "
                             f"(it keeps the newest {MAX_ROWS}); pass --replace to allow it")
        added = store.add(valid)
        present = len(valid) - added
        render.result(as_json, render.Line(f"imported {added} observations ({present} already present"
                                           + (f", {bad} invalid skipped" if bad else "") + ")",
                                           {"imported": added, "already_present": present, "invalid": bad}))


def register(app: typer.Typer) -> None:
    app.command("calibration")(command)
