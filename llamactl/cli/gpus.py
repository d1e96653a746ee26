"""`llamactl gpus`: the GPU inventory as a table or JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import typer

from llamactl import render
from llamactl.cli.common import wants_json
from llamactl.gpu import inventory
from llamactl.units import format_bytes


def gpus_json(inv: inventory.Inventory) -> list[dict[str, object]]:
    """The schema `--gpus-file` reads back: stable keys, bytes."""
    out = []
    for gpu in inv.gpus:
        out.append({
            "index": gpu.index,
            "uuid": gpu.uuid,
            "name": gpu.name,
            "memory_total_bytes": gpu.memory_total_bytes,
            "memory_used_bytes": gpu.memory_used_bytes,
            "memory_free_bytes": gpu.memory_free_bytes,
            "utilization_gpu": gpu.utilization_gpu,
            "utilization_memory": gpu.utilization_memory,
            "processes": [asdict(p) for p in gpu.processes],
            **({"error": gpu.error} if gpu.error else {}),
        })
    return out


def command(
    ctx: typer.Context,
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Simulate GPUs: none, 24GiB,16GiB, 2x80GiB."),
    gpus_file: Optional[str] = typer.Option(None, "--gpus-file", help="Inventory file as printed by `gpus --json`."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """Inventory: name, memory total/used/free, utilisation, processes."""
    inv = inventory.resolve(gpus, gpus_file)
    if wants_json(ctx, json_output):
        render.emit_json(gpus_json(inv))
        return
    if inv.note:
        render.note(inv.note)
    rows = [
        [g.index, g.name, f"{format_bytes(g.memory_used_bytes)} / {format_bytes(g.memory_total_bytes)}",
         format_bytes(g.memory_free_bytes), "-" if g.utilization_gpu is None else f"{g.utilization_gpu}%",
         " ".join(str(p.pid) for p in g.processes) or "-"]
        for g in inv.gpus
    ]
    if rows:
        print(render.table(rows, ["GPU", "NAME", "USED / TOTAL", "FREE", "UTIL", "PIDS"], align_right_from=2))


def register(app: typer.Typer) -> None:
    app.command("gpus")(command)
