"""WebSocket tunnels end to end: a `websockets` echo server as the upstream, the `websockets`
client through the gateway (in this loop, or the real `gateway run` for SIGTERM)."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.tunnel import FrameTracker, close_frame
from tests.conftest import free_port
from tests.harness import GatewayProcess, admin_url, gateway_yaml, running_gateway, write_config

MiB = 1024 * 1024


class EchoUpstream:
    """A WebSocket server that echoes every message and remembers how its connections closed."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.close_codes: list[int | None] = []
        self.closed = asyncio.Event()
        self.port = 0

    async def _echo(self, ws: ServerConnection) -> None:
        try:
            async for msg in ws:
                await ws.send(msg)
        except ConnectionClosed:
            pass
        self.close_codes.append(ws.close_code)
        self.closed.set()

    async def start(self) -> None:
        self.server = await serve(self._echo, "127.0.0.1", 0, max_size=None)
        self.port = self.server.sockets[0].getsockname()[1]  # type: ignore[index]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    up = EchoUpstream()
    await up.start()
    yield up
    await up.stop()


def ws_yaml(upstream: str, *, websocket: str = "true", extra: str = "",
            route_extra: str = "", listen: str = "127.0.0.1:0", admin: str = "127.0.0.1:0"
            ) -> str:
    return gateway_yaml([upstream], listen=listen, admin=admin, extra=extra,
                        route_extra=f"websocket: {websocket}\n{route_extra}")


async def metrics(gw: object) -> str:
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(admin_url(gw, "/metrics")) as resp:  # type: ignore[arg-type]
        return await resp.text()


