"""RedisStore: token buckets in Redis, decided by one Lua script (`ratelimit.lua`) per request.

One EVALSHA covers every Redis policy of a route: refill (with the Redis server's clock, TIME, so
gateway hosts need not agree on the time), the all-or-nothing decision and the take are atomic on
the server, which is what makes the limit exact across any number of workers and replicas. The
script is loaded at start and again whenever Redis answers NOSCRIPT (after a restart or a
SCRIPT FLUSH; the EVALSHA is then retried once, within the same deadline).

Transport: `gateway.redis_client`, one pipelined connection per store (every call of the process
in flight on it, replies matched in order), the EVALSHA encoded as one bytes join. redis-py's
asyncio client cost more per call than the rest of the request (pool checkout, wait_for, layered
packing and parsing); see that module. `rediss://` is TLS through asyncio's own ssl support with
the system trust store (no client certificates, no custom CA: put the CA in the system store).

Failure handling: every call is bounded by `redis.timeout_ms` (connect, send and reply; a reply
already received by a saturated event loop still counts). The first failure (timeout, connection
lost, error reply) marks Redis down: from then on calls fail at once with StoreError (the limiter
applies `on_store_error`) instead of each paying the timeout, while one background task opens a
new connection, PINGs and SCRIPT LOADs (within max(timeout, 0.25 s)) after 0.1 s, 0.2 s, ... up
to every 1 s. When a probe
succeeds, calls go to Redis again over the new connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import RedisConfig
from gateway.errors import StoreError
from gateway.ratelimit import Bucket
from gateway.redis_client import RedisClient, ReplyError, encode_command, parse_url

log = logging.getLogger("gateway.ratelimit")

SCRIPT = (Path(__file__).with_name("ratelimit.lua")).read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_SCRIPT_LOAD = encode_command((b"SCRIPT", b"LOAD", SCRIPT))
_PING = encode_command((b"PING",))
_NOW_SERVER = b"$0\r\n\r\n"          # ARGV[1] "": the script reads the server's TIME
_CONSUME = (b"$1\r\n0\r\n", b"$1\r\n1\r\n")


def _bulk(text: str) -> bytes:
    b = text.encode("utf-8", "surrogateescape")
    return b"$%d\r\n%b\r\n" % (len(b), b)


class RedisStore:
    """A BucketStore on Redis with a per-call timeout and a fail-fast breaker around Redis."""

    def __init__(self, config: RedisConfig, *, clock: Clock = SYSTEM_CLOCK,
                 script_clock: Clock | None = None, retry_max_s: float = 1.0) -> None:
        """`script_clock` (tests only): send its `time()` as the script's now instead of letting
        the script use the Redis server's TIME. Raises ValueError for a URL it cannot use."""
        self.config = config
        self._clock = clock
        self._script_clock = script_clock
        self._timeout = config.timeout_ms / 1000.0
        self._retry_max_s = retry_max_s
        self._client = RedisClient(config.url, self._timeout, on_lost=self._failed)
        self._where = str(parse_url(config.url))
        self._heads: dict[int, bytes] = {}               # number of keys -> EVALSHA prefix
        self._lua: dict[tuple[str, str, str], bytes] = {}  # Bucket.lua_args -> encoded
        self._down = False
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self.failures = 0           # calls that failed on Redis (not the fail-fast ones)
        self.down_since: float | None = None

    @property
    def available(self) -> bool:
        """False while Redis is considered down (calls fail fast)."""
        return not self._down

    @property
    def client(self) -> RedisClient:
        """The connection (tests and diagnostics)."""
        return self._client

    async def start(self) -> None:
        """Connect and load the script; if Redis does not answer, start degraded and probe in
        the background."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ensure_connected()
                await self._client.call(_SCRIPT_LOAD)
        except Exception as exc:  # noqa: BLE001 - any failure means "down" here
            self._failed(exc)

    async def take(self, buckets: Sequence[Bucket], idents: Sequence[str], cost: int,
                   consume: bool) -> tuple[bool, list[float]]:
        if self._down:
            raise StoreError("redis is unavailable; failing fast until a probe succeeds")
        client = self._client
        data = self._evalsha(buckets, idents, cost, consume)
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            if client.connection is None:       # first call before start(): connect lazily
                async with asyncio.timeout_at(deadline):
                    await client.ensure_connected()
            try:
                res = await client.send(data, deadline)
            except ReplyError as exc:
                if exc.code != "NOSCRIPT":
                    raise
                load = client.send(_SCRIPT_LOAD, deadline)
                retry = client.send(data, deadline)     # pipelined behind the load
                try:
                    await load
                finally:
                    res = await retry
        except Exception as exc:
            self._failed(exc)
            raise StoreError(f"redis call failed: {type(exc).__name__}: {exc}") from exc
        return res[0] == 1, [float(x) for x in res[1:]]

    def _evalsha(self, buckets: Sequence[Bucket], idents: Sequence[str], cost: int,
                 consume: bool) -> bytes:
        """EVALSHA sha n key.. now cost consume (rate cap enforce)..  as one bytes join."""
        n = len(buckets)
        head = self._heads.get(n)
        if head is None:
            head = self._heads[n] = (b"*%d\r\n$7\r\nEVALSHA\r\n" % (6 + 4 * n)
                                     + _bulk(SCRIPT_SHA) + _bulk(str(n)))
        parts = [head]
        for b, ident in zip(buckets, idents):
            parts.append(_bulk(b.key_prefix + ident))
        sc = self._script_clock
        parts.append(_NOW_SERVER if sc is None else _bulk(str(round(sc.time() * 1e6))))
        parts.append(b"$%d\r\n%d\r\n" % (len(str(cost)), cost))
        parts.append(_CONSUME[1 if consume else 0])
        lua = self._lua
        for b in buckets:
            enc = lua.get(b.lua_args)
            if enc is None:
                enc = lua[b.lua_args] = b"".join(_bulk(a) for a in b.lua_args)
            parts.append(enc)
        return b"".join(parts)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self._down or self._closed:
            return
        self._down = True
        self.down_since = self._clock.monotonic()
        log.warning("redis at %s failed (%s: %s); limits use on_store_error until it answers",
                    self._where, type(exc).__name__, exc or "timeout")
        self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay = 0.1
        client = self._client
        # a probe may take longer than a request may wait: requests are failing fast meanwhile,
        # and a loop saturated by them needs a few of its passes for connect, PING and load
        probe_s = max(self._timeout, 0.25)
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)
            try:
                # always a new connection: the old one may be wedged behind a dead peer
                await client.connect(probe_s)
                deadline = asyncio.get_running_loop().time() + probe_s
                await client.call(_PING, deadline)
                await client.call(_SCRIPT_LOAD, deadline)
            except Exception:  # noqa: BLE001, S112 - still down; try again later
                continue
            down_for = self._clock.monotonic() - (self.down_since or 0.0)
            log.warning("redis at %s answers again after %.1f s", self._where, down_for)
            self._down = False
            self.down_since = None
            self._probe = None
            return

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                pass
            self._probe = None
        await self._client.close()
