"""The upstream HTTP/1.1 client over real loopback sockets, under the default loop and uvloop.

Every test is an argument-less coroutine that starts its own small raw-socket server, so the same
functions run twice: once by pytest-asyncio on the default loop, and once each from
`test_under_uvloop` on a uvloop loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.config import Endpoint
from gateway.errors import GatewayError, UpstreamConnectError, UpstreamResetError, UpstreamTimeout
from gateway.upstream import HIGH_WATER, EndpointPool, UpstreamBodyTooLarge
from tests.harness import under_uvloop

MiB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# A small raw HTTP/1.1 server


@dataclass
class Req:
    method: str
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: str) -> bytes | None:
        want = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == want:
                return v
        return None


async def read_head(reader: asyncio.StreamReader) -> Req | None:
    """The next request head, or None on a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    lines = head[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    headers = [(k, v) for k, v in (line.split(b": ", 1) for line in lines[1:])]
    return Req(method.decode(), target, version, headers)


async def read_body(reader: asyncio.StreamReader, req: Req) -> bytes:
    cl = req.header("content-length")
    if cl is not None:
        return await reader.readexactly(int(cl))
    if req.header("transfer-encoding") == b"chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                assert await reader.readexactly(2) == b"\r\n"
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
    return b""


def response(status: int = 200, body: bytes = b"", headers: tuple[str, ...] = (),
             reason: str = "OK", version: str = "HTTP/1.1", length: bool = True) -> bytes:
    lines = [f"{version} {status} {reason}", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


Respond = Callable[[Req, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool | None]]


@dataclass
class Server:
    """Loopback server; `respond(req, reader, writer)` answers each request (its body already
    read into `req.body` unless `read_bodies` is False) and returns False to close."""

    respond: Respond
    read_bodies: bool = True
    rcvbuf: int | None = None
    connections: int = 0
    requests: list[Req] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> Server:  # noqa: PYI034
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._serve, sock=sock)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        # Handlers end by themselves on EOF; sleepers are cancelled (and swallow it, because
        # Python 3.11's start_server callback logs an error for a cancelled handler task).
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(url=f"http://127.0.0.1:{self.port}", scheme="http", host="127.0.0.1",
                        port=self.port)

    def pool(self, *, timeout_s: float = 5.0, max_connections: int = 8,
             connect_timeout_s: float = 1.0) -> EndpointPool:
        return EndpointPool(self.endpoint, connect_timeout_s=connect_timeout_s,
                            timeout_s=timeout_s, max_connections=max_connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            while True:
                req = await read_head(reader)
                if req is None:
                    break
                if self.read_bodies:
                    req.body = await read_body(reader, req)
                self.requests.append(req)
                keep = await self.respond(req, reader, writer)
                await writer.drain()
                if keep is False:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def echo(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """200 with the request body, and the method and body length in headers."""
    writer.write(response(200, req.body, (f"X-Method: {req.method}",
                                          f"X-Body-Length: {len(req.body)}")))


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Bounded wait for a network-side condition."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def body_of(resp: object) -> bytes:
    parts: list[bytes] = []
    while True:
        chunk = await resp.read()  # type: ignore[attr-defined]
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


async def agen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        await asyncio.sleep(0)
        yield c


HOST = [("Host", "svc.internal")]

# ---------------------------------------------------------------------------------------------
# Requests and bodies


async def test_get_with_content_length_response() -> None:
    async with Server(echo) as srv:
        pool = srv.pool()
        resp = await pool.request("GET", "/hello", [("Host", "svc"), ("X-Trace", "abc")])
        assert (resp.status, resp.reason) == (200, "OK")
        assert ("X-Method", "GET") in resp.headers
        assert resp.content_length == 0 and not resp.has_body and not resp.chunked
        assert await resp.read() == b""
        resp.release()
        req = srv.requests[0]
        assert (req.method, req.target, req.version) == ("GET", b"/hello", b"HTTP/1.1")
        assert req.headers == [(b"Host", b"svc"), (b"X-Trace", b"abc")]  # no framing for GET
        assert (pool.idle, pool.in_use, pool.opened_total) == (1, 0, 1)
        await pool.close()
        assert pool.idle == 0


async def test_methods_with_bytes_bodies() -> None:
    async with Server(echo) as srv:
        pool = srv.pool()
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            payload = f"{method} payload".encode() * 100
            resp = await pool.request(method, "/items/1", HOST, payload)
            assert resp.status == 200 and resp.has_body
            assert resp.content_length == len(payload)
            assert await resp.read_all(1 * MiB) == payload
            assert ("X-Method", method) in resp.headers
            resp.release()
        # a large bytes body goes out in separate writes
        big = bytes(range(256)) * 4096
        resp = await pool.request("PUT", "/big", HOST, big)
        assert await resp.read_all(2 * MiB) == big
        resp.release()
        for req in srv.requests:
            assert req.header("content-length") == str(len(req.body)).encode()
        # no body: Content-Length: 0 only where a body is expected
        for method, framing in (("POST", b"0"), ("PUT", b"0"), ("PATCH", b"0"),
                                ("DELETE", None), ("GET", None), ("OPTIONS", None)):
            resp = await pool.request(method, "/", HOST)
            await resp.read_all(100)
            resp.release()
            assert srv.requests[-1].header("content-length") == framing, method
            assert srv.requests[-1].header("transfer-encoding") is None
        assert srv.connections == 1 and pool.opened_total == 1
        await pool.close()


async def test_chunked_response_in_pieces() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Case-Kept: yes\r\n\r\n")
        for piece in (b"5\r\nhello\r\n", b"1", b"\r\n \r\n", b"6\r\nworld!\r\n", b"0\r\n\r\n"):
            w.write(piece)
            await w.drain()
            await asyncio.sleep(0.001)

    async with Server(respond) as srv:
        pool = srv.pool()
        for _ in range(2):
            resp = await pool.request("GET", "/c", HOST)
            assert resp.chunked and resp.content_length is None and resp.has_body
            assert ("X-Case-Kept", "yes") in resp.headers
            assert await body_of(resp) == b"hello world!"
            resp.release()
        assert srv.connections == 1
        await pool.close()


async def test_read_until_close_response() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(200, headers=("X-Framing: none",), length=False))
        for i in range(5):
            w.write(b"part%d;" % i)
            await w.drain()
            await asyncio.sleep(0.001)
        return False

    async with Server(respond) as srv:
        pool = srv.pool()
        for _ in range(2):
            resp = await pool.request("GET", "/stream", HOST)
            assert resp.has_body and resp.content_length is None and not resp.chunked
            assert await body_of(resp) == b"part0;part1;part2;part3;part4;"
            resp.release()
            assert pool.idle == 0 and pool.in_use == 0
        assert srv.connections == 2 and pool.opened_total == 2
        await pool.close()


async def test_streamed_request_bodies() -> None:
    async with Server(echo) as srv:
        pool = srv.pool()
        chunks = [b"alpha-", b"", b"beta-", b"gamma"]
        resp = await pool.request("POST", "/chunked", HOST, agen(chunks))
        assert await resp.read_all(100) == b"alpha-beta-gamma"
        resp.release()
        req = srv.requests[-1]
        assert req.header("transfer-encoding") == b"chunked"
        assert req.header("content-length") is None

        resp = await pool.request("PUT", "/sized", HOST, agen(chunks), content_length=16)
        assert await resp.read_all(100) == b"alpha-beta-gamma"
        resp.release()
        req = srv.requests[-1]
        assert req.header("content-length") == b"16"
        assert req.header("transfer-encoding") is None
        assert srv.connections == 1
        await pool.close()


async def test_target_sent_byte_for_byte() -> None:
    async with Server(echo) as srv:
        pool = srv.pool()
        # the last one is how the downstream server hands over raw non-ASCII bytes (Latin-1)
        targets = {"/a%2Fb?x=%20&y=1;z": b"/a%2Fb?x=%20&y=1;z",
                   "/%7Euser/./../x?q=a+b&&": b"/%7Euser/./../x?q=a+b&&",
                   "*": b"*",
                   "/caf\u00ff?\u00c3\u00a9": b"/caf\xff?\xc3\xa9"}
        for target, raw in targets.items():
            resp = await pool.request("OPTIONS" if target == "*" else "GET", target, HOST)
            resp.release()
            assert srv.requests[-1].target == raw
        await pool.close()


# ---------------------------------------------------------------------------------------------
# Responses without bodies, interim responses


async def test_head_204_304_have_no_body_and_keep_the_connection() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        path = req.target
        if path == b"/head-cl":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        elif path == b"/head-chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif path == b"/head-bare":
            w.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n")
        elif path == b"/204":
            w.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        elif path == b"/304":
            w.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: \"x\"\r\n\r\n")
        else:
            w.write(response(200, b"plain"))

    async with Server(respond) as srv:
        pool = srv.pool()
        for method, path, cl in (("HEAD", "/head-cl", 1000), ("HEAD", "/head-chunked", None),
                                 ("HEAD", "/head-bare", None), ("GET", "/204", None),
                                 ("GET", "/304", 50)):
            resp = await pool.request(method, path, HOST)
            assert not resp.has_body, path
            assert resp.content_length == cl, path
            assert await resp.read() == b""
            resp.release()
            assert pool.idle == 1, path
            resp = await pool.request("GET", "/after", HOST)
            assert await resp.read_all(100) == b"plain"
            resp.release()
        assert srv.connections == 1 and pool.opened_total == 1
        await pool.close()


async def test_interim_responses_are_skipped() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.001)
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                + response(201, b"made", ("X-Final: 1",), reason="Created"))

    async with Server(respond) as srv:
        pool = srv.pool()
        for _ in range(2):
            resp = await pool.request("POST", "/", HOST + [("Expect", "100-continue")], b"x")
            assert (resp.status, resp.reason) == (201, "Created")
            assert ("X-Final", "1") in resp.headers
            assert all(name != "Link" for name, _ in resp.headers)
            assert await resp.read_all(100) == b"made"
            resp.release()
        assert srv.connections == 1
        await pool.close()


