"""Routes for people and scripts: load or unload a model now, and the status page's files."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from aiohttp import web

from llamactl.proxy.context import proxy_of

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


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", headers={"Cache-Control": "no-cache"})


async def asset(request: web.Request) -> web.Response:
    name = request.path.rsplit("/", 1)[-1]
    return web.Response(body=_asset(name), content_type=ASSET_TYPES[name], headers={"Cache-Control": "no-cache"})


@lru_cache(maxsize=None)
def _asset(name: str) -> bytes:
    """The status page's files, shipped in the package (no build step, nothing fetched at run time)."""
    return resources.files("llamactl.proxy").joinpath("ui", name).read_bytes()
