"""gateway.redis_client against real redis-server processes: the RESP parser on fragmented input,
pipelining, NOSCRIPT recovery, AUTH, SELECT, unix sockets, timeouts of a stopped server, connection
loss and reconnect through RedisStore."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop

from gateway.config import RedisConfig
from gateway.errors import StoreError
from gateway.ratelimit import make_bucket
from gateway.ratelimit_redis import SCRIPT_SHA, RedisStore
from gateway.redis_client import (
    ProtocolError,
    RedisAddress,
    RedisClient,
    ReplyError,
    RespParser,
    encode_command,
    parse_url,
)
from tests.conftest import RedisServer, free_port, wait_port
from tests.fakes import FakeClock
from tests.test_ratelimit import limit

# ---------------------------------------------------------------------------------------------
# Parser and encoder (no server)

STREAM = (b"+OK\r\n-ERR wrong number of arguments\r\n:0\r\n:-42\r\n:9223372036854775807\r\n"
          b"$5\r\nhello\r\n$0\r\n\r\n$-1\r\n$6\r\na\r\nb\rc\r\n*0\r\n*-1\r\n"
          b"*3\r\n:1\r\n$3\r\n9.5\r\n$-1\r\n"
          b"*2\r\n*2\r\n:1\r\n*1\r\n+deep\r\n-NOSCRIPT No matching script\r\n"
          b"*4\r\n:1\r\n$17\r\n999.0000000000001\r\n$1\r\n0\r\n$4\r\n1e+3\r\n")


def normal(reply: Any) -> Any:
    """ReplyError instances compare by class and text."""
    if isinstance(reply, ReplyError):
        return ("error", str(reply))
    if isinstance(reply, list):
        return [normal(x) for x in reply]
    return reply


EXPECTED = [b"OK", ("error", "ERR wrong number of arguments"), 0, -42, 9223372036854775807,
            b"hello", b"", None, b"a\r\nb\rc", [], None, [1, b"9.5", None],
            [[1, [b"deep"]], ("error", "NOSCRIPT No matching script")],
            [1, b"999.0000000000001", b"0", b"1e+3"]]


def drain(parser: RespParser) -> list[Any]:
    out = []
    while (r := parser.gets()) is not RespParser.NEED_MORE:
        out.append(normal(r))
    return out


def test_parser_whole_stream() -> None:
    p = RespParser()
    p.feed(STREAM)
    assert drain(p) == EXPECTED


def test_parser_byte_by_byte() -> None:
    p = RespParser()
    got: list[Any] = []
    for i in range(len(STREAM)):
        p.feed(STREAM[i:i + 1])
        got.extend(drain(p))
        # nothing is ever produced early: the replies so far are a prefix of the expected ones
        assert got == EXPECTED[:len(got)]
    assert got == EXPECTED


def test_parser_random_fragments() -> None:
    rnd = random.Random(7)
    for _ in range(200):
        p = RespParser()
        got: list[Any] = []
        i = 0
        while i < len(STREAM):
            n = rnd.randint(1, 40)
            p.feed(STREAM[i:i + n])
            i += n
            got.extend(drain(p))
        assert got == EXPECTED


@pytest.mark.parametrize("garbage", [b"?what\r\n", b":12x\r\n", b"$3\r\nabcde\r\n",
                                     b"*1\r\n!x\r\n"])
def test_parser_rejects_garbage(garbage: bytes) -> None:
    p = RespParser()
    p.feed(garbage)
    with pytest.raises(ProtocolError):
        p.gets()


def test_encode_command() -> None:
    assert encode_command([b"SET", "k\u00e9", 12, 1.5]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$2\r\n12\r\n$3\r\n1.5\r\n")
    # a header value aiohttp decoded with surrogateescape goes back to its exact bytes
    assert encode_command([b"\xff".decode("utf-8", "surrogateescape")]) == b"*1\r\n$1\r\n\xff\r\n"
    with pytest.raises(TypeError):
        encode_command([True])


@pytest.mark.parametrize(("url", "want"), [
    ("redis://127.0.0.1:6380/2", RedisAddress(port=6380, db=2)),
    ("redis://localhost", RedisAddress(host="localhost")),
    ("redis://:p%40ss@h:1/0", RedisAddress(host="h", port=1, password="p@ss")),
    ("redis://alice:secret@h/3", RedisAddress(host="h", db=3, username="alice",
                                              password="secret")),
    ("rediss://h:6390/1", RedisAddress(host="h", port=6390, db=1, tls=True)),
    ("unix:///run/redis.sock?db=4&password=pw", RedisAddress(host="", port=0,
                                                             path="/run/redis.sock", db=4,
                                                             password="pw")),
])
def test_parse_url(url: str, want: RedisAddress) -> None:
    assert parse_url(url) == want
    assert "secret" not in str(parse_url(url)) and "pw" not in str(parse_url(url))


@pytest.mark.parametrize("url", ["http://h/0", "redis://h/x", "unix://", "redis://h:99999/0"])
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="redis.url"):
        parse_url(url)


# ---------------------------------------------------------------------------------------------
# Against a real server


def start_redis(workdir: Path, *extra: str, port: int | None = None,
                unix: str | None = None) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed"
    argv = [exe, "--port", str(port or 0), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), *extra]
    if unix:
        argv += ["--unixsocket", unix, "--unixsocketperm", "700"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if port:
        wait_port(port)
    elif unix:
        deadline = time.monotonic() + 10
        while not os.path.exists(unix):
            assert time.monotonic() < deadline, "redis-server did not create its socket"
            time.sleep(0.02)
    return proc


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., tuple[int, subprocess.Popen[bytes]]]]:
    """Start extra redis-servers (own port, own options); all killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str, unix: str | None = None) -> tuple[int, subprocess.Popen[bytes]]:
        port = 0 if unix else free_port()
        proc = start_redis(tmp_path, *extra, port=port, unix=unix)
        procs.append(proc)
        return port, proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