async def test_response_split_into_single_bytes() -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 299 Some Long Reason Phrase\r\nX-One: 1\r\nTransfer-Encoding: chunked\r\n"
           b"X-Two: two, 2\r\n\r\n3\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")

    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(len(raw)):
            w.write(raw[i:i + 1])
            await w.drain()
            await asyncio.sleep(0)

    async with Server(respond) as srv:
        pool = srv.pool()
        for _ in range(2):
            resp = await pool.request("GET", "/", HOST)
            assert (resp.status, resp.reason) == (299, "Some Long Reason Phrase")
            assert resp.headers == [("X-One", "1"), ("Transfer-Encoding", "chunked"),
                                    ("X-Two", "two, 2")]
            assert await body_of(resp) == b"abc0123456789"
            resp.release()
        assert srv.connections == 1
        await pool.close()


async def test_stray_bytes_on_an_idle_connection_drop_it() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(200, b"ok"))
        await w.drain()
        await asyncio.sleep(0.01)
        w.write(response(408, b"", reason="Request Timeout"))   # and keeps the socket open

    async with Server(respond) as srv:
        pool = srv.pool()
        resp = await pool.request("GET", "/", HOST)
        assert await resp.read_all(10) == b"ok"
        resp.release()
        assert pool.idle == 1
        await until(lambda: pool.idle == 0)
        assert pool.in_use == 0
        resp = await pool.request("GET", "/", HOST)
        assert await resp.read_all(10) == b"ok"
        resp.release()
        assert pool.opened_total == 2
        await pool.close()


