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


def remote_failure(url: str, exc: Exception, timeout_s: float) -> Exception:
    """An httpx failure to reach a remote proxy (`top --url`, `ctl`) as one RemoteError line."""
    import httpx

    from llamactl.errors import RemoteError

    if isinstance(exc, httpx.InvalidURL):
        return RemoteError(f"{url}: not a usable URL ({exc})")
    if isinstance(exc, httpx.ConnectError):
        return RemoteError(f"{url}: nothing answers there (connection refused or no route)")
    if isinstance(exc, httpx.TimeoutException):
        return RemoteError(f"{url}: no answer within {timeout_s:g} s")
    return RemoteError(f"{url}: {type(exc).__name__}: {exc}")


PROXY_REPLY_MAX_BYTES = 8 * 2**20  # a management reply is a few KiB; a bigger one is not a llamactl proxy's


def call_proxy(method: str, base_url: str, path: str, api_key: str | None, timeout_s: float) -> object:
    """One management call to a running proxy (`llamactl ctl`): its JSON answer, or RemoteError with the
    proxy's own message (its OpenAI-shaped error) or what went wrong on the way."""
    import httpx

    from llamactl.errors import RemoteError

    if not base_url.startswith(("http://", "https://")):
        raise RemoteError(f"{base_url}: not an http:// or https:// URL")
    url = base_url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(timeout=timeout_s) as http:
            reply = http.request(method, url, headers=headers, json={} if method == "POST" else None)
    except (httpx.InvalidURL, httpx.HTTPError) as exc:
        raise remote_failure(base_url, exc, timeout_s) from None
    try:
        data = json.loads(reply.content[:PROXY_REPLY_MAX_BYTES])
    except (ValueError, RecursionError):
        raise RemoteError(f"{url}: HTTP {reply.status_code}, not JSON (is this a llamactl proxy?)") from None
    if reply.status_code == 401:
        raise RemoteError(f"{base_url}: the proxy refused the API key" if api_key else
                          f"{base_url}: the proxy wants an API key (--api-key-file or LLAMACTL_API_KEY)")
    if reply.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise RemoteError(f"{path}: HTTP {reply.status_code}: {message or 'no message'}")
    return data
@dataclass(frozen=True)
class SlotFile:
    """What llama-server said it saved or restored: the tokens of the prompt and the file's bytes."""

    tokens: int
    file_bytes: int


def slots_json(http: httpx.Client, base_url: str, api_key: str | None, timeout_s: float) -> object | str:
    """GET /slots: the decoded reply, or a str saying why there is none."""
    import httpx

    try:
        reply = http.get(f"{base_url}/slots", headers=_bearer(api_key), timeout=timeout_s)
        if reply.status_code != 200:
            return f"/slots answered {reply.status_code}"
        return reply.json()
    except httpx.HTTPError as exc:
        return f"/slots: {type(exc).__name__}"
    except ValueError:
        return "/slots answered no JSON"


def slot_file(http: httpx.Client, base_url: str, api_key: str | None, slot_id: int, action: str, filename: str,
              timeout_s: float) -> SlotFile | str:
    """POST /slots/ID?action=save|restore with the file's name (inside the server's --slot-save-path): what it
    did, or a str saying why it did not."""
    import httpx

    try:
        reply = http.post(f"{base_url}/slots/{slot_id}", params={"action": action}, json={"filename": filename},
                          headers=_bearer(api_key), timeout=timeout_s)
        data = reply.json()
    except httpx.HTTPError as exc:
        return f"slot {slot_id} {action}: {type(exc).__name__}"
    except ValueError:
        return f"slot {slot_id} {action}: answered {reply.status_code} without JSON"
    if reply.status_code != 200 or not isinstance(data, dict):
        message = data.get("error", {}).get("message") if isinstance(data, dict) and isinstance(data.get("error"), dict) else None
        return f"slot {slot_id} {action}: answered {reply.status_code}" + (f" ({str(message)[:120]})" if message else "")
    tokens = data.get("n_saved" if action == "save" else "n_restored")
    size = data.get("n_written" if action == "save" else "n_read")
    if not isinstance(tokens, int) or not isinstance(size, int):
        return f"slot {slot_id} {action}: unexpected answer"
    return SlotFile(tokens, size)


def _bearer(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
