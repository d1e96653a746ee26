"""A request's `keep_alive` (Ollama's): how long its model stays loaded once the request ends.

Read from the body's top level and taken out of it before the body goes to llama-server (which knows no
such field). Ollama's forms: a duration ("5m", "1h30m"), a number of seconds, 0 (stop the model as soon
as this request ends) or a negative number or duration (never stop it for idleness). The last request to
end sets its model's TTL (one without `keep_alive` gives it back to the configured `ttl` / `idle_ttl`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from llamactl.errors import BadRequestError, UsageError
from llamactl.units import parse_duration

FIELD = b'"keep_alive"'
FOREVER = -1.0  # a negative keep_alive: never stopped for idleness


def seconds(value: object) -> float | None:
    """The TTL a keep_alive value asks for (FOREVER for a negative one), None for JSON null."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if number != number:  # NaN
            raise _bad(value)
        return FOREVER if number < 0 else _bounded(repr(number), value)
    if isinstance(value, str):
        text = value.strip()
        return FOREVER if text.startswith("-") else _bounded(text, value)
    raise _bad(value)


def _bounded(text: str, value: object) -> float:
    try:
        return parse_duration(text, what="keep_alive")
    except UsageError:
        raise _bad(value) from None


def _bad(value: object) -> BadRequestError:
    shown = json.dumps(value)[:60] if not isinstance(value, float) else repr(value)
    return BadRequestError(f"keep_alive: expected a duration like \"5m\", a number of seconds, 0 (unload after this "
                           f"request) or a negative number (keep loaded), got {shown}")


def strip(body: bytes) -> tuple[bytes, object | None]:
    """The body without its top-level `keep_alive`, and the value (None when it has none). The body was read
    and bounded already (bodies.model_of); one without the field is returned as it is, byte for byte."""
    if FIELD not in body:
        return body, None
    payload = json.loads(body)
    if not isinstance(payload, dict) or "keep_alive" not in payload:
        return body, None  # the words in a string, not the field
    value = payload.pop("keep_alive")
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), value


async def take(run: Callable, body: bytes) -> tuple[bytes, float | None]:
    """`strip` through the parser (`run`: bodies.Parser.run, off the loop for a large body), the value checked."""
    if FIELD not in body:
        return body, None
    stripped, value = await run(strip, body)
    return stripped, seconds(value)