async def clients() -> AsyncIterator[list[RedisClient]]:
    made: list[RedisClient] = []
    yield made
    for c in made:
        await c.close()


async def test_commands_round_trip(redis_url: str, clients: list[RedisClient]) -> None:
    c = RedisClient(redis_url, 1.0)
    clients.append(c)
    await c.ensure_connected()
    assert await c.execute("PING") == b"PONG"
    blob = bytes(range(256)) * 40 + b"\r\n"               # binary, CRLF inside, > one segment
    assert await c.execute("SET", "k", blob) == b"OK"
    assert await c.execute("GET", "k") == blob
    assert await c.execute("GET", "missing") is None
    assert await c.execute("RPUSH", "l", "a", "b", 3) == 3
    assert await c.execute("LRANGE", "l", 0, -1) == [b"a", b"b", b"3"]
    with pytest.raises(ReplyError, match="^ERR") as err:
        await c.execute("NOSUCHCOMMAND")
    assert err.value.code == "ERR"
    assert await c.execute("PING") == b"PONG"           # an error reply leaves it usable
    assert c.connects == 1


async def test_pipelining_1000_evalshas_on_one_connection(
        redis_url: str, clients: list[RedisClient]) -> None:
    c = RedisClient(redis_url, 5.0)
    clients.append(c)
    await c.ensure_connected()
    sha = await c.execute("SCRIPT", "LOAD", "return {KEYS[1], ARGV[1], tonumber(ARGV[1]) * 2}")
    futs = [c.send(encode_command((b"EVALSHA", sha, 1, f"key{i}", i))) for i in range(1000)]
    conn = c.connection
    assert conn is not None and conn.in_flight == 1000   # all written before any reply
    replies = await asyncio.gather(*futs)
    assert replies == [[f"key{i}".encode(), str(i).encode(), 2 * i] for i in range(1000)]
    assert conn.in_flight == 0 and c.connects == 1


