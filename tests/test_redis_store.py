"""RedisStore's batching layer on real redis-servers: replies matched to their callers within a
batch, per-call deadlines inside one batch, a blocked loop's reply counted in time, and the URL
forms (ACL user, wrong password, unix socket with a database)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import uvloop

from gateway.config import RedisConfig
from gateway.errors import StoreError
from gateway.ratelimit import make_bucket
from gateway.ratelimit_redis import RedisStore
from tests.conftest import LoopLag, free_port, wait_port
from tests.fakes import FakeClock
from tests.test_ratelimit import limit


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start redis-servers with their own options; yields start(*args, unix=None) -> port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str, unix: str | None = None) -> int:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server is not installed"
        port = 0 if unix else free_port()
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(tmp_path), *extra]
        if unix:
            argv += ["--unixsocket", unix, "--unixsocketperm", "700"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        if unix:
            deadline = time.monotonic() + 10
            while not os.path.exists(unix):
                assert time.monotonic() < deadline, "redis-server did not create its socket"
                time.sleep(0.02)
        else:
            wait_port(port)
        return port

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


BUCKET = make_bucket(limit("b", "1/hour", burst=99))     # capacity 100, no refill to speak of


async def test_replies_go_to_their_callers_with_some_callers_gone(redis_url: str) -> None:
    store = RedisStore(RedisConfig(url=redis_url, timeout_ms=2000), script_clock=FakeClock())
    try:
        await store.start()
        for i in range(20):                 # client i's bucket holds 100 - i tokens
            if i:
                await store.take([BUCKET], [f"c{i}"], i, True)
        batches = store.batches
        tasks = [asyncio.ensure_future(store.take([BUCKET], [f"c{i}"], 1, False))
                 for i in range(20)]
        await asyncio.sleep(0)              # all twenty queued in this loop pass ...
        for t in tasks[::3]:
            t.cancel()                      # ... and some callers leave before the reply
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, r in enumerate(results):
            if i % 3 == 0:
                assert isinstance(r, asyncio.CancelledError)
            else:
                assert r == (True, [100.0 - i]), (i, r)
        assert store.batches - batches == 1         # one pipeline for the loop pass
        assert store.available and store.failures == 0
    finally:
        await store.close()


def sleep_server(port: int, seconds: float) -> None:
    """Make the server busy for `seconds` without waiting for it (DEBUG SLEEP, fire and forget)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$%d\r\n%b\r\n"
                  % (len(str(seconds)), str(seconds).encode()))
        time.sleep(0.02)                    # received and started before the socket closes


async def test_a_late_caller_times_out_while_a_later_one_gets_its_reply(
        own_redis: Callable[..., int]) -> None:
    port = own_redis("--enable-debug-command", "yes")
    store = RedisStore(RedisConfig(url=f"redis://127.0.0.1:{port}/0", timeout_ms=100))
    try:
        await store.start()
        await asyncio.to_thread(sleep_server, port, 0.14)        # busy until ~t0 + 0.12
        async with LoopLag() as lag:
            t0 = time.monotonic()
            first = asyncio.ensure_future(store.take([BUCKET], ["a"], 1, True))
            await asyncio.sleep(0.07)
            second = asyncio.ensure_future(store.take([BUCKET], ["b"], 1, True))
            with pytest.raises(StoreError, match="no reply in time"):
                await first                 # its deadline, t0 + 0.1, passed with no reply
            t1 = time.monotonic()
        # (beyond any stall of the whole event loop meanwhile: a busy CI box's, not the store's)
        assert 0.09 <= t1 - t0 < 0.14 + lag.during(t0, t1)
        assert await second == (True, [100.0])  # deadline t0 + 0.17: its reply came in time
        assert not store.available          # the timeout marked Redis down (fail fast)
    finally:
        await store.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_reply_received_by_a_blocked_loop_is_not_a_timeout(redis_url: str,
                                                           loop_kind: str) -> None:
    # A saturated loop runs its timers late; a reply that arrived meanwhile must still win.
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop

    async def main() -> None:
        store = RedisStore(RedisConfig(url=redis_url, timeout_ms=50))
        try:
            await store.start()
            batches = store.batches
            call = asyncio.ensure_future(store.take([BUCKET], ["u"], 1, True))
            while store.batches == batches:     # until the pump has written it
                await asyncio.sleep(0)
            time.sleep(0.15)  # noqa: ASYNC251 - blocks the loop past the deadline on purpose
            assert await call == (True, [100.0])
            assert store.available and store.failures == 0
        finally:
            await store.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


async def test_acl_user_wrong_password_and_unix_socket_with_db(
        own_redis: Callable[..., int], tmp_path: Path) -> None:
    port = own_redis("--requirepass", "s3cret", "--user", "alice", "on", ">wonder",
                     "~*", "&*", "+@all")
    alice = RedisStore(RedisConfig(url=f"redis://alice:wonder@127.0.0.1:{port}/4"))
    wrong = RedisStore(RedisConfig(url=f"redis://:nope@127.0.0.1:{port}/0"))
    sock = str(tmp_path / "r.sock")
    own_redis(unix=sock)
    unix = RedisStore(RedisConfig(url=f"unix://{sock}?db=2"))
    try:
        await alice.start()
        assert alice.available
        assert await alice.take([BUCKET], ["u"], 1, True) == (True, [100.0])
        await wrong.start()                 # WRONGPASS: starts degraded, does not raise
        assert not wrong.available
        with pytest.raises(StoreError):
            await wrong.take([BUCKET], ["u"], 1, True)
        await unix.start()
        assert await unix.take([BUCKET], ["u"], 1, True) == (True, [100.0])
    finally:
        for store in (alice, wrong, unix):
            await store.close()
    check = redis.Redis(host="127.0.0.1", port=port, password="s3cret", db=4)
    on_socket = redis.Redis(unix_socket_path=sock, db=2)
    try:
        assert len(check.keys("gw:rl:b:*")) == 1
        assert len(on_socket.keys("gw:rl:b:*")) == 1
    finally:
        check.close()
        on_socket.close()


async def test_closed_store_fails_calls(redis_url: str) -> None:
    store = RedisStore(RedisConfig(url=redis_url, timeout_ms=500))
    await store.start()
    await store.close()
    with pytest.raises(StoreError):
        await store.take([BUCKET], ["u"], 1, True)
