"""The aiohttp application: routes, auth, OpenAI-shaped errors, metrics, and the lifespan it owns.

One ClientSession for every upstream call and one poller task, both created
and closed by the app's cleanup context; at shutdown the instances this proxy
started are stopped unless --keep-instances.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llamactl.config import Config
from llamactl.errors import AuthError, LlamactlError, ProxyError, RequestTimeoutError, UpstreamError, one_line
from llamactl.gpu.inventory import Inventory
from llamactl.proxy import forward
from llamactl.lifecycle import SLOT
from llamactl.proxy.pool import Pool

log = logging.getLogger("llamactl.proxy")
access = logging.getLogger("llamactl.access")

MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/completion", "/infill")
POOL_KEY = web.AppKey("pool", Pool)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
METRICS_KEY = web.AppKey("metrics", object)
STATE_KEY = web.AppKey("state", dict)
MAX_BODY_HARD = 16 * 2**30  # aiohttp's own cap; the configured max_body (reloadable) is checked per request
BODY_SECONDS_PER_MIB = 1.0  # body_timeout grows by this for each MiB a client declares
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned: logged and counted, never sent


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llamactl_requests", "Requests by model and HTTP status", ["model", "status"], registry=r)
        self.latency = Histogram("llamactl_request_seconds", "Request latency", ["model"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttfb = Histogram("llamactl_time_to_first_byte_seconds", "Time to the first upstream byte", ["model"],
                              registry=r, buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("llamactl_tokens", "Tokens reported by upstream usage", ["model", "kind"], registry=r)
        self.queue = Gauge("llamactl_queue_depth", "Requests waiting for a model to load", ["model"], registry=r)
        self.instances = Gauge("llamactl_instances", "Proxy instances by state", ["state"], registry=r)
        self.launches = Gauge("llamactl_launches", "Launches by model and result", ["model", "result"], registry=r)
        self.evictions = Gauge("llamactl_evictions", "Evictions by reason", ["reason"], registry=r)
        self.gpu_used = Gauge("llamactl_gpu_memory_used_bytes", "GPU memory used", ["gpu"], registry=r)

    def refresh(self, pool: Pool, inventory: Inventory | None) -> None:
        for phase in SLOT:
            self.instances.labels(phase.value).set(sum(1 for s in pool.slots.values() if s.phase is phase))
        for name, slot in pool.slots.items():
            self.queue.labels(name).set(slot.waiting)
        for (model, result), count in pool.stats.launches.items():
            self.launches.labels(model, result).set(count)
        for reason, count in pool.stats.evictions.items():
            self.evictions.labels(reason).set(count)
        if inventory is not None:
            for gpu in inventory.gpus:
                self.gpu_used.labels(str(gpu.index)).set(gpu.memory_used_bytes)


def _authorized(header: str, keys: tuple[str, ...]) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110), compared in constant time."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip().encode()
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token, key.encode()) for key in keys)


def error_response(exc: ProxyError | LlamactlError, status: int | None = None) -> web.Response:
    if isinstance(exc, ProxyError):
        status, kind, code = exc.http_status, exc.kind, exc.code
    else:
        status, kind, code = status or 400, "invalid_request_error", "bad_request"
    headers = {}
    if isinstance(exc, ProxyError) and exc.retry_after_s:
        headers["Retry-After"] = str(exc.retry_after_s)
    body = {"error": {"message": str(exc), "type": kind, "code": code}}
    response = web.json_response(body, status=status, headers=headers)
    if isinstance(exc, RequestTimeoutError):
        response.force_close()  # the rest of a slow body is not worth waiting for
    return response


def build_app(pool: Pool, inventory_fn: Callable[[], Inventory], *, keep_instances: bool = False,
              log_json: bool = False, reload_fn: Callable[[], Config] | None = None,
              grace_s: float = 30.0) -> web.Application:
    metrics = Metrics()
    in_flight: dict[asyncio.Task, web.Request] = {}  # for shutdown: drained for exactly --grace, then cut
    shutting_down = {"now": False}

    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Callable) -> web.StreamResponse:
        started = time.monotonic()
        request["model"] = "-"
        task = asyncio.current_task()
        if task is not None:
            in_flight[task] = request
        try:
            keys = pool.config.api_keys
            if keys and request.path != "/health" and not _authorized(request.headers.get("Authorization", ""), keys):
                raise AuthError("missing or invalid API key (Authorization: Bearer ...)")
            response = await handler(request)
        except ProxyError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status == 413:
                response = error_response(LlamactlError(f"request body too large (limit {pool.config.max_body_bytes} bytes)"), 413)
            elif exc.status in (404, 405):  # OpenAI-shaped, and logged like every other request
                what = "no such route" if exc.status == 404 else f"method {request.method} not allowed"
                response = error_response(LlamactlError(f"{what}: {request.method} {request.path[:200]}"), exc.status)
            else:
                raise
        except LlamactlError as exc:
            response = error_response(exc, 400)
        except asyncio.CancelledError:
            # the client went away (or the shutdown's grace ran out): logged and counted all the same; a
            # client that closed right after the stream's end got the whole answer: its status stands
            status = request["relay_status"] if request.get("relay_done") else (503 if shutting_down["now"] else CLIENT_CLOSED)
            _access_log(request, status, time.monotonic() - started, log_json)
            raise
        finally:
            if task is not None:
                in_flight.pop(task, None)
        _access_log(request, CLIENT_CLOSED if request.get("client_gone") else response.status,
                    time.monotonic() - started, log_json)
        return response

    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY_HARD)
    app[POOL_KEY] = pool
    app[METRICS_KEY] = metrics
    app[STATE_KEY] = {"inventory": None}

    async def read_body(request: web.Request) -> bytes:
        """The body within max_body (as configured now) and within body_timeout (+ a second per MiB declared)."""
        limit = pool.config.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
        deadline = pool.config.body_timeout_s + BODY_SECONDS_PER_MIB * (declared or 0) / 2**20
        chunks, size = [], 0

        async def read_all() -> None:
            nonlocal size
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read_all(), deadline)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"request body not received within {deadline:g} s") from None
        return b"".join(chunks)

    async def model_request(request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        try:  # a large body is parsed off the event loop: /health and streams go on meanwhile
            payload = await asyncio.to_thread(json.loads, body) if len(body) > 2**20 else json.loads(body or b"{}")
        except ValueError:
            raise LlamactlError("request body is not valid JSON") from None
        except RecursionError:
            raise LlamactlError("request body is nested too deeply") from None
        requested = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(requested, str) or not requested:
            raise LlamactlError("request body needs a \"model\" naming a configured model")
        request["model"] = requested
        started = time.monotonic()
        try:
            return await _forward(request, requested, body, started)
        except asyncio.CancelledError:
            known = pool.config.lookup(requested)
            name = known.name if known is not None else "-"  # never a client's text as a metric label
            status = request["relay_status"] if request.get("relay_done") else CLIENT_CLOSED
            metrics.requests.labels(name, str(status)).inc()
            raise

    async def _forward(request: web.Request, requested: str, body: bytes, started: float) -> web.StreamResponse:
        for attempt in range(2):
            slot = await pool.acquire(requested)
            name = slot.model.name
            try:
                response, outcome = await forward.relay(request, app[SESSION_KEY], slot.base_url + request.path, body,
                                                        slot.api_key, started)
                break
            except UpstreamError:
                # nothing was sent yet: an instance that is gone (evicted from another shell, crashed) is
                # forgotten and this request starts it again, once
                if await pool.mark_dead(slot, "unreachable") and attempt == 0:
                    continue
                metrics.requests.labels(name, "502").inc()
                raise
            finally:
                pool.release(slot)
        if outcome.upstream_died:
            await pool.mark_dead(slot, "died mid-stream", wait_s=3.0)
        metrics.requests.labels(name, str(CLIENT_CLOSED if request.get("client_gone") else outcome.status)).inc()
        metrics.latency.labels(name).observe(time.monotonic() - started)
        if outcome.ttfb_s is not None:
            metrics.ttfb.labels(name).observe(outcome.ttfb_s)
        for kind in ("prompt_tokens", "completion_tokens"):
            if outcome.usage and kind in outcome.usage:
                metrics.tokens.labels(name, kind.split("_")[0]).inc(outcome.usage[kind])
        return response

    async def models(request: web.Request) -> web.Response:
        data = []
        for name, slot in sorted(pool.slots.items()):
            if name not in pool.config.models:
                continue
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "llamactl",
                         "aliases": list(slot.model.aliases), "status": slot.phase.value})
        return web.json_response({"object": "list", "data": data})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def status(request: web.Request) -> web.Response:
        from llamactl.cli.gpus import gpus_json

        inv = await asyncio.to_thread(inventory_fn)
        instances = []
        for name, slot in sorted(pool.slots.items()):
            inst = slot.instance
            instances.append({
                "model": name, "state": slot.phase.value, "in_flight": slot.in_flight, "queued": slot.waiting,
                "last_used": slot.last_used or None, "started_by_proxy": slot.ours,
                "pid": inst.pid if inst else None, "port": inst.port if inst else None,
                "gpu_ids": list(inst.gpu_ids) if inst else [],
                "estimated_bytes": sum(inst.estimated_bytes.values()) if inst else None,
            })
        return web.json_response({"gpus": gpus_json(inv), "instances": instances})

    async def prometheus(request: web.Request) -> web.Response:
        metrics.refresh(pool, app[STATE_KEY]["inventory"])
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    for path in MODEL_ROUTES:
        app.router.add_post(path, model_request)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", prometheus)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        app[SESSION_KEY] = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        adopted = await pool.adopt_all()
        if adopted:
            log.info("adopted running instances: %s", ", ".join(adopted))
        poller = asyncio.create_task(_poll_forever(pool, app, inventory_fn))
        loop = asyncio.get_running_loop()
        if reload_fn is not None:
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: _reload(pool, reload_fn))
            except (NotImplementedError, RuntimeError):
                pass
        try:
            yield
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await pool.shutdown(keep_instances)
            await app[SESSION_KEY].close()

    async def drain(app: web.Application) -> None:
        """At SIGTERM (no new connections by now): in-flight requests get exactly `grace_s` to finish, then
        are cut (logged 503); then the instances go (lifespan)."""
        shutting_down["now"] = True
        if not in_flight:
            return
        log.info("shutting down: waiting up to %g s for %d requests in flight", grace_s, len(in_flight))
        _, pending = await asyncio.wait(set(in_flight), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("shutting down: cut %d requests still in flight after %g s", len(pending), grace_s)
            await asyncio.wait(pending, timeout=2.0)

    app.on_shutdown.append(drain)
    app.cleanup_ctx.append(lifespan)
    return app


def _reload(pool: Pool, reload_fn: Callable[[], Config]) -> None:
    try:
        config = reload_fn()
    except LlamactlError as exc:
        log.error("reload failed, keeping the old config: %s", exc)
        return
    pool.reload(config)
    log.info("config reloaded: %d models", len(config.models))


async def _poll_forever(pool: Pool, app: web.Application, inventory_fn: Callable[[], Inventory]) -> None:
    while True:
        await asyncio.sleep(pool.config.poll_interval_s)
        try:
            await pool.poll_once()
            app[STATE_KEY]["inventory"] = await asyncio.to_thread(inventory_fn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the poller must outlive one bad round
            log.error("poll failed: %s", exc)


LOGGED_VALUE_LIMIT = 200  # characters of a client's path or model name in the access log


def _access_log(request: web.Request, status: int, seconds: float, as_json: bool) -> None:
    """One line per request; what the client chose (path, model) escaped and cut, so it cannot forge lines."""
    path = one_line(request.path, LOGGED_VALUE_LIMIT)
    model = one_line(str(request.get("model", "-")), LOGGED_VALUE_LIMIT)
    if as_json:
        access.info(json.dumps({"method": request.method, "path": path, "model": model,
                                "status": status, "ms": round(seconds * 1000, 1), "remote": request.remote}))
    else:
        access.info("%s %s model=%s status=%d %.1fms", one_line(request.method, 20), path, model.replace(" ", "\\x20"),
                    status, seconds * 1000)
