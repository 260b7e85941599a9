"""RedisStore: token buckets in Redis, decided by one Lua script (`ratelimit.lua`) per request.

One EVALSHA covers every Redis policy of a route: refill (with the Redis server's clock, TIME, so
gateway hosts need not agree on the time), the all-or-nothing decision and the take are atomic on
the server, which is what makes the limit exact across any number of workers and replicas. The
script is loaded at start and again whenever Redis answers NOSCRIPT (after a restart).

Failure handling: every call is bounded by `redis.timeout_ms` (pool wait, connect, send and
reply). The first failure marks Redis down: from then on calls fail at once with StoreError (the
limiter applies `on_store_error`) instead of each paying the timeout, while one background task
probes Redis with PING + SCRIPT LOAD after 0.1 s, 0.2 s, ... up to every 1 s. When a probe
succeeds, calls go to Redis again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import RedisConfig
from gateway.errors import StoreError
from gateway.ratelimit import Bucket

log = logging.getLogger("gateway.ratelimit")

SCRIPT = (Path(__file__).with_name("ratelimit.lua")).read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


class RedisStore:
    """A BucketStore on Redis with a per-call timeout and a fail-fast breaker around Redis."""

    def __init__(self, config: RedisConfig, *, clock: Clock = SYSTEM_CLOCK,
                 script_clock: Clock | None = None, max_connections: int = 128,
                 retry_max_s: float = 1.0) -> None:
        """`script_clock` (tests only): send its `time()` as the script's now instead of letting
        the script use the Redis server's TIME."""
        self.config = config
        self._clock = clock
        self._script_clock = script_clock
        self._timeout = config.timeout_ms / 1000.0
        self._retry_max_s = retry_max_s
        self._pool = aioredis.BlockingConnectionPool.from_url(
            config.url, max_connections=max_connections, timeout=None,
            socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._down = False
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self.failures = 0           # calls that failed on Redis (not the fail-fast ones)
        self.down_since: float | None = None

    @property
    def available(self) -> bool:
        """False while Redis is considered down (calls fail fast)."""
        return not self._down

    async def start(self) -> None:
        """Load the script; if Redis does not answer, start degraded and probe in the background."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.script_load(SCRIPT)
        except Exception as exc:  # noqa: BLE001 - any failure means "down" here
            self._failed(exc)

    async def take(self, buckets: Sequence[Bucket], idents: Sequence[str], cost: int,
                   consume: bool) -> tuple[bool, list[float]]:
        if self._down:
            raise StoreError("redis is unavailable; failing fast until a probe succeeds")
        now = "" if self._script_clock is None else str(round(self._script_clock.time() * 1e6))
        args: list[str | int] = [now, cost, 1 if consume else 0]
        for b in buckets:
            args.extend(b.lua_args)
        keys = [b.key_prefix + ident for b, ident in zip(buckets, idents)]
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    res = await self._client.execute_command(
                        "EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
                except NoScriptError:
                    await self._client.script_load(SCRIPT)
                    res = await self._client.execute_command(
                        "EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
        except Exception as exc:
            self._failed(exc)
            raise StoreError(f"redis call failed: {type(exc).__name__}: {exc}") from exc
        return res[0] == 1, [float(x) for x in res[1:]]

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self._down or self._closed:
            return
        self._down = True
        self.down_since = self._clock.monotonic()
        log.warning("redis at %s failed (%s: %s); limits use on_store_error until it answers",
                    _where(self.config.url), type(exc).__name__, exc or "timeout")
        self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay = 0.1
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)
            try:
                async with asyncio.timeout(max(self._timeout, 0.05)):
                    await self._client.ping()
                    await self._client.script_load(SCRIPT)
            except Exception:  # noqa: BLE001, S112 - still down; try again later
                continue
            down_for = self._clock.monotonic() - (self.down_since or 0.0)
            log.warning("redis at %s answers again after %.1f s", _where(self.config.url),
                        down_for)
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
        await self._client.aclose()
        await self._pool.disconnect()


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials."""
    return url.rpartition("@")[2].partition("://")[2] or url.rpartition("@")[2]
