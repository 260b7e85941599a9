"""Regression tests for the downstream server's and the proxy's hardening against hostile or
careless clients: trailer fields, Host ambiguity, target forms, unbounded trailers, clients that
stop reading or stop sending, lingering close, Upgrade with a body, HTTP/1.0 framing, request
ids, and a valid request pipelined before garbage.

Server-level scenarios are argument-less coroutines over real loopback sockets (the helpers of
tests/test_downstream.py), run on the default loop and again under uvloop; gateway-level ones
run the whole GatewayServer in front of an in-process upstream that records what it received.
Timeouts are driven by calling `sweep(now)` with a loop time of our choosing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from gateway.app import GatewayServer
from gateway.downstream import LINGER_S, ClientGone, HttpConnection, Request
from tests.harness import Upstream, gateway_yaml, running_gateway, under_uvloop
from tests.test_downstream import (
    Client,
    Gateway,
    KiB,
    MiB,
    Resp,
    assert_problem,
    body_reader,
    echo,
    held,
    http,
    read_response,
    say_target,
    serve,
    until,
)

# ---------------------------------------------------------------------------------------------
# Helpers


async def open_small(gw: Gateway, buf: int = 16 * KiB) -> Client:
    """A client with a small receive buffer, whose server side has a small send buffer: a
    client that does not read makes the server's writes back up after little data."""
    loop = asyncio.get_running_loop()
    before = set(gw.ds.connections)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    gw.clients.append(writer)
    await until(lambda: len(gw.ds.connections - before) == 1)
    (conn,) = gw.ds.connections - before
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf)
    return Client(reader, writer)


async def exchange(raw: bytes, handler: Callable[[Request], Awaitable[None]] = echo,
                   ) -> tuple[Resp, bytes, Gateway]:
    """Send `raw` in one write on a fresh connection: the first response, what followed it
    until the server closed (STILL_OPEN if it did not), and the server (stopped by then) for
    its `seen`."""
    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(raw)
        resp = await c.response()
        try:
            rest = await c.rest(timeout=1.0)
        except TimeoutError:
            rest = STILL_OPEN + c.reader._buffer                # type: ignore[attr-defined]
    return resp, rest, gw


STILL_OPEN = b"<the connection is still open> "


def conn_of(gw: Gateway, client: Client) -> HttpConnection:
    port = client.writer.get_extra_info("sockname")[1]
    for conn in gw.ds.connections:
        if conn.transport.get_extra_info("peername")[1] == port:
            return conn
    raise AssertionError("no server connection for this client")


# ---------------------------------------------------------------------------------------------
# 1. Trailer fields are never merged into the request head

TRAILER_SMUGGLE = (b"POST /x HTTP/1.1\r\nHost: public.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\nHost: internal.example\r\nX-Injected: yes\r\n\r\n")


async def test_chunked_trailer_fields_are_not_merged_into_request_headers() -> None:
    seen: list[tuple[str, list[tuple[str, str]], bytes]] = []

    async def handler(req: Request) -> None:
        body = await req.read()
        seen.append((req.host, list(req.headers), body))
        req.respond(200, [], b"ok")

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(TRAILER_SMUGGLE)                       # one write: trailers parsed at once
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"ok"
        assert resp.header("Connection") is None            # a valid request: keep-alive
        ((host, headers, body),) = seen
        assert host == "public.example"
        assert body == b"abc"
        names = [n.lower() for n, _ in headers]
        assert "x-injected" not in names
        assert names.count("host") == 1
        req = gw.seen[0]
        assert req.getall("Host") == ["public.example"] and req.get("X-Injected") is None
        assert (await c.request("GET", "/next")).status == 200
        c.close()


# ---------------------------------------------------------------------------------------------
# 2. Host: exactly one on HTTP/1.1


async def test_second_host_field_gets_400_and_handler_never_runs() -> None:
    resp, rest, gw = await exchange(b"GET /x HTTP/1.1\r\nHost: public.example\r\n"
                                    b"Host: internal.example\r\n\r\n")
    assert_problem(resp, 400)
    assert rest == b""
    assert gw.seen == []


