"""Every request's way in and out: the browser checks, the key, OpenAI-shaped errors, the access log and the count.

`errors_and_auth` is the application's one middleware: a request is checked (Host, Origin, content type,
then the API key) before any handler runs; whatever a handler raises becomes an OpenAI-shaped error body
(`error_response`, the proxy's one mapping of llamactl's errors to HTTP); every request gets one access-log
line, and every model request is counted once in `llamactl_requests_total`, with the status its line has.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable

from aiohttp import web

from llamactl.config import Config
from llamactl import errors
from llamactl.errors import (AuthError, BadRequestError, ForbiddenError, LlamactlError, ProxyError, RequestTimeoutError,
                             UnsupportedMediaError, one_line)
from llamactl.proxy import browsers
from llamactl.proxy.context import MODEL_ROUTES, Proxy, proxy_of

log = logging.getLogger("llamactl.proxy")
access = logging.getLogger("llamactl.access")

CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned: logged and counted, never sent
PUBLIC_PATHS = ("/health", "/", "/ui", "/ui/app.js", "/ui/style.css")  # no data in them: served without a key
STATE_CHANGING = ("/models/",)  # POST routes besides MODEL_ROUTES that change what runs
LOGGED_VALUE_LIMIT = 200  # characters of a client's path or model name in the access log


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


def _count(proxy: Proxy, request: web.Request, status: int) -> None:
    """Every model request in llamactl_requests_total, with the status its access-log line has: answered,
    refused before forwarding (400, 403, 404, 408, 413, 415, 429, a start that failed), cut or abandoned.
    A model that is neither configured nor served by a remote box counts as `-` (never a client's text as a
    label)."""
    if request.path not in MODEL_ROUTES:
        return
    requested = str(request["model"])
    known = proxy.pool.config.lookup(requested) if requested != "-" else None
    label = known.name if known is not None else requested if proxy.remotes.serving(requested) else "-"
    proxy.metrics.requests.labels(label, str(status)).inc()


def _admit(request: web.Request, config: Config) -> web.Response | None:
    """The checks before any handler (an error raised when one fails); the answer to a CORS preflight, or None
    when the handler is to run."""
    _check_browser(request, config)
    if request.method == "OPTIONS":  # a CORS preflight from an allowed origin (others: 403 above)
        return _preflight(request, config)
    keys = config.api_keys
    if keys and request.path not in PUBLIC_PATHS and not _authorized(request.headers.get("Authorization", ""), keys):
        raise AuthError("missing or invalid API key (Authorization: Bearer ...)")
    return None


@web.middleware
async def errors_and_auth(request: web.Request, handler: Callable) -> web.StreamResponse:
    proxy = proxy_of(request)
    started = time.monotonic()
    request["model"] = "-"
    task = asyncio.current_task()
    if task is not None:
        proxy.in_flight[task] = request
    try:
        preflight = _admit(request, proxy.pool.config)
        if preflight is not None:
            _access_log(request, preflight.status, time.monotonic() - started)
            return preflight
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            response = error_response(BadRequestError(f"request body too large (limit {proxy.pool.config.max_body_bytes} bytes)"), 413)
        elif exc.status in (404, 405):  # OpenAI-shaped, and logged like every other request
            what = "no such route" if exc.status == 404 else f"method {request.method} not allowed"
            response = error_response(BadRequestError(f"{what}: {request.method} {request.path[:200]}"), exc.status)
        else:
            raise
    except LlamactlError as exc:  # typed: errors.FAILURES says whose fault (4xx the request's, 5xx ours)
        response = error_response(exc)
        if response.status >= 500:
            log.error("%s %s: %s", request.method, one_line(request.path, 200), exc,
                      extra={"event": "request_error", "method": request.method, "path": one_line(request.path, 200),
                             "status": response.status, "error": str(exc)})
    except Exception as exc:  # a bug: one logged traceback, and an OpenAI-shaped 500 for the client
        log.exception("internal error on %s %s", request.method, one_line(request.path, 200),
                      extra={"event": "internal_error", "method": request.method, "path": one_line(request.path, 200)})
        response = error_response(ProxyError(f"internal error: {type(exc).__name__} (see the proxy's log)"))
    except asyncio.CancelledError:
        # the client went away (or the shutdown's grace ran out): logged and counted all the same; a
        # client that closed right after the stream's end got the whole answer: its status stands
        # a request cut by an unload with ?force=true is ours to answer for, as one cut at shutdown
        cut = proxy.shutting_down or request.get("cut")
        status = request["relay_status"] if request.get("relay_done") else (503 if cut else CLIENT_CLOSED)
        _access_log(request, status, time.monotonic() - started)
        _count(proxy, request, status)
        raise
    finally:
        if task is not None:
            proxy.in_flight.pop(task, None)
    status = CLIENT_CLOSED if request.get("client_gone") else request.get("relay_status", response.status)
    _access_log(request, status, time.monotonic() - started)
    _count(proxy, request, status)
    if request.method == "POST" and request.path in MODEL_ROUTES:
        proxy.recent.append({"at": time.time(), "model": one_line(str(request["model"]), 80), "status": status,
                             "ms": round((time.monotonic() - started) * 1000, 1), "tokens": request.get("tokens")})
    return response


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
    return web.Response(status=204, headers={  # Allow-Origin and Vary: secure_headers, as on every response
        "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": browsers.CORS_ALLOW_HEADERS,
        "Access-Control-Max-Age": str(browsers.CORS_MAX_AGE_S)})


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The page's headers (no framing, a strict CSP), nosniff everywhere, CORS only for allowed origins; an
    `on_response_prepare` hook, so streams get them too, just before their headers go out."""
    config = proxy_of(request).pool.config
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path in ("/", "/ui") or request.path.startswith("/ui/"):
        for name, value in browsers.PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    allow = browsers.cors_origin(request.headers.get("Origin"), config.allowed_origins)
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Vary"] = "Origin"


def _access_log(request: web.Request, status: int, seconds: float) -> None:
    """One line per request (event `access`); what the client chose (method, path, model) escaped and cut, so
    it cannot forge lines."""
    method = one_line(request.method, 20)
    path = one_line(request.path, LOGGED_VALUE_LIMIT)
    model = one_line(str(request.get("model", "-")), LOGGED_VALUE_LIMIT)
    access.info("%s %s model=%s status=%d %.1fms", method, path, model.replace(" ", "\\x20"), status, seconds * 1000,
                extra={"event": "access", "method": method, "path": path, "model": model, "status": status,
                       "duration_ms": round(seconds * 1000, 1), "remote": request.remote})