async def test_101_upgrade_is_refused() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n\x81\x00")

    async with Server(respond) as srv:
        pool = srv.pool()
        with pytest.raises(UpstreamResetError, match="upgrade not supported") as ei:
            await pool.request("GET", "/ws", HOST + [("Upgrade", "websocket")])
        assert srv.endpoint.url in str(ei.value)
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


# ---------------------------------------------------------------------------------------------
# Keep-alive and the pool


async def test_sequential_requests_reuse_one_connection() -> None:
    async with Server(echo) as srv:
        pool = srv.pool()
        for i in range(200):
            resp = await pool.request("POST", f"/{i}", HOST, b"%d" % i)
            assert await resp.read_all(10) == b"%d" % i
            resp.release()
        assert srv.connections == 1 and pool.opened_total == 1
        assert (pool.idle, pool.in_use) == (1, 0)
        await pool.close()


async def test_concurrent_requests_respect_max_connections() -> None:
    inflight = 0
    peak = 0

    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.002)
        inflight -= 1
        w.write(response(200, req.target))

    async with Server(respond) as srv:
        pool = srv.pool(max_connections=4)
        seen_in_use = 0

        async def one(i: int) -> bytes:
            nonlocal seen_in_use
            resp = await pool.request("GET", f"/{i}", HOST)
            seen_in_use = max(seen_in_use, pool.in_use)
            try:
                return await resp.read_all(100)
            finally:
                resp.release()

        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert results == [b"/%d" % i for i in range(50)]
        assert srv.connections <= 4 and pool.opened_total <= 4
        assert peak <= 4 and seen_in_use <= 4
        assert pool.in_use == 0 and pool.idle == pool.opened_total
        await pool.close()


