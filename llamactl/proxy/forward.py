"""Relay one request to an instance with aiohttp, streaming without buffering.

SSE answers are passed through piece by piece as `iter_any()` yields them
(`X-Accel-Buffering: no` for any reverse proxy in front). The upstream
response is released in `finally`; a client that goes away cancels the
handler and with it the upstream read. An upstream that dies mid-stream ends
the client's stream with an error event.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from llamactl.errors import UpstreamError

# hop-by-hop and framing headers are the relay's own business
_DROP_REQUEST = {"host", "content-length", "transfer-encoding", "connection", "authorization", "keep-alive",
                 "accept-encoding"}
_DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
_TAIL_BYTES = 4096  # kept from a stream's end to read token usage without parsing every chunk
_TAIL_PIECES = 16
# the last event of an OpenAI-style stream, at a line's start (inside an event's JSON a newline is escaped, so
# a model that writes the words cannot end the answer early)
_DONE = b"\ndata: [DONE]"


@dataclass
class Outcome:
    status: int
    bytes_out: int = 0
    ttfb_s: float | None = None
    usage: dict[str, int] | None = None
    upstream_died: bool = False


def _usage_from(text: str) -> dict[str, int] | None:
    """Token usage from a JSON body or the last SSE events, when the upstream reports it."""
    candidates = [text]
    if "data:" in text:
        candidates = [line[5:].strip() for line in reversed(text.splitlines()) if line.startswith("data:")]
    for chunk in candidates:
        if '"usage"' not in chunk:
            continue
        try:
            usage = json.loads(chunk).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(usage, dict):
            return {k: int(v) for k, v in usage.items() if isinstance(v, int)}
    return None


def done_seen(carry: bytes, piece: bytes) -> tuple[bool, bytes]:
    """Whether the stream's `[DONE]` event is in this piece (or straddles it and the ones before, whose end
    `carry` keeps), and the carry for the next piece."""
    window = carry + piece
    return _DONE in window, window[-(len(_DONE) - 1):]


UPSTREAM_DIED = 502  # a stream its instance cut: logged and counted as the upstream's failure, not the client's


def sse_event(data: bytes | dict) -> bytes:
    """One server-sent event carrying `data` (a JSON object, or bytes already JSON)."""
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    return b"data: " + payload.replace(b"\n", b" ") + b"\n\n"


async def relay(request: web.Request, session: aiohttp.ClientSession, url: str, body: bytes,
                api_key: str | None, started: float,
                prepared: web.StreamResponse | None = None) -> tuple[web.StreamResponse, Outcome]:
    """`prepared`: an event stream already sent to the client (its loading comments): the upstream's answer
    goes on in it — its events as they come, or a whole answer (an error) as one event."""
    import time

    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        upstream = await session.request(request.method, url, data=body, headers=headers)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        # refused, or a kept-alive connection to a process that died since: nothing was relayed yet
        raise UpstreamError(f"instance unreachable: {exc}") from None
    finished = False
    try:
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
        streaming = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        outcome = Outcome(status=upstream.status)
        if not streaming:
            try:
                data = await upstream.read()
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # died before its answer was whole: nothing was sent to the client, so it may be retried
                raise UpstreamError(f"instance failed before answering: {exc}") from None
            outcome.ttfb_s = time.monotonic() - started
            outcome.bytes_out = len(data)
            outcome.usage = _usage_from(data[-65536:].decode("utf-8", "replace")) if upstream.status == 200 else None
            finished = True
            if prepared is not None:  # the 200 went out with the loading comments: the answer is an event
                request["relay_status"] = upstream.status
                try:
                    await prepared.write(sse_event(data))
                    await prepared.write_eof()
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    request["client_gone"] = True
                request["relay_done"] = True
                return prepared, outcome
            return web.Response(status=upstream.status, body=data, headers=out_headers), outcome
        if prepared is not None:
            response = prepared
        else:
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            response.headers["X-Accel-Buffering"] = "no"
            response.headers["Cache-Control"] = "no-cache"
            await response.prepare(request)
        request["relay_status"] = upstream.status
        tail: deque[bytes] = deque(maxlen=_TAIL_PIECES)  # appending costs nothing per piece; joined once

        def tail_usage() -> dict[str, int] | None:
            return _usage_from(b"".join(tail)[-_TAIL_BYTES:].decode("utf-8", "replace"))

        answered, carry = False, b""  # the stream's `data: [DONE]` went out: the client has its whole answer
        try:
            async for piece in upstream.content.iter_any():
                if outcome.ttfb_s is None:
                    outcome.ttfb_s = time.monotonic() - started
                try:
                    await response.write(piece)
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    # it hung up between two pieces: an abort, unless it had read to the end of the answer
                    # and only what follows [DONE] (the upstream's close) found it gone
                    request["client_gone"] = not answered
                    if answered:
                        outcome.usage = tail_usage()
                    return response, outcome
                outcome.bytes_out += len(piece)
                tail.append(piece)
                if not answered:
                    answered, carry = done_seen(carry, piece)
                    request["relay_done"] = answered
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            outcome.upstream_died = not answered  # dying after its [DONE] lost the client nothing
            if answered:
                outcome.usage = tail_usage()
                return response, outcome
            event = {"error": {"message": f"upstream instance failed mid-stream: {exc}", "type": "server_error",
                               "code": "upstream_error"}}
            # the 200 went out with the headers; what is logged and counted is what happened: an upstream error
            outcome.status = request["relay_status"] = UPSTREAM_DIED
            try:
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                pass
        # the whole answer (or the error event that ends a cut one) went out: a close now is no abort
        request["relay_done"] = True
        outcome.usage = tail_usage()
        try:
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            request["client_gone"] = not request["relay_done"]
        finished = True
        return response, outcome
    finally:
        if finished:
            upstream.release()
        else:
            upstream.close()  # the client went away (or we failed): drop the connection so the instance stops
