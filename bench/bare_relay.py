"""The least a relay can do (aiohttp, no routing, no metrics): the in-run baseline for proxy CPU cost.

Usage: python bench/bare_relay.py PORT UPSTREAM_URL
"""

import sys

import aiohttp
from aiohttp import web

up = sys.argv[2]
async def handler(request):
    body = await request.read()
    async with request.app["s"].post(up, data=body, headers={"Content-Type": "application/json"}) as r:
        resp = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get("Content-Type","")})
        await resp.prepare(request)
        async for piece in r.content.iter_any():
            await resp.write(piece)
        await resp.write_eof()
        return resp
async def ctx(app):
    app["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app["s"].close()
app = web.Application(); app.router.add_post("/v1/chat/completions", handler); app.cleanup_ctx.append(ctx)
web.run_app(app, port=int(sys.argv[1]), print=None, access_log=None)
