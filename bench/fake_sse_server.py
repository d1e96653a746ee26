"""A fast fake llama-server for proxy benchmarks (aiohttp): streams N chunks, optionally paced.

Answers `--version`/`--help` like the test fake (so llamactl's probe accepts it), `/health`,
`/props`, and `POST /v1/chat/completions` with `{"stream": true, "max_tokens": N, "pace": R}`:
N SSE chunks of fixed size, R chunks/s when given, each carrying its send time (`t`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes.fake_llama_server import answer_probe, arg  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    if answer_probe(argv, "fake-sse"):
        return
    import asyncio

    from aiohttp import web

    model = arg(argv, "--model", "")
    pad = "x" * 64

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def props(request: web.Request) -> web.Response:
        return web.json_response({"model_path": model})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens", 16))
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        pace = float(body.get("pace", 0))
        fill = "x" * int(body.get("pad", len(pad)))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = time.monotonic()
        for i in range(n):
            if pace:
                await asyncio.sleep(max(0.0, start + i / pace - time.monotonic()))
            chunk = {"i": i, "t": time.time(), "choices": [{"delta": {"content": fill}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/props", props)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host=arg(argv, "--host", "127.0.0.1"), port=int(arg(argv, "--port", "8080")), print=None,
                access_log=None)


if __name__ == "__main__":
    main()