async def test_store_pipelines_1000_takes(redis_url: str) -> None:
    store = RedisStore(RedisConfig(url=redis_url, timeout_ms=5000), script_clock=FakeClock())
    try:
        await store.start()
        b = make_bucket(limit("p", "1/hour", burst=2))                 # capacity 3
        out = await asyncio.gather(*(store.take([b], [f"u{i % 250}"], 1, True)
                                     for i in range(1000)))
        # each of 250 users: 3 admitted then 1 rejected, in send order (FIFO on one connection)
        for i, (ok, tokens) in enumerate(out):
            assert ok == (i < 750), i
            assert tokens == [3.0 - i // 250], i
        assert store.client.connects == 1
    finally:
        await store.close()


async def test_noscript_after_script_flush(redis_url: str) -> None:
    store = RedisStore(RedisConfig(url=redis_url, timeout_ms=2000), script_clock=FakeClock())
    b = make_bucket(limit("n", "1/hour", burst=99))
    sync = redis.Redis.from_url(redis_url)
    try:
        await store.start()
        assert (await store.take([b], ["u"], 1, True)) == (True, [100.0])
        sync.script_flush()
        assert sync.script_exists(SCRIPT_SHA) == [False]
        # many in flight at once all meet NOSCRIPT, reload and retry once
        out = await asyncio.gather(*(store.take([b], ["u"], 1, True) for _ in range(20)))
        assert all(ok for ok, _ in out)
        assert sorted(t[0] for _, t in out) == [float(x) for x in range(80, 100)]
        assert sync.script_exists(SCRIPT_SHA) == [True]
        assert store.available and store.failures == 0 and store.client.connects == 1
    finally:
        sync.close()
        await store.close()


async def test_auth_password_and_acl_user(own_redis: Callable[..., Any],
                                          clients: list[RedisClient]) -> None:
    port, _ = own_redis("--requirepass", "s3cret", "--user", "alice", "on", ">wonder",
                        "~*", "&*", "+@all")
    c = RedisClient(f"redis://:s3cret@127.0.0.1:{port}/0", 2.0)
    clients.append(c)
    assert await c.execute("PING") == b"PONG"               # connects lazily, AUTHs first
    user = RedisClient(f"redis://alice:wonder@127.0.0.1:{port}/0", 2.0)
    clients.append(user)
    assert await user.execute("ACL", "WHOAMI") == b"alice"
    wrong = RedisClient(f"redis://:nope@127.0.0.1:{port}/0", 2.0)
    clients.append(wrong)
    with pytest.raises(ReplyError, match="WRONGPASS"):
        await wrong.connect()
    assert not wrong.connected
    anon = RedisClient(f"redis://127.0.0.1:{port}/0", 2.0)
    clients.append(anon)
    with pytest.raises(ReplyError, match="NOAUTH"):
        await anon.execute("PING")
    # and through the store: the limiter works against a password-protected Redis
    store = RedisStore(RedisConfig(url=f"redis://:s3cret@127.0.0.1:{port}/0", timeout_ms=2000))
    try:
        await store.start()
        assert store.available
        assert (await store.take([make_bucket(limit("a", "1/hour"))], ["u"], 1, True)) == (
            True, [1.0])
    finally:
        await store.close()


async def test_select_db(redis_url: str, clients: list[RedisClient]) -> None:
    url3 = redis_url.rsplit("/", 1)[0] + "/3"
    c = RedisClient(url3, 2.0)
    clients.append(c)
    assert await c.execute("SET", "where", "db3") == b"OK"
    sync0, sync3 = redis.Redis.from_url(redis_url), redis.Redis.from_url(url3)
    try:
        assert sync3.get("where") == b"db3"
        assert sync0.get("where") is None
    finally:
        sync0.close()
        sync3.close()


async def test_unix_socket_with_db(own_redis: Callable[..., Any], tmp_path: Path,
                                   clients: list[RedisClient]) -> None:
    sock = str(tmp_path / "r.sock")
    own_redis(unix=sock)
    c = RedisClient(f"unix://{sock}?db=2", 2.0)
    clients.append(c)
    assert await c.execute("SET", "u", "1") == b"OK"
    assert await c.execute("CLIENT", "INFO") is not None
    info = (await c.execute("CLIENT", "INFO")).decode()
    assert " db=2 " in info


async def test_timeout_of_a_stopped_server_keeps_fifo(own_redis: Callable[..., Any],
                                                      clients: list[RedisClient]) -> None:
    port, proc = own_redis()
    c = RedisClient(f"redis://127.0.0.1:{port}/0", 0.1)
    clients.append(c)
    await c.ensure_connected()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        futs = [c.send(encode_command((b"ECHO", f"late{i}"))) for i in range(5)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        took = time.monotonic() - t0
        assert all(isinstance(r, StoreError) and "no reply in time" in str(r) for r in results)
        assert 0.09 <= took < 0.3, took
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # the late replies arrive and are dropped; a new call gets its own reply, not a stale one
    assert await c.execute("ECHO", "fresh") == b"fresh"
    conn = c.connection
    assert conn is not None and conn.in_flight == 0 and c.connects == 1


async def test_steady_calls_to_a_stopped_server_all_time_out(own_redis: Callable[..., Any],
                                                              clients: list[RedisClient]) -> None:
    # New calls keep arming the timer; the due ones must still fail on time.
    port, proc = own_redis()
    c = RedisClient(f"redis://127.0.0.1:{port}/0", 0.1)
    clients.append(c)
    await c.ensure_connected()
    durations: list[float] = []

    async def one() -> None:
        t = time.monotonic()
        with pytest.raises(StoreError, match="no reply in time"):
            await c.send(encode_command((b"PING",)))
        durations.append(time.monotonic() - t)

    os.kill(proc.pid, signal.SIGSTOP)
    try:
        calls = []
        stop_at = time.monotonic() + 0.4
        while time.monotonic() < stop_at:           # a call every millisecond or so
            calls.append(asyncio.ensure_future(one()))
            await asyncio.sleep(0.001)
        await asyncio.gather(*calls)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert len(durations) > 50
    assert min(durations) >= 0.09 and max(durations) < 0.2, (min(durations), max(durations))


async def test_cancelled_call_keeps_replies_in_order(redis_url: str,
                                                     clients: list[RedisClient]) -> None:
    c = RedisClient(redis_url, 2.0)
    clients.append(c)
    await c.ensure_connected()
    first = c.send(encode_command((b"ECHO", b"one")))
    second = c.send(encode_command((b"ECHO", b"two")))
    first.cancel()
    assert await second == b"two"
    assert await c.execute("ECHO", "three") == b"three"


async def test_connection_loss_fails_pending_calls(own_redis: Callable[..., Any]) -> None:
    port, proc = own_redis()
    lost: list[BaseException] = []
    c = RedisClient(f"redis://127.0.0.1:{port}/0", 5.0, on_lost=lost.append)
    try:
        await c.ensure_connected()
        os.kill(proc.pid, signal.SIGSTOP)
        futs = [c.send(encode_command((b"PING",))) for _ in range(3)]
        t0 = time.monotonic()
        proc.kill()                                       # SIGKILL works on a stopped process
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert time.monotonic() - t0 < 2.0                 # well before the 5 s timeout
        assert all(isinstance(r, StoreError) and "connection lost" in str(r) for r in results)
        assert len(lost) == 1 and not c.connected
        with pytest.raises(StoreError, match="not connected"):
            c.send(encode_command((b"PING",)))
    finally:
        await c.close()


async def test_connect_refused_and_timeout(clients: list[RedisClient]) -> None:
    c = RedisClient(f"redis://127.0.0.1:{free_port()}/0", 0.5)
    clients.append(c)
    with pytest.raises(StoreError, match="cannot connect"):
        await c.execute("PING")
    assert not c.connected


async def test_store_reconnects_after_kill_and_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    store = RedisStore(RedisConfig(url=server.url, timeout_ms=200), retry_max_s=0.2)
    b = make_bucket(limit("k", "1/hour", burst=9))
    try:
        await store.start()
        assert (await store.take([b], ["u"], 1, True))[0]
        server.stop()
        deadline = time.monotonic() + 5
        while store.available and time.monotonic() < deadline:  # connection_lost marks it down
            await asyncio.sleep(0.01)
        assert not store.available
        with pytest.raises(StoreError, match="unavailable"):
            await store.take([b], ["u"], 1, True)
        server.start()                                  # same port, empty: NOSCRIPT handled
        deadline = time.monotonic() + 5
        while not store.available and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert store.available
        assert (await store.take([b], ["u"], 1, True)) == (True, [10.0])
        assert store.client.connects == 2
    finally:
        await store.close()
        server.stop()


async def test_closed_store_fails_calls(redis_url: str) -> None:
    store = RedisStore(RedisConfig(url=redis_url, timeout_ms=500))
    await store.start()
    await store.close()
    with pytest.raises(StoreError):
        await store.take([make_bucket(limit("c", "1/hour"))], ["u"], 1, True)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_reply_received_by_a_blocked_loop_is_not_a_timeout(redis_url: str,
                                                           loop_kind: str) -> None:
    # A saturated loop runs its timers late; a reply that arrived meanwhile must still win.
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop

    async def main() -> None:
        c = RedisClient(redis_url, 0.05)
        try:
            await c.ensure_connected()
            fut = c.send(encode_command((b"ECHO", b"in-time")))
            time.sleep(0.15)  # noqa: ASYNC251 - blocks the loop past the deadline on purpose
            assert await fut == b"in-time"
            # while a call with no reply still times out
            ok = c.send(encode_command((b"ECHO", b"x")))
            stuck = c.send(encode_command((b"BLPOP", b"nothing", b"0")))
            assert await ok == b"x"
            with pytest.raises(StoreError, match="no reply in time"):
                await stuck
        finally:
            await c.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