async def test_http11_without_host_gets_400_but_http10_without_host_is_served() -> None:
    resp, rest, gw = await exchange(b"GET /nohost HTTP/1.1\r\nX-A: 1\r\n\r\n")
    assert_problem(resp, 400)
    assert rest == b""
    assert gw.seen == []

    resp, rest, gw = await exchange(b"GET /old HTTP/1.0\r\n\r\n", say_target)
    assert resp.status == 200 and resp.body == b"/old"
    assert [r.target for r in gw.seen] == ["/old"] and gw.seen[0].host == ""


# ---------------------------------------------------------------------------------------------
# 3. Request target forms, HTTP versions


async def test_absolute_form_target_names_the_host_and_becomes_origin_form() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(b"GET http://other.example:8080/p?q=1 HTTP/1.1\r\n"
                     b"Host: public.example\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"/p?q=1"
        await c.send(b"GET HTTP://Bare.example HTTP/1.1\r\nHost: public.example\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"/"          # an empty path is "/"
        assert [(r.host, r.target) for r in gw.seen] == [("other.example:8080", "/p?q=1"),
                                                          ("Bare.example", "/")]
        c.close()


async def _refused(raw: bytes, status: int) -> None:
    resp, rest, gw = await exchange(raw + http("GET", "/after"))
    assert_problem(resp, status)
    assert rest == b""                                         # closed; /after never answered
    assert gw.seen == []


async def test_unsupported_target_forms_and_versions_are_refused() -> None:
    await _refused(b"OPTIONS * HTTP/1.1\r\nHost: public.example\r\n\r\n", 400)
    await _refused(b"GET p/q HTTP/1.1\r\nHost: public.example\r\n\r\n", 400)
    await _refused(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501)
    # llhttp parses these versions (it refuses e.g. HTTP/1.2 itself, with a 400): ours is 505
    await _refused(b"GET / HTTP/2.0\r\nHost: public.example\r\n\r\n", 505)
    await _refused(b"GET / HTTP/0.9\r\nHost: public.example\r\n\r\n", 505)


# ---------------------------------------------------------------------------------------------
# 4. An endless trailer field is bounded


async def test_endless_trailer_field_gets_431_while_still_coming() -> None:
    handler, outcome, done = body_reader()
    total = 2 * MiB
    piece = b"a" * (64 * KiB)

    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nX-T: ")
        await until(lambda: len(gw.seen) == 1)
        sent = 0
        try:
            while sent < total:
                await c.send(piece)
                sent += len(piece)
                await asyncio.sleep(0)
                if c.reader._buffer or c.reader.at_eof():          # type: ignore[attr-defined]
                    break                                          # answered already
        except ConnectionError:
            pass
        assert sent < total, "the whole trailer flood was accepted without an answer"
        assert sent > 64 * KiB                                     # not refused early
        assert_problem(await c.response(), 431)
        assert await c.rest() == b""
        await asyncio.wait_for(done.wait(), 2)
        assert outcome == ["gone"]                                  # the body never completed
        await until(lambda: not gw.ds.connections)


# ---------------------------------------------------------------------------------------------
# 5. A client that stops reading: send timeout


async def test_send_timeout_aborts_client_that_never_reads_but_not_one_that_reads() -> None:
    piece = b"w" * (64 * KiB)
    outcome: list[str] = []
    parked = asyncio.Event()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def handler(req: Request) -> None:
        if req.target == "/flood":
            req.start(200, [])
            try:
                for _ in range(2000):                     # at most 128 MiB
                    await req.write(piece)
                outcome.append("written")
            except ClientGone:
                outcome.append("gone")
                raise
        elif req.target == "/reader":
            req.start(200, [], content_length=32 * len(piece) + 4)
            for _ in range(32):                           # 2 MiB: pauses, then resumes
                await req.write(piece)
            parked.set()
            await release.wait()
            await req.write(b"tail")
            req.end()
        else:
            await say_target(req)

    async with serve(handler, send_timeout_s=10.0, keepalive_timeout_s=600.0,
                     header_timeout_s=600.0, body_timeout_s=600.0) as gw:
        stuck = await open_small(gw)
        stuck_conn = conn_of(gw, stuck)
        await stuck.send(http("GET", "/flood"))
        await until(lambda: stuck_conn.write_paused)

        good = await open_small(gw)
        good_conn = conn_of(gw, good)
        pauses: list[float] = []
        pause_writing = good_conn.pause_writing

        def counting_pause() -> None:
            pauses.append(loop.time())
            pause_writing()

        good_conn.pause_writing = counting_pause          # type: ignore[method-assign]
        await good.send(http("GET", "/reader"))
        reading = asyncio.create_task(good.response(timeout=5))
        await asyncio.wait_for(parked.wait(), 5)
        await until(lambda: not good_conn.write_paused)
        assert pauses                                     # it was paused, and resumed since

        gw.ds.sweep(loop.time() + 5.0)                    # before the timeout: nothing
        assert not stuck_conn.lost and outcome == []

        gw.ds.sweep(loop.time() + 11.0)
        await until(lambda: outcome == ["gone"])
        await until(lambda: stuck_conn not in gw.ds.connections)
        assert good_conn in gw.ds.connections and not good_conn.closing

        release.set()
        resp = await reading
        assert resp.status == 200 and resp.complete
        assert resp.body == piece * 32 + b"tail"
        assert (await good.request("GET", "/again")).body == b"/again"
        good.close()


# ---------------------------------------------------------------------------------------------
# 6. A client that sends but does not read: no new handlers while its responses back up


async def test_client_not_reading_stops_new_handlers_until_it_reads() -> None:
    n = 10
    body = b"r" * MiB

    async def handler(req: Request) -> None:
        req.respond(200, [("X-Target", req.target)], body)

    def parsed(gw: Gateway) -> int:
        """Requests the server has read: handled, waiting to be, or queued."""
        conn = gw.only_conn()
        current = conn._current
        waiting = current is not None and all(r is not current for r in gw.seen)
        return len(gw.seen) + len(conn._pipeline) + waiting

    async with serve(handler) as gw:
        c = await open_small(gw)
        for i in range(n):                                # one at a time, never reading
            await c.send(http("GET", f"/r{i}"))
            await until(lambda: parsed(gw) == i + 1)      # noqa: B023 - awaited at once
        assert len(gw.seen) <= 3, [r.target for r in gw.seen]
        for i in range(n):
            resp = await c.response(timeout=5)
            assert resp.status == 200 and resp.complete
            assert resp.header("X-Target") == f"/r{i}".encode()
            assert len(resp.body) == len(body)
        assert [r.target for r in gw.seen] == [f"/r{i}" for i in range(n)]
        c.close()


# ---------------------------------------------------------------------------------------------
# 7. A client that stops sending its body: body timeout


async def test_body_timeout_gives_408_and_reader_gets_client_gone() -> None:
    handler, outcome, done = body_reader()
    loop = asyncio.get_running_loop()

    async with serve(handler, body_timeout_s=10.0, keepalive_timeout_s=600.0,
                     header_timeout_s=600.0) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        await until(lambda: len(gw.seen) == 1 and gw.seen[0]._buffered == 0)  # "abc" taken
        conn = gw.only_conn()

        gw.ds.sweep(loop.time() + 5.0)                    # before the timeout: nothing
        assert not conn.closing and outcome == []
        assert c.reader._buffer == b""                    # type: ignore[attr-defined]

        gw.ds.sweep(loop.time() + 11.0)
        assert_problem(await c.response(), 408)
        assert await c.rest() == b""
        await asyncio.wait_for(done.wait(), 2)
        assert outcome == ["gone"]
        await until(lambda: not gw.ds.connections)


# ---------------------------------------------------------------------------------------------
# 8. Answering before the body: lingering close


async def _reject_413(req: Request) -> None:
    req.respond(413, [("Content-Type", "text/plain")], b"too large")


async def test_early_413_reaches_a_client_that_writes_its_whole_body_first() -> None:
    size = 8 * MiB
    async with serve(_reject_413) as gw:
        c = await Client.open(gw)
        # A blocking-style client: write everything, then read. Closing with its body unread
        # would reset the connection under the 413 before the client ever reads it.
        c.writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\n"
                       + f"Content-Length: {size}\r\n\r\n".encode() + b"u" * size)
        await asyncio.wait_for(c.writer.drain(), 5)
        resp = await c.response()
        assert resp.status == 413 and resp.body == b"too large" and resp.complete
        assert resp.header("Connection") == b"close"
        assert await asyncio.wait_for(c.reader.read(), 2) == b""   # EOF, not a reset
        assert [r.target for r in gw.seen] == ["/upload"]
        c.close()
        await until(lambda: not gw.ds.connections)


async def test_lingering_connection_is_aborted_after_linger_s() -> None:
    loop = asyncio.get_running_loop()
    async with serve(_reject_413) as gw:
        c = await Client.open(gw)
        await c.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 8388608\r\n\r\n"
                     + b"u" * KiB)
        resp = await c.response()
        assert resp.status == 413 and resp.header("Connection") == b"close"
        assert await asyncio.wait_for(c.reader.read(), 2) == b""   # our FIN; the client stays
        conn = gw.only_conn()
        assert conn._linger_at is not None
        await c.send(b"u" * (64 * KiB))                   # still read (and dropped)

        gw.ds.sweep(loop.time() + 1.0)
        assert gw.ds.connections == {conn} and not conn.lost
        gw.ds.sweep(loop.time() + LINGER_S + 1.0)
        await until(lambda: not gw.ds.connections)
        assert conn.lost


