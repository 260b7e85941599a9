"""A tiny bundled upstream so the quick start proxies something at once (and tests have a peer).

    GET  /                 -> JSON hello
    GET  /headers          -> the request's headers, method and raw target as JSON
    ANY  /echo             -> streams the request body back
    POST /upload           -> reads the whole body, answers its size and sha256
    GET  /status/{code}    -> that status
    GET  /delay/{ms}       -> answers after ms milliseconds
    GET  /bytes/{n}        -> n bytes, streamed in 64 KiB chunks (Content-Length)
    GET  /chunked/{n}      -> n bytes, chunked transfer encoding
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from aiohttp import web

_CHUNK = b"x" * 65536


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"service": "demo", "message": "hello from the demo upstream",
                              "path": request.raw_path, "pid": os.getpid()})


async def headers(request: web.Request) -> web.Response:
    return web.json_response({"method": request.method, "target": request.raw_path,
                              "headers": [[k, v] for k, v in request.headers.items()]})


async def echo(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    if request.content_length is not None:
        resp.content_length = request.content_length
    await resp.prepare(request)
    async for chunk in request.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"bytes": size, "sha256": digest.hexdigest()})


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304) or code < 200:
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


async def delay(request: web.Request) -> web.Response:
    await asyncio.sleep(int(request.match_info["ms"]) / 1000)
    return web.json_response({"delayed_ms": int(request.match_info["ms"])})


async def nbytes(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    resp = web.StreamResponse()
    resp.content_length = n
    resp.content_type = "application/octet-stream"
    await resp.prepare(request)
    if request.method == "HEAD":  # aiohttp would send what we write, even for HEAD
        return resp
    while n > 0:
        part = _CHUNK[: min(n, len(_CHUNK))]
        await resp.write(part)
        n -= len(part)
    await resp.write_eof()
    return resp


async def chunked(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    resp.content_type = "application/octet-stream"
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    while n > 0:
        part = _CHUNK[: min(n, 10000)]
        await resp.write(part)
        n -= len(part)
    await resp.write_eof()
    return resp


def make_app(extra: list[web.RouteDef] | None = None) -> web.Application:
    """The demo app; `extra` routes (tests add their own) go before the catch-all."""
    app = web.Application(client_max_size=1024**3)
    app.router.add_routes(extra or [])
    app.router.add_get("/", hello)
    app.router.add_get("/headers", headers)
    app.router.add_route("*", "/echo", echo)
    app.router.add_post("/upload", upload)
    app.router.add_route("*", r"/status/{code:\d{3}}", status)
    app.router.add_get(r"/delay/{ms:\d+}", delay)
    app.router.add_get(r"/bytes/{n:\d+}", nbytes)
    app.router.add_get(r"/chunked/{n:\d+}", chunked)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def run(host: str, port: int) -> None:
    from gateway.eventloop import new_loop
    web.run_app(make_app(), host=host, port=port, print=None, access_log=None, backlog=4096,
                handle_signals=True, loop=new_loop())