def series(text: str, *labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("gateway_requests_total{") and all(x in line for x in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_1mib_messages_both_ways_through_the_tunnel(
        tmp_path: Path, echo: EchoUpstream, tls: bool) -> None:
    extra, client_ssl, scheme = "", None, "ws"
    if tls:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        (tmp_path / "gw.crt").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        (tmp_path / "gw.key").write_bytes(cert.private_key_pem.bytes())
        extra = (f"tls: {{certificates: [{{cert: {tmp_path}/gw.crt, "
                 f"key: {tmp_path}/gw.key}}]}}\n")
        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
        scheme = "wss"
    async with running_gateway(tmp_path, ws_yaml(echo.url, extra=extra)) as gw:
        assert gw.proxy_address is not None
        url = f"{scheme}://localhost:{gw.proxy_address[1]}/chat"
        t0 = time.monotonic()
        async with connect(url, max_size=None, ssl=client_ssl, compression=None) as ws:
            assert ws.response.headers["Upgrade"].lower() == "websocket"
            assert ws.response.headers["X-Request-Id"]
            for i in range(3):
                payload = os.urandom(MiB) + bytes([i])
                await ws.send(payload)
                assert await ws.recv() == payload
            await ws.send("text too")
            assert await ws.recv() == "text too"
            # Both directions at once: several messages in flight before any echo is read.
            sent = [os.urandom(MiB) for _ in range(4)]
            await asyncio.gather(*(ws.send(m) for m in sent))
            for m in sent:
                assert await ws.recv() == m
            while not gw.signals.inflight:
                await asyncio.sleep(0.01)       # (already true: the tunnel is a request)
        await asyncio.wait_for(echo.closed.wait(), 5)
        assert echo.close_codes == [1000]       # the client's own close went through
        duration = time.monotonic() - t0
        deadline = time.monotonic() + 5
        while gw.signals.inflight:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        text = await metrics(gw)
        assert series(text, 'route="main"', 'code="101"') == 1
        shipped = [s for s in gw.signals.swap().series if s.code == 101]
        assert len(shipped) == 1 and shipped[0].bytes_in > 7 * MiB
        assert shipped[0].bytes_out > 7 * MiB
        assert 0 < shipped[0].sum_s <= duration + 0.5   # one request lasting the tunnel


async def test_a_side_that_does_not_read_stops_the_other_side(tmp_path: Path) -> None:
    """Backpressure: an upstream that stops reading fills its socket, the gateway stops
    reading the client, and the client's sends block; nothing piles up in the gateway."""
    release = asyncio.Event()

    async def sulk(ws: ServerConnection) -> None:
        await release.wait()

    server = await serve(sulk, "127.0.0.1", 0, max_size=None, max_queue=1, close_timeout=0.5)
    port = server.sockets[0].getsockname()[1]  # type: ignore[index]
    try:
        async with running_gateway(tmp_path, ws_yaml(f"http://127.0.0.1:{port}")) as gw:
            assert gw.proxy_address is not None and gw._server is not None
            async with connect(f"ws://127.0.0.1:{gw.proxy_address[1]}/", max_size=None,
                               compression=None, close_timeout=0.5) as ws:
                chunk = os.urandom(MiB)
                sent = 0

                async def flood() -> None:
                    nonlocal sent
                    for _ in range(64):
                        await ws.send(chunk)
                        sent += 1

                task = asyncio.create_task(flood())
                await asyncio.sleep(1.0)    # (a real network filling its buffers)
                assert not task.done() and sent < 64
                (tunnel,) = gw._server.tunnels
                buffered = tunnel.upstream.transport.get_write_buffer_size()
                assert buffered <= 2 * MiB, buffered
                assert tunnel.bytes_in < 40 * MiB
                task.cancel()
                release.set()
    finally:
        server.close()
        await server.wait_closed()


async def test_limits_apply_to_the_handshake(tmp_path: Path, echo: EchoUpstream) -> None:
    text = ws_yaml(echo.url, route_extra="limits: [per_ip]\n",
                   extra="limits:\n  - {name: per_ip, key: ip_address, rate: 1/hour}\n")
    async with running_gateway(tmp_path, text) as gw:
        assert gw.proxy_address is not None
        url = f"ws://127.0.0.1:{gw.proxy_address[1]}/"
        async with connect(url) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        with pytest.raises(InvalidStatus) as exc:
            async with connect(url):
                pass
        resp = exc.value.response
        assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
        assert orjson.loads(resp.body)["violated-policies"] == ["per_ip"]


async def test_upgrade_on_a_route_without_websocket_is_refused(
        tmp_path: Path, echo: EchoUpstream) -> None:
    async with running_gateway(tmp_path, ws_yaml(echo.url, websocket="false")) as gw:
        assert gw.proxy_address is not None
        with pytest.raises(InvalidStatus) as exc:
            async with connect(f"ws://127.0.0.1:{gw.proxy_address[1]}/"):
                pass
        resp = exc.value.response
        assert resp.status_code == 400
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert "websocket: true" in orjson.loads(resp.body)["detail"]
        assert not echo.close_codes             # never reached the upstream


async def test_idle_tunnel_is_closed_with_1001(tmp_path: Path, echo: EchoUpstream) -> None:
    text = ws_yaml(echo.url, websocket="{idle_timeout_s: 30}")
    async with running_gateway(tmp_path, text) as gw:
        assert gw.proxy_address is not None and gw._server is not None
        async with connect(f"ws://127.0.0.1:{gw.proxy_address[1]}/") as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            loop = asyncio.get_running_loop()
            gw._server.sweep(loop.time() + 10)      # not idle long enough
            await ws.send("y")
            assert await ws.recv() == "y"
            gw._server.sweep(loop.time() + 31)      # 31 s without a byte either way
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1001
        await asyncio.wait_for(echo.closed.wait(), 5)
        assert echo.close_codes == [1001]
        assert not gw._server.tunnels


async def test_sigterm_closes_tunnels_with_close_frames(tmp_path: Path,
                                                        echo: EchoUpstream) -> None:
    port, admin = free_port(), free_port()
    text = ws_yaml(echo.url, listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}")
    gw = GatewayProcess(write_config(tmp_path, text), port, admin)
    gw.start()
    try:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=None) as ws:
            big = os.urandom(MiB)
            await ws.send(big)
            assert await ws.recv() == big
            t0 = time.monotonic()
            gw.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1001
        await asyncio.wait_for(echo.closed.wait(), 5)
        assert echo.close_codes == [1001]
        assert gw.proc is not None
        code = await asyncio.to_thread(gw.proc.wait, 10)
        assert code == 0 and time.monotonic() - t0 < 5     # drain_s is 5
    finally:
        gw.stop()


def test_frame_tracker_finds_boundaries_across_reads() -> None:
    def frame(payload: bytes, masked: bool, opcode: int = 2) -> bytes:
        n = len(payload)
        size = bytes([n]) if n < 126 else (b"\x7e" + n.to_bytes(2, "big") if n < 65536
                                           else b"\x7f" + n.to_bytes(8, "big"))
        head = bytes([0x80 | opcode]) + bytes([size[0] | (0x80 if masked else 0)]) + size[1:]
        return head + (b"\x00" * 4 if masked else b"") + payload

    frames = [frame(b"a" * 10, True), frame(b"b" * 300, False), frame(b"c" * 70000, True),
              frame(b"", False), close_frame(1001, masked=True)]
    stream = b"".join(frames)
    ends = {sum(len(f) for f in frames[:i + 1]) for i in range(len(frames))}
    for step in (1, 3, 7, 1000):
        t = FrameTracker()
        for pos in range(0, len(stream), step):
            t.feed(stream[pos:pos + step])
            end = min(pos + step, len(stream))
            assert t.at_boundary == (end in ends), (step, end)
        assert t.closes == 1
    # stop=True: the offset of the next boundary in a read, -1 when the read ends inside a frame
    t = FrameTracker()
    assert t.feed(stream[:5], stop=True) == 0           # at a boundary already
    t.feed(stream[:5])                                   # inside the first frame
    assert t.feed(stream[5:12], stop=True) == -1
    assert t.feed(stream[12:400], stop=True) == len(frames[0]) - 12
    assert close_frame(1001, masked=False) == b"\x88\x02\x03\xe9"


async def test_the_breaker_applies_to_the_handshake(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    text = ws_yaml(dead, extra="").replace(
        "    timeout_s: 2\n", "    timeout_s: 2\n    breaker: {failure_threshold: 2}\n")
    async with running_gateway(tmp_path, text) as gw:
        assert gw.proxy_address is not None
        url = f"ws://127.0.0.1:{gw.proxy_address[1]}/"
        for want in (502, 502, 503):
            with pytest.raises(InvalidStatus) as exc:
                async with connect(url):
                    pass
            assert exc.value.response.status_code == want


async def test_reload_does_not_wait_for_open_tunnels(tmp_path: Path, echo: EchoUpstream) -> None:
    async with running_gateway(tmp_path, ws_yaml(echo.url)) as gw:
        assert gw.proxy_address is not None
        async with connect(f"ws://127.0.0.1:{gw.proxy_address[1]}/") as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            old = gw.runtime
            await gw.reload()
            await asyncio.wait_for(old.drained.wait(), 2)   # retired while the tunnel is open
            await ws.send("after")
            assert await ws.recv() == "after"