# ---------------------------------------------------------------------------------------------
# 9. Upgrade with a body


async def test_upgrade_with_a_body_gets_400_and_handler_never_runs() -> None:
    chunked = b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    for framing in (b"Content-Length: 3\r\n\r\nabc", chunked):
        resp, rest, gw = await exchange(b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                        b"Upgrade: foo\r\n" + framing)
        assert_problem(resp, 400)
        assert rest == b""
        assert gw.seen == []


# ---------------------------------------------------------------------------------------------
# 10. HTTP/1.0 framing and Connection tokens, Transfer-Encoding


async def test_http10_chunked_request_closes_even_with_keepalive() -> None:
    resp, rest, gw = await exchange(
        b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n" + http("GET", "/after", version="1.0",
                                        headers=[("Connection", "keep-alive")]))
    assert resp.status == 200 and resp.body == b"abc"
    assert resp.header("Connection") == b"close"
    assert rest == b""
    assert [r.target for r in gw.seen] == ["/x"] and gw.seen[0].keep_alive is False


async def test_http10_keepalive_and_close_tokens_close() -> None:
    resp, rest, gw = await exchange(http("GET", "/x", [("Connection", "keep-alive, close")],
                                         version="1.0") + http("GET", "/after"), say_target)
    assert resp.status == 200 and resp.body == b"/x"
    assert resp.header("Connection") == b"close"
    assert rest == b""
    assert [r.target for r in gw.seen] == ["/x"]
    # the same tokens split over two fields
    resp, rest, gw = await exchange(http("GET", "/y", [("Connection", "keep-alive"),
                                                       ("Connection", "close")],
                                         version="1.0") + http("GET", "/after"), say_target)
    assert resp.header("Connection") == b"close" and rest == b""
    assert [r.target for r in gw.seen] == ["/y"]


