"""What the proxy's handlers share: the pool, the inventory, the upstream session and the live picture.

One `Proxy` per application (`app[PROXY_KEY]`), made by `app.build_app`; the handlers, the middleware,
the status routes and the poller read it from the request's app, so each is a plain module function.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from llamactl.config import Config
from llamactl.gpu.inventory import Inventory
from llamactl.proxy.pool import Pool
from llamactl.proxy.remote import Remotes
from llamactl.servers import client

if TYPE_CHECKING:
    import aiohttp

    from llamactl.proxy.bodies import Parser
    from llamactl.proxy.status import Metrics

# POST routes routed by the body's `model` to the same path on its instance: OpenAI's, Anthropic's
# (`/v1/messages`), and llama-server's own that clients use
MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/completion", "/infill",
                "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize",
                "/apply-template")
RECENT_REQUESTS = 200  # kept for the status page and `llamactl top --url`
HISTORY_POINTS = 600  # GPU memory samples kept (one per poll: 10 minutes at 1 s)


@dataclass
class Proxy:
    pool: Pool
    inventory_fn: Callable[[], Inventory]
    metrics: Metrics
    parser: Parser
    keep_instances: bool = False
    grace_s: float = 30.0
    reload_fn: Callable[[], Config] | None = None
    session: aiohttp.ClientSession | None = None  # every upstream call's, open from start-up to cleanup
    inventory: Inventory | None = None  # the poller's last reading
    live: dict[str, client.Live] = field(default_factory=dict)  # slots and speed of ready instances, by name
    recent: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))
    history: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every pool change: /status/stream wakes
    notes_due: asyncio.Event = field(default_factory=asyncio.Event)  # set on every pool change: the notes are rewritten
    address: tuple[str, int] | None = None  # where it listens: its notes for local viewers are named by the port
    in_flight: dict[asyncio.Task, web.Request] = field(default_factory=dict)  # drained at shutdown for --grace
    shutting_down: bool = False
    remotes: Remotes = field(init=False)  # the models other boxes serve, from the same config as the pool

    def __post_init__(self) -> None:
        self.remotes = Remotes(self.pool.config)

    def upstream(self) -> aiohttp.ClientSession:
        assert self.session is not None, "the session opens at start-up"
        return self.session


PROXY_KEY = web.AppKey("proxy", Proxy)


def proxy_of(request: web.Request) -> Proxy:
    return request.app[PROXY_KEY]
