"""The CLI's synchronous HTTP to llama-server instances (httpx lives here and nowhere else in the CLI).

Short explicit timeouts: a hung instance costs `ps` at most its timeout, and
every transport failure becomes None rather than an exception.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: httpx costs ~50 ms, and `ps` with nothing running needs none
    import httpx

DEFAULT_TIMEOUT_S = 1.0
_METRIC_RE = re.compile(r"^llamacpp:(\w+)\s+([0-9.eE+-]+)$", re.MULTILINE)


@dataclass(frozen=True)
class Live:
    """What one instance said when polled; None where it did not answer."""

    healthy: bool
    model_path: str | None = None
    slots_busy: int | None = None
    slots_total: int | None = None
    tokens_per_s: float | None = None
    activity: int | None = None  # prompt + predicted token counters: grows with every request


def health(client: httpx.Client, base_url: str) -> int | None:
    """The /health status code, or None when nothing answers."""
    import httpx

    try:
        return client.get(f"{base_url}/health").status_code
    except httpx.HTTPError:
        return None


def model_path(client: httpx.Client, base_url: str) -> str | None:
    """The model the answering server loaded (/props), to tell our server from another program's."""
    import httpx

    try:
        reply = client.get(f"{base_url}/props")
        return reply.json().get("model_path") if reply.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def slots_of(data: object) -> tuple[int | None, int | None]:
    """(busy, total) from a /slots reply; (None, None) when it is not a list of slots (no /slots, a key)."""
    if not isinstance(data, list):
        return None, None
    return sum(1 for s in data if isinstance(s, dict) and s.get("is_processing")), len(data)


def speed_of(metrics_text: str) -> tuple[float | None, int | None]:
    """(tokens/s, activity) from llama-server's /metrics: the generation speed, and prompt + predicted token
    counters (grows with every request)."""
    metrics = {k: float(v) for k, v in _METRIC_RE.findall(metrics_text)}
    activity = None
    if "prompt_tokens_total" in metrics or "tokens_predicted_total" in metrics:
        activity = int(metrics.get("prompt_tokens_total", 0) + metrics.get("tokens_predicted_total", 0))
    return metrics.get("predicted_tokens_seconds"), activity


def _poll(base_url: str, timeout_s: float) -> Live:
    import httpx

    with httpx.Client(timeout=timeout_s) as client:
        code = health(client, base_url)
        if code is None:
            return Live(healthy=False)
        busy = total = tps = activity = None
        try:
            busy, total = slots_of(client.get(f"{base_url}/slots").json())
        except (httpx.HTTPError, ValueError):
            pass
        try:
            reply = client.get(f"{base_url}/metrics")
            if reply.status_code == 200:
                tps, activity = speed_of(reply.text)
        except (httpx.HTTPError, ValueError):
            pass
        return Live(healthy=code == 200, slots_busy=busy, slots_total=total, tokens_per_s=tps, activity=activity)


def poll_all(base_urls: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Live]:
    """Poll instances concurrently: the slowest costs its timeout, not the sum."""
    if not base_urls:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(base_urls))) as pool:
        return list(pool.map(lambda url: _poll(url, timeout_s), base_urls))


def session(timeout_s: float = DEFAULT_TIMEOUT_S) -> httpx.Client:
    import httpx

    return httpx.Client(timeout=timeout_s)


def health_status(base_url: str, timeout_s: float = 1.0) -> int | None:
    import httpx

    with httpx.Client(timeout=timeout_s) as http:
        return health(http, base_url)


def wait_healthy(base_url: str, timeout_s: float, *, alive: Callable[[], bool] | None = None,
                 interval_s: float = 0.05) -> bool:
    """Poll /health until it answers 200 (True), or until the deadline or `alive()` says the process is gone
    (False). For servers without /props identity, e.g. the proxy (llama-server children: runner.wait_ready)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0) as http:
        while time.monotonic() < deadline:
            if health(http, base_url) == 200:
                return True
            if alive is not None and not alive():
                return False
            time.sleep(interval_s)
    return False


def chat_stream(base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 120.0) -> Iterator[str]:
    """One streamed /v1/chat/completions: yields the text pieces as they arrive."""
    import httpx

    body = {"model": model, "max_tokens": max_tokens, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    with httpx.Client(timeout=timeout_s) as http, http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            reply.read()
            raise ValueError(f"error {reply.status_code}: {reply.text[:200]}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise ValueError(str(event["error"].get("message")))
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


MAX_INVENTORY_BYTES = 4 * 2**20


def get_json(url: str, bearer: str, timeout_s: float = 2.0) -> object:
    """GET `url` with `Authorization: Bearer`, the body as JSON; RemoteError naming the failure (no answer,
    a status other than 200, too large, not JSON)."""
    import httpx

    from llamactl.errors import RemoteError

    try:
        with httpx.Client(timeout=timeout_s) as http, http.stream(
                "GET", url, headers={"Authorization": f"Bearer {bearer}"}) as reply:
            if reply.status_code != 200:
                raise RemoteError(f"answered {reply.status_code}" + (" (wrong key)" if reply.status_code == 401 else ""))
            body = b""
            for piece in reply.iter_bytes():
                body += piece
                if len(body) > MAX_INVENTORY_BYTES:
                    raise RemoteError(f"answer larger than {MAX_INVENTORY_BYTES // 2**20} MiB")
    except httpx.HTTPError as exc:
        raise RemoteError(f"cannot be reached ({type(exc).__name__})") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise RemoteError("answered something that is not JSON") from None


def complete(base_url: str, prompt: str, n_predict: int, timeout_s: float = 60.0) -> str:
    """One /completion; the generated text ("" when the server says nothing usable)."""
    import httpx

    with httpx.Client(timeout=timeout_s) as http:
        try:
            reply = http.post(f"{base_url}/completion", json={"prompt": prompt, "n_predict": n_predict})
            return str(reply.json().get("content", ""))
        except (httpx.HTTPError, ValueError, AttributeError):
            return ""
