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
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from importlib import resources

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # Prometheus' conventions: counters end in _total, no extra _created series

from llamactl.config import Config
from llamactl import errors
from llamactl.errors import (AuthError, BadRequestError, BodyTooLargeError, ForbiddenError, LlamactlError, ProxyError,
                             RequestTimeoutError, UnsupportedMediaError, UpstreamError, one_line)
from llamactl.gpu.inventory import Inventory
from llamactl.proxy import bodies, browsers, forward
from llamactl.lifecycle import SLOT, Status
from llamactl.proxy.pool import Pool
from llamactl.servers import client

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
RECENT_REQUESTS = 200  # kept for the status page and `llamactl top --url`
HISTORY_POINTS = 600  # GPU memory samples kept (one per poll: 10 minutes at 1 s)
STREAM_INTERVAL_S = 1.0  # /status/stream sends at least this often, and at once on a change
PUBLIC_PATHS = ("/health", "/", "/ui", "/ui/app.js", "/ui/style.css")  # no data in them: served without a key


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
        self.pool_counts = _PoolCounters()  # launches and evictions, counted by the pool
        r.register(self.pool_counts)
        self.gpu_used = Gauge("llamactl_gpu_memory_used_bytes", "GPU memory used", ["gpu"], registry=r)

    def refresh(self, pool: Pool, inventory: Inventory | None) -> None:
        for phase in SLOT:
            self.instances.labels(phase.value).set(sum(1 for s in pool.slots.values() if s.phase is phase))
        for name, slot in pool.slots.items():
            self.queue.labels(name).set(slot.waiting)
        self.pool_counts.stats = pool.stats
        if inventory is not None:
            for gpu in inventory.gpus:
                self.gpu_used.labels(str(gpu.index)).set(gpu.memory_used_bytes)


class _PoolCounters:
    """The pool's launch and eviction counts as Prometheus counters (`llamactl_launches_total`, ...)."""

    def __init__(self) -> None:
        self.stats: object | None = None

    def collect(self):
        launches = CounterMetricFamily("llamactl_launches", "Launches by model and result", labels=["model", "result"])
        evictions = CounterMetricFamily("llamactl_evictions", "Evictions (stops) by reason", labels=["reason"])
        if self.stats is not None:
            for (model, result), count in self.stats.launches.items():  # type: ignore[attr-defined]
                launches.add_metric([model, result], count)
            for reason, count in self.stats.evictions.items():  # type: ignore[attr-defined]
                evictions.add_metric([reason], count)
        yield launches
        yield evictions


def _authorized(header: str, keys: tuple[str, ...]) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110), compared in constant time."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip().encode()
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token, key.encode()) for key in keys)


def error_response(exc: LlamactlError, status: int | None = None) -> web.Response:
    """OpenAI's envelope for a failure, its status and code from errors.FAILURES (`status`: aiohttp's own)."""
    failure = errors.failure_of(exc)
    status = status or failure.http_status
    headers = {}
    if isinstance(exc, ProxyError) and exc.retry_after_s:
        headers["Retry-After"] = str(exc.retry_after_s)
    body = {"error": {"message": str(exc), "type": errors.openai_type(status), "code": failure.code}}
    response = web.json_response(body, status=status, headers=headers)
    if isinstance(exc, RequestTimeoutError):
        response.force_close()  # the rest of a slow body is not worth waiting for
    return response


