"""`llamactl evict`: stop instances by name, all, idle for a while, or least recently used. Cron-safe."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import typer

from llamactl import render
from llamactl.cli.common import state_store, wants_json
from llamactl.cli.complete import instance_names
from llamactl.errors import UsageError
from llamactl.servers.launcher import stop_instances
from llamactl.servers.refresh import refresh
from llamactl.servers.state import Instance, Status
from llamactl.units import format_duration, parse_duration


def command(
    ctx: typer.Context,
    names: Optional[list[str]] = typer.Argument(None, metavar="NAME", help="Instances to stop.",
                                                autocompletion=instance_names),
    all_: bool = typer.Option(False, "--all", help="Stop every instance."),
    idle: Optional[str] = typer.Option(None, "--idle", help="Stop instances idle longer than this, e.g. 30m."),
    lru: Optional[int] = typer.Option(None, "--lru", min=1, help="Stop the N least recently used."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be stopped; stop nothing."),
    grace: str = typer.Option("10s", "--grace", help="Grace between TERM and KILL."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """Stop instances: TERM to the process group, KILL after --grace, then drop them from the state."""
    chosen_modes = sum(bool(x) for x in (names, all_, idle is not None, lru is not None))
    if chosen_modes != 1:
        raise UsageError("give instance names, or exactly one of --all, --idle DURATION, --lru N")
    grace_s = parse_duration(grace, what="--grace")
    store = state_store(ctx)
    rows = [inst for inst, _ in refresh(store)]  # polling first records recent use (last_used)
    now = time.time()
    if names:
        known = {i.name for i in rows}
        for missing in [n for n in names if n not in known]:
            render.note(f"no instance named {missing!r} (already gone)")
        targets = [i for i in rows if i.name in names]
    elif all_:
        targets = rows
    elif idle is not None:
        limit = parse_duration(idle, what="--idle")
        targets = [i for i in rows if i.status is Status.READY and i.serves_http and now - i.last_used > limit]
    else:  # a worker's rpc-servers are never idle in a sense that matters here: they go by name or --all
        candidates = sorted((i for i in rows if i.status is Status.READY and i.serves_http), key=lambda i: i.last_used)
        targets = candidates[:lru]
    chosen = [i.name for i in targets]
    if dry_run:
        stopped: list[str] = []
    else:
        stopped = stop_instances(store, chosen, grace_s=grace_s)
    render.result(wants_json(ctx, json_output), Eviction(tuple(targets), tuple(stopped), dry_run, now))


@dataclass(frozen=True)
class Eviction:
    """evict's result: the instances chosen, which of them still ran (and were stopped), at `now`."""

    targets: tuple[Instance, ...]
    were_running: tuple[str, ...]
    dry_run: bool
    now: float

    def to_json(self) -> dict[str, object]:
        chosen = [i.name for i in self.targets]
        return {"evicted": chosen if not self.dry_run else [], "would_evict": chosen if self.dry_run else [],
                "were_running": list(self.were_running)}

    def text(self) -> Iterator[str]:
        for inst in self.targets:
            verb = "would stop" if self.dry_run else ("stopped" if inst.name in self.were_running else "removed")
            yield f"{verb} {inst.name} (idle {format_duration(self.now - inst.last_used)})"


def register(app: typer.Typer) -> None:
    app.command("evict")(command)
