"""The optional access log: one JSON object per line, buffered so it never blocks the loop.

`log()` only serialises the line and appends it to a list. A background task flushes the list
every 0.5 s, or as soon as 64 KiB are pending, writing in a worker thread; `close()` writes what
is left. If the disk cannot keep up, lines beyond `MAX_PENDING_BYTES` are dropped and the next
flush writes one `{"dropped": N}` line saying how many.

The caller passes only safe values (API keys already hashed); the path is logged without its
query string, so no `?api_key=...` ever reaches the log.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from gateway.clock import SYSTEM_CLOCK, Clock

FLUSH_INTERVAL_S = 0.5
FLUSH_BYTES = 64 * 1024
MAX_PENDING_BYTES = 16 * 1024 * 1024


class AccessLog:
    """JSON-lines access log to a file (appended) or, with path "", to stderr."""

    def __init__(self, path: str = "", *, clock: Clock = SYSTEM_CLOCK,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.path = path
        self._clock = clock
        self._flush_interval_s = flush_interval_s
        self._buf: list[bytes] = []
        self._size = 0
        self._dropped = 0            # since the last flush, reported in the log itself
        self._dropped_total = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._file: IO[bytes] | None = None
        self._write_lock = asyncio.Lock()

    @property
    def dropped(self) -> int:
        """Lines dropped so far because the writer could not keep up."""
        return self._dropped_total

    def log(self, *, request_id: str, method: str, path: str, route: str, upstream: str,
            status: int, duration_ms: float, bytes_in: int, bytes_out: int,
            limit: str | None, breaker: str | None, trace_id: str = "") -> None:
        """Queue one line. Never blocks and never raises for odd values (they are str()-ed)."""
        q = path.find("?")
        if q >= 0:
            path = path[:q]
        line = orjson.dumps({
            "time": datetime.fromtimestamp(self._clock.time(), UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": request_id, "method": method, "path": path, "route": route,
            "upstream": upstream, "status": status, "duration_ms": round(duration_ms, 3),
            "bytes_in": bytes_in, "bytes_out": bytes_out, "limit": limit, "breaker": breaker,
            "trace_id": trace_id,
        }, default=str, option=orjson.OPT_APPEND_NEWLINE)
        if self._size + len(line) > MAX_PENDING_BYTES:
            self._dropped += 1
            self._dropped_total += 1
            return
        self._buf.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self._wake.set()

    async def start(self) -> None:
        """Open the file and start the background flusher."""
        if self._task is not None:
            return
        if self.path:
            self._file = await asyncio.to_thread(open, self.path, "ab")
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="access-log")

    async def close(self) -> None:
        """Stop the flusher, write every pending line, close the file."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await task
        await self.flush()
        if self._file is not None:
            f, self._file = self._file, None
            await asyncio.to_thread(f.close)

    async def flush(self) -> None:
        """Write what is pending now (in a worker thread)."""
        async with self._write_lock:   # one write at a time keeps lines in order
            if not self._buf and not self._dropped:
                return
            chunks, self._buf, self._size = self._buf, [], 0
            if self._dropped:
                chunks.append(orjson.dumps({"dropped": self._dropped},
                                           option=orjson.OPT_APPEND_NEWLINE))
                self._dropped = 0
            await asyncio.to_thread(self._write, b"".join(chunks))

    def _write(self, data: bytes) -> None:
        if self.path and self._file is None:    # logged and closed without start()
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
            return
        err: Any = sys.stderr
        raw = getattr(err, "buffer", None)
        if raw is not None:
            err.flush()
            raw.write(data)
            raw.flush()
        else:
            err.write(data.decode("utf-8"))
            err.flush()

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self._flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except OSError as exc:   # a full disk must not kill the flusher; say so once per try
                print(f"access log: write to {self.path or 'stderr'} failed: {exc}",
                      file=sys.stderr)
