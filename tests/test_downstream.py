"""The downstream HTTP/1.1 server over real loopback sockets, under the default loop and uvloop.

Every test is an argument-less coroutine that starts its own `DownstreamServer` on a free port
and talks to it with raw bytes (so the framing is exactly what the test says), or with an
aiohttp client where a normal client is the point. The same functions run twice: once by
pytest-asyncio on the default loop, and once each from `test_under_uvloop` (the loop the
gateway runs on). Timeouts are driven by calling `sweep(now)` with a loop time of our choosing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import aiohttp

from gateway.downstream import (
    BODY_HIGH_WATER,
    MAX_PIPELINE,
    ClientGone,
    DownstreamServer,
    HttpConnection,
    Request,
)
from tests.harness import under_uvloop

KiB = 1024
MiB = 1024 * KiB
PROBLEM = b"application/problem+json"

Handler = Callable[[Request], Awaitable[None]]

# ---------------------------------------------------------------------------------------------
# The server under test, and a raw client


@dataclass
class Gateway:
    ds: DownstreamServer
    port: int
    seen: list[Request] = field(default_factory=list)
    clients: list[asyncio.StreamWriter] = field(default_factory=list)

    def only_conn(self) -> HttpConnection:
        assert len(self.ds.connections) == 1, self.ds.connections
        return next(iter(self.ds.connections))


@asynccontextmanager
async def serve(handler: Handler, **kw: float) -> AsyncIterator[Gateway]:
    """A DownstreamServer on a free loopback port; every request is recorded in `seen`."""
    gw: Gateway

    async def recording(req: Request) -> None:
        gw.seen.append(req)
        await handler(req)

    loop = asyncio.get_running_loop()
    ds = DownstreamServer(recording, **kw)
    server = await loop.create_server(ds, "127.0.0.1", 0)
    gw = Gateway(ds, server.sockets[0].getsockname()[1])
    try:
        yield gw
    finally:
        for writer in gw.clients:                # a failed test leaves its clients open
            writer.transport.abort()
        server.close()
        await ds.shutdown(0)          # aborts what is left, cancels the tick
        await server.wait_closed()


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    """Bounded wait for a network-side condition."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)


@dataclass
class Resp:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    head: bytes
    body: bytes = b""
    complete: bool = True             # False: the connection ended inside the body

    def all(self, name: str) -> list[bytes]:
        want = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == want]

    def header(self, name: str) -> bytes | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} given {len(values)} times: {values}"
        return values[0] if values else None

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


async def read_response(reader: asyncio.StreamReader, method: str = "GET",
                        timeout: float = 2.0) -> Resp:
    """One response: status line, headers, and the body by its framing (Content-Length,
    chunked, or until close). A 1xx is returned on its own."""

    async def go() -> Resp:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, status, reason = (lines[0].split(b" ", 2) + [b""])[:3]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep, f"bad header line {line!r}"
            headers.append((name, value.strip(b" \t")))
        resp = Resp(version, int(status), reason, headers, head)
        if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            return resp
        te = resp.header("Transfer-Encoding")
        cl = resp.header("Content-Length")
        parts: list[bytes] = []
        try:
            if te is not None:
                assert te.lower() == b"chunked", te
                assert cl is None, "Content-Length together with Transfer-Encoding"
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":
                            pass            # trailers
                        break
                    parts.append(await reader.readexactly(size))
                    assert await reader.readexactly(2) == b"\r\n"
            elif cl is not None:
                parts.append(await reader.readexactly(int(cl)))
            else:
                parts.append(await reader.read())          # until close
        except asyncio.IncompleteReadError as exc:
            parts.append(exc.partial)
            resp.complete = False
        except ConnectionResetError:
            resp.complete = False
        resp.body = b"".join(parts)
        return resp

    return await asyncio.wait_for(go(), timeout)


