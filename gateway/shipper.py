"""Ships the gateway's aggregates to the control plane, off the hot path, with a disk spool.

Every `ship_interval_s` the shipper takes `snapshot()` (the signals wire document), adds
`batch_id`, `gateway_id` and `seq`, gzips it and POSTs it to `{url}/v1/ingest`. With several
URLs (control-plane replicas) a delivery tries the one that last worked, then the others in
order, moving on after a network error, a timeout or a retryable status (5xx, 401/403/408/429);
the first that accepts becomes the one used from then on. Only when all of them fail is the
batch spooled and retried with backoff, as with one URL. A batch that
cannot be delivered is written to `spool_dir` (one file per batch, tmp + fsync + rename) and
retried with exponential backoff and jitter, oldest first; new batches queue behind the spool so
the control plane always receives them in order. The control plane is idempotent by batch_id, so
a batch whose response was lost is simply sent again.

* seq starts at the wall clock in milliseconds (and above any seq already in the spool), so batch
  ids stay unique across restarts without persisting a counter: a restarted process never reuses
  an id the control plane already holds. Each process (worker) needs its own `gateway_id`.
* Spool bound: `spool_max_bytes`; when a new batch does not fit, the oldest are dropped
  (`on_result("dropped")` and a log line each).
* A 4xx answer other than 401/403/408/429 means the control plane will never accept the batch: it
  is dropped with a log line. 401/403/408/429, 5xx and network errors are retried.
* A spool file that cannot be read back (bad gzip/JSON) is renamed to `*.corrupt` (the newest 10
  are kept for inspection), logged and skipped.
* `on_result(result)`: "success" per delivered batch, "failure" per failed attempt, "spooled" per
  batch written to disk, "dropped" per batch given up. `on_spooled(n)`: the spool's batch count.
  `on_directives(directives)`: the `directives` object of every successful ingest response
  (budget enforcement, see gateway/budgetguard.py).
* `snapshot()` may return None: nothing to ship this interval. It may be a coroutine function
  (the gateway's encodes its histograms off the event loop).
* File IO, JSON encoding and gzip run in threads; nothing here runs on the request path.
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import logging
import os
import random
import re
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import ControlPlaneConfig

Snapshot = Callable[[], "dict[str, Any] | Awaitable[dict[str, Any] | None] | None"]
log = logging.getLogger("gateway.shipper")

_SUFFIX = ".json.gz"
_NAME = re.compile(r"^(\d{20})-[A-Za-z0-9_.-]*\.json\.gz$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_KEEP_CORRUPT = 10
_RETRY_STATUSES = frozenset({401, 403, 408, 429})


@dataclass(frozen=True, slots=True)
class _Batch:
    seq: int
    batch_id: str
    body: bytes          # gzipped JSON, exactly what is POSTed


@dataclass(frozen=True, slots=True)
class _Spooled:
    path: Path
    size: int


class Shipper:
    """Background delivery of aggregates to the control plane. `start()`, then `stop()`."""

    def __init__(self, cfg: ControlPlaneConfig, snapshot: Snapshot, *,
                 gateway_id: str, clock: Clock = SYSTEM_CLOCK,
                 on_result: Callable[[str], None] | None = None,
                 on_spooled: Callable[[int], None] | None = None,
                 on_directives: Callable[[dict[str, Any]], None] | None = None,
                 timeout_s: float | None = None, backoff_base_s: float | None = None,
                 backoff_max_s: float | None = None, stop_timeout_s: float = 2.0) -> None:
        # Control-plane replicas in order; `_current` is the one that last worked (sticky).
        self._urls = tuple(u.rstrip("/") + "/v1/ingest" for u in (cfg.urls or (cfg.url,)))
        self._current = 0
        self._token = cfg.token
        self._interval = float(cfg.ship_interval_s)
        self._timeout = timeout_s if timeout_s is not None else min(5.0, self._interval)
        self._base = backoff_base_s if backoff_base_s is not None else min(1.0, self._interval / 2)
        self._max = backoff_max_s if backoff_max_s is not None else \
            max(self._base, min(60.0, 6 * self._interval))
        self._stop_timeout = stop_timeout_s
        self._dir = Path(cfg.spool_dir)
        self._max_bytes = cfg.spool_max_bytes
        self._snapshot = snapshot
        self.gateway_id = gateway_id
        self._file_tag = _UNSAFE.sub("_", gateway_id)[:64]
        self._clock = clock
        self._on_result = on_result
        self._on_spooled = on_spooled
        self._on_directives = on_directives
        self._seq = 0
        self._files: deque[_Spooled] = deque()
        self._bytes = 0
        self._failures = 0
        self._retry_at = 0.0            # clock.monotonic() before which the drainer waits
        self._lock = asyncio.Lock()     # one delivery or spool mutation at a time
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    # -----------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Scan the spool left by an earlier process, then ship every interval in the background."""
        if self._started:
            return
        self._started = True
        # Usable at once, even if stop() comes while the spool is being scanned.
        self._seq = int(self._clock.time() * 1000)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout))
        files, max_seq = await asyncio.to_thread(self._scan)
        async with self._lock:
            self._files = deque(sorted(set(files) | set(self._files), key=lambda f: f.path.name))
            self._bytes = sum(f.size for f in self._files)
            self._seq = max(self._seq, max_seq + 1)
        self._spooled_changed()
        if files:
            log.info("spool found", extra={"event": "shipper_spool_found", "batches": len(files),
                                           "bytes": self._bytes})
        self._tasks = [asyncio.create_task(self._ticker(), name="shipper-ticker"),
                       asyncio.create_task(self._drainer(), name="shipper-drainer")]
        self._wake.set()

    async def stop(self) -> None:
        """Take a final snapshot and try, for about `stop_timeout_s`, to deliver it and the spool
        (oldest first); whatever is left stays in the spool for the next process."""
        if not self._started:
            return
        self._started = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._stop_timeout
        try:
            batch = await self._take()
        except Exception:
            log.exception("final snapshot failed", extra={"event": "shipper_snapshot_error"})
            batch = None
        try:
            async with self._lock:
                if batch is not None:
                    if self._files:
                        await self._spool_write(batch)
                    else:
                        outcome = await self._post(batch, deadline - loop.time(), total=True)
                        if outcome == "retry":
                            await self._spool_write(batch)
                while self._files and loop.time() < deadline:
                    if not await self._deliver_oldest(deadline - loop.time(), total=True):
                        break
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None
        if self._files:
            log.info("spool kept for the next start",
                     extra={"event": "shipper_spool_kept", "batches": len(self._files)})

    # -----------------------------------------------------------------------------------------
    # Public single steps (the background tasks use them; tests drive them directly)

    async def tick(self) -> None:
        """One interval: snapshot, then deliver now or queue behind the spool.
        A snapshot of None means nothing to ship this time."""
        batch = await self._take()
        if batch is None:
            return
        async with self._lock:
            if not self._files and self._clock.monotonic() >= self._retry_at:
                try:
                    outcome = await self._post(batch, self._timeout)
                except asyncio.CancelledError:
                    # Shutting down mid-request: never lose the batch (it may also have arrived;
                    # the control plane drops the replay).
                    self._spool_write_now(batch)
                    raise
                if outcome != "retry":
                    return
            await self._spool_write(batch)
        self._wake.set()

    async def drain(self) -> int:
        """Deliver spooled batches now, oldest first, ignoring backoff; stop at the first failure.
        Returns how many are left."""
        async with self._lock:
            while self._files:
                if not await self._deliver_oldest(self._timeout):
                    break
            return len(self._files)

    @property
    def spooled(self) -> int:
        return len(self._files)

    # -----------------------------------------------------------------------------------------
    # Background tasks

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += self._interval
            if next_at < loop.time():  # fell behind (a slow delivery): skip, don't burst
                next_at = loop.time() + self._interval
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("shipping failed", extra={"event": "shipper_error"})

    async def _drainer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._files:
                delay = self._retry_at - self._clock.monotonic()
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.25))  # re-check: the clock may jump
                    continue
                try:
                    async with self._lock:
                        if self._files:
                            await self._deliver_oldest(self._timeout)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("spool delivery failed", extra={"event": "shipper_error"})
                    self._backoff(None)

    # -----------------------------------------------------------------------------------------
    # Delivery

    async def _take(self) -> _Batch | None:
        doc = self._snapshot()
        if inspect.isawaitable(doc):
            doc = await doc
        if doc is None:
            return None
        seq = self._seq
        self._seq += 1
        batch_id = f"{self.gateway_id}-{seq}"
        full = {"batch_id": batch_id, "gateway_id": self.gateway_id, "seq": seq}
        full.update((k, v) for k, v in doc.items() if k not in full)
        body = await asyncio.to_thread(_encode, full)
        return _Batch(seq, batch_id, body)

    async def _post(self, batch: _Batch, timeout: float, *, total: bool = False) -> str:
        """POST one batch to the replicas in turn, starting with the one that last worked:
        "ok", "bad" (dropped: will never be accepted) or "retry" (all of them failed). Each
        replica gets up to min(timeout, timeout_s); with `total` (the way out, bounded by stop's
        deadline) `timeout` is the budget of all of them together."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if total else timeout * len(self._urls))
        outcome = "retry"
        for step in range(len(self._urls)):
            i = (self._current + step) % len(self._urls)
            left = deadline - loop.time()
            if step and left <= 0.05:
                break
            outcome = await self._post_one(self._urls[i], batch, min(timeout, left))
            if outcome != "retry":
                if i != self._current:
                    log.info("control plane replica switched", extra={
                        "event": "shipper_replica_switched", "url": self._urls[i],
                        "previous": self._urls[self._current]})
                    self._current = i
                return outcome
        return outcome

    async def _post_one(self, url: str, batch: _Batch, timeout: float) -> str:
        assert self._session is not None, "start() first"
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        retry_after: float | None = None
        try:
            async with self._session.post(
                    url, data=batch.body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=max(0.05, min(timeout, self._timeout)))
            ) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
                if resp.headers.get("Retry-After", "").isdigit():
                    retry_after = float(resp.headers["Retry-After"])
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._result("failure")
            self._backoff(None)
            self._log_failure(url, batch, f"{type(exc).__name__}: {exc}".rstrip(": "))
            return "retry"
        if 200 <= status < 300:
            self._result("success")
            if self._failures:
                log.info("control plane reachable again",
                         extra={"event": "shipper_recovered", "failures": self._failures})
            self._failures = 0
            self._retry_at = 0.0
            self._directives(text)
            return "ok"
        if 400 <= status < 500 and status not in _RETRY_STATUSES:
            self._result("dropped")
            log.error("control plane rejected a batch; dropped",
                      extra={"event": "shipper_batch_rejected", "batch_id": batch.batch_id,
                             "status": status, "detail": text[:500]})
            return "bad"
        self._result("failure")
        self._backoff(retry_after)
        self._log_failure(url, batch, f"HTTP {status}: {text[:200]}")
        return "retry"

    async def _deliver_oldest(self, timeout: float, *, total: bool = False) -> bool:
        """Try the oldest spooled batch. True when it is gone (delivered, dropped, corrupt)."""
        entry = self._files[0]
        body = await asyncio.to_thread(_read_spooled, entry.path)
        if body is None:
            await asyncio.to_thread(_quarantine, entry.path)
            self._forget_oldest()
            self._result("dropped")
            log.warning("corrupt spool file skipped", extra={
                "event": "shipper_spool_corrupt", "file": str(entry.path),
                "moved_to": str(entry.path) + ".corrupt"})
            return True
        seq = int(_NAME.match(entry.path.name).group(1))  # type: ignore[union-attr]
        batch = _Batch(seq, body[1], body[0])
        outcome = await self._post(batch, timeout, total=total)
        if outcome == "retry":
            return False
        await asyncio.to_thread(_unlink, entry.path)
        self._forget_oldest()
        return True

    def _backoff(self, retry_after: float | None) -> None:
        self._failures += 1
        delay = min(self._max, self._base * 2 ** min(self._failures - 1, 30))
        delay *= random.uniform(0.5, 1.0)   # jitter: gateways that failed together spread out
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max))
        self._retry_at = self._clock.monotonic() + delay

    def _log_failure(self, url: str, batch: _Batch, why: str) -> None:
        # One warning per outage, not per attempt.
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "control plane unreachable; spooling",
                extra={"event": "shipper_delivery_failed", "batch_id": batch.batch_id,
                       "error": why, "url": url})

    # -----------------------------------------------------------------------------------------
    # Spool

    def _scan(self) -> tuple[list[_Spooled], int]:
        self._dir.mkdir(parents=True, exist_ok=True)
        files: list[_Spooled] = []
        max_seq = -1
        for p in self._dir.iterdir():
            if p.name.endswith(".tmp"):
                _unlink(p)  # an interrupted write: never renamed, so never complete
                continue
            m = _NAME.match(p.name)
            if not m:
                continue
            try:
                files.append(_Spooled(p, p.stat().st_size))
            except OSError:
                continue
            max_seq = max(max_seq, int(m.group(1)))
        files.sort(key=lambda f: f.path.name)
        return files, max_seq

    async def _spool_write(self, batch: _Batch) -> None:
        await asyncio.to_thread(self._spool_write_now, batch)

    def _spool_write_now(self, batch: _Batch) -> None:
        size = len(batch.body)
        if size > self._max_bytes:
            self._result("dropped")
            log.error("batch larger than the whole spool; dropped",
                      extra={"event": "shipper_spool_dropped", "batch_id": batch.batch_id,
                             "bytes": size})
            return
        while self._files and self._bytes + size > self._max_bytes:
            oldest = self._files[0]
            _unlink(oldest.path)
            self._forget_oldest()
            self._result("dropped")
            log.warning("spool full; dropped the oldest batch",
                        extra={"event": "shipper_spool_dropped", "file": oldest.path.name,
                               "spool_max_bytes": self._max_bytes})
        path = self._dir / f"{batch.seq:020d}-{self._file_tag}{_SUFFIX}"
        tmp = path.with_name("." + path.name + ".tmp")
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(batch.body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(tmp)
            self._result("dropped")
            log.error("cannot write the spool; batch dropped",
                      extra={"event": "shipper_spool_error", "batch_id": batch.batch_id,
                             "error": str(exc)})
            return
        self._files.append(_Spooled(path, size))
        self._bytes += size
        self._result("spooled")
        self._spooled_changed()

    def _forget_oldest(self) -> None:
        gone = self._files.popleft()
        self._bytes -= gone.size
        self._spooled_changed()

    # -----------------------------------------------------------------------------------------
    # Callbacks (never allowed to break shipping)

    def _result(self, result: str) -> None:
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("on_result callback failed")

    def _directives(self, text: str) -> None:
        """Feed `directives` of an ingest response (e.g. budget enforcement) to on_directives."""
        if self._on_directives is None:
            return
        try:
            doc = orjson.loads(text)
            directives = doc.get("directives") if isinstance(doc, dict) else None
            if isinstance(directives, dict):
                self._on_directives(directives)
        except Exception:
            log.exception("on_directives callback failed")

    def _spooled_changed(self) -> None:
        if self._on_spooled is not None:
            try:
                self._on_spooled(len(self._files))
            except Exception:
                log.exception("on_spooled callback failed")


def _encode(doc: dict[str, Any]) -> bytes:
    return gzip.compress(orjson.dumps(doc), compresslevel=6)


def _read_spooled(path: Path) -> tuple[bytes, str] | None:
    """(body, batch_id) of a spool file, or None when it is not a valid gzipped batch."""
    try:
        body = path.read_bytes()
        doc = orjson.loads(gzip.decompress(body))
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, orjson.JSONDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("batch_id"), str):
        return None
    return body, doc["batch_id"]


def _quarantine(path: Path) -> None:
    try:
        os.replace(path, path.with_name(path.name + ".corrupt"))
    except OSError:
        _unlink(path)
        return
    corrupt = sorted(p for p in path.parent.iterdir() if p.name.endswith(".corrupt"))
    for old in corrupt[:-_KEEP_CORRUPT]:
        _unlink(old)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete a spool file", extra={"file": str(path), "error": str(exc)})
