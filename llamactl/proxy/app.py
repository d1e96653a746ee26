"""The aiohttp application: its routes, its one middleware, and the lifespan it owns.

Wiring only: the handlers live in `models.py` (the model routes, /v1/models), `passthrough.py` (llama-server's
read-only routes), `admin.py` (load, unload, the page), `status.py` (/status, /status/stream, /running,
/metrics); every request passes `guard.errors_and_auth`. One ClientSession for every upstream call (the
relay's and the poller's) and one poller task, both created and closed by the app's cleanup context; at
shutdown the instances this proxy started are stopped unless --keep-instances.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from llamactl.config import Config
from llamactl.errors import LlamactlError
from llamactl.gpu.inventory import Inventory
from llamactl.proxy import admin, bodies, guard, models, passthrough, poller, status
from llamactl.proxy.context import MODEL_ROUTES, PROXY_KEY, Proxy
from llamactl.proxy.pool import Pool
from llamactl.servers import proxy_notes

log = logging.getLogger("llamactl.proxy")

UPSTREAM_CONNECT_S = 10  # an instance that does not accept a connection in this long is unreachable (502)

ROUTES = [
    *(web.post(path, models.model_request) for path in MODEL_ROUTES),
    web.get("/v1/models", models.models),
    web.get("/v1/models/{id:.+}", models.model),
    *(web.get(path, passthrough.read_only) for path in passthrough.READ_ONLY_ROUTES),
    web.get("/running", status.running),
    web.get("/health", models.health),
    web.get("/status", status.status),
    web.get("/status/stream", status.status_stream),
    web.post("/models/unload", admin.unload_all),
    web.post("/models/{name}/load", admin.load_model),
    web.post("/models/{name}/unload", admin.unload_model),
    web.get("/", admin.page),
    web.get("/ui", admin.page),
    web.get("/ui/app.js", admin.asset),
    web.get("/ui/style.css", admin.asset),
    web.get("/metrics", status.prometheus),
]


def build_app(pool: Pool, inventory_fn: Callable[[], Inventory], *, keep_instances: bool = False,
              reload_fn: Callable[[], Config] | None = None, grace_s: float = 30.0,
              address: tuple[str, int] | None = None) -> web.Application:
    """`address`: where the proxy listens; given, it keeps notes for local viewers in the state dir."""
    proxy = Proxy(pool, inventory_fn, status.Metrics(), bodies.Parser(), keep_instances=keep_instances,
                  grace_s=grace_s, reload_fn=reload_fn, address=address)
    previous_on_change = pool.on_change

    def on_change() -> None:
        proxy.changed.set()
        proxy.notes_due.set()
        if previous_on_change is not None:
            previous_on_change()

    pool.on_change = on_change
    app = web.Application(middlewares=[guard.errors_and_auth], client_max_size=models.MAX_BODY_HARD)
    app[PROXY_KEY] = proxy
    app.router.add_routes(ROUTES)
    app.on_response_prepare.append(guard.secure_headers)
    app.on_shutdown.append(_drain)
    app.cleanup_ctx.append(_lifespan)
    return app


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    proxy = app[PROXY_KEY]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=UPSTREAM_CONNECT_S)
    proxy.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
    adopted = await proxy.pool.adopt_all()
    if adopted:
        log.info("adopted running instances: %s", ", ".join(adopted), extra={"event": "adopted_all", "models": adopted})
    polling = asyncio.create_task(poller.poll_forever(proxy))
    polling_remotes = asyncio.create_task(poller.poll_remotes_forever(proxy))
    preloading = asyncio.create_task(proxy.pool.preload())  # in the background: /health answers meanwhile
    notes = proxy_notes.path_for(proxy.pool.store.dir, proxy.address[1]) if proxy.address else None
    noting = asyncio.create_task(poller.keep_notes(proxy, notes)) if notes is not None else None
    if proxy.reload_fn is not None:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload, proxy, proxy.reload_fn)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        yield
    finally:
        background = [t for t in (polling, polling_remotes, preloading, noting) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await proxy.pool.shutdown(proxy.keep_instances)
        if notes is not None:
            proxy_notes.remove(notes)
        await proxy.session.close()
        proxy.parser.close()


async def _drain(app: web.Application) -> None:
    """At SIGTERM (no new connections by now): in-flight requests get exactly `grace_s` to finish, then
    are cut (logged 503); then the instances go (lifespan)."""
    proxy = app[PROXY_KEY]
    proxy.shutting_down = True
    if not proxy.in_flight:
        return
    grace_s = proxy.grace_s
    log.info("shutting down: waiting up to %g s for %d requests in flight", grace_s, len(proxy.in_flight),
             extra={"event": "draining", "in_flight": len(proxy.in_flight), "grace_s": grace_s})
    _, pending = await asyncio.wait(set(proxy.in_flight), timeout=grace_s)
    for task in pending:
        task.cancel()
    if pending:
        log.warning("shutting down: cut %d requests still in flight after %g s", len(pending), grace_s,
                    extra={"event": "requests_cut", "cut": len(pending), "grace_s": grace_s})
        await asyncio.wait(pending, timeout=2.0)


def _reload(proxy: Proxy, reload_fn: Callable[[], Config]) -> None:
    try:
        config = reload_fn()
    except LlamactlError as exc:
        log.error("reload failed, keeping the old config: %s", exc, extra={"event": "reload_failed", "error": str(exc)})
        return
    proxy.pool.reload(config)
    proxy.remotes.reload(config)
    log.info("config reloaded: %d models", len(config.models), extra={"event": "reload", "models": sorted(config.models)})