async def test_waiting_for_a_free_connection_times_out() -> None:
    async with Server(echo) as srv:
        pool = srv.pool(max_connections=1, timeout_s=0.3)
        held = await pool.request("GET", "/held", HOST)
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="no connection .* became free"):
            await pool.request("GET", "/waits", HOST)
        assert 0.25 < time.monotonic() - t0 < 1.5
        held.release()
        resp = await pool.request("GET", "/now", HOST)  # the held connection, reused
        resp.release()
        assert pool.opened_total == 1 and srv.connections == 1
        await pool.close()


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    async with Server(echo) as srv:
        pool = srv.pool(max_connections=1)
        held = await pool.request("GET", "/held", HOST)
        waiter = asyncio.ensure_future(pool.request("GET", "/w", HOST))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        held.release()
        resp = await pool.request("GET", "/again", HOST)
        resp.release()
        assert (pool.in_use, pool.idle) == (0, 1)
        await pool.close()


async def test_idle_connection_closed_by_server_is_dropped() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(200, b"ok"))  # keep-alive response, then an idle close
        return False

    async with Server(respond) as srv:
        pool = srv.pool()
        resp = await pool.request("GET", "/1", HOST)
        assert await resp.read_all(10) == b"ok"
        resp.release()
        await until(lambda: pool.idle == 0)   # EOF while idle: dropped from the pool
        assert pool.in_use == 0
        resp = await pool.request("GET", "/2", HOST)
        assert await resp.read_all(10) == b"ok"
        resp.release()
        assert srv.connections == 2
        await pool.close()


def racing_close_server() -> Server:
    """Answers the first request of each connection; closes on the second without answering,
    as a server does when its idle timeout races our request."""
    counts: dict[int, int] = {}

    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        key = id(w)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > 1:
            return False
        w.write(response(200, b"fresh"))
        return True

    return Server(respond)


async def test_broken_reused_connection_is_retried_for_idempotent_requests() -> None:
    async with racing_close_server() as srv:
        pool = srv.pool()
        for method, body in (("GET", None), ("PUT", b"data"), ("DELETE", None)):
            resp = await pool.request(method, "/x", HOST, body)
            assert await resp.read_all(10) == b"fresh"
            resp.release()
        # first on connection 1; then each found its reused connection dead and retried once
        assert srv.connections == 3
        assert len(srv.requests) == 5
        await pool.close()


async def test_broken_reused_connection_is_not_retried_for_streams_or_post() -> None:
    async with racing_close_server() as srv:
        pool = srv.pool()
        for method, body_factory in (("POST", lambda: agen([b"a" * 1000] * 5)),
                                     ("PUT", lambda: agen([b"b"] * 3)),
                                     ("POST", lambda: b"bytes")):
            resp = await pool.request("GET", "/warm", HOST)
            await resp.read_all(10)
            resp.release()
            opened = pool.opened_total
            with pytest.raises(UpstreamResetError, match="closed the reused keep-alive") as ei:
                await pool.request(method, "/up", HOST, body_factory())
            assert srv.endpoint.url in str(ei.value)
            assert pool.opened_total == opened       # no retry
            assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


