"""RedisStore: token buckets in Redis, decided by one Lua script (`ratelimit.lua`) per request.

One EVALSHA covers every Redis policy of a route: refill (with the Redis server's clock, TIME, so
gateway hosts need not agree on the time), the all-or-nothing decision and the take are atomic on
the server, which is what makes the limit exact across any number of workers and replicas. The
script is loaded at start and again whenever Redis answers NOSCRIPT (after a restart, a SCRIPT
FLUSH, a failover or a new cluster node; the call is then retried once, within its deadline).

Transport: redis-py (with hiredis) for connections, TLS, AUTH, Sentinel and Cluster, behind an
auto-batching layer of ours. redis-py's per-call API costs about three times our own per-call
work (pool checkout, lock and timeout wrapping around every command); batching removes that: the
calls issued in one event-loop pass wait in a queue, and one pump task per store sends them as
one write and reads their replies in order, with one batch in flight at a time (the next batch
gathers while the server answers this one). The EVALSHA is encoded here as one bytes join and
written through the connection as it is.

* `redis://`, `rediss://` (TLS; `redis.tls` adds a private CA and a client certificate),
  `unix://`: one connection of the URL's pool, owned by the pump.
* `redis+sentinel://h1:p1,h2:p2/<master>/<db>`: the connection is a Sentinel-managed one: every
  (re)connect asks the sentinels for the current master, and a master demoted to a replica
  (READONLY) drops the connection, so a failover is followed by the normal reconnect below.
* `redis.cluster: true`: a RedisCluster seeded by the URL's host (its slot map, connections and
  redirections); each batch is split by node, one write per node, and a call answered MOVED or
  ASK goes again through the cluster client. A request's keys share a hash tag (its first Redis
  policy's client key), so its one script runs on one node.

Failure handling: every call is bounded by `redis.timeout_ms` (one timer per store sweeps due
calls; a reply already received by a saturated event loop still counts). The first failure
(timeout, connection lost, error reply) marks Redis down: from then on calls fail at once with
StoreError (the limiter applies `on_store_error`) instead of each paying the timeout, while one
background task opens a new connection, PINGs and SCRIPT LOADs (within max(timeout, 0.25 s))
after 0.1 s, 0.2 s, ... up to every 1 s. When a probe succeeds, calls go to Redis again over the
new connection; the old one is closed then (replies still in flight on it until then count).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import RedisConfig, parse_sentinel_url
from gateway.errors import StoreError
from gateway.ratelimit import Bucket

log = logging.getLogger("gateway.ratelimit")

SCRIPT = (Path(__file__).with_name("ratelimit.lua")).read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_NOW_SERVER = b"$0\r\n\r\n"          # ARGV[1] "": the script reads the server's TIME
_CONSUME = (b"$1\r\n0\r\n", b"$1\r\n1\r\n")

Call = list[Any]
"""[future, deadline, command]: the command is encoded bytes (one connection) or (slot, encoded,
arguments) (cluster); a list so that a NOSCRIPT retry can swap the command in place."""


def _fail(calls: list[Call], exc: StoreError) -> None:
    for call in calls:
        fut = call[0]
        if fut is not None and not fut.done():
            fut.set_exception(exc)


def _bulk(text: str) -> bytes:
    b = text.encode("utf-8", "surrogateescape")
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _encode(args: Sequence[str | bytes | int]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode("utf-8", "surrogateescape")
        parts.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(parts)


_SCRIPT_LOAD = _encode(("SCRIPT", "LOAD", SCRIPT))


def describe(url: str) -> str:
    """The URL without credentials, for logs."""
    u = urlsplit(url)
    host = u.netloc.rpartition("@")[2]
    return f"{u.scheme}://{host}{u.path}"


class Link(Protocol):
    """One way to Redis: opened, handed batches by the pump, closed when replaced."""

    async def open(self) -> None:
        """Connect, PING and SCRIPT LOAD (the caller bounds the time)."""
        ...

    async def run(self, batch: list[Call]) -> None:
        """Send the batch and resolve each call's future with its reply or its error reply.
        Raises when the connection failed (calls not resolved then belong to the caller)."""
        ...

    def noscript(self, call: Call) -> list[Call]:
        """The calls that load the script and retry `call`, to be sent together."""
        ...

    async def close(self) -> None:
        ...


def _tls_kwargs(config: RedisConfig) -> dict[str, Any]:
    tls = config.tls
    if tls is None:
        return {}
    kw: dict[str, Any] = {}
    if tls.ca:
        kw["ssl_ca_certs"] = tls.ca
    if tls.cert:
        kw["ssl_certfile"] = tls.cert
        kw["ssl_keyfile"] = tls.key or None
    return kw


class _ConnectionLink:
    """One connection of a redis-py pool (plain URL or Sentinel-managed), written to directly."""

    def __init__(self, config: RedisConfig) -> None:
        url = config.url
        connect_s = max(config.timeout_ms / 1000.0, 0.25)
        if url.startswith("redis+sentinel://"):
            sentinels, master, db, user, password = parse_sentinel_url(url)
            # timeouts for the questions to the sentinels only: a socket timeout on the master's
            # connection would wrap every read (the pump's deadlines bound the calls)
            self._sentinel: Sentinel | None = Sentinel(
                sentinels, sentinel_kwargs={"socket_timeout": connect_s,
                                            "socket_connect_timeout": connect_s})
            self.client: aioredis.Redis = self._sentinel.master_for(
                master, db=db, username=user or None, password=password or None,
                socket_connect_timeout=connect_s)
        else:
            self._sentinel = None
            self.client = aioredis.Redis.from_url(url, socket_connect_timeout=connect_s,
                                                  **_tls_kwargs(config))
        self._conn: Any = None
        self._closed = False

    async def open(self) -> None:
        conn = self._conn = self.client.connection_pool.make_connection()
        await conn.connect()
        await conn.send_packed_command(b"*1\r\n$4\r\nPING\r\n" + _SCRIPT_LOAD, check_health=False)
        await conn.read_response()
        await conn.read_response()

    async def run(self, batch: list[Call]) -> None:
        conn = self._conn
        await conn.send_packed_command(b"".join([c[2] for c in batch]), check_health=False)
        for call in batch:
            fut = call[0]
            try:
                reply = await conn.read_response()
            except ResponseError as exc:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                continue
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def noscript(self, call: Call) -> list[Call]:
        """The calls that load the script and retry `call` (sent together, in order)."""
        return [[None, call[1], _SCRIPT_LOAD], call]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
        await self.client.aclose()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                await s.aclose()


class _ClusterLink:
    """A RedisCluster: a batch is split by the node that serves each call's slot and written to
    one connection per node; a call answered MOVED/ASK/TRYAGAIN goes again through the cluster
    client, which follows the redirection and updates its slot map for the calls after it.
    (A cluster pipeline per batch does the same with about three times the client CPU per call:
    `benchmarks/bench_redis_store.py`.)"""

    def __init__(self, config: RedisConfig, known: Sequence[tuple[str, int]] = ()) -> None:
        """`known`: nodes the previous link saw, seeds besides the URL's host (which may be the
        node that just failed)."""
        self.client = RedisCluster.from_url(
            config.url, socket_connect_timeout=max(config.timeout_ms / 1000.0, 0.25),
            startup_nodes=[ClusterNode(host, port) for host, port in known],
            **_tls_kwargs(config))
        self._conns: dict[str, Any] = {}         # node name -> the connection batches go on
        self.redirects = 0                       # calls answered MOVED/ASK/TRYAGAIN (tests)
        self._closed = False

    async def open(self) -> None:
        client = self.client
        await client.initialize()
        await client.execute_command("PING", target_nodes=RedisCluster.PRIMARIES)
        await client.script_load(SCRIPT)          # on every primary

    def nodes(self) -> list[tuple[str, int]]:
        return [(n.host, int(n.port)) for n in self.client.get_nodes()]

    async def run(self, batch: list[Call]) -> None:
        nodes = self.client.nodes_manager
        groups: dict[str, tuple[Any, list[Call]]] = {}
        for call in batch:
            node = nodes.get_node_from_slot(call[2][0])
            group = groups.get(node.name)
            if group is None:
                groups[node.name] = (node, [call])
            else:
                group[1].append(call)
        sent = []
        for name, (node, calls) in groups.items():
            conn = self._conns.get(name)
            if conn is None:
                conn = self._conns[name] = node.acquire_connection()   # held, never released
            await conn.send_packed_command(b"".join([c[2][1] for c in calls]),
                                           check_health=False)
            sent.append((conn, calls))
        redirected = []
        for conn, calls in sent:
            for call in calls:
                fut = call[0]
                try:
                    reply = await conn.read_response()
                except (AskError, TryAgainError, ClusterDownError):   # MovedError is an AskError
                    redirected.append(call)
                    continue
                except ResponseError as exc:
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                    continue
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        self.redirects += len(redirected)
        for call in redirected:
            fut = call[0]
            try:
                reply = await self.client.execute_command(*call[2][2])
            except ResponseError as exc:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                continue
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def noscript(self, call: Call) -> list[Call]:
        # EVAL runs the script and caches it on the node that answered NOSCRIPT
        slot, _, args = call[2]
        args = ["EVAL", SCRIPT, *args[2:]]
        call[2] = (slot, _encode(args), args)
        return [call]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.client.aclose()


def make_link(config: RedisConfig, known: Sequence[tuple[str, int]] = ()) -> Link:
    """The link for the configured URL. Raises ValueError for a URL it cannot use."""
    if config.cluster:
        return _ClusterLink(config, known)
    return _ConnectionLink(config)


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
        self._where = describe(config.url)
        self._cluster = config.cluster
        scheme = urlsplit(config.url).scheme     # the URL's problems surface here, not in a task
        if scheme == "redis+sentinel":
            parse_sentinel_url(config.url)
        elif scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis.url: unsupported scheme {scheme!r}")
        self._link: Link | None = None
        self._pump: asyncio.Task[None] | None = None
        self._known: list[tuple[str, int]] = []     # cluster nodes last seen
        self._queue: list[Call] = []
        self._inflight: list[Call] = []
        self._wake: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._heads: dict[int, bytes] = {}               # number of keys -> EVALSHA prefix
        self._lua: dict[tuple[str, str, str], bytes] = {}  # Bucket.lua_args -> encoded
        self._down = False
        self._probe: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        self.failures = 0           # calls that failed on Redis (not the fail-fast ones)
        self.connects = 0           # links opened (tests and logs)
        self.batches = 0            # batches sent (tests: calls per batch)
        self.down_since: float | None = None

    @property
    def available(self) -> bool:
        """False while Redis is considered down (calls fail fast)."""
        return not self._down

    @property
    def redirects(self) -> int:
        """Cluster calls the current connection saw redirected (tests and diagnostics)."""
        return getattr(self._link, "redirects", 0)

    async def start(self) -> None:
        """Connect and load the script; if Redis does not answer, start degraded and probe in
        the background."""
        if self._link is not None or self._down:
            return
        try:
            await self._connect(self._timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means "down" here
            self._failed(exc)

    async def _connect(self, timeout_s: float) -> None:
        """Open a new link (within `timeout_s`) and give it a pump of its own; the previous
        pump is cancelled (it fails the calls still in flight on it and closes its link)."""
        if self._closed:
            raise StoreError("redis store closed")
        link = make_link(self.config, self._known)
        try:
            async with asyncio.timeout(timeout_s):
                await link.open()
        except BaseException:
            await self._close_link(link)
            raise
        if isinstance(link, _ClusterLink):
            self._known = link.nodes()
        if self._closed:
            await self._close_link(link)
            raise StoreError("redis store closed")
        old_pump, old_link = self._pump, self._link
        self._link = link
        self.connects += 1
        self._pump = asyncio.get_running_loop().create_task(self._run_pump(link))
        if old_pump is not None:
            old_pump.cancel()
        if old_link is not None:        # also here: a pump cancelled before it ran closes nothing
            await self._close_link(old_link)

    @staticmethod
    async def _close_link(link: Link) -> None:
        try:
            await link.close()
        except Exception:  # noqa: BLE001, S110 - closing a broken link may fail; it is gone
            pass

    async def _ensure_started(self, deadline: float) -> None:
        """First call before start(): connect lazily, concurrent callers sharing one attempt."""
        task = self._starting
        if task is None:
            task = self._starting = asyncio.ensure_future(self._connect(self._timeout))
            task.add_done_callback(self._started)
        async with asyncio.timeout_at(deadline):
            await asyncio.shield(task)

    def _started(self, task: asyncio.Future[None]) -> None:
        self._starting = None
        if not task.cancelled():
            task.exception()        # retrieved here too: waiters may all have gone

    async def take(self, buckets: Sequence[Bucket], idents: Sequence[str], cost: int,
                   consume: bool) -> tuple[bool, list[float]]:
        if self._down:
            raise StoreError("redis is unavailable; failing fast until a probe succeeds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        if self._cluster:
            cmd: bytes | tuple[int, bytes, list[Any]] = self._cluster_call(buckets, idents, cost,
                                                                           consume)
        else:
            cmd = self._evalsha(buckets, [b.key_prefix + i for b, i in zip(buckets, idents)],
                                cost, consume)
        fut: asyncio.Future[Any] = loop.create_future()
        call: Call = [fut, deadline, cmd]
        try:
            if self._link is None:
                await self._ensure_started(deadline)
            self._submit([call])
            try:
                res = await fut
            except NoScriptError:
                link = self._link
                if link is None:
                    raise
                fut = call[0] = loop.create_future()
                self._submit(link.noscript(call))
                res = await fut
        except Exception as exc:
            self._failed(exc)
            raise StoreError(f"redis call failed: {type(exc).__name__}: {exc}") from exc
        return res[0] == 1, [float(x) for x in res[1:]]

    async def run_script(self, script: str, sha: str, keys: Sequence[str],
                         args: Sequence[str]) -> Any:
        """Another Lua script through the same batching pump and deadline: EVALSHA, and EVAL
        once if Redis answers NOSCRIPT. The keys must share a hash tag (Cluster). Raises
        StoreError and marks Redis down on failure, as `take` does."""
        if self._down:
            raise StoreError("redis is unavailable; failing fast until a probe succeeds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout

        def command(argv: list[Any]) -> bytes | tuple[int, bytes, list[Any]]:
            if self._cluster:
                return (key_slot(keys[0].encode("utf-8", "surrogateescape")), _encode(argv),
                        argv)
            return _encode(argv)

        fut: asyncio.Future[Any] = loop.create_future()
        call: Call = [fut, deadline, command(["EVALSHA", sha, len(keys), *keys, *args])]
        try:
            if self._link is None:
                await self._ensure_started(deadline)
            self._submit([call])
            try:
                return await fut
            except NoScriptError:
                fut = call[0] = loop.create_future()
                call[2] = command(["EVAL", script, len(keys), *keys, *args])
                self._submit([call])
                return await fut
        except Exception as exc:
            self._failed(exc)
            raise StoreError(f"redis call failed: {type(exc).__name__}: {exc}") from exc

    # the batching layer -----------------------------------------------------------------------

    def _submit(self, calls: list[Call]) -> None:
        self._queue.extend(calls)
        wake = self._wake
        if wake is not None:
            self._wake = None
            if not wake.done():
                wake.set_result(None)
        if self._timer is None:
            self._arm(calls[-1][1])

    async def _run_pump(self, link: Link) -> None:
        """Send what was queued as one batch, read its replies, repeat; wait when idle."""
        loop = asyncio.get_running_loop()
        batch: list[Call] = []
        try:
            while True:
                if not self._queue:
                    wake = self._wake = loop.create_future()
                    await wake
                    continue
                batch, self._queue = self._queue, []
                self._inflight = batch
                self.batches += 1
                await link.run(batch)
                batch = self._inflight = []
        except asyncio.CancelledError:
            _fail(batch, StoreError(f"redis at {self._where}: connection replaced"))
            raise
        except Exception as exc:  # noqa: BLE001 - the connection is gone
            err = StoreError(f"redis at {self._where}: {type(exc).__name__}: {exc}")
            queued, self._queue = self._queue, []
            _fail(batch + queued, err)
            if self._pump is asyncio.current_task():
                self._failed(exc)
        finally:
            if self._pump is asyncio.current_task():
                self._pump = self._link = self._wake = None
                self._inflight = []
            await self._close_link(link)

    # timeouts: one timer per store --------------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        # Two hops through the ready queue put one I/O poll between the timer and the sweep
        # (uvloop runs timers before polling); the sweep then fails only the calls that were due
        # when the timer fired, so every failed call had a poll after its deadline and no reply
        # in it. Under saturation a loop pass can outlast the timeout, and a reply read in the
        # next poll is in time, not a timeout.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._sweep, loop.time())

    def _sweep(self, cutoff: float) -> None:
        self._timer = None
        nxt = 0.0
        for calls in (self._inflight, self._queue):
            for call in calls:
                fut, deadline = call[0], call[1]
                if fut is None or fut.done():
                    continue
                if deadline <= cutoff:
                    fut.set_exception(StoreError(f"redis at {self._where}: no reply in time"))
                elif nxt == 0.0 or deadline < nxt:
                    nxt = deadline
        if nxt:
            self._arm(nxt)

    # commands ---------------------------------------------------------------------------------

    def _evalsha(self, buckets: Sequence[Bucket], keys: Sequence[str], cost: int,
                 consume: bool) -> bytes:
        """EVALSHA sha n key.. now cost consume (rate cap enforce)..  as one bytes join."""
        n = len(buckets)
        head = self._heads.get(n)
        if head is None:
            head = self._heads[n] = (b"*%d\r\n$7\r\nEVALSHA\r\n" % (6 + 4 * n)
                                     + _bulk(SCRIPT_SHA) + _bulk(str(n)))
        parts = [head]
        for key in keys:
            parts.append(_bulk(key))
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

    def _cluster_call(self, buckets: Sequence[Bucket], idents: Sequence[str], cost: int,
                      consume: bool) -> tuple[int, bytes, list[Any]]:
        """(slot, encoded EVALSHA, its arguments) with every key in the slot of the first client
        key's hash tag. The arguments serve a redirection or a NOSCRIPT retry."""
        tag = idents[0]
        keys = [b.key_prefix + "{" + tag + "}" + ("" if ident == tag else ":" + ident)
                for b, ident in zip(buckets, idents)]
        data = self._evalsha(buckets, keys, cost, consume)
        sc = self._script_clock
        args: list[Any] = ["EVALSHA", SCRIPT_SHA, len(keys), *keys,
                           "" if sc is None else str(round(sc.time() * 1e6)), cost,
                           "1" if consume else "0"]
        for b in buckets:
            args.extend(b.lua_args)
        return key_slot(keys[0].encode("utf-8", "surrogateescape")), data, args

    # failures ---------------------------------------------------------------------------------

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
        # a probe may take longer than a request may wait: requests are failing fast meanwhile,
        # and a loop saturated by them needs a few of its passes for connect, PING and load
        probe_s = max(self._timeout, 0.25)
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)
            try:
                # always a new connection: the old one may be wedged behind a dead peer
                await self._connect(probe_s)
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
        for task in (self._probe, self._starting, self._pump):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110
                    pass
        self._probe = self._starting = self._pump = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._link is not None:
            await self._close_link(self._link)
            self._link = None


__all__ = ["SCRIPT", "SCRIPT_SHA", "RedisStore", "describe"]
