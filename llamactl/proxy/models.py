"""The model routes: a body read within its bounds, the model it names found, the request relayed to its instance.

Also `/v1/models` (the configured models and their state) and `/health` (the proxy itself).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time

import aiohttp

from aiohttp import web

from llamactl import errors
from llamactl.errors import BadRequestError, LlamactlError, BodyTooLargeError, RequestTimeoutError, UnknownModelError, UpstreamError
from llamactl.proxy import bodies, forward, keepalive
from llamactl.proxy.context import Proxy, proxy_of
from llamactl.lifecycle import Status
from llamactl.proxy.pool import Pool, Slot
from llamactl.proxy.remote import Box

MAX_BODY_HARD = 16 * 2**30  # aiohttp's own cap; the configured max_body (reloadable) is checked per request
BODY_SECONDS_PER_MIB = 1.0  # body_timeout grows by this for each MiB a client declares


async def read_body(request: web.Request, proxy: Proxy) -> bytes:
    """The body within max_body (as configured now) and within body_timeout (+ a second per MiB declared)."""
    limit = proxy.pool.config.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
    deadline = proxy.pool.config.body_timeout_s + BODY_SECONDS_PER_MIB * (declared or 0) / 2**20
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
    proxy = proxy_of(request)
    body = await read_body(request, proxy)
    # a large body is counted and parsed in another process: /health and streams go on meanwhile
    verdict, requested = await proxy.parser.model_of(body)
    if verdict == "too_many":
        raise BodyTooLargeError(f"request body has more than {bodies.MAX_VALUES} JSON values")
    if verdict == "invalid":
        raise BadRequestError("request body is not valid JSON")
    if verdict == "deep":
        raise BadRequestError("request body is nested too deeply")
    if not isinstance(requested, str) or not requested:
        raise BadRequestError("request body needs a \"model\" naming a configured model")
    request["model"] = requested
    route = proxy.pool.config.route(requested)
    if route is None and proxy.remotes.serving(requested):  # the body as the client sent it: its box's own rules
        return await _relay_remote(proxy, request, requested, body, time.monotonic())
    body, keep_alive_s = await keepalive.take(proxy.parser.run, body)  # llama-server knows no such field
    if route is not None:
        model, rules = route
        requested = model.name  # a variant runs on its model's instance
        if rules:  # the model's (or the variant's) request defaults, forced fields and stripped ones
            body = await proxy.parser.run(functools.partial(bodies.rewrite, rules=rules), body)
    return await _forward(proxy, request, requested, body, time.monotonic(), keep_alive_s)


async def _forward(proxy: Proxy, request: web.Request, requested: str, body: bytes, started: float,
                   keep_alive_s: float | None = None) -> web.StreamResponse:
    pool = proxy.pool
    prepared: web.StreamResponse | None = None
    for attempt in range(2):
        if prepared is None and _loading(pool, requested) and await _streams(proxy, body):
            slot, prepared = await _acquire_streaming(pool, request, requested, started)
            if slot is None:
                return prepared  # the failure went out as the stream's last event
        else:
            slot = await pool.acquire(requested)
        name = slot.model.name
        try:
            response, outcome = await forward.relay(request, proxy.upstream(), slot.base_url + request.path, body,
                                                    slot.api_key, started, prepared)
            break
        except UpstreamError:
            # nothing was sent yet: an instance that is gone (evicted from another shell, crashed) is
            # forgotten and this request starts it again, once
            if await pool.mark_dead(slot, "unreachable") and attempt == 0:
                continue
            raise
        finally:
            pool.release(slot, keep_alive_s)
    if outcome.upstream_died:
        await pool.mark_dead(slot, "died mid-stream", wait_s=3.0)
    _observe(proxy, request, name, outcome, started)
    return response


async def _relay_remote(proxy: Proxy, request: web.Request, name: str, body: bytes,
                        started: float) -> web.StreamResponse:
    """A model another box serves: to the box `remote.pick` chooses with its key; one that cannot be reached
    (nothing was relayed yet) is marked unreachable and the next box serving the model is tried; none left is
    a 503 naming them."""
    remotes, tried = proxy.remotes, []
    while True:
        box = remotes.acquire(name, tried)
        try:
            response, outcome = await forward.relay(request, proxy.upstream(), box.base_url + request.path, body,
                                                    box.api_key, started)
            break
        except UpstreamError as exc:
            remotes.failed(box, str(exc))
            tried.append(box)
        finally:
            remotes.release(box, name)
    if outcome.upstream_died:
        remotes.failed(box, "died mid-stream")
    _observe(proxy, request, name, outcome, started)
    return response


def _observe(proxy: Proxy, request: web.Request, name: str, outcome: forward.Outcome, started: float) -> None:
    """A relayed request in the metrics: its latency, time to first byte and the tokens its upstream reported."""
    metrics = proxy.metrics
    metrics.latency.labels(name).observe(time.monotonic() - started)
    if outcome.ttfb_s is not None:
        metrics.ttfb.labels(name).observe(outcome.ttfb_s)
    for kind in ("prompt_tokens", "completion_tokens"):
        if outcome.usage and kind in outcome.usage:
            metrics.tokens.labels(name, kind.split("_")[0]).inc(outcome.usage[kind])
    if outcome.usage:
        request["tokens"] = outcome.usage.get("total_tokens")


LOADING_AFTER_S = 1.0  # a streaming request still waiting for its model this long gets its stream now...
LOADING_EVERY_S = 5.0  # ...and a comment line this often while it waits
_STREAM = re.compile(rb'"stream"\s*:\s*true')


def _loading(pool: Pool, name: str) -> bool:
    slot = pool.slots.get(name)
    return slot is not None and slot.phase is not Status.READY


def _stream_flag(body: bytes) -> bool:
    payload = json.loads(body or b"{}")
    return isinstance(payload, dict) and payload.get("stream") is True


async def _streams(proxy: Proxy, body: bytes) -> bool:
    """Whether the client asked for an event stream (the body's top-level `stream`)."""
    return bool(_STREAM.search(body)) and await proxy.parser.run(_stream_flag, body)


async def _loading_stream(request: web.Request, name: str) -> web.StreamResponse:
    """The event stream, sent now: a streaming client waiting for a model's load gets comment lines meanwhile
    (`: loading NAME 12 s`) so that its read timeout does not fire."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                       "X-Accel-Buffering": "no"})
    await response.prepare(request)
    request["relay_status"] = 200
    return response


async def _acquire_streaming(pool: Pool, request: web.Request, name: str,
                             started: float) -> tuple[Slot | None, web.StreamResponse | None]:
    """pool.acquire for a streaming client: answered as any request when it ends within LOADING_AFTER_S
    (a slot, or the failure raised); else its event stream goes out now, with a loading comment every
    LOADING_EVERY_S, and a failure is the stream's last event (an OpenAI error object, as a stream that
    fails mid-way ends): (None, the stream)."""
    task = asyncio.ensure_future(pool.acquire(name))
    response = None
    try:
        done, _ = await asyncio.wait({task}, timeout=LOADING_AFTER_S)
        if done:
            return task.result(), None
        response = await _loading_stream(request, name)
        while True:
            await response.write(f": loading {name} {time.monotonic() - started:.0f} s\n\n".encode())
            done, _ = await asyncio.wait({task}, timeout=LOADING_EVERY_S)
            if done:
                break
    except LlamactlError:
        raise  # failed before the stream went out: the ordinary error answer
    except BaseException:  # the client went away (or the handler was cancelled): let go of what it waited for
        task.cancel()
        task.add_done_callback(lambda t: pool.release(t.result()) if not t.cancelled() and t.exception() is None else None)
        raise
    try:
        return task.result(), response
    except LlamactlError as exc:
        failure = errors.failure_of(exc)
        request["relay_status"] = failure.http_status
        event = {"error": {"message": str(exc), "type": errors.openai_type(failure.http_status), "code": failure.code}}
        try:
            await response.write(forward.sse_event(event))
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            request["client_gone"] = True
        request["relay_done"] = True
        return None, response


def _entry(slot: Slot, variant: str | None = None) -> dict[str, object]:
    """A model as OpenAI lists it, with its aliases and state (`stopped`, `starting`, `ready`, `stopping`); a
    variant names the model whose instance serves it (`of`)."""
    if variant is not None:
        return {"id": variant, "object": "model", "created": 0, "owned_by": "llamactl", "aliases": [],
                "of": slot.model.name, "status": slot.phase.value}
    return {"id": slot.model.name, "object": "model", "created": 0, "owned_by": "llamactl",
            "aliases": list(slot.model.aliases), "status": slot.phase.value}


def _remote_entry(name: str, boxes: list[Box]) -> dict[str, object]:
    """A model other boxes serve: `ready` while one of them is reachable (or not polled yet), else
    `unreachable`; `upstreams` names them."""
    status = "unreachable" if all(b.reachable is False for b in boxes) else "ready"
    return {"id": name, "object": "model", "created": 0, "owned_by": "llamactl", "aliases": [], "status": status,
            "upstreams": [b.name for b in boxes]}


async def models(request: web.Request) -> web.Response:
    proxy = proxy_of(request)
    pool = proxy.pool
    data = [_entry(slot) for name, slot in sorted(pool.slots.items()) if name in pool.config.models]
    data += [_entry(pool.slots[v.of], v.name) for v in sorted(pool.config.variants.values(), key=lambda v: v.name)
             if v.of in pool.slots]
    remote = sorted({name for name, _ in proxy.remotes.served()})
    data += [_remote_entry(name, proxy.remotes.serving(name)) for name in remote]
    return web.json_response({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    """One configured model by its name or an alias (its `id` is the name), or a 404."""
    pool = proxy_of(request).pool
    variant = pool.config.variants.get(request.match_info["id"])
    if variant is not None and variant.of in pool.slots:
        return web.json_response(_entry(pool.slots[variant.of], variant.name))
    found = pool.config.lookup(request.match_info["id"])
    boxes = proxy_of(request).remotes.serving(request.match_info["id"]) if found is None else []
    if boxes:
        return web.json_response(_remote_entry(request.match_info["id"], boxes))
    if found is None or found.name not in pool.slots:
        raise UnknownModelError(f"model {request.match_info['id']!r} not found")
    return web.json_response(_entry(pool.slots[found.name]))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
