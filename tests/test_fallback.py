"""`fallback:` on an upstream, end to end: real upstreams on 127.0.0.1, the real listener, a
FakeClock for the primary's `reset_timeout_s` (recovery without sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway import config as config_mod
from gateway.app import GatewayServer
from gateway.errors import REDUCED_CAPACITY
from tests.conftest import free_port
from tests.fakes import FakeClock
from tests.harness import Upstream, admin_url, fetch, url_of


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def config(primary: str, backup: str, *, backup_breaker: str = "{failure_threshold: 5}") -> str:
    return ('listen: "127.0.0.1:0"\n'
            'admin: {listen: "127.0.0.1:0"}\n'
            "upstreams:\n"
            "  - name: primary\n"
            f'    endpoints: ["{primary}"]\n'
            "    connect_timeout_s: 1\n"
            "    timeout_s: 5\n"
            "    fallback: backup\n"
            "    breaker: {failure_threshold: 3, reset_timeout_s: 30, half_open_successes: 2,"
            " half_open_max_inflight: 1}\n"
            "  - name: backup\n"
            f'    endpoints: ["{backup}"]\n'
            "    connect_timeout_s: 1\n"
            f"    breaker: {backup_breaker}\n"
            "routes:\n"
            "  - {name: main, upstream: primary, service: shop}\n")


async def start(tmp_path: Path, text: str, clock: FakeClock) -> GatewayServer:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw = GatewayServer(str(path), config_mod.load(path), clock=clock)
    await gw.start()
    return gw


def series(metrics: str, *labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("gateway_requests_total{") and all(x in line for x in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_fallback_serves_while_the_primary_is_open_then_the_primary_returns(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    primary_port = free_port()          # nothing listens there yet: connect errors
    backup, primary = Upstream(), Upstream()
    await backup.start()
    gw = await start(tmp_path, config(f"http://127.0.0.1:{primary_port}", backup.url), clock)
    try:
        for _ in range(3):
            assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 502
        assert gw.runtime.upstreams["primary"].breaker.state == "open"

        # Open: the fallback answers, says so, and is counted under its own name.
        for _ in range(4):
            status, headers, body = await fetch(session, "GET", url_of(gw, "/"))
            assert status == 200 and headers["X-Gateway-Fallback"] == "primary"
            assert orjson.loads(body)["service"] == "demo"
        assert backup.requests == 4

        # The primary comes back; after reset_timeout_s the half-open probe goes to it, and a
        # request arriving while the probe's slot is taken goes to the fallback.
        await primary.start(primary_port)
        clock.advance(31)
        probe = asyncio.create_task(fetch(session, "GET", url_of(gw, "/delay/300")))
        await asyncio.sleep(0.1)
        assert gw.runtime.upstreams["primary"].breaker.state == "half_open"
        status, headers, _ = await fetch(session, "GET", url_of(gw, "/"))
        assert status == 200 and headers["X-Gateway-Fallback"] == "primary"
        status, headers, _ = await probe
        assert status == 200 and "X-Gateway-Fallback" not in headers
        status, headers, _ = await fetch(session, "GET", url_of(gw, "/"))
        assert status == 200 and "X-Gateway-Fallback" not in headers
        assert gw.runtime.upstreams["primary"].breaker.state == "closed"
        before = backup.requests
        for _ in range(3):
            status, headers, _ = await fetch(session, "GET", url_of(gw, "/"))
            assert status == 200 and "X-Gateway-Fallback" not in headers
        assert backup.requests == before and primary.requests == 5

        _, _, data = await fetch(session, "GET", admin_url(gw, "/metrics"))
        text = data.decode()
        assert series(text, 'route="main"', 'upstream="backup"', 'code="200"') == 5
        assert series(text, 'route="main"', 'upstream="primary"', 'code="200"') == 5
        assert series(text, 'route="main"', 'upstream="primary"', 'code="502"') == 3
        # What is shipped to the control plane: the fallback's series under the route's service.
        shipped = {(s.upstream, s.service, s.code): s.count for s in gw.signals.swap().series}
        assert shipped[("backup", "shop", 200)] == 5
    finally:
        await gw.stop()
        await primary.stop()
        await backup.stop()


async def test_both_circuits_open_is_the_503_problem(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    gw = await start(tmp_path, config(f"http://127.0.0.1:{free_port()}",
                                      f"http://127.0.0.1:{free_port()}",
                                      backup_breaker="{failure_threshold: 1}"), clock)
    try:
        for _ in range(3):
            assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 502
        # The primary is open: its fallback is tried, fails, and opens (threshold 1).
        status, headers, _ = await fetch(session, "GET", url_of(gw, "/"))
        assert status == 502 and "X-Gateway-Fallback" not in headers
        assert gw.runtime.upstreams["backup"].breaker.state == "open"
        status, headers, body = await fetch(session, "GET", url_of(gw, "/"))
        problem = orjson.loads(body)
        assert status == 503 and headers["Retry-After"] == "30"
        assert problem["type"] == REDUCED_CAPACITY and problem["upstream"] == "primary"
    finally:
        await gw.stop()