async def test_connection_close_and_http10_are_not_reused() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # the server keeps the connection open: only the client's reading stops reuse
        if req.target == b"/close":
            w.write(response(200, b"a", ("Connection: close",)))
        elif req.target == b"/close-token":
            w.write(response(200, b"a", ("Connection: x-foo, Close",)))
        elif req.target == b"/http10":
            w.write(response(200, b"a", version="HTTP/1.0"))
        elif req.target == b"/http10-ka":
            w.write(response(200, b"a", ("Connection: keep-alive",), version="HTTP/1.0"))
        else:
            w.write(response(200, b"a"))

    async with Server(respond) as srv:
        pool = srv.pool()
        for expected, (path, reused) in enumerate((("/close", False), ("/close-token", False), ("/http10", False),
                             ("/http10-ka", True), ("/plain", True)), start=1):
            resp = await pool.request("GET", path, HOST)
            assert await resp.read_all(10) == b"a"
            resp.release()
            assert pool.idle == (1 if reused else 0), path
            assert pool.opened_total == expected - (path == "/plain"), path
        await pool.close()


async def test_release_before_end_of_body_closes_and_abort_closes() -> None:
    async with Server(echo) as srv:
        pool = srv.pool()
        resp = await pool.request("POST", "/", HOST, b"x" * (4 * MiB))
        assert len(await resp.read()) < 4 * MiB
        resp.release()
        assert await resp.read() == b""       # released: nothing more
        resp.release()                        # idempotent
        assert (pool.idle, pool.in_use) == (0, 0)
        resp = await pool.request("POST", "/", HOST, b"y" * 10)
        resp.abort()
        assert (pool.idle, pool.in_use) == (0, 0)
        resp = await pool.request("POST", "/", HOST, b"z" * 10)
        assert await resp.read_all(10) == b"z" * 10
        resp.release()
        assert pool.idle == 1 and pool.opened_total == 3
        await pool.close()


async def test_read_all_limit() -> None:
    async with Server(echo) as srv:
        pool = srv.pool()
        resp = await pool.request("POST", "/", HOST, b"q" * 5000)
        with pytest.raises(UpstreamBodyTooLarge, match="larger than 4096 bytes"):
            await resp.read_all(4096)
        resp.release()
        assert pool.in_use == 0
        resp = await pool.request("POST", "/", HOST, b"q" * 5000)
        assert len(await resp.read_all(5000)) == 5000
        resp.release()
        await pool.close()


async def test_closed_pool_refuses_requests() -> None:
    async with Server(echo) as srv:
        pool = srv.pool(max_connections=1)
        held = await pool.request("GET", "/", HOST)
        waiter = asyncio.ensure_future(pool.request("GET", "/w", HOST))
        await asyncio.sleep(0.01)
        await pool.close()
        with pytest.raises(UpstreamConnectError, match="closed"):
            await waiter
        held.release()                        # in-use connection closes on release
        assert (pool.idle, pool.in_use) == (0, 0)
        with pytest.raises(UpstreamConnectError, match="closed"):
            await pool.request("GET", "/", HOST)


# ---------------------------------------------------------------------------------------------
# Failures and timeouts


async def test_connection_refused() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                  # nothing listens there now
    ep = Endpoint(url=f"http://127.0.0.1:{port}", scheme="http", host="127.0.0.1", port=port)
    pool = EndpointPool(ep, connect_timeout_s=1, timeout_s=5, max_connections=2)
    for _ in range(3):                         # slots are given back
        with pytest.raises(UpstreamConnectError,
                           match=f"cannot connect to http://127.0.0.1:{port}: ") as ei:
            await pool.request("GET", "/", HOST)
        assert "refused" in str(ei.value).lower()
    assert (pool.in_use, pool.idle, pool.opened_total) == (0, 0, 0)


