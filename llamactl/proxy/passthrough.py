"""llama-server's read-only routes, `GET /props` and `GET /slots`, passed to the instance `?model=` names.

A look never starts a model: one that is not running is a 503 `model_not_running` (pool.hold), and the
instance it reaches is held against a stop until the answer is relayed, without counting as a use (a
dashboard that polls `/slots` does not keep a model loaded). The POST routes llama-server's clients use
(`/v1/messages`, `/tokenize`, ...) are model routes (context.MODEL_ROUTES), routed by the body's `model`.
Their writing counterparts (`POST /props`, `POST /slots?action=...`) are not passed: 405.
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

from aiohttp import web

from llamactl.errors import BadRequestError
from llamactl.proxy import forward
from llamactl.proxy.context import proxy_of

READ_ONLY_ROUTES = ("/props", "/slots")


async def read_only(request: web.Request) -> web.StreamResponse:
    proxy = proxy_of(request)
    requested = request.query.get("model")
    if not requested:
        raise BadRequestError(f"GET {request.path} needs ?model=NAME, naming a running model")
    request["model"] = requested
    slot = proxy.pool.hold(requested)
    try:
        rest = [(k, v) for k, v in request.query.items() if k != "model"]
        url = slot.base_url + request.path + (f"?{urlencode(rest)}" if rest else "")
        response, _ = await forward.relay(request, proxy.upstream(), url, b"", slot.api_key, time.monotonic())
        return response
    finally:
        proxy.pool.unhold(slot)
