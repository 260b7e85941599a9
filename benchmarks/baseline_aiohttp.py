"""The "what a user would write" baseline: an aiohttp server proxying with an aiohttp ClientSession.

    python benchmarks/baseline_aiohttp.py PORT UPSTREAM_URL

One process on uvloop, one shared ClientSession (TCPConnector(limit=512), keep-alive), no
access log, hop-by-hop headers dropped, the response body streamed in 64 KiB chunks. No limits,
no breaker, no metrics: the straightforward proxy our gateway is measured against in
benchmarks/suite.py. Listens on 127.0.0.1 only; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length"})
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    body = request.content if request.body_exists else None
    async with session.request(request.method, request.app[UPSTREAM] + request.path_qs,
                               headers=headers, data=body, allow_redirects=False) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in HOP_BY_HOP:
                response.headers.add(k, v)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(65536):
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[SESSION] = session
        yield


async def main(port: int, upstream: str) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