async def test_transfer_encoding_other_than_chunked_gets_501() -> None:
    resp, rest, gw = await exchange(b"POST /x HTTP/1.1\r\nHost: a\r\n"
                                    b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                                    b"3\r\nabc\r\n0\r\n\r\n")
    assert_problem(resp, 501)
    assert rest == b""
    assert gw.seen == []


# ---------------------------------------------------------------------------------------------
# 12. A valid request pipelined between a busy one and garbage


async def test_pipelined_requests_before_garbage_are_all_answered_in_order() -> None:
    handler, release = held("/slow")
    async with serve(handler) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/slow") + http("GET", "/b") + b"GARBAGE\r\n\r\n")
        await until(lambda: len(gw.seen) == 1 and gw.only_conn().closing)
        release.set()
        first = await c.response()
        assert first.status == 200 and first.body == b"/slow"
        second = await c.response()
        assert second.status == 200 and second.body == b"/b"
        assert second.header("Connection") == b"close"
        assert await c.rest() == b""                        # the garbage gets no answer
        assert [r.target for r in gw.seen] == ["/slow", "/b"]


async def test_pipelined_request_with_malformed_body_is_not_handed_to_the_handler() -> None:
    # The bad bytes are inside the queued request's own body: that request can never be
    # complete (nothing more is read), so it must not be handled (a proxy would forward a
    # request it knows to be broken and wait on a body that never ends), only the one before.
    handler, release = held("/slow")

    async def reading(req: Request) -> None:
        if req.method == "POST":
            await req.read()
        await handler(req)

    async with serve(reading) as gw:
        c = await Client.open(gw)
        await c.send(http("GET", "/slow") + b"POST /q HTTP/1.1\r\nHost: a\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        await until(lambda: len(gw.seen) == 1 and gw.only_conn().closing)
        release.set()
        first = await c.response()
        assert first.status == 200 and first.body == b"/slow"
        try:
            rest = await c.rest(timeout=1.0)
        except TimeoutError:
            rest = STILL_OPEN + c.reader._buffer                # type: ignore[attr-defined]
        assert [r.target for r in gw.seen] == ["/slow"]
        assert rest == b"" or rest.startswith(b"HTTP/1.1 400 "), rest
        assert first.header("Connection") == b"close"           # nothing follows it


# ---------------------------------------------------------------------------------------------
# The same server-level scenarios under uvloop

# ---------------------------------------------------------------------------------------------
# 9. Field values, fragments, separator dot segments, hosts


async def test_field_values_lose_trailing_whitespace_like_leading() -> None:
    async with serve(say_target) as gw:
        c = await Client.open(gw)
        await c.send(b"GET /t HTTP/1.1\r\nHost: public.example \r\nX-Api-Key: \tK \t\r\n"
                     b"X-Empty: \t \r\nX-Inner: a  b\r\nExpect: 100-continue\t\r\n"
                     b"Content-Length: 0\r\n\r\n")
        assert (await c.response()).status == 200
        (req,) = gw.seen
        assert req.host == "public.example"
        assert req.get("X-Api-Key") == "K" and req.get("X-Empty") == ""
        assert req.get("X-Inner") == "a  b"                      # only the ends are trimmed
        assert req.expect_continue
        c.close()


async def test_fragment_in_the_target_gets_400() -> None:
    await _refused(b"GET /login#x HTTP/1.1\r\nHost: public.example\r\n\r\n", 400)
    await _refused(b"GET http://public.example/login#x HTTP/1.1\r\nHost: p\r\n\r\n", 400)


async def test_dot_segments_behind_other_separators_get_400() -> None:
    for target in (b"/x/..\\api", b"/x/%2e%2e\\api", b"/x/..%5Capi", b"/x/..%2fapi",
                   b"/x/..;/api", b"/x/%2E;a=b/api"):
        await _refused(b"GET " + target + b" HTTP/1.1\r\nHost: public.example\r\n\r\n", 400)


async def test_host_with_empty_label_or_slash_gets_400() -> None:
    for host in (b"api.internal..", b"a/b", b"a\\b"):
        await _refused(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400)


test_under_uvloop = under_uvloop(globals())


# ---------------------------------------------------------------------------------------------
# Through the whole gateway: what the upstream receives


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Upstream, list[Received]]]:
    """The demo upstream, except that every request is recorded and answered `ok`."""
    received: list[Received] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        received.append(Received(request.method, request.raw_path, headers, body))
        return web.Response(text="ok")

    up = Upstream()
    up.extra.append(web.route("*", "/{tail:.*}", record))
    await up.start()
    yield up, received
    await up.stop()


