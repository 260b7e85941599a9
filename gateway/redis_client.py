"""A small RESP2 client for the rate limiter's hot path: one pipelined asyncio.Protocol connection.

Purpose-built like `upstream.py`: redis-py's asyncio client
spends most of a call in its own machinery (pool checkout, `asyncio.wait_for`, command packing and
reply parsing in layers), which capped `store: redis` at well under half the local store's rate.
Here a command is one bytes join written to the socket at once; any number of commands are in
flight on the one connection (pipelining) and replies are matched first-in first-out to futures;
the reply parser is incremental over one receive buffer; timeouts are one timer per connection that
sweeps due calls, not a timer or a task per call.

Scope: what the limiter needs. Replies: simple strings, errors, integers, bulk strings and (nested)
arrays (RESP2). Commands: anything, given as bytes/str/int arguments. URLs:
`redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS with the system trust store and
hostname check), `unix://[[user]:password@]/path/to/socket[?db=N&password=...]`. AUTH and SELECT
are sent when a connection opens. No reconnect logic here: a lost connection fails its pending
calls with StoreError and reports to `on_lost`; the owner (RedisStore) decides when to reconnect.

Timeouts under load: a call fails only if its deadline passed before an I/O poll that brought no
reply for it; a saturated loop whose pass outlasts the timeout still delivers a reply that came in
time instead of reporting Redis as timed out (and tripping the store's breaker).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gateway.errors import StoreError

__all__ = [
    "RedisAddress",
    "RedisClient",
    "RedisConnection",
    "ReplyError",
    "RespParser",
    "encode_command",
    "parse_url",
]

Reply = Any
"""int | bytes | None | ReplyError | list[Reply] (simple strings arrive as bytes)."""


class ReplyError(Exception):
    """Redis answered a command with an error reply (`-ERR ...`, `-NOSCRIPT ...`)."""

    @property
    def code(self) -> str:
        """The first word of the error: ERR, NOSCRIPT, WRONGPASS, ..."""
        return str(self).partition(" ")[0]


class ProtocolError(Exception):
    """The byte stream is not RESP2: the connection cannot be trusted any more."""


# --------------------------------------------------------------------------------------------
# Encoding


def _arg(a: bytes | str | float) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        # Identifiers are header values decoded Latin-1 (downstream.py): any fixed encoding
        # keeps keys consistent; surrogateescape never fails on a str from elsewhere.
        return a.encode("utf-8", "surrogateescape")
    if isinstance(a, bool):
        raise TypeError("a bool is not a Redis argument; send 1 or 0")
    if isinstance(a, int | float):
        return repr(a).encode()
    raise TypeError(f"cannot send {type(a).__name__} to Redis")


def encode_command(args: Sequence[bytes | str | int | float]) -> bytes:
    """One command as a RESP array of bulk strings, in a single bytes join."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        parts.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# Parsing

_CRLF = b"\r\n"


class RespParser:
    """Incremental RESP2 parser: `feed(data)` then `gets()` until it returns `NEED_MORE`.

    Partial replies stay in the buffer; a reply is parsed from its first byte again once more
    data arrives (the replies here are tens of bytes, so restarting is cheaper than keeping a
    resumable parse stack)."""

    NEED_MORE: Any = object()

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if self._pos:
            del buf[:self._pos]
            self._pos = 0
        buf += data

    def gets(self) -> Reply:
        """The next complete reply, or NEED_MORE. Raises ProtocolError on garbage."""
        value, end = self._parse(self._pos)
        if end < 0:
            return self.NEED_MORE
        self._pos = end
        return value

    def _parse(self, pos: int) -> tuple[Reply, int]:
        buf = self._buf
        nl = buf.find(_CRLF, pos)
        if nl < 0:
            if len(buf) - pos > 65536:
                raise ProtocolError("no CRLF in 64 KiB of reply header")
            return None, -1
        kind = buf[pos]
        try:
            if kind == 58:          # ':'
                return int(buf[pos + 1:nl]), nl + 2
            if kind == 36:          # '$'
                n = int(buf[pos + 1:nl])
                if n < 0:
                    return None, nl + 2
                end = nl + 2 + n
                if len(buf) < end + 2:
                    return None, -1
                if buf[end:end + 2] != _CRLF:
                    raise ProtocolError("bulk string not followed by CRLF")
                return bytes(buf[nl + 2:end]), end + 2
            if kind == 42:          # '*'
                n = int(buf[pos + 1:nl])
                if n < 0:
                    return None, nl + 2
                items: list[Reply] = []
                p = nl + 2
                for _ in range(n):
                    # bulk strings and integers inline: the limiter's replies are arrays of them
                    if p < len(buf) and buf[p] == 36:
                        nl = buf.find(_CRLF, p)
                        if nl < 0:
                            return None, -1
                        m = int(buf[p + 1:nl])
                        if m >= 0:
                            end = nl + 2 + m
                            if len(buf) < end + 2:
                                return None, -1
                            if buf[end:end + 2] != _CRLF:
                                raise ProtocolError("bulk string not followed by CRLF")
                            items.append(bytes(buf[nl + 2:end]))
                            p = end + 2
                            continue
                    item, p = self._parse(p)
                    if p < 0:
                        return None, -1
                    items.append(item)
                return items, p
            if kind == 43:          # '+'
                return bytes(buf[pos + 1:nl]), nl + 2
            if kind == 45:          # '-'
                return ReplyError(buf[pos + 1:nl].decode("utf-8", "replace")), nl + 2
        except ValueError as exc:
            raise ProtocolError(f"bad length or integer in {bytes(buf[pos:nl])!r}") from exc
        raise ProtocolError(f"unknown reply type byte {bytes([kind])!r}")


