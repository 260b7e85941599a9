"""A WebSocket tunnel: the client's connection and the upstream's, joined after the handshake.

Bytes are relayed as they come, both ways, with backpressure: when one side's transport has
more buffered than it can send (`pause_writing`), the other side stops being read until it
drains (`resume_writing`). Either side closing (EOF, reset) closes the other once what was
relayed to it is written. A tunnel with no byte in either direction for `idle_timeout_s`, and
every tunnel at shutdown, is closed the way WebSocket peers expect: a close frame with status
1001 (going away) to each side, then the TCP connections once both answered with their own
close frame, or at the drain deadline.

The tunnel does not decode messages; it follows frame boundaries only (a header of 2 to 14
bytes, then a payload whose length the header gives), so that a close frame it sends lands
between two frames and never inside one. Frames to the upstream are masked, as frames from a
client must be (RFC 6455 5.3); frames to the client are not.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

GOING_AWAY = 1001
CLOSE_GRACE_S = 5.0     # after our close frames, how long the peers have to answer before a cut


def close_frame(code: int, *, masked: bool) -> bytes:
    """A close frame carrying `code` and no reason (4 bytes, or 8 when masked)."""
    payload = code.to_bytes(2, "big")
    if not masked:
        return b"\x88\x02" + payload
    mask = os.urandom(4)
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class FrameTracker:
    """Follows the frame boundaries of one direction of a WebSocket byte stream."""

    __slots__ = ("closes", "head", "left")

    def __init__(self) -> None:
        self.left = 0           # payload bytes of the current frame still to come
        self.head = b""         # a frame header split across reads
        self.closes = 0         # close frames seen

    @property
    def at_boundary(self) -> bool:
        return not self.left and not self.head

    def feed(self, data: bytes, stop: bool = False) -> int:
        """Advance over `data`. With `stop`, stop at the first frame boundary and return its
        offset (0 when the stream is at one already), or -1 when `data` ends inside a frame.
        Without, consume everything (the result is then meaningless)."""
        i, n = 0, len(data)
        while True:
            if self.left:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                if self.left:
                    return -1
            if stop and not self.head:
                return i
            if i >= n:
                return n if not self.head else -1
            buf = self.head + data[i:i + 14]
            size = _header_size(buf)
            if size == 0 or len(buf) < size:
                self.head += data[i:]
                return -1
            i += size - len(self.head)
            self.head = b""
            if buf[0] & 0x0F == 0x8:
                self.closes += 1
            length = buf[1] & 0x7F
            if length == 126:
                length = int.from_bytes(buf[2:4], "big")
            elif length == 127:
                length = int.from_bytes(buf[2:10], "big")
            self.left = length


def _header_size(buf: bytes) -> int:
    """The length of the frame header starting `buf`, or 0 when `buf` is too short to tell."""
    if len(buf) < 2:
        return 0
    length = buf[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + 4 if buf[1] & 0x80 else size


class _Side(asyncio.Protocol):
    """One end of the tunnel: what its peer sends is written to the other end."""

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, masked_out: bool) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.other: _Side = None  # type: ignore[assignment]
        self.frames = FrameTracker()    # of the stream this side receives
        self.masked_out = masked_out    # frames written to this side must be masked
        self.received = 0
        self.lost = False
        self.pending_close = False      # a close frame waits for the next boundary
        self.closed_to_other = False    # we sent the other side our close: drop what follows
        self.answered = False           # this side's peer sent its close frame

    # -- relaying ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        tunnel.active_at = tunnel.loop.time()
        self.received += len(data)
        frames = self.frames
        if self.closed_to_other:
            self._watch(data)
            return
        if self.pending_close:
            cut = frames.feed(data, stop=True)
            if cut < 0:
                self.other.write(data)
                return
            self.other.write(data[:cut])
            self._close_other()
            self._watch(data[cut:])
            return
        frames.feed(data)
        self.other.write(data)

    def _watch(self, data: bytes) -> None:
        before = self.frames.closes
        self.frames.feed(data)
        if self.frames.closes > before:
            self.answered = True
            self.tunnel.check_done()

    def write(self, data: bytes) -> None:
        if data and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def send_going_away(self) -> None:
        """Close the stream from this side to the other with a close frame, at the next frame
        boundary."""
        if self.closed_to_other or self.other.lost:
            return
        if self.frames.at_boundary:
            self._close_other()
        else:
            self.pending_close = True

    def _close_other(self) -> None:
        self.pending_close = False
        self.closed_to_other = True
        other = self.other
        other.write(close_frame(GOING_AWAY, masked=other.masked_out))

    # -- flow control and closing --------------------------------------------------------

    def pause_writing(self) -> None:
        if not self.other.lost:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.other.lost:
            self.other.transport.resume_reading()

    def eof_received(self) -> bool:
        self.answered = True
        self.other.end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.answered = True
        self.other.end()
        self.tunnel.check_done()

    def end(self) -> None:
        """The other side is gone: close this one once what was written to it is sent."""
        if not self.lost and not self.transport.is_closing():
            self.transport.close()


class Tunnel:
    """Joins two transports (after the 101 went out) until both are closed; `closed` is then
    done. `on_close` is called once, when both connections are gone."""

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport,
                 client_tail: bytes, upstream_tail: bytes, *, idle_timeout_s: float,
                 on_close: Callable[[], Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout_s = idle_timeout_s
        self.active_at = self.loop.time()
        self.closing_at = 0.0
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._on_close = on_close
        self.client = _Side(self, client, masked_out=False)
        self.upstream = _Side(self, upstream, masked_out=True)
        self.client.other, self.upstream.other = self.upstream, self.client
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        if client_tail:
            self.client.data_received(client_tail)
        if upstream_tail:
            self.upstream.data_received(upstream_tail)
        for side in (self.client, self.upstream):
            if side.transport.is_closing():
                side.lost = side.answered = True
                side.other.end()
            else:
                side.transport.resume_reading()
        self.check_done()

    @property
    def bytes_in(self) -> int:
        """Bytes from the client to the upstream."""
        return self.client.received

    @property
    def bytes_out(self) -> int:
        return self.upstream.received

    def going_away(self) -> None:
        """Shutdown or idleness: close frames (1001) to both sides; the connections close
        when both answered, or CLOSE_GRACE_S later (the server's drain deadline first)."""
        if self.closing_at:
            return
        self.closing_at = self.loop.time()
        self.client.send_going_away()
        self.upstream.send_going_away()
        self.check_done()

    def check_done(self) -> None:
        client, upstream = self.client, self.upstream
        if self.closing_at and client.answered and upstream.answered:
            client.end()
            upstream.end()
        if client.lost and upstream.lost and not self.closed.done():
            self.closed.set_result(None)
            if self._on_close is not None:
                self._on_close()

    def sweep(self, now: float) -> None:
        """Called about once a second by the server."""
        if self.closing_at:
            if now - self.closing_at > CLOSE_GRACE_S:
                self.abort()
        elif now - self.active_at > self.idle_timeout_s:
            self.going_away()

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if not side.lost:
                side.transport.abort()