async def gateway_exchange(gw: GatewayServer, raw: bytes) -> tuple[Resp, bytes]:
    assert gw.proxy_address is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
    try:
        writer.write(raw)
        await writer.drain()
        resp = await read_response(reader, timeout=5)
        try:
            rest = await asyncio.wait_for(reader.read(), 2) \
                if resp.header("Connection") == b"close" else b""
        except ConnectionResetError:
            rest = b""
        return resp, rest
    finally:
        writer.close()


async def test_gateway_forwards_no_trailer_fields(
        tmp_path: Path, recorder: tuple[Upstream, list[Received]]) -> None:
    up, received = recorder
    async with running_gateway(tmp_path, gateway_yaml([up.url])) as gw:
        resp, _ = await gateway_exchange(gw, TRAILER_SMUGGLE)
        assert resp.status == 200 and resp.body == b"ok"
    (got,) = received
    assert got.target == "/x" and got.body == b"abc"
    assert got.all("Host") == ["public.example"]
    assert got.all("X-Injected") == []
    assert got.all("X-Forwarded-Host") == ["public.example"]


async def test_gateway_refuses_second_host_without_contacting_upstream(
        tmp_path: Path, recorder: tuple[Upstream, list[Received]]) -> None:
    up, received = recorder
    async with running_gateway(tmp_path, gateway_yaml([up.url])) as gw:
        resp, rest = await gateway_exchange(gw, b"GET /x HTTP/1.1\r\nHost: public.example\r\n"
                                                b"Host: internal.example\r\n\r\n")
        assert_problem(resp, 400)
        assert rest == b""
        resp, _ = await gateway_exchange(gw, b"GET /y HTTP/1.1\r\n\r\n")     # no Host at all
        assert_problem(resp, 400)
    assert received == [] and up.requests == 0