async def test_dns_failure() -> None:
    ep = Endpoint(url="http://no-such-host.invalid:80", scheme="http",
                  host="no-such-host.invalid", port=80)
    pool = EndpointPool(ep, connect_timeout_s=2, timeout_s=5, max_connections=2)
    with pytest.raises((UpstreamConnectError, UpstreamTimeout),
                       match="http://no-such-host.invalid:80"):
        await pool.request("GET", "/", HOST)
    assert pool.in_use == 0


async def test_connect_timeout() -> None:
    # A listener with a full accept queue drops further SYNs, so connecting hangs.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        ep = Endpoint(url=f"http://127.0.0.1:{port}", scheme="http", host="127.0.0.1", port=port)
        pool = EndpointPool(ep, connect_timeout_s=0.2, timeout_s=5, max_connections=2)
        t0 = time.monotonic()
        with pytest.raises(UpstreamConnectError) as ei:
            await pool.request("GET", "/", HOST)
        if "timed out" not in str(ei.value):
            pytest.skip(f"this kernel refuses instead of dropping SYNs: {ei.value}")
        assert str(ei.value) == f"cannot connect to {ep.url}: timed out after 0.2s"
        assert time.monotonic() - t0 < 1.0
        assert pool.in_use == 0
    finally:
        for c in fillers:
            c.close()
        lsock.close()


async def test_slow_response_head_times_out() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with Server(respond) as srv:
        pool = srv.pool(timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="within 0.3s") as ei:
            await pool.request("GET", "/slow", HOST)
        assert 0.25 < time.monotonic() - t0 < 1.2
        assert srv.endpoint.url in str(ei.value)
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


async def test_slow_body_times_out_on_read() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await w.drain()
        await asyncio.sleep(10)

    async with Server(respond) as srv:
        pool = srv.pool(timeout_s=0.3)
        t0 = time.monotonic()
        resp = await pool.request("GET", "/slow-body", HOST)
        assert await resp.read() == b"first"
        with pytest.raises(UpstreamTimeout):
            await resp.read()
        assert 0.25 < time.monotonic() - t0 < 1.2
        with pytest.raises(UpstreamTimeout):     # and it stays failed
            await resp.read()
        resp.release()
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


async def test_timer_does_not_fire_after_a_complete_body() -> None:
    async with Server(echo) as srv:
        pool = srv.pool(timeout_s=0.1)
        resp = await pool.request("POST", "/", HOST, b"done")
        await asyncio.sleep(0.2)               # past the deadline, body already complete
        assert await resp.read_all(10) == b"done"
        resp.release()
        assert pool.idle == 1
        await pool.close()


async def test_server_closing_mid_body_is_a_reset() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if req.target == b"/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        return False

    async with Server(respond) as srv:
        pool = srv.pool()
        for path, first in (("/cl", b"0123456789"), ("/chunked", b"abcd")):
            resp = await pool.request("GET", path, HOST)
            assert await resp.read() == first
            with pytest.raises(UpstreamResetError, match="middle of the response body") as ei:
                await resp.read()
            assert srv.endpoint.url in str(ei.value)
            resp.release()
            assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


async def test_server_closing_before_responding_on_a_fresh_connection() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        return False

    async with Server(respond) as srv:
        pool = srv.pool()
        with pytest.raises(UpstreamResetError, match="before sending a response"):
            await pool.request("GET", "/", HOST)
        assert srv.connections == 1            # a fresh connection is not retried
        await pool.close()


async def test_garbage_response_is_a_reset() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async with Server(respond) as srv:
        pool = srv.pool()
        with pytest.raises(UpstreamResetError, match="invalid HTTP response"):
            await pool.request("GET", "/", HOST)
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


async def test_early_response_stops_the_upload() -> None:
    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # answers without reading the body, and keeps the connection open
        w.write(response(413, b"too big", reason="Content Too Large"))
        await w.drain()
        await asyncio.sleep(10)

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"u" * 65536
        for _ in range(100_000):
            yield chunk

    async with Server(respond, read_bodies=False, rcvbuf=65536) as srv:
        pool = srv.pool(timeout_s=5)
        t0 = time.monotonic()
        resp = await pool.request("POST", "/upload", HOST, endless())
        assert resp.status == 413
        assert await resp.read_all(100) == b"too big"
        assert time.monotonic() - t0 < 3
        resp.release()
        assert (pool.in_use, pool.idle) == (0, 0)   # the request was cut short: not reused
        await pool.close()


