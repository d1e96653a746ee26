"""Remote devices: each configured worker's `/inventory` beside the local GPUs.

A worker (`llamactl worker` on another host) serves its devices in `gpus --json`'s schema, each with the
endpoint of the ggml-rpc-server that exports it. Here they become Gpu records with `endpoint` and `worker`,
named as llama.cpp names them (`RPC0[host:port]`: each rpc-server exports one device) and numbered
REMOTE_INDEX_BASE + PER_WORKER × the worker's place in the config + the device's place in its list, so a
device keeps its number while the config does. A worker that cannot be reached, refuses the key or answers
nonsense is left out with a warning naming it: its devices are not planned on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from llamactl.errors import LlamactlError
from llamactl.gpu.inventory import Gpu, Inventory, from_json

if TYPE_CHECKING:
    from llamactl.config import WorkerConfig

log = logging.getLogger(__name__)

REMOTE_INDEX_BASE = 1000
PER_WORKER = 64
TIMEOUT_S = 2.0
_UNSPECIFIED = ("0.0.0.0", "::", "[::]")


def device_name(endpoint: str) -> str:
    """What llama-server calls the one device an rpc-server exports (its logs, `--list-devices`)."""
    return f"RPC0[{endpoint}]"


def devices_of(position: int, name: str, url: str, listed: Inventory) -> list[Gpu]:
    """A worker's listing as remote devices (pure): numbered, named, tagged with the worker; an endpoint on an
    unspecified address (a worker bound to 0.0.0.0) reached at the URL's host."""
    url_host = urlsplit(url).hostname or ""
    out = []
    for k, gpu in enumerate(g for g in listed.gpus if g.endpoint is not None):
        if k >= PER_WORKER:
            break
        assert gpu.endpoint is not None
        host, _, port = gpu.endpoint.rpartition(":")
        where = f"{url_host}:{port}" if host in _UNSPECIFIED else gpu.endpoint
        out.append(replace(gpu, index=REMOTE_INDEX_BASE + PER_WORKER * position + k, name=device_name(where),
                           endpoint=where, worker=name, simulated=False, processes=()))
    return out


def _read_key(worker: "WorkerConfig") -> str:
    from llamactl.errors import UsageError

    try:
        with open(worker.api_key_file, "rb") as fh:
            text = fh.read(4097).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise UsageError(f"api_key_file {worker.api_key_file}: {exc.strerror or exc}") from None
    if not text:
        raise UsageError(f"api_key_file {worker.api_key_file} is empty")
    return text.splitlines()[0].strip()


def fetch(worker: "WorkerConfig") -> Inventory:
    """The worker's /inventory, checked as any inventory file is; a LlamactlError saying what went wrong."""
    from llamactl.servers.client import get_json

    data = get_json(f"{worker.url}/inventory", _read_key(worker), timeout_s=TIMEOUT_S)
    return from_json(data, f"worker {worker.name}")


def with_workers(local: Inventory, workers: Sequence["WorkerConfig"],
                 fetch_fn: Callable[["WorkerConfig"], Inventory] = fetch) -> Inventory:
    """`local` with every reachable worker's devices after it (workers asked at once: the slowest costs its
    timeout, not the sum); each one left out is named in a warning."""
    if not workers:
        return local

    def ask(worker: "WorkerConfig") -> Inventory | None:
        try:
            return fetch_fn(worker)
        except LlamactlError as exc:
            log.warning("worker %s (%s) left out of the inventory: %s", worker.name, worker.url, exc)
            return None

    with ThreadPoolExecutor(max_workers=min(8, len(workers))) as pool:
        answers = list(pool.map(ask, workers))
    remote = [gpu for position, (worker, listed) in enumerate(zip(workers, answers)) if listed is not None
              for gpu in devices_of(position, worker.name, worker.url, listed)]
    if not remote:
        return local
    note = local.note
    if note and not local.gpus:  # the local inventory's own words; the plan may use the workers' devices now
        note = note.removesuffix("; planning for CPU").removesuffix(": planning for CPU")
    return replace(local, gpus=local.gpus + tuple(remote), note=note)
