"""Routes for people and scripts: load or unload a model now, unload every model, and the status page's files."""

from __future__ import annotations

import asyncio
from functools import lru_cache
from importlib import resources

from aiohttp import web

from llamactl.errors import BadRequestError, ModelUnavailableError, UsageError
from llamactl.proxy.context import Proxy, proxy_of
from llamactl.units import parse_duration

ASSET_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}


async def load_model(request: web.Request) -> web.Response:
    """Start a configured model now (as a request for it would), for the status page and scripts."""
    pool = proxy_of(request).pool
    slot = await pool.acquire(request.match_info["name"])
    pool.release(slot)
    return web.json_response({"model": slot.model.name, "state": slot.phase.value})


async def unload_model(request: web.Request) -> web.Response:
    """Stop a model's instance now (as its TTL would): refused while requests are in flight."""
    name = request.match_info["name"]
    stopped = await proxy_of(request).pool.unload(name)
    return web.json_response({"model": name, "stopped": stopped})


UNLOAD_WAIT_S = 30.0  # how long an unload of every model waits for requests in flight, unless ?wait= says


async def unload_all(request: web.Request) -> web.Response:
    """Stop every model's instance, each once its requests are done (`?wait=`, default 30 s), or at once with
    `?force=true`: their requests in flight are cut (logged 503). 503 naming the models still busy at the end."""
    proxy = proxy_of(request)
    try:
        wait_s = parse_duration(request.query.get("wait", str(UNLOAD_WAIT_S)), what="wait")
    except UsageError as exc:
        raise BadRequestError(str(exc)) from None
    force = request.query.get("force", "false").lower()
    if force not in ("true", "false", "1", "0"):
        raise BadRequestError(f"force: expected true or false, got {force[:20]!r}")
    if force in ("true", "1"):
        _cut(proxy, asyncio.current_task())
    done = await proxy.pool.unload_all(wait_s)
    if done.busy:
        held = ", ".join(f"{name} ({why})" for name, why in done.busy.items())
        raise ModelUnavailableError(f"still busy after {wait_s:g} s, not stopped: {held}; stopped: "
                                    f"{', '.join(done.stopped) or 'none'} (?force=true cuts their requests)")
    return web.json_response({"stopped": list(done.stopped), "not_ours": list(done.not_ours)})


def _cut(proxy: Proxy, me: asyncio.Task | None) -> None:
    """Cancel every model request in flight (or waiting) for an instance the unload may stop."""
    pool = proxy.pool
    for task, req in list(proxy.in_flight.items()):
        model = pool.config.lookup(str(req.get("model", "-")))
        if task is not me and model is not None and pool.may_stop(model.name):
            req["cut"] = True
            task.cancel()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", headers={"Cache-Control": "no-cache"})


async def asset(request: web.Request) -> web.Response:
    name = request.path.rsplit("/", 1)[-1]
    return web.Response(body=_asset(name), content_type=ASSET_TYPES[name], headers={"Cache-Control": "no-cache"})


@lru_cache(maxsize=None)
def _asset(name: str) -> bytes:
    """The status page's files, shipped in the package (no build step, nothing fetched at run time)."""
    return resources.files("llamactl.proxy").joinpath("ui", name).read_bytes()