# --------------------------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, parsed from the configured URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""            # unix socket path; empty for TCP
    db: int = 0
    username: str = ""
    password: str = ""
    tls: bool = False

    def __str__(self) -> str:
        """host:port/db or the socket path, without credentials (for logs)."""
        where = self.path or f"{self.host}:{self.port}"
        return f"{where}/{self.db}"


def parse_url(url: str) -> RedisAddress:
    """`redis://`, `rediss://` or `unix://` URL -> RedisAddress. ValueError names the problem."""
    u = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    username = unquote(u.username or "") or query.get("username", "")
    password = unquote(u.password or "") if u.password is not None else query.get("password", "")
    db_text = query.get("db", "")
    if u.scheme in ("redis", "rediss"):
        path_db = u.path.strip("/")
        if path_db:
            db_text = path_db
        try:
            port = u.port or 6379
        except ValueError as exc:
            raise ValueError(f"redis.url: bad port in {url!r}") from exc
        host = u.hostname or "127.0.0.1"
        path = ""
    elif u.scheme == "unix":
        if not u.path:
            raise ValueError(f"redis.url: unix:// URL without a socket path: {url!r}")
        host, port, path = "", 0, unquote(u.path)
    else:
        raise ValueError(f"redis.url: must be redis://, rediss:// or unix://, got {url!r}")
    try:
        db = int(db_text) if db_text else 0
    except ValueError as exc:
        raise ValueError(f"redis.url: database must be a number, got {db_text!r}") from exc
    return RedisAddress(host=host, port=port, path=path, db=db, username=username,
                        password=password, tls=u.scheme == "rediss")


# --------------------------------------------------------------------------------------------
# Connection