def http(method: str = "GET", target: str = "/", headers: Iterable[tuple[str, str]] = (),
         body: bytes = b"", version: str = "1.1", host: bool = True,
         length: bool = True) -> bytes:
    """A request in bytes: Host (unless told not to) and Content-Length (when there is a body)."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host:
        lines.append("Host: gw.test")
    lines += [f"{k}: {v}" for k, v in headers]
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Client:
    """A raw client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, gw: Gateway) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        gw.clients.append(writer)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: str = "GET", timeout: float = 2.0) -> Resp:
        return await read_response(self.reader, method, timeout)

    async def request(self, method: str = "GET", target: str = "/",
                      headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                      version: str = "1.1") -> Resp:
        await self.send(http(method, target, headers, body, version))
        return await self.response(method)

    async def rest(self, timeout: float = 2.0) -> bytes:
        """Everything until the server closes (a timeout if it does not)."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with an RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


def assert_problem(resp: Resp, status: int) -> None:
    assert resp.status == status, (resp.head, resp.body)
    assert resp.header("Content-Type") == PROBLEM
    assert resp.header("Connection") == b"close"
    assert resp.header("Content-Length") == str(len(resp.body)).encode()
    doc = resp.json()
    assert doc["status"] == status
    assert isinstance(doc["detail"], str) and doc["detail"]


# Handlers


async def echo(req: Request) -> None:
    """200 with the body it read; method, target and body length in headers."""
    body = await req.read()
    req.respond(200, [("X-Method", req.method), ("X-Target", req.target),
                      ("X-Body-Length", str(len(body)))], body)


async def say_target(req: Request) -> None:
    req.respond(200, [("Content-Type", "text/plain")], req.target.encode())


def body_reader() -> tuple[Handler, list[str], asyncio.Event]:
    """A handler that reads the whole body and notes "read", or "gone" on ClientGone; `done`
    is set when it has finished."""
    outcome: list[str] = []
    done = asyncio.Event()

    async def handler(req: Request) -> None:
        try:
            await req.read()
            outcome.append("read")
        except ClientGone:
            outcome.append("gone")
        done.set()

    return handler, outcome, done


def held(target: str) -> tuple[Handler, asyncio.Event]:
    """`say_target`, except that the request for `target` waits until the event is set."""
    release = asyncio.Event()

    async def handler(req: Request) -> None:
        if req.target == target:
            await release.wait()
        await say_target(req)

    return handler, release


# ---------------------------------------------------------------------------------------------
# Connections: keep-alive, HTTP/1.0, Connection: close


async def test_http11_keepalive_serves_several_requests_on_one_connection() -> None:
    async with serve(echo) as gw:
        c = await Client.open(gw)
        for i in range(5):
            resp = await c.request("POST", f"/r{i}", body=b"x" * i)
            assert resp.status == 200
            assert resp.header("X-Target") == f"/r{i}".encode()
            assert resp.body == b"x" * i
            assert resp.header("Content-Length") == str(i).encode()
            assert resp.header("Connection") is None      # HTTP/1.1: keep-alive implied
        assert len(gw.seen) == 5
        assert len({id(r._conn) for r in gw.seen}) == 1
        assert gw.ds.stats() == {"connections": 1, "busy": 0}
        c.close()


async def test_http10_without_keepalive_closes_after_response() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /old HTTP/1.0\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"/old"
        assert resp.header("Connection") == b"close"
        assert gw.seen[0].version == "1.0" and gw.seen[0].keep_alive is False
        assert await c.rest() == b""


async def test_http10_with_keepalive_stays_open_and_says_keep_alive() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        for target in ("/a", "/b", "/c"):
            resp = await c.request("GET", target, [("Connection", "keep-alive")], version="1.0")
            assert resp.status == 200 and resp.body == target.encode()
            assert resp.header("Connection") == b"keep-alive"
        assert len({id(r._conn) for r in gw.seen}) == 1
        resp = await c.request("GET", "/last", version="1.0")     # no keep-alive this time
        assert resp.header("Connection") == b"close"
        assert await c.rest() == b""


async def test_connection_close_from_client_closes_after_response() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        resp = await c.request("GET", "/first")
        assert resp.header("Connection") is None
        resp = await c.request("GET", "/bye", [("Connection", "close")])
        assert resp.status == 200 and resp.body == b"/bye"
        assert resp.header("Connection") == b"close"
        assert await c.rest() == b""
        assert gw.seen[1].keep_alive is False


async def test_connection_close_then_pipelined_request_answers_only_the_first() -> None:
    # A client may pipeline after a request with `Connection: close`: that request is
    # answered, the rest is never handled, the connection closes.
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/one", [("Connection", "close")]) + http("GET", "/two"))
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"/one"
        assert resp.header("Connection") == b"close"
        assert await c.rest() == b""
        assert [r.target for r in gw.seen] == ["/one"]


async def test_aiohttp_client_reuses_one_connection() -> None:
    async def handler(req: Request) -> None:
        if req.target == "/stream":
            req.start(200, [("Content-Type", "text/plain")])
            for i in range(3):
                await req.write(f"part{i};".encode())
            req.end()
        elif req.target == "/continue":
            req.send_continue()
            await echo(req)
        elif req.method == "HEAD":
            req.respond(200, [("X-Method", "HEAD")], content_length=42)
        else:
            await echo(req)

    async def gen() -> AsyncIterator[bytes]:
        for piece in (b"chunked ", b"upload ", b"body"):
            yield piece

    async with serve(handler) as gw:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            base = f"http://127.0.0.1:{gw.port}"
            async with session.get(base + "/hello?x=1") as r:
                assert r.status == 200 and r.headers["X-Target"] == "/hello?x=1"
                assert await r.read() == b""
            async with session.post(base + "/data", data=b"abc" * 1000) as r:
                assert await r.read() == b"abc" * 1000
            async with session.post(base + "/chunked", data=gen()) as r:
                assert await r.read() == b"chunked upload body"
            async with session.get(base + "/stream") as r:
                assert r.headers["Transfer-Encoding"] == "chunked"
                assert await r.read() == b"part0;part1;part2;"
            async with session.head(base + "/head") as r:
                assert r.status == 200 and r.headers["X-Method"] == "HEAD"
                assert r.headers["Content-Length"] == "42" and await r.read() == b""
            async with session.post(base + "/continue", data=b"after 100", expect100=True) as r:
                assert r.status == 200 and await r.read() == b"after 100"
        assert [r.target for r in gw.seen] == ["/hello?x=1", "/data", "/chunked", "/stream",
                                               "/head", "/continue"]
        assert gw.seen[2].chunked and gw.seen[2].content_length is None
        assert len({id(r._conn) for r in gw.seen}) == 1


# ---------------------------------------------------------------------------------------------
# Pipelining


async def test_pipelined_requests_in_one_write_are_answered_in_order() -> None:
    active = 0
    peak = 0

    async def handler(req: Request) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0)
        active -= 1
        await say_target(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"".join(http("GET", f"/p{i}") for i in range(5)))
        for i in range(5):
            resp = await c.response()
            assert resp.status == 200 and resp.body == f"/p{i}".encode()
        assert peak == 1                                  # one handler at a time
        assert [r.target for r in gw.seen] == [f"/p{i}" for i in range(5)]
        c.close()


async def test_pipelined_slow_first_handler_and_fast_later_ones_stay_in_order() -> None:
    handler, release = held("/slow")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/slow") + http("GET", "/fast1") + http("GET", "/fast2"))
        await until(lambda: len(gw.ds.connections) == 1)
        conn = gw.only_conn()
        await until(lambda: len(conn._pipeline) == 2)      # both fast ones parsed and waiting
        assert [r.target for r in gw.seen] == ["/slow"]     # ... but not handled before /slow
        release.set()
        bodies = [(await c.response()).body for _ in range(3)]
        assert bodies == [b"/slow", b"/fast1", b"/fast2"]
        c.close()


async def test_pipelined_requests_with_bodies_each_get_their_own_body() -> None:
    async with serve(echo) as gw:
        c = await Client.open(gw)
        chunked = (b"POST /two HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nbbb\r\n2\r\nBB\r\n0\r\n\r\n")
        await c.send(http("POST", "/one", body=b"first body") + chunked +
                     http("GET", "/three") + http("PUT", "/four", body=b"4444"))
        expected = [("/one", b"first body"), ("/two", b"bbbBB"), ("/three", b""),
                    ("/four", b"4444")]
        for target, body in expected:
            resp = await c.response()
            assert resp.header("X-Target") == target.encode()
            assert resp.body == body
        c.close()


async def test_many_pipelined_requests_beyond_the_pipeline_limit_all_answered() -> None:
    n = MAX_PIPELINE * 3
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        data = b"".join(http("GET", f"/n{i}") for i in range(n))
        await c.send(data)
        for i in range(n):
            resp = await c.response()
            assert resp.body == f"/n{i}".encode()
        resp = await c.request("GET", "/after")            # reading resumed
        assert resp.body == b"/after"
        c.close()


async def test_pipelined_valid_request_then_garbage_answers_the_valid_request_first() -> None:
    # The first request was complete and valid: it gets its answer before the connection
    # is given up for the garbage that followed it in the same read.
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/valid") + b"HELLO WORLD\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"/valid"
        rest = await c.rest()
        assert rest == b"" or rest.startswith(b"HTTP/1.1 400 ")
        assert [r.target for r in gw.seen] == ["/valid"]


# ---------------------------------------------------------------------------------------------
# Request bodies


async def test_body_by_content_length() -> None:
    async with serve(echo) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /cl HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 11\r\n\r\nhello")
        await until(lambda: len(gw.seen) == 1)
        await c.send(b" world")
        resp = await c.response()
        assert resp.body == b"hello world"
        req = gw.seen[0]
        assert req.content_length == 11 and not req.chunked and req.body_exists
        c.close()


async def test_chunked_body_is_decoded_across_awkward_splits() -> None:
    async with serve(echo) as gw:
        c = await Client.open(gw)
        pieces = [b"POST /ch HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n",
                  b"5;ext=1\r\nhel", b"lo\r", b"\n1", b"0\r\n", b", chunked world!",
                  b"\r\n0\r\nX-Trailer: t\r\n", b"\r\n"]
        for piece in pieces:
            await c.send(piece)
            await asyncio.sleep(0)
        resp = await c.response()
        assert resp.body == b"hello, chunked world!"
        req = gw.seen[0]
        assert req.chunked and req.content_length is None and req.body_exists
        resp = await c.request("GET", "/next")              # framing consumed exactly
        assert resp.header("X-Target") == b"/next"
        c.close()


async def test_no_body_request_reads_empty() -> None:
    got: list[bytes] = []

    async def handler(req: Request) -> None:
        assert not req.body_exists
        got.append(await req.chunk())
        got.append(await req.read())
        req.respond(204, [])

    async with serve(handler) as gw:
        c = await Client.open(gw)
        resp = await c.request("POST", "/empty", [("Content-Length", "0")])
        assert resp.status == 204
        assert got == [b"", b""]
        assert gw.seen[0].content_length == 0
        c.close()


async def test_large_body_streams_with_backpressure_and_bounded_buffer() -> None:
    size = 8 * MiB
    piece = bytes(range(256)) * 1024                    # 256 KiB
    stats: dict[str, int] = {}

    async def handler(req: Request) -> None:
        if req.method != "PUT":
            return await say_target(req)
        conn = req._conn
        await until(lambda: req._buffered > BODY_HIGH_WATER)   # the client ran ahead of us
        assert conn._paused_body and not conn.transport.is_reading()
        held = req._buffered
        for _ in range(10):                  # reading is paused: more turns bring nothing
            await asyncio.sleep(0.001)
        assert req._buffered == held
        digest = hashlib.sha256()
        n = peak = 0
        while True:
            peak = max(peak, req._buffered)
            data = await req.chunk()
            if not data:
                break
            peak = max(peak, req._buffered + len(data))
            n += len(data)
            digest.update(data)
        stats["peak"] = peak
        req.respond(200, [], f"{n} {digest.hexdigest()}".encode())

    async with serve(handler) as gw:
        c = await Client.open(gw)

        async def upload() -> None:
            c.writer.write(b"PUT /big HTTP/1.1\r\nHost: gw.test\r\n"
                           + f"Content-Length: {size}\r\n\r\n".encode())
            for _ in range(size // len(piece)):
                c.writer.write(piece)
                await c.writer.drain()

        sender = asyncio.create_task(upload())
        resp = await c.response(timeout=10)
        await sender
        expected = hashlib.sha256(piece * (size // len(piece))).hexdigest()
        assert resp.body == f"{size} {expected}".encode()
        # never more than the high-water mark plus one read (256 KiB) waiting for the handler
        assert stats["peak"] <= BODY_HIGH_WATER + 256 * KiB, stats
        resp = await c.request("GET", "/again")             # the connection is still good
        assert resp.status == 200
        c.close()


async def test_unread_body_over_high_water_does_not_stall_the_connection() -> None:
    # The whole body arrived (so the connection may be kept), but it went over the high
    # water mark and the handler answered without reading it: the next request must still
    # be read.
    first = BODY_HIGH_WATER - 4 * KiB
    total = BODY_HIGH_WATER + 4 * KiB

    async def handler(req: Request) -> None:
        if req.target == "/upload":
            await until(lambda: req._body_done)
            req.respond(401, [], b"no")
        else:
            await say_target(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /upload HTTP/1.1\r\nHost: gw.test\r\n"
                     + f"Content-Length: {total}\r\n\r\n".encode() + b"a" * first)
        await until(lambda: len(gw.seen) == 1 and gw.seen[0]._buffered == first)
        await c.send(b"a" * (total - first))          # one small read crosses the mark and ends
        resp = await c.response()
        assert resp.status == 401
        assert resp.header("Connection") is None      # body complete: keep-alive is fine
        resp = await c.request("GET", "/next")
        assert resp.status == 200 and resp.body == b"/next"
        c.close()


async def test_pipelined_body_waits_with_backpressure_until_its_turn() -> None:
    size = 2 * MiB
    release = asyncio.Event()

    async def handler(req: Request) -> None:
        if req.target == "/slow":
            await release.wait()
            await say_target(req)
        else:
            await echo(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        body = bytes(range(256)) * (size // 256)

        async def upload() -> None:
            await c.send(http("GET", "/slow") + http("POST", "/queued", body=body)
                         + http("GET", "/third"))

        sender = asyncio.create_task(upload())
        await until(lambda: len(gw.ds.connections) == 1 and bool(gw.only_conn()._pipeline)
                    and not gw.only_conn().transport.is_reading())
        conn = gw.only_conn()
        queued = conn._pipeline[0]
        assert queued.target == "/queued"
        # Reading pauses at a queued request's head: no more of its body than came in the
        # same read is held while the one before it is answered.
        assert queued._buffered <= 256 * KiB < len(body)
        assert [r.target for r in gw.seen] == ["/slow"]
        release.set()
        assert (await c.response()).body == b"/slow"
        resp = await c.response(timeout=5)
        assert resp.header("X-Target") == b"/queued" and resp.body == body
        assert (await c.response()).header("X-Target") == b"/third"
        await sender
        c.close()


async def test_client_closing_mid_body_gives_client_gone_to_chunk() -> None:
    outcome: list[object] = []
    done = asyncio.Event()

    async def handler(req: Request) -> None:
        try:
            while data := await req.chunk():
                outcome.append(data)
        except ClientGone:
            outcome.append("gone")
            raise
        finally:
            done.set()
        req.respond(200, [])

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /up HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1000\r\n\r\n"
                     + b"z" * 100)
        await until(lambda: len(gw.seen) == 1)
        c.close()
        await asyncio.wait_for(done.wait(), 2)
        assert b"".join(x for x in outcome if isinstance(x, bytes)) == b"z" * 100
        assert outcome[-1] == "gone"
        await until(lambda: not gw.ds.connections)


async def test_client_reset_mid_body_gives_client_gone_to_chunk() -> None:
    handler, outcome, done = body_reader()

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /up HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"10\r\n0123456789abcdef\r\n")
        await until(lambda: len(gw.seen) == 1)
        c.reset()
        await asyncio.wait_for(done.wait(), 2)
        assert outcome == ["gone"]
        await until(lambda: not gw.ds.connections)


async def test_half_close_after_complete_request_still_gets_response() -> None:
    async def handler(req: Request) -> None:
        await until(lambda: req._conn.eof)                # answer after the client's FIN
        await echo(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("POST", "/half", body=b"payload"))
        c.writer.write_eof()
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"payload"
        assert resp.header("Connection") == b"close"
        assert await c.rest() == b""


async def test_half_close_after_pipelined_requests_answers_all_of_them() -> None:
    async def handler(req: Request) -> None:
        await until(lambda: req._conn.eof)
        await say_target(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/h1") + http("GET", "/h2") + http("GET", "/h3"))
        c.writer.write_eof()
        bodies = [(await c.response()).body for _ in range(3)]
        assert bodies == [b"/h1", b"/h2", b"/h3"]
        assert await c.rest() == b""


async def test_invalid_chunk_after_handler_started_closes_and_reader_gets_client_gone() -> None:
    handler, outcome, done = body_reader()

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /x HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n")
        await until(lambda: len(gw.seen) == 1)
        await c.send(b"zz\r\n")                           # not a chunk size
        await asyncio.wait_for(done.wait(), 2)
        assert outcome == ["gone"]
        rest = await c.rest()
        assert b" 200 " not in rest


# ---------------------------------------------------------------------------------------------
# Expect: 100-continue


async def test_expect_continue_sends_100_when_handler_asks() -> None:
    async def handler(req: Request) -> None:
        if req.method == "PUT":
            assert req.expect_continue
            req.send_continue()
            req.send_continue()                             # once only
        await echo(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"PUT /e HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\n\r\n")
        interim = await c.response()
        assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
        await c.send(b"hello")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"hello"
        assert resp.header("Connection") is None
        resp = await c.request("GET", "/after")
        assert resp.header("X-Target") == b"/after"
        c.close()


async def test_expect_continue_not_sent_when_handler_answers_without_reading() -> None:
    async def handler(req: Request) -> None:
        assert req.expect_continue
        req.respond(413, [("Content-Type", "text/plain")], b"too big")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"PUT /e HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5000000\r\n\r\n")
        resp = await c.response()
        assert resp.status == 413 and resp.body == b"too big"
        assert resp.header("Connection") == b"close"       # the body never came
        assert await c.rest() == b""                        # and no late 100 either


async def test_expect_continue_not_sent_when_body_already_arrived() -> None:
    async def handler(req: Request) -> None:
        await until(lambda: req._body_done)
        req.send_continue()
        await echo(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"PUT /e HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 3\r\n\r\nabc")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"abc"
        c.close()


# ---------------------------------------------------------------------------------------------
# Response framing


async def test_respond_sets_content_length_and_sends_one_body() -> None:
    sizes = [0, 1, 100, 16 * KiB, 16 * KiB + 1, 300 * KiB]

    async def handler(req: Request) -> None:
        n = int(req.target[1:])
        req.respond(200, [("Content-Type", "application/octet-stream")], b"r" * n)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        for n in sizes:
            resp = await c.request("GET", f"/{n}")
            assert resp.header("Content-Length") == str(n).encode()
            assert resp.header("Transfer-Encoding") is None
            assert resp.body == b"r" * n
        c.close()


async def test_custom_reason_phrase_and_unknown_status() -> None:
    async def handler(req: Request) -> None:
        if req.target == "/teapot":
            req.respond(299, [], b"x", reason="Fine Indeed")
        else:
            req.respond(404, [], b"")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        resp = await c.request("GET", "/teapot")
        assert resp.head.startswith(b"HTTP/1.1 299 Fine Indeed\r\n")
        resp = await c.request("GET", "/missing")
        assert resp.head.startswith(b"HTTP/1.1 404 Not Found\r\n")
        c.close()


async def test_start_with_content_length_streams_that_many_bytes() -> None:
    async def handler(req: Request) -> None:
        req.start(200, [("Content-Type", "text/plain")], content_length=12)
        await req.write(b"hello ")
        await req.write(b"")
        await req.write(b"world!")
        req.end()

    async with serve(handler) as gw:
        c = await Client.open(gw)
        for _ in range(2):
            resp = await c.request("GET", "/s")
            assert resp.header("Content-Length") == b"12"
            assert resp.header("Transfer-Encoding") is None
            assert resp.body == b"hello world!"
        c.close()


async def test_start_without_length_is_chunked_on_http11() -> None:
    async def handler(req: Request) -> None:
        req.start(200, [("Content-Type", "text/plain")])
        assert req.headers_sent and not req.finished
        await req.write(b"abc")
        await req.write(b"0123456789ABCDEFG")
        req.end()
        assert req.finished

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/chunked"))
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 2)
        assert b"\r\nTransfer-Encoding: chunked\r\n" in head
        assert b"Content-Length" not in head and b"Connection" not in head
        raw = await asyncio.wait_for(c.reader.readuntil(b"0\r\n\r\n"), 2)
        assert raw == b"3\r\nabc\r\n11\r\n0123456789ABCDEFG\r\n0\r\n\r\n"
        resp = await c.request("GET", "/again")             # keep-alive after a chunked body
        assert resp.body == b"abc0123456789ABCDEFG"
        c.close()


async def test_start_without_length_is_close_delimited_on_http10() -> None:
    async def handler(req: Request) -> None:
        req.start(200, [("Content-Type", "text/plain")])
        await req.write(b"until ")
        await req.write(b"close")
        req.end()

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await c.response()
        assert resp.header("Transfer-Encoding") is None
        assert resp.header("Content-Length") is None
        assert resp.header("Connection") == b"close"
        assert resp.body == b"until close"


async def test_head_gets_no_body_but_the_get_content_length() -> None:
    async def handler(req: Request) -> None:
        kind = req.target
        if kind == "/with-body":
            req.respond(200, [], b"0123456789")
        elif kind == "/given-length":
            req.respond(200, [], content_length=1234)
        elif kind == "/unknown":
            req.respond(200, [])
        elif kind == "/streamed":
            req.start(200, [], content_length=5)
            await req.write(b"12345")
            req.end()
        elif kind == "/streamed-chunked":
            req.start(200, [])
            await req.write(b"12345")
            req.end()
        else:
            await say_target(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        cases = [("/with-body", b"10"), ("/given-length", b"1234"), ("/unknown", None),
                 ("/streamed", b"5"), ("/streamed-chunked", None)]
        for target, length in cases:
            resp = await c.request("HEAD", target)
            assert resp.status == 200
            assert resp.header("Content-Length") == length, target
            assert resp.header("Transfer-Encoding") is None, target
            assert resp.header("Connection") is None, target
            # no body bytes went out: the next response starts right after the head
            resp = await c.request("GET", "/probe")
            assert resp.status == 200 and resp.body == b"/probe", target
        c.close()


async def test_204_and_304_have_no_body_and_no_content_length() -> None:
    async def handler(req: Request) -> None:
        if req.target == "/204":
            req.respond(204, [("X-A", "1")], b"must not be sent")
        elif req.target == "/304":
            req.respond(304, [("ETag", '"v1"')])
        elif req.target == "/304-streamed":
            req.start(304, [("ETag", '"v1"')], content_length=10)
            req.end()
        elif req.target == "/204-streamed":
            req.start(204, [])
            req.end()
        else:
            await say_target(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        for target in ("/204", "/304", "/304-streamed", "/204-streamed"):
            resp = await c.request("GET", target)
            assert resp.status == int(target[1:4])
            assert resp.header("Content-Length") is None, target
            assert resp.header("Transfer-Encoding") is None, target
            resp = await c.request("GET", "/probe")
            assert resp.body == b"/probe", target
        c.close()


async def test_date_header_added_when_handler_gives_none() -> None:
    async def handler(req: Request) -> None:
        if req.target == "/stream":
            req.start(200, [])
            req.end()
        else:
            req.respond(200, [], b"x")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        for target in ("/plain", "/stream"):
            resp = await c.request("GET", target)
            dates = resp.all("Date")
            assert len(dates) == 1
            when = parsedate_to_datetime(dates[0].decode())
            assert abs(when.timestamp() - time.time()) < 5
            assert dates[0].endswith(b" GMT")
        c.close()


async def test_date_header_not_duplicated_when_handler_gives_one() -> None:
    given = "Tue, 01 Jan 2030 00:00:00 GMT"

    async def handler(req: Request) -> None:
        name = req.target[1:]
        if req.method == "POST":
            req.start(200, [(name, given)], content_length=0)
            req.end()
        else:
            req.respond(200, [(name, given)], b"x")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        for method in ("GET", "POST"):
            for name in ("Date", "date"):
                resp = await c.request(method, f"/{name}")
                assert resp.all("Date") == [given.encode()], (method, name)
        c.close()


async def test_response_before_body_arrived_closes_and_never_parses_the_rest() -> None:
    async def handler(req: Request) -> None:
        req.respond(403, [("Content-Type", "text/plain")], b"denied")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        smuggled = http("GET", "/smuggled")
        body = b"x" * 10 + smuggled + b"y" * (200 - 10 - len(smuggled))
        await c.send(b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 200\r\n\r\n"
                     + body[:10])
        resp = await c.response()
        assert resp.status == 403 and resp.body == b"denied"
        assert resp.header("Connection") == b"close"
        try:
            await c.send(body[10:])
        except ConnectionError:
            pass
        assert await c.rest() == b""
        assert [r.target for r in gw.seen] == ["/upload"]


# ---------------------------------------------------------------------------------------------
# Limits


async def test_target_longer_than_16k_gets_414() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        ok = "/" + "a" * (16 * KiB - 1)                    # exactly 16 KiB: fine
        resp = await c.request("GET", ok)
        assert resp.status == 200 and resp.body == ok.encode()
        await c.send(http("GET", "/" + "a" * (16 * KiB)))
        assert_problem(await c.response(), 414)
        assert await c.rest() == b""
        assert len(gw.seen) == 1


async def test_header_field_longer_than_16k_gets_431() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        resp = await c.request("GET", "/ok", [("X-Big", "v" * (16 * KiB - 5))])
        assert resp.status == 200
        await c.send(http("GET", "/big", [("X-Big", "v" * (16 * KiB - 4))]))
        assert_problem(await c.response(), 431)
        assert await c.rest() == b""
        assert [r.target for r in gw.seen] == ["/ok"]


async def test_more_than_128_header_fields_gets_431() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        resp = await c.request("GET", "/ok", [(f"X-F{i}", "1") for i in range(127)])  # + Host
        assert resp.status == 200
        assert len(gw.seen[0].headers) == 128
        await c.send(http("GET", "/many", [(f"X-F{i}", "1") for i in range(128)]))
        assert_problem(await c.response(), 431)
        assert await c.rest() == b""
        assert len(gw.seen) == 1


async def test_head_over_64k_in_many_reads_gets_431() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /huge HTTP/1.1\r\nHost: gw.test\r\n")
        sent = 0
        try:
            for i in range(100):                              # 100 x 1 KiB fields, one a write
                line = f"X-F{i:03}: ".encode() + b"v" * (KiB - 9) + b"\r\n"
                await c.send(line)
                sent += len(line)
                await asyncio.sleep(0)
                if c.reader._buffer:                          # type: ignore[attr-defined]
                    break                                     # answered already
        except ConnectionError:
            pass
        assert sent > 60 * KiB                                # not refused early
        assert_problem(await c.response(), 431)
        assert await c.rest() == b""
        assert gw.seen == []


async def test_unterminated_header_value_over_64k_in_many_reads_gets_431() -> None:
    # llhttp hands a field over only once it is complete: what it holds meanwhile is bounded.
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /endless HTTP/1.1\r\nHost: gw.test\r\nX-Endless: ")
        sent = 0
        try:
            for _ in range(100):
                await c.send(b"v" * KiB)
                sent += KiB
                await asyncio.sleep(0)
                if c.reader._buffer:                          # type: ignore[attr-defined]
                    break
        except ConnectionError:
            pass
        assert 60 * KiB < sent < 100 * KiB                    # refused while still coming
        assert_problem(await c.response(), 431)
        assert await c.rest() == b""
        assert gw.seen == []


async def test_oversized_request_pipelined_behind_busy_one_closes_after_the_first() -> None:
    release = asyncio.Event()

    async def handler(req: Request) -> None:
        await release.wait()
        await say_target(req)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/first") + http("GET", "/" + "a" * (17 * KiB)))
        await until(lambda: len(gw.seen) == 1 and gw.only_conn().closing)
        release.set()
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"/first"
        assert resp.header("Connection") == b"close"
        assert await c.rest() == b""                          # the bad one: no answer
        assert len(gw.seen) == 1


async def test_head_of_60k_in_many_reads_is_accepted() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /big-but-fine HTTP/1.1\r\nHost: gw.test\r\n")
        for i in range(60):
            await c.send(f"X-F{i:03}: ".encode() + b"v" * (KiB - 9) + b"\r\n")
            await asyncio.sleep(0)
        await c.send(b"\r\n")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"/big-but-fine"
        assert len(gw.seen[0].headers) == 61
        c.close()


# ---------------------------------------------------------------------------------------------
# Malformed requests


async def _expect_400(raw: bytes) -> None:
    async with serve(echo) as gw:
        c = await Client.open(gw)
        await c.send(raw)
        resp = await c.response()
        assert_problem(resp, 400)
        assert resp.all("Date")
        assert await c.rest() == b""                        # nothing after the 400


async def test_garbage_gets_400() -> None:
    await _expect_400(b"HELLO WORLD\r\n\r\n")


async def test_tls_hello_on_plain_port_gets_400() -> None:
    await _expect_400(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)


async def test_content_length_with_chunked_gets_400() -> None:
    for order in ((b"Content-Length: 5", b"Transfer-Encoding: chunked"),
                  (b"Transfer-Encoding: chunked", b"Content-Length: 5")):
        await _expect_400(b"POST / HTTP/1.1\r\nHost: gw.test\r\n" + b"\r\n".join(order)
                          + b"\r\n\r\n0\r\n\r\n")


async def test_two_different_content_lengths_get_400() -> None:
    await _expect_400(b"POST / HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n"
                      b"Content-Length: 6\r\n\r\nhello!")


async def test_invalid_chunk_size_gets_400() -> None:
    await _expect_400(b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nhello\r\n0\r\n\r\n")


# ---------------------------------------------------------------------------------------------
# Handler failures


async def test_handler_raising_gets_500_problem() -> None:
    async def handler(req: Request) -> None:
        raise RuntimeError("boom")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        resp = await c.request("GET", "/boom")
        assert_problem(resp, 500)
        assert b"boom" not in resp.body                      # no internals leak
        assert await c.rest() == b""
        assert gw.seen[0].finished


async def test_handler_raising_after_start_cuts_the_connection() -> None:
    async def handler(req: Request) -> None:
        if req.target == "/chunked":
            req.start(200, [])
        else:
            req.start(200, [], content_length=100)
        await req.write(b"partial")
        raise RuntimeError("boom mid-body")

    async with serve(handler) as gw:
        for target in ("/chunked", "/sized"):
            c = await Client.open(gw)
            resp = await c.request("GET", target)
            assert resp.status == 200
            assert not resp.complete                         # truncated, not a clean end
            assert resp.body == b"partial"
            assert await c.rest() == b""


async def test_handler_returning_without_responding_gets_500() -> None:
    async def handler(req: Request) -> None:
        return None

    async with serve(handler) as gw:
        c = await Client.open(gw)
        assert_problem(await c.request("GET", "/nothing"), 500)
        assert await c.rest() == b""


async def test_cut_closes_the_connection_without_a_response() -> None:
    async def handler(req: Request) -> None:
        req.cut()
        assert req.finished

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/drop"))
        assert await c.rest() == b""
        assert len(gw.seen) == 1


async def test_handler_returning_after_start_without_end_cuts() -> None:
    async def handler(req: Request) -> None:
        req.start(200, [])
        await req.write(b"half")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        resp = await c.request("GET", "/unfinished")
        assert not resp.complete and resp.body == b"half"
        assert await c.rest() == b""


async def test_handler_raising_while_building_the_head_gets_500() -> None:
    # A header value that is not Latin-1 makes respond() raise before anything was sent:
    # the client gets the 500, not a silently dropped connection.
    async def handler(req: Request) -> None:
        req.respond(200, [("X-Name", "\u20ac uro")], b"x")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/euro"))
        assert_problem(await c.response(), 500)
        assert await c.rest() == b""


# ---------------------------------------------------------------------------------------------
# Timeouts


async def test_keepalive_timeout_closes_idle_connection_but_not_busy_one() -> None:
    handler, release = held("/busy")

    loop = asyncio.get_running_loop()
    async with serve(handler, keepalive_timeout_s=5.0, header_timeout_s=5.0) as gw:
        idle = await Client.open(gw)
        assert (await idle.request("GET", "/done")).body == b"/done"
        busy = await Client.open(gw)
        await busy.send(http("GET", "/busy"))
        await until(lambda: gw.ds.stats() == {"connections": 2, "busy": 1})

        gw.ds.sweep(loop.time() + 1.0)                        # before the timeout: nothing
        assert gw.ds.stats()["connections"] == 2
        assert (await idle.request("GET", "/still")).body == b"/still"

        gw.ds.sweep(loop.time() + 10.0)
        assert await idle.rest() == b""
        assert gw.ds.stats() == {"connections": 1, "busy": 1}
        release.set()
        resp = await busy.response()
        assert resp.body == b"/busy" and resp.header("Connection") is None
        assert (await busy.request("GET", "/more")).body == b"/more"
        busy.close()


async def test_keepalive_timeout_closes_connection_that_never_sent_anything() -> None:
    loop = asyncio.get_running_loop()
    async with serve(say_target, keepalive_timeout_s=3.0, header_timeout_s=30.0) as gw:
        c = await Client.open(gw)
        await until(lambda: len(gw.ds.connections) == 1)
        gw.ds.sweep(loop.time() + 1.0)
        assert len(gw.ds.connections) == 1
        gw.ds.sweep(loop.time() + 4.0)
        assert await c.rest() == b""


async def test_header_timeout_gives_408_on_partial_head() -> None:
    loop = asyncio.get_running_loop()
    async with serve(say_target, keepalive_timeout_s=60.0, header_timeout_s=2.0) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /slowloris HTTP/1.1\r\nHost: gw.test\r\nX-A: 1\r\n")
        await until(lambda: len(gw.ds.connections) == 1
                    and gw.only_conn().head_started is not None)
        gw.ds.sweep(loop.time() + 1.0)
        assert len(gw.ds.connections) == 1 and not gw.only_conn().closing
        gw.ds.sweep(loop.time() + 3.0)
        assert_problem(await c.response(), 408)
        assert await c.rest() == b""
        assert gw.seen == []


async def test_header_timeout_applies_to_next_request_on_keepalive_connection() -> None:
    loop = asyncio.get_running_loop()
    async with serve(say_target, keepalive_timeout_s=60.0, header_timeout_s=2.0) as gw:
        c = await Client.open(gw)
        assert (await c.request("GET", "/first")).body == b"/first"
        await c.send(b"GET /second HTTP/1.1\r\nHo")
        await until(lambda: gw.only_conn().head_started is not None)
        gw.ds.sweep(loop.time() + 3.0)
        assert_problem(await c.response(), 408)
        assert await c.rest() == b""


# ---------------------------------------------------------------------------------------------
# Shutdown


async def test_shutdown_closes_idle_connections_at_once() -> None:
    async with serve(say_target) as gw:
        used = await Client.open(gw)
        assert (await used.request("GET", "/x")).status == 200
        fresh = await Client.open(gw)
        await until(lambda: len(gw.ds.connections) == 2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(gw.ds.shutdown(5.0), 2)
        assert loop.time() - started < 1.0                    # did not wait for a timeout
        assert await used.rest() == b""
        assert await fresh.rest() == b""
        assert gw.ds.stats() == {"connections": 0, "busy": 0}


async def test_shutdown_lets_busy_response_finish_with_connection_close() -> None:
    handler, release = held("/busy")

    async with serve(handler) as gw:
        busy = await Client.open(gw)
        await busy.send(http("GET", "/busy") + http("GET", "/queued"))
        idle = await Client.open(gw)
        assert (await idle.request("GET", "/idle")).status == 200
        await until(lambda: gw.ds.stats() == {"connections": 2, "busy": 1})
        shutdown = asyncio.create_task(gw.ds.shutdown(5.0))
        assert await idle.rest() == b""                       # idle one: closed at once
        assert not shutdown.done()
        release.set()
        resp = await busy.response()
        assert resp.status == 200 and resp.body == b"/busy"
        assert resp.header("Connection") == b"close"
        assert await busy.rest() == b""                       # /queued is not started
        await asyncio.wait_for(shutdown, 2)
        assert sorted(r.target for r in gw.seen) == ["/busy", "/idle"]     # not /queued


async def test_shutdown_closes_streaming_connection_after_its_end() -> None:
    go_on = asyncio.Event()

    async def handler(req: Request) -> None:
        req.start(200, [])                                   # keep-alive head, sent already
        await req.write(b"before ")
        await go_on.wait()
        await req.write(b"after")
        req.end()

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/stream"))
        await until(lambda: bool(gw.seen) and gw.seen[0].headers_sent)
        shutdown = asyncio.create_task(gw.ds.shutdown(5.0))
        await asyncio.sleep(0)
        go_on.set()
        resp = await c.response()
        assert resp.complete and resp.body == b"before after"
        assert await c.rest() == b""
        await asyncio.wait_for(shutdown, 2)


async def test_shutdown_cuts_connection_still_busy_past_the_timeout() -> None:
    release = asyncio.Event()
    outcome: list[str] = []

    async def handler(req: Request) -> None:
        await release.wait()
        try:
            await req.write(b"late")                          # ClientGone: never started
        except ClientGone:
            outcome.append("gone")
        except RuntimeError:
            outcome.append("runtime")
        if not req.headers_sent:
            req.respond(200, [], b"too late")             # a no-op: the client is gone

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/forever"))
        await until(lambda: gw.ds.stats()["busy"] == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(gw.ds.shutdown(0.1), 2)
        assert 0.09 <= loop.time() - started < 1.0
        assert await c.rest() == b""                          # cut: no response at all
        assert gw.ds.stats() == {"connections": 0, "busy": 0}
        release.set()
        await until(lambda: bool(outcome))
        assert outcome == ["gone"]


# ---------------------------------------------------------------------------------------------
# Writing to a client that left


async def test_write_to_reset_client_raises_client_gone() -> None:
    go_on = asyncio.Event()
    outcome: list[str] = []

    async def handler(req: Request) -> None:
        req.start(200, [])
        await req.write(b"first")
        await go_on.wait()
        try:
            await req.write(b"second")
            outcome.append("written")
        except ClientGone:
            outcome.append("gone")
            raise

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/stream"))
        await asyncio.wait_for(c.reader.readuntil(b"first"), 2)
        c.reset()
        await until(lambda: not gw.ds.connections)
        go_on.set()
        await until(lambda: bool(outcome))
        assert outcome == ["gone"]


async def test_write_to_closed_client_raises_client_gone() -> None:
    outcome: list[str] = []
    piece = b"w" * (64 * KiB)

    async def handler(req: Request) -> None:
        req.start(200, [])
        await req.write(b"first")
        try:
            for _ in range(2000):                             # at most 128 MiB
                await asyncio.sleep(0)                        # like awaiting an upstream read
                await req.write(piece)
            outcome.append("written")
        except ClientGone:
            outcome.append("gone")
            raise

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/stream"))
        await asyncio.wait_for(c.reader.readuntil(b"first"), 2)
        c.close()
        await until(lambda: bool(outcome), timeout=5)
        assert outcome == ["gone"]


async def test_write_loop_without_other_awaits_still_sees_client_gone() -> None:
    # A handler that streams from memory only awaits write(): once the client is gone the
    # writes must fail, not vanish silently until the loop ends.
    go_on = asyncio.Event()
    outcome: list[object] = []
    piece = b"w" * (16 * KiB)

    async def handler(req: Request) -> None:
        req.start(200, [])
        await req.write(b"first")
        await go_on.wait()
        try:
            for _ in range(4000):                             # at most 64 MiB
                await req.write(piece)
            outcome.append("written")
        except ClientGone:
            outcome.append("gone")
            raise
        except Exception as exc:
            outcome.append(exc)
            raise

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/stream"))
        await asyncio.wait_for(c.reader.readuntil(b"first"), 2)
        c.close()
        await until(lambda: gw.only_conn().eof)
        go_on.set()
        await until(lambda: bool(outcome), timeout=5)
        assert outcome == ["gone"]


# ---------------------------------------------------------------------------------------------
# Heads: fields, encodings, Upgrade


async def test_request_fields_and_peer_ip() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(b"PATCH /p/a%20th?q=1&q=2 HTTP/1.1\r\nHost: api.example:8443\r\n"
                     b"X-Request-Id: rid-42\r\nAccept: a/b\r\naccept: c/d\r\n"
                     b"Content-Length: 2\r\n\r\nok")
        assert (await c.response()).status == 200
        req = gw.seen[0]
        assert req.peer_ip == "127.0.0.1"
        assert (req.method, req.target, req.version) == ("PATCH", "/p/a%20th?q=1&q=2", "1.1")
        assert req.host == "api.example:8443"
        assert req.x_request_id == "rid-42"
        assert req.headers == [("Host", "api.example:8443"), ("X-Request-Id", "rid-42"),
                               ("Accept", "a/b"), ("accept", "c/d"), ("Content-Length", "2")]
        assert req.get("ACCEPT") == "a/b" and req.getall("accept") == ["a/b", "c/d"]
        assert req.get("missing") is None and req.getall("missing") == []
        assert req.keep_alive and not req.expect_continue and req.content_length == 2
        c.close()


async def test_non_ascii_header_bytes_pass_through_as_latin1() -> None:
    async def handler(req: Request) -> None:
        value = req.get("X-Raw")
        assert value == "caf\xe9\xff"
        req.respond(200, [("X-Echo", value)], value.encode("latin-1"))

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-Raw: caf\xe9\xff\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200
        assert b"\r\nX-Echo: caf\xe9\xff\r\n" in resp.head
        assert resp.body == b"caf\xe9\xff"
        c.close()


async def test_websocket_upgrade_is_answered_plainly_then_closed() -> None:
    async with serve(echo) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n\x81\x85\x00\x00\x00\x00hello")
        resp = await c.response()
        assert resp.status == 200
        assert resp.header("Upgrade") is None
        assert resp.header("Connection") == b"close"
        assert resp.header("X-Target") == b"/ws" and resp.body == b""
        assert await c.rest() == b""
        assert [r.target for r in gw.seen] == ["/ws"]
        assert gw.seen[0].keep_alive is False


async def test_stats_count_connections_and_busy_ones() -> None:
    release = asyncio.Event()

    async def handler(req: Request) -> None:
        await release.wait()
        await say_target(req)

    async with serve(handler) as gw:
        assert gw.ds.stats() == {"connections": 0, "busy": 0}
        a = await Client.open(gw)
        b = await Client.open(gw)
        await until(lambda: gw.ds.stats()["connections"] == 2)
        await a.send(http("GET", "/a"))
        await until(lambda: gw.ds.stats() == {"connections": 2, "busy": 1})
        release.set()
        await a.response()
        await until(lambda: gw.ds.stats() == {"connections": 2, "busy": 0})
        a.close()
        b.close()
        await until(lambda: gw.ds.stats() == {"connections": 0, "busy": 0})


# ---------------------------------------------------------------------------------------------
# The byte stream cut anywhere


async def test_pipelined_mix_cut_at_random_points_gives_the_same_answers() -> None:
    """GETs, Content-Length and chunked POSTs, HEAD, pipelined on one connection and delivered
    in random slices (1 byte to 3 KiB, seeded): every request is answered in order, every body
    arrives intact, and the connection stays usable."""
    import random

    rng = random.Random(20261122)
    requests: list[tuple[bytes, str, str, bytes]] = []   # raw, method, target, body
    for i in range(60):
        kind = i % 4
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 5000)))
        if kind == 0:
            requests.append((http("GET", f"/g{i}?q={i}"), "GET", f"/g{i}?q={i}", b""))
        elif kind == 1:
            requests.append((http("POST", f"/cl{i}", body=body), "POST", f"/cl{i}", body))
        elif kind == 2:
            chunks, rest = [], body
            while rest:
                n = rng.randrange(1, 700)
                chunks.append(b"%x\r\n%s\r\n" % (len(rest[:n]), rest[:n]))
                rest = rest[n:]
            raw = http("POST", f"/ch{i}", [("Transfer-Encoding", "chunked")]) + \
                b"".join(chunks) + b"0\r\n\r\n"
            requests.append((raw, "POST", f"/ch{i}", body))
        else:
            requests.append((http("HEAD", f"/h{i}"), "HEAD", f"/h{i}", b""))
    stream = b"".join(raw for raw, *_ in requests)

    async with serve(echo) as gw:
        c = await Client.open(gw)
        c.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def feed() -> None:
            pos = 0
            while pos < len(stream):
                n = rng.choice((1, 2, 7, 64, 500, 3000))
                await c.send(stream[pos:pos + n])
                pos += n
                if rng.random() < 0.3:
                    await asyncio.sleep(0)

        feeder = asyncio.create_task(feed())
        for _, method, target, body in requests:
            resp = await c.response(method)
            assert resp.status == 200, (target, resp.head)
            assert resp.header("X-Target") == target.encode()
            assert resp.header("X-Method") == method.encode()
            assert resp.header("X-Body-Length") == str(len(body)).encode()
            if method != "HEAD":
                assert resp.body == body, target
        await feeder
        assert (await c.request("GET", "/after")).header("X-Target") == b"/after"
        assert len(gw.seen) == len(requests) + 1
        c.close()


# ---------------------------------------------------------------------------------------------
# The same scenarios under uvloop

test_under_uvloop = under_uvloop(globals())
