"""The downstream HTTP/1.1 server: the side clients talk to.

asyncio.Protocol + httptools (llhttp, the parser of Node and uvicorn), the mirror of upstream.py.
It replaced aiohttp's server on the proxy listener because aiohttp's request/response machinery
was the ceiling of the hot path: with the same upstream client, the same upstream and wrk -c32 on
this 2-core box, an aiohttp low-level server proxies 18-19k req/s and this protocol 29-31k. The
admin API and the control plane stay on aiohttp (not hot paths).

What a connection does:
* keep-alive: HTTP/1.1 by default, HTTP/1.0 with `Connection: keep-alive`; pipelined requests are
  answered in order, one handler at a time per connection (a later request's body is buffered
  until its turn, within the flow-control limits below);
* request bodies stream with backpressure: llhttp decodes Content-Length and chunked framing,
  reading pauses while more than `BODY_HIGH_WATER` bytes wait for the handler;
* responses go out in one write when the handler has the whole body, else streamed with
  Content-Length, chunked, or (HTTP/1.0) until close; HEAD, 1xx, 204 and 304 carry no body;
* a response sent before its request body fully arrived closes the connection after it (the
  rest of that body is never read, so nothing of it can be taken for the next request);
* limits: request target and each header field <= 16 KiB (414 / 431), the head <= 64 KiB and
  128 fields (431); a started head must arrive within `header_timeout_s` (408); an idle
  keep-alive connection closes after `keepalive_timeout_s`;
* malformed requests (llhttp strict mode: bad framing, Content-Length with Transfer-Encoding,
  invalid characters) get a problem+json 400 and the connection closes; so do targets with a
  `#fragment` or with dot segments (also behind `\\`, `%5c`, `%2f` or before `;`), and a Host
  with `..`, `/` or `\\`: routes match the raw target, so every spelling an upstream might
  normalise into another path must be refused here;
* field values lose trailing spaces and tabs as well as the leading ones llhttp strips (RFC 9110
  5.5), so the limiter, the router and the upstream all see the same value;
* `Upgrade: websocket` (a GET) is marked `request.upgrade`: the handler either answers it as
  any request (the connection closes after) or tunnels it with `switch_protocols()`; other
  upgrades are answered as plain requests and the connection closes after the response;
* shutdown: idle connections close at once, busy ones after their current response (sent with
  `Connection: close`), and what is left is cut at the drain deadline.

Header names and values are decoded Latin-1 both ways, so bytes pass through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools

from gateway.errors import PROBLEM_CONTENT_TYPE, problem_body
from gateway.tls import client_subject

log = logging.getLogger("gateway.downstream")

MAX_TARGET = 16 * 1024
MAX_FIELD = 16 * 1024
MAX_HEAD = 64 * 1024
MAX_FIELDS = 128
BODY_HIGH_WATER = 256 * 1024     # buffered request body that pauses reading ...
BODY_LOW_WATER = 64 * 1024       # ... until the handler has taken it down to this
MAX_PIPELINE = 16                # requests parsed ahead of the one being answered
LINGER_S = 5.0                   # after answering early, how long to drain the client's body
ONE_WRITE = 16 * 1024            # bodies up to this are joined to the head: one buffer, one send

_NO_BODY_STATUS = frozenset({204, 304})
_DATE_NAMES = frozenset({"Date", "date", "DATE"})
_SPECIAL = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect",
                      b"x-request-id", b"connection"})
_SINGLE = frozenset({b"host", b"content-length", b"transfer-encoding"})
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, str] = {}


def _refuse_dot_segments(target: bytes) -> None:
    """Routes match on the raw path: `/public/../admin` would match `/public` while an upstream
    that normalises serves `/admin`. Paths with `.` or `..` segments (also as %2e) are refused,
    as clients normalise them before sending (curl, browsers). Upstreams differ in what else
    separates segments, so `\\` and `%5c` (WHATWG URL parsers: Node, browsers), `%2f` (servers
    that decode before normalising) and a `;parameter` after the dots (Tomcat's `..;`) count
    as separators too."""
    q = target.find(b"?")
    path = target if q < 0 else target[:q]
    if b"\\" in path or b"%" in path:
        path = (path.replace(b"\\", b"/").replace(b"%5c", b"/").replace(b"%5C", b"/")
                .replace(b"%2f", b"/").replace(b"%2F", b"/"))
    for seg in path.split(b"/"):
        if seg and (seg[:1] == b"." or seg[:3] in (b"%2e", b"%2E")):
            semi = seg.find(b";")
            if semi >= 0:
                seg = seg[:semi]
            if len(seg) <= 6 and \
                    seg.replace(b"%2e", b".").replace(b"%2E", b".") in (b".", b".."):
                raise _Reject(400, "dot segments ('.' or '..') in the request path are "
                                   "refused (also with \\, %5c or %2f as the separator)")


class ClientGone(Exception):
    """The downstream client went away while we were reading its body or writing ours."""


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP error."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _status_line(status: int, reason: str | None) -> str:
    if reason is None or reason == _REASONS.get(status):
        line = _STATUS_LINES.get(status)
        if line is None:
            line = _STATUS_LINES[status] = \
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        return line
    return f"HTTP/1.1 {status} {reason}\r\n"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _DateHeader:
    """`Date: ...\r\n`, refreshed once a second by the servers' tick (not per response)."""

    value = f"Date: {formatdate(usegmt=True)}\r\n"

    @classmethod
    def refresh(cls) -> None:
        cls.value = f"Date: {formatdate(usegmt=True)}\r\n"


class Request:
    """One request on a connection, and the one response it gets.

    The handler reads the head fields, takes the body with `read()` / `chunk()`, and answers
    with either `respond()` (whole body in hand: one write) or `start()` + `write()` + `end()`.
    `cut()` closes the connection instead (a truncated response, a client to drop).
    Handlers give headers without framing (Content-Length, Transfer-Encoding, Connection):
    those are the server's."""

    __slots__ = (
        "_body_done",
        "_buffered",
        "_chunked_out",
        "_chunks",
        "_conn",
        "_continue_sent",
        "_state",
        "_waiter",
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "peer_ip",
        "request_id",
        "target",
        "trace",
        "upgrade",
        "version",
        "x_request_id",
    )

    def __init__(self, conn: HttpConnection, method: str, target: str, version: str,
                 headers: list[tuple[str, str]], special: dict[bytes, str],
                 keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.peer_ip = conn.peer_ip
        self.request_id = ""
        self.trace: Any = None            # the proxy's trace context (gateway.tracing)
        self.host = special.get(b"host", "")
        self.x_request_id = special.get(b"x-request-id")
        self.chunked = b"transfer-encoding" in special
        cl = special.get(b"content-length")
        self.content_length = int(cl) if cl is not None and not self.chunked else None
        self.expect_continue = (version == "1.1" and
                                special.get(b"expect", "").lower() == "100-continue")
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._body_done = not (self.chunked or self.content_length)
        self._waiter: asyncio.Future[None] | None = None
        self._continue_sent = False
        self._state = 0                 # 0: nothing sent, 1: head sent, 2: response complete
        self._chunked_out = False
        self.upgrade = False            # a WebSocket handshake (GET with Upgrade: websocket)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} HTTP/{self.version}>"

    # -- head ----------------------------------------------------------------------------

    def get(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def getall(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    @property
    def client_cert(self) -> str:
        """The verified client certificate's subject (TLS with client_ca), else ""."""
        return self._conn.client_cert

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def headers_sent(self) -> bool:
        return self._state > 0

    @property
    def finished(self) -> bool:
        return self._state == 2

    # -- body ----------------------------------------------------------------------------

    def send_continue(self) -> None:
        """`100 Continue` if the client waits for it (call once the request is admitted)."""
        if self.expect_continue and not self._continue_sent and not self._body_done \
                and self._state == 0 and not self._conn.lost:
            self._continue_sent = True
            self._conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def chunk(self) -> bytes:
        """The next piece of the body; b"" at its end. ClientGone if the client left first."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft()
                self._buffered -= len(data)
                if self._buffered <= BODY_LOW_WATER:
                    self._conn.resume_for_body()
                return data
            if self._body_done:
                return b""
            if self._conn.lost or self._conn.eof:
                raise ClientGone("the client closed the connection before the whole body")
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        while True:
            data = await self.chunk()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()

    def _complete(self) -> None:
        self._body_done = True
        self._wake()

    async def hold(self, seconds: float) -> bool:
        """Wait `seconds` before answering (a throttled request waiting for its token). False as
        soon as the client goes away meanwhile (closed, reset, or half-closed: a client that
        stops sending while its request is held is taken to have given up on it)."""
        conn = self._conn
        loop = conn.loop
        deadline = loop.time() + seconds
        while True:
            if conn.lost or conn.eof:
                return False
            if loop.time() >= deadline:
                return True
            w = self._waiter = loop.create_future()
            timer = loop.call_at(deadline, _resolve, w)
            try:
                await w
            finally:
                timer.cancel()
                self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- response ------------------------------------------------------------------------

    def respond(self, status: int, headers: Iterable[tuple[str, str]], body: bytes = b"",
                reason: str | None = None, content_length: int | None = None) -> None:
        """The whole response in one write. `content_length` is for HEAD answers (the length
        the GET would have); otherwise it is the body's."""
        conn = self._conn
        if self._state:
            if self._state == 2 and conn.closing:
                return              # the server answered already (a malformed body: 400)
            raise RuntimeError("response already started")
        if conn.lost:
            self._state = 2
            return
        no_body = status in _NO_BODY_STATUS or status < 200
        if no_body or (content_length is None and not body and self.method == "HEAD"):
            framing = ""            # (a HEAD answer whose GET length is unknown: none given)
        else:
            n = len(body) if content_length is None else content_length
            framing = f"Content-Length: {n}\r\n"
        head = self._head(status, reason, headers, framing)
        self._state = 2             # (only now: a head that cannot be built leaves room for a 500)
        if no_body or self.method == "HEAD" or not body:
            conn.transport.write(head)
        elif len(body) <= ONE_WRITE:
            conn.transport.write(head + body)
        else:
            conn.transport.writelines((head, body))
        conn.response_done(self)

    def start(self, status: int, headers: Iterable[tuple[str, str]], reason: str | None = None,
              content_length: int | None = None) -> None:
        """Send the head of a streamed response: Content-Length if known, else chunked
        (HTTP/1.1) or until close (HTTP/1.0)."""
        conn = self._conn
        if conn.lost or conn.transport.is_closing():
            raise ClientGone("the client closed the connection")
        if self._state:
            raise RuntimeError("response already started")
        if status in _NO_BODY_STATUS or status < 200 or self.method == "HEAD":
            framing = "" if content_length is None or status in _NO_BODY_STATUS \
                else f"Content-Length: {content_length}\r\n"
        elif content_length is not None:
            framing = f"Content-Length: {content_length}\r\n"
        elif self.version == "1.1":
            framing = "Transfer-Encoding: chunked\r\n"
            self._chunked_out = True
        else:
            framing = ""
            self.keep_alive = False     # the end of the body is the end of the connection
        head = self._head(status, reason, headers, framing)
        self._state = 1
        conn.transport.write(head)

    async def write(self, data: bytes) -> None:
        """A piece of a streamed body; waits while the client is slower than we are."""
        conn = self._conn
        if conn.lost or conn.transport.is_closing():
            raise ClientGone("the client closed the connection")
        if not data or self.method == "HEAD":
            return
        if self._chunked_out:
            conn.transport.writelines((f"{len(data):x}\r\n".encode(), data, b"\r\n"))
        else:
            conn.transport.write(data)
        if conn.write_paused:
            await conn.drain()

    def end(self) -> None:
        """The end of a streamed body."""
        if self._state != 1:
            raise RuntimeError("no streamed response to end")
        self._state = 2
        conn = self._conn
        if conn.lost:
            return
        if self._chunked_out and self.method != "HEAD":
            conn.transport.write(b"0\r\n\r\n")
        conn.response_done(self)

    @property
    def draining(self) -> bool:
        """The server is shutting down."""
        return self._conn.server.draining

    def switch_protocols(self, headers: Iterable[tuple[str, str]]
                         ) -> tuple[asyncio.Transport, bytes, set[Any]]:
        """Answer a WebSocket handshake with `101 Switching Protocols` (`headers` as given:
        Upgrade, Connection, Sec-WebSocket-*) and hand the connection over: the transport,
        the bytes the client sent after its request head, and the server's set of tunnels
        (where the caller registers its tunnel, to be swept and drained). The caller sets its
        own protocol on the transport; this connection no longer reads, answers or times
        out."""
        conn = self._conn
        if self._state or conn.lost or conn.transport.is_closing():
            raise ClientGone("the client closed the connection")
        parts = ["HTTP/1.1 101 Switching Protocols\r\n"]
        parts.extend(f"{name}: {value}\r\n" for name, value in headers)
        parts.append("\r\n")
        self._state = 2
        self.keep_alive = False
        conn.server.connections.discard(conn)   # the tunnel's owner drains it from now on
        transport = conn.transport
        transport.write("".join(parts).encode("latin-1"))
        tail, conn._tunnel_tail = conn._tunnel_tail or b"", None
        return transport, tail, conn.server.tunnels

    def cut(self) -> None:
        """Close the connection now (after what was written): a truncated response, or none."""
        self._state = 2
        self.keep_alive = False
        self._conn.close()

    def _head(self, status: int, reason: str | None, headers: Iterable[tuple[str, str]],
              framing: str) -> bytes:
        conn = self._conn
        if not self._body_done or conn.server.draining or \
                ((conn.closing or conn.eof) and not conn._pipeline):
            self.keep_alive = False
        parts = [_status_line(status, reason)]
        has_date = False
        for name, value in headers:
            if name in _DATE_NAMES:
                has_date = True
            parts.append(f"{name}: {value}\r\n")
        if not has_date:
            parts.append(_DateHeader.value)
        if not self.keep_alive:
            parts.append("Connection: close\r\n")
        elif self.version == "1.0":
            parts.append("Connection: keep-alive\r\n")
        parts.append(framing)
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")


Handler = Callable[[Request], Awaitable[None]]


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, runs the handler for each in turn."""

    def __init__(self, server: DownstreamServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer_ip = ""
        self.client_cert = ""
        self._tunnel_tail: bytes | None = None   # bytes after a WebSocket handshake's head
        self.lost = False
        self.eof = False
        self.closing = False
        self.write_paused = False
        self.idle_since = self.loop.time()
        self.head_started: float | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._drain_waiter: asyncio.Future[None] | None = None
        self._current: Request | None = None        # being answered
        self._parsing: Request | None = None        # receiving its body
        self._pipeline: deque[Request] = deque()
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._special: dict[bytes, str] = {}
        self._head_bytes = 0
        self._field_bytes = 0
        self._meta_bytes = 0
        self._body_at = 0.0             # last progress of the body being received
        self._paused_at = 0.0           # when writing paused (a client not reading)
        self._linger_at: float | None = None
        self._closed_at: float | None = None
        self._paused_body = False
        self._paused_pipeline = False
        self._task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[Request | None] | None = None

    # -- transport -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (tuple, list)) and peer:
            self.peer_ip = str(peer[0])
        if self.server.tls:     # (the handshake is done: the protocol starts after it)
            self.client_cert = client_subject(transport.get_extra_info("peercert"))
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self._tunnel_tail is not None:
                # Sent before our 101 (a client that does not wait): kept for the tunnel.
                self._tunnel_tail += data
                self.transport.pause_reading()
            return
        if self.head_started is not None:
            # llhttp hands a header field over only when it is complete: bound what it
            # accumulates meanwhile (whole reads after the one the head began in).
            if self._head_bytes > MAX_HEAD:
                self._error(431, f"request head larger than {MAX_HEAD} bytes")
                return
            self._head_bytes += len(data)
        else:
            p = self._parsing
            if p is not None and p.chunked:
                # Chunk-size lines and trailer fields: bounded like a head (llhttp hands a
                # trailer field over only when it is complete). Body bytes reset the count.
                if self._meta_bytes > MAX_HEAD:
                    self._error(431, f"chunk metadata or trailer section larger than "
                                     f"{MAX_HEAD} bytes")
                    return
                self._meta_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # What follows the head belongs to another protocol: stop reading, answer this
            # request as a plain one and close, or (a WebSocket route) tunnel it.
            self.closing = True
            self._tunnel_tail = data[exc.args[0]:] if exc.args else b""
            for req in (self._current, *self._pipeline):
                if req is not None:
                    req.keep_alive = False
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._error(cause.status, cause.detail)
            else:
                log.error("request parser callback failed", exc_info=cause)
                self._error(500, "internal error while reading the request")
        except httptools.HttpParserError as exc:
            detail = str(exc).strip() or type(exc).__name__
            self._error(400, f"malformed request: {detail}")

    def eof_received(self) -> bool:
        self.eof = True
        if self._linger_at is not None or (self._current is None and not self._pipeline):
            self.closing = True
            return False                # nothing to answer: close
        # A client that half-closes after its requests still gets their responses; the last
        # one says `Connection: close`.
        if self._parsing is not None:
            self._parsing._wake()       # a body cut short: its reader gets ClientGone
        if self._current is not None:
            self._current._wake()       # a held (throttled) request sees the client go
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self.server.connections.discard(self)
        for req in (self._current, self._parsing):
            if req is not None:
                req._wake()
        self._pipeline.clear()
        waiting = self._next
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._paused_at = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        while self.write_paused and not self.lost:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.lost:
            raise ClientGone("the client closed the connection")

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self._closed_at = self.loop.time()
            self.transport.close()

    def linger(self) -> None:
        """Answered before the request body was all in: send our FIN after the response but
        keep reading (and dropping) what the client still sends, so that closing does not
        reset the connection under a response it has not read yet; closed on the client's
        EOF or after LINGER_S."""
        self.closing = True
        self._linger_at = self.loop.time()
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
            if self._paused_body or self._paused_pipeline:
                self._paused_body = self._paused_pipeline = False
                transport.resume_reading()
        else:
            self.close()

    def resume_for_body(self) -> None:
        p = self._parsing
        if self._paused_body and (p is None or p._buffered <= BODY_LOW_WATER):
            self._paused_body = False
            if not self._paused_pipeline and not self.closing:
                self.transport.resume_reading()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._special = {}
        self._head_bytes = 0
        self._field_bytes = 0
        self.head_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise _Reject(414, f"request target longer than {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if size > MAX_FIELD:
            raise _Reject(431, f"header field longer than {MAX_FIELD} bytes")
        self._field_bytes += size
        if self._field_bytes > MAX_HEAD:
            raise _Reject(431, f"request head larger than {MAX_HEAD} bytes")
        if self._parsing is not None:
            return      # a trailer field (after a chunked body): counted, never merged
        headers = self._headers
        if len(headers) >= MAX_FIELDS:
            raise _Reject(431, f"more than {MAX_FIELDS} header fields")
        if value[-1:] in b" \t" and value:
            # llhttp strips the leading optional whitespace only (RFC 9110 5.5: both sides):
            # `X-Api-Key: K ` must key, route and reach the upstream as `K`.
            value = value.rstrip(b" \t")
        v = value.decode("latin-1")
        headers.append((name.decode("latin-1"), v))
        lname = name.lower()
        if lname in _SPECIAL:
            special = self._special
            if lname in special:
                if lname in _SINGLE:
                    raise _Reject(400, f"more than one {name.decode('latin-1')} field")
                if lname == b"connection":
                    special[lname] += ", " + v
                return
            special[lname] = v

    def on_headers_complete(self) -> None:
        self.head_started = None
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(505, f"HTTP/{version} is not supported (HTTP/1.1 and 1.0 are)")
        method = parser.get_method().decode("ascii")
        special = self._special
        url = self._url
        if b"#" in url:
            # A fragment is not part of the target (RFC 9112 3.2): routed with it, `/login#x`
            # would miss the `/login` route while the upstream serves `/login`.
            raise _Reject(400, "a fragment ('#') in the request target is refused")
        if url[:1] != b"/":
            url = self._absolute_form(method, url, special)
        elif version == "1.1" and b"host" not in special:
            raise _Reject(400, "an HTTP/1.1 request must carry a Host field")
        host = special.get(b"host")
        if host is not None and (".." in host or "/" in host or "\\" in host):
            # Routes match the host without one trailing dot; `api.internal..` or `a/b` name
            # no host at all (nginx refuses them the same way).
            raise _Reject(400, f"invalid Host {host[:100]!r}")
        if b"/." in url or b"%2" in url or b"\\" in url or b"%5" in url:
            _refuse_dot_segments(url)
        keep_alive = parser.should_keep_alive()
        te = special.get(b"transfer-encoding")
        if te is not None:
            if te.strip().lower() != "chunked":
                raise _Reject(501, f"Transfer-Encoding {te!r} is not supported (chunked is)")
            if version == "1.0":
                keep_alive = False      # RFC 9112 6.1: chunked from a 1.0 client
        websocket = False
        if parser.should_upgrade():
            if te is not None or special.get(b"content-length", "0") != "0":
                raise _Reject(400, "Upgrade with a request body is not supported")
            keep_alive = False
            websocket = method == "GET" and any(
                n.lower() == "upgrade" and "websocket" in v.lower() for n, v in self._headers)
        conn_field = special.get(b"connection")
        if keep_alive and conn_field is not None and \
                "close" in (t.strip() for t in conn_field.lower().split(",")):
            keep_alive = False
        req = Request(self, method, url.decode("latin-1"), version, self._headers, special,
                      keep_alive)
        if websocket:
            req.upgrade = True
        self._meta_bytes = 0
        self._parsing = req
        if not req._body_done:
            self._body_at = self.loop.time()
        waiting = self._next
        if waiting is not None:
            self._next = None
            self._current = req
            waiting.set_result(req)
        elif self._task is None:
            self._current = req
            self._task = self.loop.create_task(self._serve(req))
        else:
            self._pipeline.append(req)
            # Read ahead no further than one queued body, and MAX_PIPELINE heads.
            if (len(self._pipeline) >= MAX_PIPELINE or not req._body_done) and \
                    not self._paused_pipeline:
                self._paused_pipeline = True
                self.transport.pause_reading()

    @staticmethod
    def _absolute_form(method: str, url: bytes, special: dict[bytes, str]) -> bytes:
        """RFC 9112 3.2.2: `http://authority/path?query` names its host in the target, which
        replaces the Host field. Other target forms (CONNECT's authority, `*`) are refused."""
        if method == "CONNECT":
            raise _Reject(501, "CONNECT is not supported")
        if not url.lower().startswith((b"http://", b"https://")):
            raise _Reject(400, "the request target must be a path (/...) or an absolute URI")
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise _Reject(400, "invalid request target") from None
        if not parsed.host:
            raise _Reject(400, "invalid request target")
        authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        special[b"host"] = authority.decode("latin-1")
        target = parsed.path or b"/"
        if parsed.query:
            target += b"?" + parsed.query
        return target

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is None:
            return
        self._meta_bytes = 0
        self._body_at = self.loop.time()
        if req._state == 2:
            return                      # answered already: the rest is dropped
        req._feed(body)
        if req._buffered > BODY_HIGH_WATER and not self._paused_body:
            self._paused_body = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        req = self._parsing
        if req is not None:
            req._complete()
        self._parsing = None

    # -- answering -----------------------------------------------------------------------

    async def _serve(self, req: Request | None) -> None:
        """Answer requests in arrival order. One task per connection, waiting on a future for
        the next request (cheaper than a task per request: ~2 of ~45 us)."""
        handler = self.server.handler
        try:
            while req is not None:
                if self.write_paused:   # a client that does not read: answer no more
                    await self.drain()
                try:
                    await handler(req)
                except ClientGone:
                    req.cut()
                except Exception:
                    log.exception("request handler failed",
                                  extra={"method": req.method, "target": req.target,
                                         "request_id": req.request_id})
                    self._fail(req)
                else:
                    if req._state != 2:
                        log.error("request handler returned without finishing its response",
                                  extra={"method": req.method, "target": req.target})
                        self._fail(req)
                self._current = None
                if req._chunks:         # a body the handler did not read: let it go
                    req._chunks.clear()
                    req._buffered = 0
                if self._paused_body and (self._parsing is None or
                                          self._parsing._buffered <= BODY_LOW_WATER):
                    self.resume_for_body()
                if self.lost or self.transport.is_closing() or \
                        (self.closing and not self._pipeline):
                    if self._linger_at is None:
                        self.close()
                    return
                if self._pipeline:
                    req = self._current = self._pipeline.popleft()
                    if self._paused_pipeline and len(self._pipeline) < MAX_PIPELINE // 2:
                        self._paused_pipeline = False
                        if not self._paused_body:
                            self.transport.resume_reading()
                    continue
                self.idle_since = self.loop.time()
                if self.server.draining or self.eof:
                    self.close()
                    return
                self._next = self.loop.create_future()
                req = await self._next      # set (and `_current` with it) by the parser
        except ClientGone:
            pass
        finally:
            self._task = None
            self._next = None
            self._current = None

    def _fail(self, req: Request) -> None:
        if req._state == 0:
            req.keep_alive = False
            req.respond(500, [("Content-Type", PROBLEM_CONTENT_TYPE),
                              ("X-Request-Id", req.request_id)],
                        problem_body(500, "internal error"))
        else:
            req.cut()

    def response_done(self, req: Request) -> None:
        if not req.keep_alive:
            if not req._body_done and not self.lost and self._linger_at is None:
                self.linger()
            else:
                self.close()

    def _error(self, status: int, detail: str) -> None:
        """Answer a request we could not parse (once nothing else is being answered) and
        close the connection."""
        self.head_started = None
        on_reject = self.server.on_reject
        if on_reject is not None:
            on_reject(status, detail, self.peer_ip)
        body = problem_body(status, detail)
        head = (f"{_status_line(status, None)}Content-Type: {PROBLEM_CONTENT_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\n{_DateHeader.value}Connection: close\r\n\r\n")
        current = self._current
        if current is not None and not current.finished:
            if self._parsing is current:
                # Its own body is malformed: nothing more can be read. The client gets the 400
                # unless its response has begun; the handler's reader gets ClientGone.
                if current._state == 0 and not self.lost:
                    current._state = 2
                    current.keep_alive = False
                    self.transport.write(head.encode("latin-1") + body)
                self.close()
                return
            # The requests parsed before the bad one keep their answers (the last says
            # Connection: close); the bad one (a queued request whose body is malformed) gets
            # none and is never handed to the handler.
            self.closing = True
            bad = self._parsing
            if bad is not None and self._pipeline and self._pipeline[-1] is bad:
                self._pipeline.pop()
            self._parsing = None
            if not self._pipeline:
                current.keep_alive = False
            return
        if not self.lost:
            self.transport.write(head.encode("latin-1") + body)
        self.close()

    # -- timeouts and shutdown -----------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._current is not None

    def sweep(self, now: float) -> None:
        """Called about once a second: close an idle keep-alive connection, one whose request
        head or body stalls, one whose client stopped reading, or a lingering one."""
        server = self.server
        if self.lost:
            return
        if self._linger_at is not None:
            if now - self._linger_at > LINGER_S:
                self.transport.abort()
            return
        if self.write_paused and now - self._paused_at > server.send_timeout_s:
            self.transport.abort()      # the handler's write() gets ClientGone
            return
        p = self._parsing
        if p is not None and not p._body_done and not self._paused_body and \
                not self._paused_pipeline and now - self._body_at > server.body_timeout_s:
            if p is self._current and p._state == 0:
                self._error(408, "request body not received in time")
            else:
                self.transport.abort()
            return
        if self._closed_at is not None:
            if now - self._closed_at > server.send_timeout_s:
                self.transport.abort()  # closed with data the client never took
            return
        if self.head_started is not None:
            if now - self.head_started > server.header_timeout_s and self._current is None:
                self._error(408, "request head not received in time")
        elif self._current is None and now - self.idle_since > server.keepalive_timeout_s:
            self.close()


class DownstreamServer:
    """The protocol factory given to `loop.create_server`, and what is shared by its
    connections: the handler, the timeouts, the drain state."""

    def __init__(self, handler: Handler, *, keepalive_timeout_s: float = 75.0,
                 header_timeout_s: float = 30.0, body_timeout_s: float = 60.0,
                 send_timeout_s: float = 60.0,
                 on_reject: Callable[[int, str, str], None] | None = None,
                 tls: bool = False) -> None:
        self.handler = handler
        self.tls = tls
        """Served over TLS: connections read the client certificate's subject."""
        self.body_timeout_s = body_timeout_s
        """Longest pause between two pieces of a request body (nginx client_body_timeout)."""
        self.send_timeout_s = send_timeout_s
        """Longest a client may leave a response unread (nginx send_timeout)."""
        self.on_reject = on_reject
        """Told (status, detail, peer IP) of each request refused before the handler saw it."""
        self.keepalive_timeout_s = keepalive_timeout_s
        self.header_timeout_s = header_timeout_s
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self.tunnels: set[Any] = set()
        """Open WebSocket tunnels (`gateway.tunnel.Tunnel`): swept for idleness, and closed
        with close frames on shutdown."""
        self.draining = False
        _DateHeader.refresh()           # (stale if no server ticked in this process lately)
        self._tick_handle: asyncio.TimerHandle | None = self.loop.call_later(1.0, self._tick)

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def _tick(self) -> None:
        _DateHeader.refresh()
        self.sweep(self.loop.time())
        self._tick_handle = self.loop.call_later(1.0, self._tick)

    def sweep(self, now: float) -> None:
        """Enforce the timeouts as of loop time `now` (the tick does this once a second;
        tests call it with a time of their choosing)."""
        for conn in list(self.connections):
            conn.sweep(now)
        for tunnel in list(self.tunnels):
            tunnel.sweep(now)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now and busy ones after their response; cut what is left
        after `timeout` seconds."""
        self.draining = True
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        for tunnel in list(self.tunnels):
            tunnel.going_away()         # close frames (1001) to both sides
        deadline = self.loop.time() + timeout
        while (self.connections or self.tunnels) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for tunnel in list(self.tunnels):
            tunnel.abort()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    def stats(self) -> dict[str, Any]:
        return {"connections": len(self.connections),
                "busy": sum(1 for c in self.connections if c.busy)}