class RedisConnection(asyncio.Protocol):
    """One pipelined connection: `send(data, deadline)` writes at once and returns a future that
    gets the reply (ReplyError replies are set as the future's exception)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, where: str,
                 on_lost: Callable[[RedisConnection, BaseException], None] | None) -> None:
        self._loop = loop
        self._where = where
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._parser = RespParser()
        # (future, deadline) in send order; a timed-out call stays until its reply arrives so
        # that replies keep matching FIFO
        self._pending: deque[tuple[asyncio.Future[Reply], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.open = False

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered (including timed-out ones awaiting their reply)."""
        return len(self._pending)

    # asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.open = True

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        pending = self._pending
        need_more = RespParser.NEED_MORE
        while True:
            try:
                reply = parser.gets()
            except ProtocolError as exc:
                self._abort(StoreError(f"redis at {self._where}: protocol error: {exc}"))
                return
            if reply is need_more:
                return
            if not pending:
                self._abort(StoreError(f"redis at {self._where}: reply with no command waiting"))
                return
            fut = pending.popleft()[0]
            if fut.done():          # timed out or cancelled: its reply is dropped
                continue
            if isinstance(reply, ReplyError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def eof_received(self) -> bool:
        return False                # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.open
        self.open = False
        self._transport = None
        self._fail_all(StoreError(f"redis at {self._where}: connection lost"
                                  + (f" ({type(exc).__name__}: {exc})" if exc else "")))
        if was_open and self._on_lost is not None:
            self._on_lost(self, exc or ConnectionResetError("closed by redis"))

    # calls ------------------------------------------------------------------------------------

    def send(self, data: bytes, deadline: float) -> asyncio.Future[Reply]:
        """Write one encoded command now and return the future of its reply. Raises StoreError
        if the connection is closed.

        Written at once rather than gathered into one write per loop pass: Redis then works on
        the other core while this loop goes on (measured through the gateway at 32 connections:
        10.2k req/s writing at once, 8.0k gathering, with the loop idle part of the time)."""
        transport = self._transport
        if transport is None or not self.open:
            raise StoreError(f"redis at {self._where}: not connected")
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._pending.append((fut, deadline))
        transport.write(data)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return fut

    def close(self) -> None:
        """Close now; pending calls fail with StoreError; `on_lost` is not called."""
        self.open = False
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail_all(StoreError(f"redis at {self._where}: connection closed"))

    # timeouts ---------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        # Two hops through the ready queue put one I/O poll between the timer and the sweep
        # (uvloop runs timers before polling); the sweep then fails only the calls that were due
        # when the timer fired, so every failed call had a poll after its deadline and no reply
        # in it. Under saturation a loop pass can outlast the timeout (256 connections: 15-30 ms
        # passes against 25 ms), and a reply read in the next poll is in time, not a timeout.
        self._timer = None
        self._loop.call_soon(self._loop.call_soon, self._sweep, self._loop.time())

    def _sweep(self, cutoff: float) -> None:
        # always sweeps, even if a send armed a new timer meanwhile: under steady load one
        # always does, and skipping would leave due calls waiting on a hung server
        nxt = 0.0
        for fut, deadline in self._pending:
            if fut.done():
                continue
            if deadline <= cutoff:
                fut.set_exception(StoreError(f"redis at {self._where}: no reply in time"))
            elif nxt == 0.0 or deadline < nxt:
                nxt = deadline
        if nxt and (self._timer is None or nxt < self._timer_at):
            self._arm(nxt)

    def _fail_all(self, exc: StoreError) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        for fut, _ in pending:
            if not fut.done():
                fut.set_exception(exc)

    def _abort(self, exc: StoreError) -> None:
        transport = self._transport
        self._fail_all(exc)
        if transport is not None:
            transport.abort()       # connection_lost reports to on_lost


# --------------------------------------------------------------------------------------------
# Client


class RedisClient:
    """The connection to one Redis, opened with `connect()` (AUTH, SELECT) and replaced with
    `connect()` again. `call(data)` sends an encoded command on it and awaits the reply.

    Errors: StoreError for not connected, timeout, connection lost; ReplyError for an error reply.
    `on_lost(exc)` is called when an open connection drops by itself (not on `close()`)."""

    def __init__(self, url: str, timeout_s: float, *,
                 on_lost: Callable[[BaseException], None] | None = None) -> None:
        self.address = parse_url(url)
        self.timeout_s = timeout_s
        self._on_lost = on_lost
        self._conn: RedisConnection | None = None
        self._connecting: asyncio.Future[None] | None = None
        self.connects = 0           # connections opened (for tests and logs)
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.open

    @property
    def connection(self) -> RedisConnection | None:
        return self._conn

    def send(self, data: bytes, deadline: float | None = None) -> asyncio.Future[Reply]:
        """Write now; the future gets the reply. Raises StoreError when not connected."""
        conn = self._conn
        if conn is None:
            raise StoreError(f"redis at {self.address}: not connected")
        if deadline is None:
            deadline = conn._loop.time() + self.timeout_s
        return conn.send(data, deadline)

    async def call(self, data: bytes, deadline: float | None = None) -> Reply:
        """Send and await one encoded command, connecting first if no connection was opened."""
        if self._conn is None:
            await self.ensure_connected()
        return await self.send(data, deadline)

    async def execute(self, *args: bytes | str | float,
                      deadline: float | None = None) -> Reply:
        """Convenience for rare commands: encode and call."""
        return await self.call(encode_command(args), deadline)

    async def ensure_connected(self) -> None:
        """Open the first connection; concurrent callers share one attempt."""
        if self._conn is not None:
            return
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.ensure_future(self.connect())
            task.add_done_callback(self._connect_done)
        await asyncio.shield(task)

    def _connect_done(self, task: asyncio.Future[None]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()        # retrieved here too: waiters may all have gone

    async def connect(self, timeout_s: float | None = None) -> None:
        """Open a new connection (AUTH, SELECT, all within `timeout_s`, default the client's
        timeout) and make it the current one; the previous one, if any, is closed (its pending
        calls fail with StoreError). Raises StoreError (or ReplyError, e.g. WRONGPASS)."""
        if self._closed:
            raise StoreError(f"redis at {self.address}: client closed")
        loop = asyncio.get_running_loop()
        a = self.address
        where = str(a)
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)

        def factory() -> RedisConnection:
            return RedisConnection(loop, where, self._lost)

        try:
            async with asyncio.timeout_at(deadline):
                if a.path:
                    _, conn = await loop.create_unix_connection(factory, a.path)
                else:
                    ctx = ssl.create_default_context() if a.tls else None
                    _, conn = await loop.create_connection(
                        factory, a.host, a.port, ssl=ctx,
                        server_hostname=a.host if a.tls else None)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise StoreError(f"redis at {where}: cannot connect: "
                             f"{type(exc).__name__}: {exc or 'timeout'}") from exc
        try:
            hello: list[asyncio.Future[Reply]] = []
            if a.password:
                auth = (b"AUTH", a.username, a.password) if a.username else (b"AUTH", a.password)
                hello.append(conn.send(encode_command(auth), deadline))
            if a.db:
                hello.append(conn.send(encode_command((b"SELECT", a.db)), deadline))
            for fut in hello:
                await fut
        except BaseException:
            conn.close()
            for fut in hello:
                if fut.done() and not fut.cancelled():
                    fut.exception()     # the first failure is the one raised
            raise
        if self._closed:            # closed while connecting
            conn.close()
            raise StoreError(f"redis at {where}: client closed")
        old, self._conn = self._conn, conn
        self.connects += 1
        if old is not None:
            old.close()

    def _lost(self, conn: RedisConnection, exc: BaseException) -> None:
        if conn is self._conn and self._on_lost is not None:
            self._on_lost(exc)

    async def close(self) -> None:
        """Close the connection; later calls and connects fail with StoreError."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
