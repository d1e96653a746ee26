"""A request body's `model`, read within bounds: of bytes (app.read_body), of JSON values and of nesting,
and never on the event loop's interpreter for a large body.

The cost of parsing JSON is its number of values, not its bytes: 60 MiB of `[{},{},...]` is 20 million
dicts (1.6 GB) and seconds of a held GIL, where a 60 MiB string is one value. So a body over a MiB is
checked and parsed in a separate process (a small spawn pool, started on first use): its values are
counted first at C speed (strings blanked by a regex, then `{`, `[` and `,` counted), a body over
MAX_VALUES is refused unparsed, and only the model name comes back. The proxy's own loop and memory see
only the bytes it already holds.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamactl.config import RequestRules
from collections.abc import Callable
from typing import TypeVar

MAX_VALUES = 1_000_000
INLINE_BYTES = 2**20  # smaller bodies parse on the loop: microseconds
T = TypeVar("T")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def count_values(body: bytes) -> int:
    """An upper bound of the JSON values in `body` (containers and their elements), strings not looked into."""
    bare = _STRING.sub(b'""', body)
    return bare.count(b"{") + bare.count(b"[") + bare.count(b",") + 1


def model_of(body: bytes, max_values: int = MAX_VALUES) -> tuple[str, str | None]:
    """("ok", model or None) | ("too_many", None) | ("invalid", None) | ("deep", None)."""
    if count_values(body) > max_values:
        return "too_many", None
    try:
        payload = json.loads(body or b"{}")
    except RecursionError:
        return "deep", None
    except ValueError:
        return "invalid", None
    model = payload.get("model") if isinstance(payload, dict) else None
    return "ok", model if isinstance(model, str) else None


def rewrite(body: bytes, rules: "RequestRules") -> bytes:
    """The body with a model's request rules applied (`[models.NAME.request]`: defaults, force, strip)."""
    payload = json.loads(body or b"{}")
    if not isinstance(payload, dict):
        return body
    return json.dumps(rules.apply(payload), ensure_ascii=False, separators=(",", ":")).encode()


class Parser:
    """The pool that parses large bodies; created on first use, shut down with the app."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._pool = None

    def pool(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def model_of(self, body: bytes) -> tuple[str, str | None]:
        return await self.run(model_of, body)

    async def run(self, fn: Callable[[bytes], T], body: bytes) -> T:
        """`fn(body)` on the loop for a small body, in the pool for a large one (`fn`: a module-level function)."""
        import asyncio

        if len(body) <= INLINE_BYTES:
            return fn(body)
        return await asyncio.get_running_loop().run_in_executor(self.pool(), fn, body)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