async def test_slow_request_body_source_times_out() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(10)               # the client stops sending
        yield b"never"

    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)               # waits for the rest of the body

    async with Server(respond, read_bodies=False) as srv:
        pool = srv.pool(timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await pool.request("POST", "/", HOST, trickle())
        assert 0.25 < time.monotonic() - t0 < 1.2
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


async def test_body_source_errors_propagate_and_close_the_connection() -> None:
    class ClientWentAway(Exception):
        pass

    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise ClientWentAway

    async with Server(echo, read_bodies=False) as srv:
        pool = srv.pool()
        with pytest.raises(ClientWentAway):
            await pool.request("POST", "/", HOST, broken())
        assert (pool.in_use, pool.idle) == (0, 0)
        with pytest.raises(GatewayError, match="ended after 4 of its 10 bytes") as ei:
            await pool.request("POST", "/", HOST, agen([b"1234"]), content_length=10)
        assert ei.value.status == 400
        with pytest.raises(GatewayError, match="longer than its Content-Length 2"):
            await pool.request("POST", "/", HOST, agen([b"1234"]), content_length=2)
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.close()


# ---------------------------------------------------------------------------------------------
# Large bodies and flow control


async def test_large_response_streams_with_bounded_buffer() -> None:
    size = 50 * MiB
    piece = bytes(range(256)) * 256           # 64 KiB
    sent = 0

    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        while sent < size:
            w.write(piece)
            sent += len(piece)
            await w.drain()

    async with Server(respond) as srv:
        pool = srv.pool(timeout_s=30)
        resp = await pool.request("GET", "/big", HOST)
        assert resp.content_length == size
        # Nobody reads yet: the client must stop reading the socket, and so stall the server.
        await until(lambda: pool.max_buffered_bytes > HIGH_WATER)
        stalled = -1
        while stalled != sent:
            stalled = sent
            await asyncio.sleep(0.05)
        assert sent < size
        assert pool.max_buffered_bytes < 1 * MiB
        digest = hashlib.sha256()
        total = 0
        while chunk := await resp.read():
            total += len(chunk)
            digest.update(chunk)
        assert total == size
        assert digest.hexdigest() == hashlib.sha256(piece * (size // len(piece))).hexdigest()
        assert pool.max_buffered_bytes < 1 * MiB  # never more than ~high water + one read
        resp.release()
        assert pool.idle == 1
        resp = await pool.request("HEAD", "/big", HOST)  # connection still good
        resp.release()
        assert srv.connections == 1
        await pool.close()


async def test_large_streamed_upload_with_backpressure() -> None:
    size = 20 * MiB
    piece = bytes(range(256)) * 256
    produced = 0
    reading = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        while produced < size:
            produced += len(piece)
            yield piece

    async def respond(req: Req, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await reading.wait()                  # let the client run into backpressure first
        digest = hashlib.sha256()
        n = 0
        while n < size:
            data = await r.read(1 << 20)
            if not data:
                break
            n += len(data)
            digest.update(data)
        w.write(response(200, f"{n} {digest.hexdigest()}".encode()))

    async with Server(respond, read_bodies=False, rcvbuf=65536) as srv:
        pool = srv.pool(timeout_s=30)
        task = asyncio.ensure_future(
            pool.request("PUT", "/upload", HOST, body(), content_length=size))
        stalled = -1
        while stalled != produced:            # bounded: the producer stalls on drain
            stalled = produced
            await asyncio.sleep(0.05)
        assert produced < size                # did not buffer the whole upload
        reading.set()
        resp = await task
        expected = hashlib.sha256(piece * (size // len(piece))).hexdigest()
        assert await resp.read_all(200) == f"{size} {expected}".encode()
        resp.release()
        assert pool.idle == 1
        await pool.close()


# ---------------------------------------------------------------------------------------------
# The same scenarios under uvloop

test_under_uvloop = under_uvloop(globals())