def build_app(pool: Pool, inventory_fn: Callable[[], Inventory], *, keep_instances: bool = False,
              log_json: bool = False, reload_fn: Callable[[], Config] | None = None,
              grace_s: float = 30.0) -> web.Application:
    metrics = Metrics()
    in_flight: dict[asyncio.Task, web.Request] = {}  # for shutdown: drained for exactly --grace, then cut
    recent: deque[dict[str, object]] = deque(maxlen=RECENT_REQUESTS)
    history: deque[dict[str, object]] = deque(maxlen=HISTORY_POINTS)
    changed = asyncio.Event()
    previous_on_change = pool.on_change

    def on_change() -> None:
        changed.set()
        if previous_on_change is not None:
            previous_on_change()

    pool.on_change = on_change
    shutting_down = {"now": False}

    def count(request: web.Request, status: int) -> None:
        """Every model request in llamactl_requests_total, with the status its access-log line has: answered,
        refused before forwarding (400, 403, 404, 408, 413, 415, 429, a start that failed), cut or abandoned.
        A model that is not configured counts as `-` (never a client's text as a label)."""
        if request.path not in MODEL_ROUTES:
            return
        known = pool.config.lookup(str(request["model"])) if request["model"] != "-" else None
        metrics.requests.labels(known.name if known is not None else "-", str(status)).inc()

    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Callable) -> web.StreamResponse:
        started = time.monotonic()
        request["model"] = "-"
        task = asyncio.current_task()
        if task is not None:
            in_flight[task] = request
        try:
            _check_browser(request, pool.config)
            if request.method == "OPTIONS":  # a CORS preflight from an allowed origin (others: 403 above)
                response = _preflight(request, pool.config)
                _access_log(request, response.status, time.monotonic() - started, log_json)
                return response
            keys = pool.config.api_keys
            if keys and request.path not in PUBLIC_PATHS and not _authorized(request.headers.get("Authorization", ""), keys):
                raise AuthError("missing or invalid API key (Authorization: Bearer ...)")
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                response = error_response(BadRequestError(f"request body too large (limit {pool.config.max_body_bytes} bytes)"), 413)
            elif exc.status in (404, 405):  # OpenAI-shaped, and logged like every other request
                what = "no such route" if exc.status == 404 else f"method {request.method} not allowed"
                response = error_response(BadRequestError(f"{what}: {request.method} {request.path[:200]}"), exc.status)
            else:
                raise
        except LlamactlError as exc:  # typed: errors.FAILURES says whose fault (4xx the request's, 5xx ours)
            response = error_response(exc)
            if response.status >= 500:
                log.error("%s %s: %s", request.method, one_line(request.path, 200), exc)
        except Exception as exc:  # a bug: one logged traceback, and an OpenAI-shaped 500 for the client
            log.exception("internal error on %s %s", request.method, one_line(request.path, 200))
            response = error_response(ProxyError(f"internal error: {type(exc).__name__} (see the proxy's log)"))
        except asyncio.CancelledError:
            # the client went away (or the shutdown's grace ran out): logged and counted all the same; a
            # client that closed right after the stream's end got the whole answer: its status stands
            status = request["relay_status"] if request.get("relay_done") else (503 if shutting_down["now"] else CLIENT_CLOSED)
            _access_log(request, status, time.monotonic() - started, log_json)
            count(request, status)
            raise
        finally:
            if task is not None:
                in_flight.pop(task, None)
        status = CLIENT_CLOSED if request.get("client_gone") else request.get("relay_status", response.status)
        _access_log(request, status, time.monotonic() - started, log_json)
        count(request, status)
        if request.method == "POST" and request.path in MODEL_ROUTES:
            recent.append({"at": time.time(), "model": one_line(str(request["model"]), 80), "status": status,
                           "ms": round((time.monotonic() - started) * 1000, 1), "tokens": request.get("tokens")})
        return response

    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY_HARD)
    parser = bodies.Parser()
    app[POOL_KEY] = pool
    app[METRICS_KEY] = metrics
    app[STATE_KEY] = {"inventory": None, "history": history, "live": {}}

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
        # a large body is counted and parsed in another process: /health and streams go on meanwhile
        verdict, requested = await parser.model_of(body)
        if verdict == "too_many":
            raise BodyTooLargeError(f"request body has more than {bodies.MAX_VALUES} JSON values")
        if verdict == "invalid":
            raise BadRequestError("request body is not valid JSON")
        if verdict == "deep":
            raise BadRequestError("request body is nested too deeply")
        if not isinstance(requested, str) or not requested:
            raise BadRequestError("request body needs a \"model\" naming a configured model")
        request["model"] = requested
        return await _forward(request, requested, body, time.monotonic())

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
                raise
            finally:
                pool.release(slot)
        if outcome.upstream_died:
            await pool.mark_dead(slot, "died mid-stream", wait_s=3.0)
        metrics.latency.labels(name).observe(time.monotonic() - started)
        if outcome.ttfb_s is not None:
            metrics.ttfb.labels(name).observe(outcome.ttfb_s)
        for kind in ("prompt_tokens", "completion_tokens"):
            if outcome.usage and kind in outcome.usage:
                metrics.tokens.labels(name, kind.split("_")[0]).inc(outcome.usage[kind])
        if outcome.usage:
            request["tokens"] = outcome.usage.get("total_tokens")
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

    def snapshot(inv: Inventory | None) -> dict[str, object]:
        """The live picture `llamactl top --url` and the status page draw (views.py's shape)."""
        from llamactl.cli.gpus import gpus_json

        now = time.time()
        instances = []
        for name, slot in sorted(pool.slots.items()):
            inst = slot.instance
            ttl = slot.model.ttl_s if slot.model.ttl_s is not None else pool.config.idle_ttl_s
            idle = now - slot.last_used if inst is not None and slot.last_used else None
            instances.append({
                "name": name, "model": name, "aliases": list(slot.model.aliases), "state": slot.phase.value,
                "configured": name in pool.config.models, "in_flight": slot.in_flight, "queued": slot.waiting,
                "last_used": slot.last_used or None, "idle_s": idle if not slot.in_flight else 0.0,
                "ttl_s": ttl, "ttl_left_s": max(ttl - idle, 0.0) if ttl is not None and idle is not None else None,
                "started_by_proxy": slot.ours, "pid": inst.pid if inst else None, "port": inst.port if inst else None,
                "gpu_ids": list(inst.gpu_ids) if inst else [],
                "estimated_bytes": sum(inst.estimated_bytes.values()) if inst else None,
                "actual_bytes": sum(inst.actual_bytes.values()) or None if inst else None,
                "devices": {d: {"estimated_bytes": inst.estimated_bytes.get(d), "actual_bytes": inst.actual_bytes.get(d)}
                            for d in inst.estimated_bytes} if inst else {},
                **_live_fields(app[STATE_KEY]["live"].get(name) if inst else None),
            })
        rates: dict[str, dict[str, object]] = {}
        for r in recent:
            if now - float(r["at"]) <= 60:  # type: ignore[arg-type]
                entry = rates.setdefault(str(r["model"]), {"per_min": 0, "latencies": []})
                entry["per_min"] += 1  # type: ignore[operator]
                entry["latencies"].append(r["ms"])  # type: ignore[union-attr]
        for entry in rates.values():
            lat = sorted(entry.pop("latencies"))  # type: ignore[arg-type]
            entry["p50_ms"] = lat[len(lat) // 2] if lat else None
            entry["p95_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else None
        return {"source": "proxy", "at": now, "gpus": gpus_json(inv) if inv is not None else [],
                "gpu_note": inv.note if inv is not None else None, "instances": instances,
                "events": pool.events.json(), "requests": list(recent)[-50:], "rates": rates,
                "history": list(history), "queue": sum(s.waiting for s in pool.slots.values())}

    async def status(request: web.Request) -> web.Response:
        inv = await asyncio.to_thread(inventory_fn)
        return web.json_response(snapshot(inv))

    async def status_stream(request: web.Request) -> web.StreamResponse:
        """Server-sent events: the snapshot at once, then on every change and at least every second."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        request["relay_status"], request["relay_done"] = 200, True  # a stream the client ends is no abort
        while not shutting_down["now"]:
            inv = app[STATE_KEY]["inventory"] or await asyncio.to_thread(inventory_fn)
            try:
                await response.write(f"data: {json.dumps(snapshot(inv))}\n\n".encode())
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                break
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), STREAM_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
        return response

    async def load_model(request: web.Request) -> web.Response:
        """Start a configured model now (as a request for it would), for the status page and scripts."""
        slot = await pool.acquire(request.match_info["name"])
        pool.release(slot)
        return web.json_response({"model": slot.model.name, "state": slot.phase.value})

    async def unload_model(request: web.Request) -> web.Response:
        """Stop a model's instance now (as its TTL would): refused while requests are in flight."""
        name = request.match_info["name"]
        stopped = await pool.unload(name)
        return web.json_response({"model": name, "stopped": stopped})

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=_asset("index.html"), content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def asset(request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        kind = {"app.js": "text/javascript", "style.css": "text/css"}[name]
        return web.Response(body=_asset(name), content_type=kind, headers={"Cache-Control": "no-cache"})

    async def prometheus(request: web.Request) -> web.Response:
        metrics.refresh(pool, app[STATE_KEY]["inventory"])
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    for path in MODEL_ROUTES:
        app.router.add_post(path, model_request)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_get("/status/stream", status_stream)
    app.router.add_post("/models/{name}/load", load_model)
    app.router.add_post("/models/{name}/unload", unload_model)
    app.router.add_get("/", page)
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/app.js", asset)
    app.router.add_get("/ui/style.css", asset)
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
            parser.close()

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

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        _secure_headers(request, response, pool.config)  # streams too: just before their headers go out

    app.on_response_prepare.append(on_prepare)
    app.on_shutdown.append(drain)
    app.cleanup_ctx.append(lifespan)
    return app


STATE_CHANGING = ("/models/",)  # POST routes besides MODEL_ROUTES that change what runs


def _check_browser(request: web.Request, config: Config) -> None:
    """Host, Origin and content type, before the key: a page the user visits is not a client."""
    host = request.headers.get("Host")
    if not browsers.host_allowed(host, config.host, config.allowed_hosts):
        raise ForbiddenError(f"Host {one_line(host or '', 100)!r} is not this proxy's address; add the name to "
                             "allowed_hosts if clients reach the proxy by it")
    origin = request.headers.get("Origin")
    if not browsers.origin_allowed(origin, host, config.allowed_origins):
        raise ForbiddenError(f"requests from the page {one_line(origin or '', 100)!r} are refused; add the origin to "
                             "allowed_origins to let it call the proxy")
    if (request.method == "POST" and (request.path in MODEL_ROUTES or request.path.startswith(STATE_CHANGING))
            and not browsers.is_json(request.headers.get("Content-Type"))):
        raise UnsupportedMediaError("POST bodies must be Content-Type: application/json")


def _preflight(request: web.Request, config: Config) -> web.Response:
    allow = browsers.cors_origin(request.headers.get("Origin"), config.allowed_origins)
    if allow is None:
        raise ForbiddenError("cross-origin requests are refused; add the page's origin to allowed_origins")
    return web.Response(status=204, headers={  # Allow-Origin and Vary: _secure_headers, as on every response
        "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": browsers.CORS_ALLOW_HEADERS,
        "Access-Control-Max-Age": str(browsers.CORS_MAX_AGE_S)})


def _secure_headers(request: web.Request, response: web.StreamResponse, config: Config) -> None:
    """The page's headers (no framing, a strict CSP), nosniff everywhere, CORS only for allowed origins."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path in ("/", "/ui") or request.path.startswith("/ui/"):
        for name, value in browsers.PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    allow = browsers.cors_origin(request.headers.get("Origin"), config.allowed_origins)
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Vary"] = "Origin"


def _live_fields(live: client.Live | None) -> dict[str, object]:
    return {"slots_busy": live.slots_busy if live else None, "slots_total": live.slots_total if live else None,
            "tokens_per_s": live.tokens_per_s if live else None}


@lru_cache(maxsize=None)
def _asset(name: str) -> bytes:
    """The status page's files, shipped in the package (no build step, nothing fetched at run time)."""
    return resources.files("llamactl.proxy").joinpath("ui", name).read_bytes()


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
            # slots busy and tokens/s of each ready instance (not those with a private key: /slots needs it)
            ready = {n: s.base_url for n, s in pool.slots.items()
                     if s.instance is not None and s.phase is Status.READY and not s.api_key}
            lives = await asyncio.to_thread(client.poll_all, list(ready.values()))
            app[STATE_KEY]["live"] = dict(zip(ready, lives))
            inv = await asyncio.to_thread(inventory_fn)
            app[STATE_KEY]["inventory"] = inv
            app[STATE_KEY]["history"].append({"at": time.time(), "gpus": [
                {"index": g.index, "used": g.memory_used_bytes, "total": g.memory_total_bytes} for g in inv.gpus]})
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
