"""The proxy's poller: every poll interval, the pool's round (liveness, TTLs, activity written back), then each
ready instance's slots and speed and the GPU inventory, for /status, the page and /metrics.

Instances are asked through the application's one aiohttp session, concurrently, each request within
`client.DEFAULT_TIMEOUT_S` to connect and to read, as `ps` asks them; what they answer is parsed by the
same functions as `ps`'s (`client.slots_of`, `client.speed_of`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import aiohttp

from llamactl.lifecycle import Status
from llamactl.proxy import remote
from llamactl.proxy.context import Proxy
from llamactl.proxy.status import snapshot
from llamactl.servers import client, procs, proxy_notes

log = logging.getLogger("llamactl.proxy")

REMOTE_TIMEOUT_S = 2.0  # another box (over a network) gets this long to connect and to answer a poll
NOTES_INTERVAL_S = 1.0  # the notes are rewritten at most this often (a change per request end would be more)


async def _get(session: aiohttp.ClientSession, url: str, timeout_s: float,
               api_key: str | None = None) -> tuple[int, bytes] | None:
    """(status, body), or None when nothing answers in time."""
    timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
    headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    try:
        async with session.get(url, timeout=timeout, headers=headers) as reply:
            return reply.status, await reply.read()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def poll_instance(session: aiohttp.ClientSession, base_url: str,
                        timeout_s: float = client.DEFAULT_TIMEOUT_S) -> client.Live:
    """What one instance says: /health, then /slots and /metrics (each may be missing)."""
    health = await _get(session, f"{base_url}/health", timeout_s)
    if health is None:
        return client.Live(healthy=False)
    busy = total = tps = activity = None
    slots = await _get(session, f"{base_url}/slots", timeout_s)
    if slots is not None:
        try:
            busy, total = client.slots_of(json.loads(slots[1]))
        except (ValueError, RecursionError):
            pass
    metrics = await _get(session, f"{base_url}/metrics", timeout_s)
    if metrics is not None and metrics[0] == 200:
        tps, activity = client.speed_of(metrics[1].decode("utf-8", "replace"))
    return client.Live(healthy=health[0] == 200, slots_busy=busy, slots_total=total, tokens_per_s=tps,
                       activity=activity)


async def poll_box(session: aiohttp.ClientSession, box: remote.Box,
                   timeout_s: float = REMOTE_TIMEOUT_S) -> remote.Reading:
    """A remote model's /health, or an upstream's /v1/models and then its /running (free slots), with its key."""
    started = time.monotonic()
    got = await _get(session, box.base_url + ("/v1/models" if box.imports else "/health"), timeout_s, box.api_key)
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    if got is None or got[0] != 200:
        return remote.Reading(reachable=False)
    if not box.imports:
        return remote.Reading(reachable=True, latency_ms=latency_ms)
    running = await _get(session, box.base_url + "/running", timeout_s, box.api_key)
    return remote.Reading(True, latency_ms, remote.models_of(got[1]),
                          remote.running_slots(running[1]) if running is not None and running[0] == 200 else {})


async def poll_remotes(proxy: Proxy) -> None:
    """Every remote box at once: the slowest costs its timeout, not the sum."""
    boxes = list(proxy.remotes.boxes)
    readings = await asyncio.gather(*(poll_box(proxy.upstream(), box) for box in boxes))
    for box, reading in zip(boxes, readings):
        proxy.remotes.record(box, reading)


async def poll_once(proxy: Proxy) -> None:
    pool = proxy.pool
    await pool.poll_once()
    # slots busy and tokens/s of each ready instance (not those with a private key: /slots needs it)
    ready = {n: s.base_url for n, s in pool.slots.items()
             if s.instance is not None and s.phase is Status.READY and not s.api_key}
    lives = await asyncio.gather(*(poll_instance(proxy.upstream(), url) for url in ready.values()))
    proxy.live = dict(zip(ready, lives))
    inv = await asyncio.to_thread(proxy.inventory_fn)
    proxy.inventory = inv
    proxy.history.append({"at": time.time(), "gpus": [
        {"index": g.index, "used": g.memory_used_bytes, "total": g.memory_total_bytes} for g in inv.gpus]})


async def poll_forever(proxy: Proxy) -> None:
    while True:
        await asyncio.sleep(proxy.pool.config.poll_interval_s)
        await _survive(poll_once, proxy)


async def poll_remotes_forever(proxy: Proxy) -> None:
    """The remote boxes' round, at once (an upstream's models are routable from start-up) and then every poll
    interval, apart from the pool's: a box that is slow to answer delays no TTL or liveness check."""
    while True:
        await _survive(poll_remotes, proxy)
        await asyncio.sleep(proxy.pool.config.poll_interval_s)


async def _survive(round_, proxy: Proxy) -> None:
    try:
        await round_(proxy)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the poller must outlive one bad round
        log.error("poll failed: %s", exc, extra={"event": "poll_failed", "error": str(exc)})


async def keep_notes(proxy: Proxy, path: Path) -> None:
    """The notes local viewers read (`servers/proxy_notes.py`: TTL deadlines, requests, recent events): written
    on a change of the pool, at most once a second, and at least every poll interval."""
    assert proxy.address is not None
    host, port = proxy.address
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    pid = os.getpid()
    started = procs.create_time_of(pid) or 0.0
    failing = False
    while True:
        try:
            await asyncio.wait_for(proxy.notes_due.wait(), proxy.pool.config.poll_interval_s)
        except asyncio.TimeoutError:
            pass
        proxy.notes_due.clear()
        snap = snapshot(proxy, proxy.inventory)
        notes = proxy_notes.to_json(url, pid, started, proxy.pool.config.poll_interval_s, snap.instances,
                                    snap.events, time.time())
        try:
            await asyncio.to_thread(proxy_notes.write, path, notes)
            failing = False
        except OSError as exc:
            if not failing:  # said once, not at every change
                log.warning("cannot write %s for local viewers: %s", path, exc.strerror or exc,
                            extra={"event": "notes_failed", "path": str(path), "error": str(exc)})
            failing = True
        await asyncio.sleep(NOTES_INTERVAL_S)
