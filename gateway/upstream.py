"""The upstream HTTP/1.1 client: a keep-alive connection pool per endpoint, streaming both ways.

Purpose-built for the proxy's hot path (each choice below was measured): one asyncio.Protocol per
connection with an `httptools` response parser, the request head written as one bytes join, no
task per request, no regex, no logging. A request is `pool.request(...)`, which returns an
`UpstreamResponse` once the response head has arrived; the proxy then reads the body chunk by chunk
and calls `release()` (or `abort()` when its client went away).

Flow control: the protocol buffers received body chunks for the reader and pauses the socket above
`HIGH_WATER` buffered bytes, resuming below `LOW_WATER`, so a 1 GiB body never sits in memory; the
request body is written with `drain` semantics (pause_writing/resume_writing).

Text encodings: Latin-1 both ways, as on the downstream side (downstream.py decodes the client's
target and headers that way), so header bytes pass through unchanged and decoding never fails.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools

from gateway.config import Endpoint
from gateway.errors import (
    GatewayError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeout,
)

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "EndpointPool",
    "UpstreamBodyTooLarge",
    "UpstreamResponse",
]

HIGH_WATER = 256 * 1024
"""Buffered response bytes above which the socket stops being read."""
LOW_WATER = 64 * 1024
"""Buffered response bytes at or below which reading resumes."""

# A bytes body up to this size goes out in the same write (and segment) as the head.
_COALESCE_BODY = 16 * 1024
# Retrying these is safe when the server dropped a reused connection before answering.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Methods that normally carry a body: without one they still say `Content-Length: 0`.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Bodies held in memory: sent with Content-Length, and can be sent again on a retry.
_RESENDABLE = (bytes, bytearray, memoryview)

# Connection states, as the pool sees them.
_IDLE = 0      # in the pool's idle list
_ACTIVE = 1    # checked out by a request (or being handed to a waiter)
_CLOSED = 2    # discarded; its slot has been given back

# Results a pool waiter can receive besides a connection (None means "a slot is yours: connect").
_WAIT_TIMED_OUT: Any = object()
_POOL_CLOSED: Any = object()


class UpstreamBodyTooLarge(UpstreamError):
    """`read_all(limit)` met a body longer than `limit`."""

    status = 502
    kind = "body_too_large"


class _StaleConnection(UpstreamResetError):
    """A reused keep-alive connection was closed by the server before any response byte.

    The server most likely closed it while idle, racing our request: safe to retry once on a new
    connection when the request is idempotent and its body can be sent again."""


def _expire_waiter(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_WAIT_TIMED_OUT)


def _request_head(method: str, target: str, headers: list[tuple[str, str]],
                  framing: str) -> bytes:
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers])
    return f"{method} {target} HTTP/1.1\r\n{lines}{framing}\r\n".encode("latin-1")


class UpstreamResponse:
    """The head of an upstream response, and its body as a stream.

    `headers` are as received (names in their original case, hop-by-hop ones included: filtering
    is the proxy's job). `has_body` is False for HEAD, 204, 304 and `Content-Length: 0`.
    """

    __slots__ = ("_conn", "chunked", "content_length", "has_body", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]],
                 content_length: int | None, chunked: bool, has_body: bool,
                 conn: _Connection) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.has_body = has_body
        self._conn: _Connection | None = conn

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r}>"

    async def read(self) -> bytes:
        """The next body chunk; b"" at the end of the body (or after release/abort).

        Raises UpstreamResetError when the server cut the body short and UpstreamTimeout when the
        exchange overran its deadline."""
        conn = self._conn
        if conn is None:
            return b""
        chunks = conn.chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.paused_reading and conn.buffered <= LOW_WATER:
                    conn.resume()
                return chunk
            if conn.exc is not None:
                raise conn.exc
            if conn.complete:
                return b""
            fut = conn.loop.create_future()
            conn.read_fut = fut
            try:
                await fut
            finally:
                conn.read_fut = None

    async def read_all(self, limit: int) -> bytes:
        """The whole remaining body; UpstreamBodyTooLarge if it is longer than `limit` bytes."""
        parts: list[bytes] = []
        total = 0
        while True:
            chunk = await self.read()
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                url = self._conn.pool.endpoint.url if self._conn is not None else "upstream"
                raise UpstreamBodyTooLarge(f"response from {url} is larger than {limit} bytes")
            parts.append(chunk)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def release(self) -> None:
        """The proxy is done with the response: the connection goes back to the pool when the body
        was read to its end and the connection may be reused; otherwise it is closed."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.pool._release(conn)

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """A 101 to a WebSocket handshake: take the connection out of the pool's hands (its slot
        stays taken until `EndpointPool.tunnel_closed()`), with the bytes after the head."""
        conn = self._conn
        if conn is None or self.status != 101:
            raise RuntimeError("only a 101 response to open_tunnel() can be detached")
        self._conn = None
        conn.state = _CLOSED
        conn._cancel_timer()
        return conn.transport, conn.tail

    def abort(self) -> None:
        """Close the connection now (the proxy's client went away, or it gave up)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.pool._discard(conn)


class _Connection(asyncio.Protocol):
    """One upstream TCP connection: parser callbacks, flow control, exchange state."""

    __slots__ = (
        "buffered",
        "chunked",
        "chunks",
        "complete",
        "connection_hdr",
        "content_length",
        "deadline",
        "drain_fut",
        "exc",
        "got_bytes",
        "head_fut",
        "headers",
        "interim",
        "is_head",
        "keep_alive",
        "loop",
        "lost",
        "parser",
        "paused_reading",
        "paused_writing",
        "pool",
        "read_fut",
        "reason",
        "resp",
        "served",
        "spoiled",
        "state",
        "swap_parser",
        "tail",
        "timer",
        "timer_at",
        "transport",
        "tunnel",
        "until_close",
        "upgrade",
    )

    def __init__(self, pool: EndpointPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.parser = httptools.HttpResponseParser(self)
        self.state = _ACTIVE
        self.served = 0                 # exchanges completed on this connection
        self.lost = False
        self.paused_writing = False
        self.paused_reading = False
        self.drain_fut: asyncio.Future[None] | None = None
        # Per exchange; None/False between exchanges.
        self.head_fut: asyncio.Future[None] | None = None
        self.read_fut: asyncio.Future[None] | None = None
        # The deadline timer is left armed between exchanges (arming one costs ~3 us): when it
        # fires it expires the exchange in progress if that one is late, re-arms for it if not,
        # and lets go of an idle connection.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline = 0.0
        self.resp: UpstreamResponse | None = None
        self.exc: UpstreamError | None = None
        self.got_bytes = False
        self.is_head = False
        self.interim = False
        self.upgrade = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False
        self.spoiled = False            # something happened that forbids reuse
        self.swap_parser = False
        self.tunnel = False             # a WebSocket handshake: a 101 hands the connection over
        self.tail = b""                 # bytes after a 101's head (the tunnel's first)
        # Per response message.
        self.reason = b""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.connection_hdr: bytes | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass

    def data_received(self, data: bytes) -> None:
        if self.head_fut is None:
            # Nobody asked: a stray response, or a 408 sent just before an idle close.
            self.spoiled = True
            if self.state == _IDLE:
                self.pool._drop_idle(self)
            self.transport.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.tunnel and self.upgrade and self.resp is None:
                self.tail = data[exc.args[0]:] if exc.args else b""
                self.transport.pause_reading()      # until the tunnel takes the connection
                self.complete = True
                self._cancel_timer()
                self.resp = UpstreamResponse(101, self.reason.decode("latin-1"), self.headers,
                                             None, False, False, self)
                self._wake()
            else:
                self._fail(UpstreamResetError(
                    f"{self.pool.endpoint.url} answered 101 Switching Protocols: "
                    "upgrade not supported"))
        except httptools.HttpParserError as exc:
            if self.complete:
                self.spoiled = True     # bytes after the response
            else:
                self._fail(UpstreamResetError(
                    f"{self.pool.endpoint.url} sent an invalid HTTP response: {exc}"))
        if self.swap_parser:
            # After a HEAD response llhttp would take the next bytes for the body its
            # Content-Length announced; a fresh parser starts at the next status line.
            self.swap_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        return False    # close the transport; connection_lost() decides what EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.paused_writing = False
        if self.state == _IDLE:
            self.pool._drop_idle(self)
        elif self.head_fut is not None and not self.complete and self.exc is None:
            url = self.pool.endpoint.url
            if self.resp is None:
                if self.got_bytes or self.served == 0:
                    self.exc = UpstreamResetError(
                        f"{url} closed the connection before sending a response")
                else:
                    self.exc = _StaleConnection(
                        f"{url} closed the reused keep-alive connection before responding")
            elif self.until_close and exc is None:
                self._done(False)       # EOF is how a read-until-close body ends
            else:
                self.exc = UpstreamResetError(
                    f"{url} closed the connection in the middle of the response body")
        self._cancel_timer()
        self._wake()

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        fut = self.drain_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.spoiled = True         # a second response to one request
            return
        self.reason = b""
        self.headers = []
        self.content_length = None
        self.chunked = False
        self.connection_hdr = None

    def on_status(self, reason: bytes) -> None:
        # llhttp may deliver the reason phrase in pieces across reads.
        self.reason = self.reason + reason if self.reason else reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is not None:
            return                      # a chunked trailer field: not forwarded
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        n = len(name)
        if n == 14:
            if name.lower() == b"content-length":
                self.content_length = int(value)
        elif n == 17:
            if name.lower() == b"transfer-encoding":
                self.chunked = value.rstrip().lower().endswith(b"chunked")
        elif n == 10 and name.lower() == b"connection":
            self.connection_hdr = value

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self.upgrade = True     # feed_data raises HttpParserUpgrade next
            else:
                self.interim = True     # 100 Continue, 103 Early Hints: skipped
            return
        cl = self.content_length
        has_body = not (self.is_head or status == 204 or status == 304 or cl == 0)
        self.until_close = has_body and cl is None and not self.chunked
        self.resp = UpstreamResponse(status, self.reason.decode("latin-1"), self.headers, cl,
                                     self.chunked, has_body, self)
        fut = self.head_fut
        if fut is not None and not fut.done():
            fut.set_result(None)
        fut = self.drain_fut            # a request body still being sent stops here
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self.is_head:
            keep = parser.should_keep_alive()
            if not keep and cl is None and not self.chunked:
                # llhttp thinks an unframed body follows; a HEAD response has none.
                keep = self._keep_alive_by_headers()
            self.swap_parser = True
            self._done(keep)

    def on_body(self, body: bytes) -> None:
        if self.complete or self.resp is None:
            self.spoiled = True         # bytes after a HEAD response
            return
        self.chunks.append(body)
        buffered = self.buffered + len(body)
        self.buffered = buffered
        pool = self.pool
        pool.max_buffered_bytes = max(pool.max_buffered_bytes, buffered)
        if buffered > HIGH_WATER and not self.paused_reading and not self.lost:
            self.paused_reading = True
            self.transport.pause_reading()
        fut = self.read_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.upgrade or self.complete:
            return
        self._done(self.parser.should_keep_alive())

    # -- exchange --------------------------------------------------------------------------------

    async def exchange(self, method: str, head: bytes, body: bytes | AsyncIterator[bytes] | None,
                       content_length: int | None, deadline: float) -> UpstreamResponse:
        """Send one request and wait for its response head. The caller owns the slot."""
        if self.lost or self.transport.is_closing():
            raise _StaleConnection(
                f"{self.pool.endpoint.url} closed the reused keep-alive connection")
        loop = self.loop
        self.head_fut = head_fut = loop.create_future()
        self.deadline = deadline
        timer = self.timer
        if timer is None or deadline < self.timer_at:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(deadline, self._on_deadline)
            self.timer_at = deadline
        self.resp = None
        self.exc = None
        self.got_bytes = False
        self.is_head = method == "HEAD"
        self.interim = self.upgrade = self.complete = self.keep_alive = False
        self.until_close = self.spoiled = False

        transport = self.transport
        if body is None:
            transport.write(head)
        elif isinstance(body, _RESENDABLE):
            if len(body) <= _COALESCE_BODY:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
        else:
            transport.write(head)
            try:
                # The deadline also covers waiting on the body's source (a slow client).
                async with asyncio.timeout_at(deadline):
                    await self._send_stream(body, content_length)
            except TimeoutError:
                self.spoiled = True
                self._expire()
        if self.resp is None:
            if self.exc is None:
                await head_fut
            if self.resp is None:
                raise self.exc  # type: ignore[misc]  # set whenever head_fut fires without resp
        return self.resp

    async def _send_stream(self, body: AsyncIterator[bytes], content_length: int | None) -> None:
        # Half duplex, like nginx: the response is handed over once the body is sent. A server may
        # answer early (413, 401) and stop reading: then sending stops when the socket buffers are
        # full, the response is returned, and the connection is never reused.
        transport = self.transport
        sent = 0
        async for chunk in body:
            if not chunk:
                continue                # an empty chunk would end a chunked body
            if self.lost or self.exc is not None or transport.is_closing():
                self.spoiled = True
                return
            n = len(chunk)
            sent += n
            if content_length is None:
                transport.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
            else:
                if sent > content_length:
                    raise GatewayError(
                        f"request body is longer than its Content-Length {content_length}",
                        status=400)
                transport.write(chunk)
            if self.paused_writing:
                await self._drain()
                if self.paused_writing:     # answered without reading on, or failed
                    self.spoiled = True
                    return
        if self.lost or self.exc is not None or transport.is_closing():
            self.spoiled = True
            return
        if content_length is None:
            transport.write(b"0\r\n\r\n")
        elif sent != content_length:
            raise GatewayError(
                f"request body ended after {sent} of its {content_length} bytes", status=400)

    async def _drain(self) -> None:
        while self.paused_writing and not self.lost and self.exc is None and self.resp is None:
            fut = self.loop.create_future()
            self.drain_fut = fut
            try:
                await fut
            finally:
                self.drain_fut = None

    # -- helpers ---------------------------------------------------------------------------------

    def resume(self) -> None:
        self.paused_reading = False
        if not self.lost:
            self.transport.resume_reading()

    def _keep_alive_by_headers(self) -> bool:
        tokens: tuple[bytes, ...] = ()
        if self.connection_hdr is not None:
            tokens = tuple(t.strip() for t in self.connection_hdr.lower().split(b","))
        if b"close" in tokens:
            return False
        return self.parser.get_http_version() == "1.1" or b"keep-alive" in tokens

    def _done(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        fut = self.read_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_deadline(self) -> None:
        self.timer = None
        if self.complete or self.head_fut is None or self.state == _CLOSED:
            return                      # idle between exchanges: disarmed until the next one
        deadline = self.deadline
        if self.loop.time() < deadline:  # armed for an earlier exchange: follow this one
            self.timer = self.loop.call_at(deadline, self._on_deadline)
            self.timer_at = deadline
            return
        self._expire()

    def _expire(self) -> None:
        if self.complete:
            return
        self.chunks.clear()
        self.buffered = 0
        pool = self.pool
        self._fail(UpstreamTimeout(
            f"{pool.endpoint.url} did not complete the exchange within {pool.timeout_s:g}s"))

    def _fail(self, exc: UpstreamError) -> None:
        if self.exc is None:
            self.exc = exc
        self._cancel_timer()
        if not self.lost:
            self.transport.abort()
        self._wake()

    def _cancel_timer(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()

    def _wake(self) -> None:
        # Futures here are wake-ups only: waiters look at the state, so no exception is ever left
        # unretrieved in a future nobody awaits.
        for fut in (self.head_fut, self.read_fut, self.drain_fut):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        """Close now, dropping whatever is in flight."""
        self.state = _CLOSED
        self._cancel_timer()
        self.chunks.clear()
        self.buffered = 0
        if not self.lost and self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.spoiled and not self.chunks
                and not self.lost and self.exc is None)


class EndpointPool:
    """Keep-alive connection pool to one endpoint.

    At most `max_connections` connections (in use + idle + connecting); a request beyond that
    waits, first come first served, for a connection or a free slot within its deadline. Idle
    connections are reused last-in first-out, so the pool shrinks back when servers close the
    ones it no longer needs.
    """

    __slots__ = (
        "_closed",
        "_idle",
        "_loop",
        "_max",
        "_opened",
        "_total",
        "_waiters",
        "connect_timeout_s",
        "endpoint",
        "max_buffered_bytes",
        "server_name",
        "ssl",
        "timeout_s",
    )

    def __init__(self, endpoint: Endpoint, *, connect_timeout_s: float, timeout_s: float,
                 max_connections: int, ssl: _ssl.SSLContext | None = None,
                 server_name: str | None = None) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._max = max_connections
        self._idle: list[_Connection] = []
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._total = 0             # slots taken: connecting + in use + idle
        self._opened = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None   # the first request's
        self.ssl = ssl
        """TLS for an https:// endpoint (the handshake is part of connecting)."""
        self.server_name = server_name or endpoint.host
        """SNI and the name the upstream's certificate must carry."""
        self.max_buffered_bytes = 0
        """High-water mark of response bytes buffered on one connection (a flow-control stat)."""

    def __repr__(self) -> str:
        return (f"<EndpointPool {self.endpoint.url} in_use={self.in_use} idle={self.idle} "
                f"max={self._max}>")

    @property
    def in_use(self) -> int:
        """Connections checked out by requests (or still connecting)."""
        return self._total - len(self._idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def max_connections(self) -> int:
        return self._max

    @property
    def opened_total(self) -> int:
        """Connections ever opened by this pool."""
        return self._opened

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes | AsyncIterator[bytes] | None = None, *,
                      content_length: int | None = None) -> UpstreamResponse:
        """Send a request and return once the response head has arrived.

        `target` is sent byte for byte; `headers` must not carry framing (Content-Length,
        Transfer-Encoding, Connection): it is added here from `body` and `content_length`.
        Raises UpstreamConnectError, UpstreamResetError or UpstreamTimeout (the whole exchange,
        body included, must end within `timeout_s`). Whatever the body iterator raises (the
        client went away) propagates unchanged. The caller must `release()` or `abort()` the
        response."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if body is None:
            framing = "Content-Length: 0\r\n" if method in _BODY_METHODS else ""
        elif isinstance(body, _RESENDABLE):
            framing = f"Content-Length: {len(body)}\r\n"
        elif content_length is not None:
            framing = f"Content-Length: {content_length}\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n"
        head = _request_head(method, target, headers, framing)

        conn = await self._acquire(loop, deadline)
        try:
            return await conn.exchange(method, head, body, content_length, deadline)
        except _StaleConnection:
            if method not in _IDEMPOTENT or not (body is None or isinstance(body, _RESENDABLE)):
                self._discard(conn)
                raise
            conn.close()            # keep its slot for the fresh connection
        except BaseException:
            self._discard(conn)
            raise
        try:
            conn = await self._connect(loop, deadline)
        except BaseException:
            self._free_slot()
            raise
        try:
            return await conn.exchange(method, head, body, content_length, deadline)
        except BaseException:
            self._discard(conn)
            raise

    async def open_tunnel(self, target: str,
                          headers: list[tuple[str, str]]) -> UpstreamResponse:
        """Send a WebSocket handshake (`headers` carry Upgrade and Connection) on a new
        connection and return once the response head has arrived. A 101 is `detach()`ed into
        a tunnel; any other answer (403, 426, ...) is read and released like any response, and
        its connection is not reused. Errors as for `request()`."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if self._closed:
            raise UpstreamConnectError(f"connection pool for {self.endpoint.url} is closed")
        if self._total < self._max:
            self._total += 1
        else:
            got = await self._wait(loop, deadline)
            if got is not None:
                got.close()     # a pooled connection handed over: its slot is what we need
        try:
            conn = await self._connect(loop, deadline)
        except BaseException:
            self._free_slot()
            raise
        conn.tunnel = True
        try:
            resp = await conn.exchange("GET", _request_head("GET", target, headers, ""), None,
                                       None, deadline)
        except BaseException:
            self._discard(conn)
            raise
        conn.spoiled = True
        return resp

    def tunnel_closed(self) -> None:
        """A tunnel made from this pool's connection ended: its slot is free."""
        self._free_slot()

    async def close(self) -> None:
        """Close idle connections and fail waiting requests; in-use connections close when
        released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._total -= 1
            conn.state = _CLOSED
            conn.transport.close()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(_POOL_CLOSED)
        await asyncio.sleep(0)      # let the transports finish closing

    # -- slots and connections -------------------------------------------------------------------

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.lost:
                conn.state = _ACTIVE
                return conn
            conn.state = _CLOSED    # connection_lost not delivered yet
            self._total -= 1
        if self._closed:
            raise UpstreamConnectError(f"connection pool for {self.endpoint.url} is closed")
        if self._total < self._max:
            self._total += 1
        else:
            got = await self._wait(loop, deadline)
            if got is not None:
                if not got.lost and not got.transport.is_closing():
                    return got  # type: ignore[no-any-return]
                got.close()     # died during the hand-over: connect anew in its slot
        try:
            return await self._connect(loop, deadline)
        except BaseException:
            self._free_slot()
            raise

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Any:
        fut = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_at(deadline, _expire_waiter, fut)
        try:
            got = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                got = fut.result()      # handed over just as we were cancelled: give it back
                if got is None:
                    self._free_slot()
                elif isinstance(got, _Connection):
                    self._release(got)
            raise
        finally:
            timer.cancel()
        if got is _WAIT_TIMED_OUT:
            raise UpstreamTimeout(
                f"no connection to {self.endpoint.url} became free within {self.timeout_s:g}s "
                f"(max_connections={self._max})")
        if got is _POOL_CLOSED:
            raise UpstreamConnectError(f"connection pool for {self.endpoint.url} is closed")
        return got

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        """Open a connection in a slot the caller already holds."""
        ep = self.endpoint
        conn = _Connection(self, loop)
        connect_deadline = loop.time() + self.connect_timeout_s
        limit = min(connect_deadline, deadline)
        try:
            async with asyncio.timeout_at(limit):
                if self.ssl is None:
                    await loop.create_connection(lambda: conn, ep.host, ep.port)
                else:
                    await loop.create_connection(lambda: conn, ep.host, ep.port, ssl=self.ssl,
                                                 server_hostname=self.server_name,
                                                 ssl_handshake_timeout=self.connect_timeout_s)
        except TimeoutError:
            if connect_deadline <= deadline:
                raise UpstreamConnectError(
                    f"cannot connect to {ep.url}: timed out after "
                    f"{self.connect_timeout_s:g}s") from None
            raise UpstreamTimeout(
                f"{ep.url} did not complete the exchange within {self.timeout_s:g}s "
                "(still connecting)") from None
        except _ssl.SSLError as exc:
            # Verification failures and handshake errors: the upstream cannot be reached safely,
            # which the breaker counts as a connect error.
            if isinstance(exc, _ssl.SSLCertVerificationError):
                detail = f"certificate verify failed: {exc.verify_message}"
            else:
                detail = exc.reason or str(exc)
            raise UpstreamConnectError(
                f"cannot connect to {ep.url}: TLS handshake failed: {detail}") from exc
        except OSError as exc:
            # asyncio's own message ("Connect call failed ...") hides the cause; name it.
            if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
                reason = exc.strerror or str(exc) or type(exc).__name__
            else:
                reason = os.strerror(exc.errno)
            raise UpstreamConnectError(f"cannot connect to {ep.url}: {reason}") from exc
        self._opened += 1
        return conn

    def _release(self, conn: _Connection) -> None:
        conn.resp = None
        conn.head_fut = None
        if conn.state != _ACTIVE:
            return
        if not conn.reusable() or self._closed:
            self._discard(conn)
            return
        conn.served += 1
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)    # handed over still checked out
                return
        conn.state = _IDLE
        self._idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.resp = None
        conn.head_fut = None
        if conn.state == _CLOSED:
            return
        conn.close()
        self._free_slot()

    def _drop_idle(self, conn: _Connection) -> None:
        """The server closed (or spoke on) an idle connection."""
        if conn.state != _IDLE:
            return
        conn.state = _CLOSED
        try:
            self._idle.remove(conn)
        except ValueError:  # pragma: no cover - defensive
            pass
        self._free_slot()

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)    # the slot passes to the waiter, who connects
                return
        self._total -= 1