async def test_gateway_forwards_absolute_form_as_origin_form_with_its_host(
        tmp_path: Path, recorder: tuple[Upstream, list[Received]]) -> None:
    up, received = recorder
    async with running_gateway(tmp_path, gateway_yaml([up.url])) as gw:
        resp, _ = await gateway_exchange(
            gw, b"GET http://other.example:8080/p?q=1 HTTP/1.1\r\nHost: public.example\r\n\r\n")
        assert resp.status == 200
    (got,) = received
    assert got.target == "/p?q=1"
    assert got.all("Host") == ["other.example:8080"]


async def test_gateway_sends_exactly_one_request_id(
        tmp_path: Path, recorder: tuple[Upstream, list[Received]]) -> None:
    up, received = recorder
    async with running_gateway(tmp_path, gateway_yaml([up.url])) as gw:
        # The client's id, with the client naming it a connection option: still forwarded
        resp, _ = await gateway_exchange(gw, b"GET /a HTTP/1.1\r\nHost: h\r\n"
                                             b"X-Request-Id: client-id-1\r\n"
                                             b"Connection: close, X-Request-Id\r\n\r\n")
        assert resp.status == 200 and resp.all("X-Request-Id") == [b"client-id-1"]
        assert received[-1].all("X-Request-Id") == ["client-id-1"]

        # Two ids from the client: the first is the request's, and the only one forwarded
        resp, _ = await gateway_exchange(gw, b"GET /b HTTP/1.1\r\nHost: h\r\n"
                                             b"X-Request-Id: client-id-1\r\n"
                                             b"X-Request-Id: client-id-2\r\n"
                                             b"Connection: close\r\n\r\n")
        assert resp.status == 200 and resp.all("X-Request-Id") == [b"client-id-1"]
        assert received[-1].all("X-Request-Id") == ["client-id-1"]

        # None from the client: one generated, the same the client is answered with
        resp, _ = await gateway_exchange(gw, b"GET /c HTTP/1.1\r\nHost: h\r\n"
                                             b"Connection: close\r\n\r\n")
        assert resp.status == 200
        (generated,) = resp.all("X-Request-Id")
        assert len(generated) >= 16
        assert received[-1].all("X-Request-Id") == [generated.decode()]
    assert [r.target for r in received] == ["/a", "/b", "/c"]
