"""The proxy end to end over real sockets: a real upstream, the real gateway listener, a client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import yarl
from aiohttp import web

from gateway.app import GatewayServer
from tests.conftest import free_port
from tests.harness import Upstream, admin_url, fetch, gateway_yaml, running_gateway, url_of


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
async def test_methods_with_bodies(tmp_path: Path, upstream: Upstream,
                                   session: aiohttp.ClientSession, method: str) -> None:
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        body = (method * 1000).encode()
        status, headers, data = await fetch(session, method, url_of(gw, "/echo"), data=body)
        assert status == 200
        assert data == body
        assert headers["Content-Length"] == str(len(body))


async def test_head_204_304(tmp_path: Path, upstream: Upstream,
                            session: aiohttp.ClientSession) -> None:
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        status, headers, data = await fetch(session, "HEAD", url_of(gw, "/bytes/1000"))
        assert (status, data) == (200, b"")
        assert headers["Content-Length"] == "1000"
        for code in (204, 304):
            status, headers, data = await fetch(session, "GET", url_of(gw, f"/status/{code}"))
            assert (status, data) == (code, b"")
        # the pooled connection is still good after bodiless responses
        status, _, data = await fetch(session, "GET", url_of(gw, "/"))
        assert status == 200 and b"hello" in data
        assert upstream.connections == 1


async def test_404_when_no_route_matches(tmp_path: Path, upstream: Upstream,
                                         session: aiohttp.ClientSession) -> None:
    text = gateway_yaml([upstream.url]).replace('path_prefix: "/"', 'path_prefix: "/api"')
    async with running_gateway(tmp_path, text) as gw:
        status, headers, data = await fetch(session, "GET", url_of(gw, "/other?x=1"))
        assert status == 404
        assert headers["Content-Type"] == "application/problem+json"
        doc = orjson.loads(data)
        assert doc == {"type": "about:blank", "title": "Not Found", "status": 404,
                       "detail": "no route matches GET /other"}
        assert upstream.requests == 0


async def test_path_and_query_preserved_byte_for_byte(tmp_path: Path, upstream: Upstream) -> None:
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        target = "/headers/a%2Fb/%7Euser/x;p=1?q=%20a+b&empty=&u=%E2%9C%93&q=2#"
        target = target.rstrip("#")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
        writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        body = raw.split(b"\r\n\r\n", 1)[1]
        # /headers/... hits the demo's catch-all, which reports the raw target it received
        assert orjson.loads(body)["path"] == target


async def test_prefix_stripping(tmp_path: Path, upstream: Upstream,
                                session: aiohttp.ClientSession) -> None:
    text = gateway_yaml([upstream.url], route_extra="strip_prefix: true").replace(
        'path_prefix: "/"', 'path_prefix: "/api"')
    async with running_gateway(tmp_path, text) as gw:
        _, _, data = await fetch(session, "GET",
                                 yarl.URL(url_of(gw, "/api/headers?x=%2F"), encoded=True))
        assert orjson.loads(data)["target"] == "/headers?x=%2F"


async def test_header_hygiene(tmp_path: Path, upstream: Upstream) -> None:
    async def hop_response(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={
            "Connection": "X-Upstream-Secret", "X-Upstream-Secret": "no", "Keep-Alive": "timeout=5",
            "X-Kept": "yes", "Proxy-Authenticate": "Basic"})

    upstream.extra.append(web.get("/hop", hop_response))
    await upstream.stop()
    await upstream.start()
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
        writer.write(
            b"GET /headers HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Connection: keep-alive, X-Secret\r\nX-Secret: drop-me\r\nKeep-Alive: 300\r\n"
            b"TE: trailers\r\nProxy-Authorization: Basic Zm9v\r\nUpgrade: h2c\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\nX-Custom: kept\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                      .split(b":")[1])
        body = await reader.readexactly(length)
        seen = {k.lower(): v for k, v in orjson.loads(body)["headers"]}
        for dropped in ("x-secret", "keep-alive", "te", "proxy-authorization", "upgrade"):
            assert dropped not in seen, dropped
        assert seen["x-custom"] == "kept"
        assert seen["host"] == "api.example.com"
        assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "api.example.com"
        assert len(seen["x-request-id"]) >= 16
        # a client's own request id is kept
        writer.write(b"GET /hop HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\n"
                     b"Connection: close\r\n\r\n")
        raw = await reader.read()
        writer.close()
        head2 = raw.split(b"\r\n\r\n")[0].decode().lower()
        assert "x-request-id: abc-123" in head2
        assert "x-upstream-secret" not in head2 and "keep-alive: timeout" not in head2
        assert "proxy-authenticate" not in head2
        assert "x-kept: yes" in head2


async def test_chunked_both_ways(tmp_path: Path, upstream: Upstream,
                                 session: aiohttp.ClientSession) -> None:
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(200):
                yield bytes([65 + i % 26]) * 1000

        async with session.post(url_of(gw, "/echo"), data=gen()) as resp:
            assert resp.status == 200
            data = await resp.read()
        assert len(data) == 200_000 and data[:1000] == b"A" * 1000
        async with session.get(url_of(gw, "/chunked/300000")) as resp:
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            assert len(await resp.read()) == 300_000


async def test_concurrent_requests_reuse_pooled_connections(
        tmp_path: Path, upstream: Upstream, session: aiohttp.ClientSession) -> None:
    text = gateway_yaml([upstream.url], upstream_extra="max_connections: 4").replace(
        "timeout_s: 2", "timeout_s: 5")
    async with running_gateway(tmp_path, text) as gw:
        async def one(i: int) -> int:
            status, _, _ = await fetch(session, "GET", url_of(gw, f"/delay/{i % 3}"))
            return status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        assert statuses == [200] * 200
        assert upstream.requests == 200
        assert 1 <= upstream.connections <= 4


async def test_upstream_closing_keep_alive_connections(tmp_path: Path, upstream: Upstream,
                                                       session: aiohttp.ClientSession) -> None:
    async def closing(request: web.Request) -> web.Response:
        return web.Response(text="bye", headers={"Connection": "close"})

    upstream.extra.append(web.get("/closing", closing))
    await upstream.stop()
    await upstream.start()
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        for _ in range(20):
            status, _, data = await fetch(session, "GET", url_of(gw, "/closing"))
            assert (status, data) == (200, b"bye")
        assert upstream.connections == 20   # a closed connection is never reused


async def test_upstream_down_502_and_slow_504(tmp_path: Path,
                                              session: aiohttp.ClientSession) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_gateway(tmp_path, gateway_yaml([dead])) as gw:
        status, headers, data = await fetch(session, "GET", url_of(gw, "/x"))
        assert status == 502
        assert headers["Content-Type"] == "application/problem+json"
        doc = orjson.loads(data)
        assert doc["type"] == "about:blank" and doc["status"] == 502
        assert "127.0.0.1" in doc["detail"]

    up = Upstream()
    await up.start()
    try:
        text = gateway_yaml([up.url]).replace("timeout_s: 2", "timeout_s: 0.3")
        async with running_gateway(tmp_path, text) as gw:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            status, headers, data = await fetch(session, "GET", url_of(gw, "/delay/3000"))
            assert status == 504
            assert loop.time() - t0 < 2.0
            assert orjson.loads(data)["status"] == 504
    finally:
        await up.stop()


async def test_round_robin_across_endpoints(tmp_path: Path,
                                            session: aiohttp.ClientSession) -> None:
    ups = [Upstream(), Upstream()]
    for u in ups:
        await u.start()
    try:
        async with running_gateway(tmp_path, gateway_yaml([u.url for u in ups])) as gw:
            for _ in range(10):
                assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 200
        assert [u.requests for u in ups] == [5, 5]
    finally:
        for u in ups:
            await u.stop()


async def test_client_disconnect_mid_download_does_not_break_the_gateway(
        tmp_path: Path, upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
        writer.write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(100_000)
        writer.transport.abort()
        await asyncio.sleep(0.2)
        status, _, _data = await fetch(session, "GET", url_of(gw, "/"))
        assert status == 200
        assert gw.signals.inflight == 0


async def test_admin_endpoints(tmp_path: Path, upstream: Upstream,
                               session: aiohttp.ClientSession) -> None:
    text = gateway_yaml([upstream.url]).replace('admin: {listen: "127.0.0.1:0"}',
                                                 'admin: {listen: "127.0.0.1:0", token: s3cret}')
    async with running_gateway(tmp_path, text) as gw:
        auth = {"Authorization": "Bearer s3cret"}
        status, _, data = await fetch(session, "GET", admin_url(gw, "/healthz"))
        assert (status, orjson.loads(data)) == (200, {"status": "ok"})
        status, _, _ = await fetch(session, "GET", admin_url(gw, "/readyz"))
        assert status == 200
        status, headers, data = await fetch(session, "GET", admin_url(gw, "/admin/config"))
        assert status == 401 and headers["Content-Type"] == "application/problem+json"
        status, _, _ = await fetch(session, "GET", admin_url(gw, "/admin/config"),
                                   headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, data = await fetch(session, "GET", admin_url(gw, "/admin/config"), headers=auth)
        doc = orjson.loads(data)
        assert status == 200 and doc["version"] == gw.cfg.version
        assert doc["config"]["admin"]["token"] == "<redacted>" and b"s3cret" not in data
        status, headers, data = await fetch(session, "GET", admin_url(gw, "/metrics"))
        assert status == 200 and b"gateway_inflight_requests" in data


async def test_reload_via_admin_good_and_bad(tmp_path: Path, upstream: Upstream,
                                             session: aiohttp.ClientSession) -> None:
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        path = Path(gw.config_path)
        old_version = gw.cfg.version
        path.write_text(path.read_text().replace('path_prefix: "/"', 'path_prefix: "/v2"'))
        status, _, data = await fetch(session, "POST", admin_url(gw, "/admin/reload"))
        assert status == 200
        assert orjson.loads(data)["version"] == gw.cfg.version != old_version
        assert (await fetch(session, "GET", url_of(gw, "/other")))[0] == 404
        assert (await fetch(session, "GET", url_of(gw, "/v2/x")))[0] == 200

        path.write_text(path.read_text().replace("upstream: up", "upstream: nowhere")
                        + "bogus: 1\n")
        status, headers, data = await fetch(session, "POST", admin_url(gw, "/admin/reload"))
        assert status == 400 and headers["Content-Type"] == "application/problem+json"
        assert orjson.loads(data)["errors"] == [
            "bogus: unknown key", "routes[0].upstream: names unknown upstream 'nowhere' "
                                  "(known: up)"]
        assert (await fetch(session, "GET", url_of(gw, "/v2/x")))[0] == 200  # old one serves


async def test_ipv6_loopback_listener(tmp_path: Path, upstream: Upstream,
                                      session: aiohttp.ClientSession) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback")
    text = gateway_yaml([upstream.url], listen="[::1]:0")
    async with running_gateway(tmp_path, text) as gw:
        port = gw.proxy_address[1]
        status, _, _ = await fetch(session, "GET", f"http://[::1]:{port}/")
        assert status == 200


async def test_expect_100_continue_is_answered(tmp_path: Path, upstream: Upstream) -> None:
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\nhello")


async def test_gateway_ratelimit_headers_replace_the_upstreams(tmp_path: Path,
                                                               upstream: Upstream) -> None:
    async def own_headers(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"RateLimit": '"upstream";r=1;t=1',
                                                "RateLimit-Policy": '"upstream";q=1;w=1'})

    upstream.extra.append(web.get("/own", own_headers))
    await upstream.stop()
    await upstream.start()
    text = gateway_yaml([upstream.url], route_extra="limits: [l]") + (
        'limits: [{name: l, key: ip_address, rate: "10/second", burst: 5}]\n')
    async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
        async with s.get(url_of(gw, "/own")) as resp:
            assert resp.headers.getall("RateLimit-Policy") == ['"l";q=10;w=1']
            assert resp.headers.getall("RateLimit")[0].startswith('"l";r=')
            assert len(resp.headers.getall("RateLimit")) == 1


async def test_access_log_lines_match_the_responses(tmp_path: Path, upstream: Upstream) -> None:
    log_path = tmp_path / "access.log"
    text = gateway_yaml([upstream.url]).replace('path_prefix: "/"', 'path_prefix: "/api"') + (
        f"access_log: {{enabled: true, path: '{log_path}'}}\n")
    sent = []
    async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
        for path, headers in (("/api/headers?api_key=secret123", {}),
                              ("/api/status/503", {"X-Request-Id": "client-id-1"}),
                              ("/nowhere", {})):
            async with s.get(url_of(gw, path), headers=headers) as resp:
                await resp.read()
                sent.append((path.split("?")[0], resp.status, resp.headers["X-Request-Id"]))
    # the gateway has stopped: the buffered log is flushed
    lines = [orjson.loads(line) for line in log_path.read_text().splitlines()]
    assert [(d["path"], d["status"], d["request_id"]) for d in lines] == sent
    assert sent[1][2] == "client-id-1" and len(sent[0][2]) >= 16 and len(sent[2][2]) >= 16
    assert [d["route"] for d in lines] == ["main", "main", "-"]
    assert "secret123" not in log_path.read_text()
    assert all(d["duration_ms"] >= 0 and "time" in d for d in lines)


async def test_malformed_requests_get_400_and_are_counted(tmp_path: Path, upstream: Upstream,
                                                          session: aiohttp.ClientSession) -> None:
    """Requests the server refuses before any handler (bad framing, oversized heads) get a
    problem+json answer, never reach the upstream, and show in the request metrics."""
    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        cases = [
            (b"NOT HTTP AT ALL\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
            (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        ]
        for raw, want in cases:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
            writer.write(raw)
            answer = await asyncio.wait_for(reader.read(), 5)   # the server closes after it
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {want} ".encode()), (raw[:40], head)
            assert b"Content-Type: application/problem+json" in head
            assert b"Connection: close" in head
            assert orjson.loads(body)["status"] == want
        assert upstream.requests == 0
        _, _, data = await fetch(session, "GET", admin_url(gw, "/metrics"))
        text = data.decode()
        for code, n in (("400", 2), ("431", 1), ("414", 1)):
            line = next(ln for ln in text.splitlines() if ln.startswith("gateway_requests_total{")
                        and 'route="-"' in ln and f'code="{code}"' in ln)
            assert line.endswith(f" {n}.0"), line


async def test_dot_segments_are_refused_before_routing(tmp_path: Path, upstream: Upstream,
                                                      session: aiohttp.ClientSession) -> None:
    """`/public/../admin` would match a `/public` route while an upstream that normalises
    serves `/admin`: such paths are refused; dots inside names are not dot segments."""
    text = gateway_yaml([upstream.url]).replace('path_prefix: "/"', 'path_prefix: "/public"')
    async with running_gateway(tmp_path, text) as gw:
        for target in (b"/public/../admin", b"/public/%2e%2E/admin", b"/public/.%2e/admin",
                       b"/public/./x", b"/public/x/..", b"/public/x/.?q=1"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400 "), (target, answer[:60])
            assert b"dot segments" in answer
        assert upstream.requests == 0
        for target in ("/public/.well-known/x", "/public/file.txt", "/public/a..b/..c",
                       "/public/%2e%2ex", "/public/x?path=/../etc"):
            status, _, _ = await fetch(session, "GET",
                                       yarl.URL(url_of(gw, target), encoded=True))
            assert status == 200, target


async def test_forwarded_and_x_real_ip_only_from_trusted_peers(tmp_path: Path,
                                                               upstream: Upstream) -> None:
    """An upstream may take `Forwarded` or `X-Real-IP` as the client's address: they pass only
    from a trusted proxy (like X-Forwarded-Proto/Host), never from an arbitrary client."""
    request = (b"GET /headers HTTP/1.1\r\nHost: t\r\nForwarded: for=10.9.9.9\r\n"
               b"X-Real-IP: 10.9.9.9\r\nConnection: close\r\n\r\n")

    async def seen_by_upstream(gw: GatewayServer) -> dict[str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return {k.lower(): v for k, v in orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["headers"]}

    async with running_gateway(tmp_path, gateway_yaml([upstream.url])) as gw:
        seen = await seen_by_upstream(gw)
        assert "forwarded" not in seen and "x-real-ip" not in seen
        assert seen["x-forwarded-for"] == "127.0.0.1"
    trusted = gateway_yaml([upstream.url], extra='trusted_proxies: ["127.0.0.1/32"]\n')
    async with running_gateway(tmp_path, trusted) as gw:
        seen = await seen_by_upstream(gw)
        assert seen["forwarded"] == "for=10.9.9.9" and seen["x-real-ip"] == "10.9.9.9"
