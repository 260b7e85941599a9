"""Throttling instead of rejecting (`limits[].delay_max_ms`, `key: global`), through a real
gateway on 127.0.0.1 with a real upstream: memory and Redis stores."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.ratelimit import Limiter
from tests.harness import Upstream, gateway_yaml, running_gateway, url_of


def _yaml(upstream: Upstream, store: str, redis_url: str, delay_ms: int = 2000) -> str:
    extra = ("limits:\n"
             f"  - {{name: provider, key: global, rate: \"10/second\", burst: 0, store: {store},"
             f" delay_max_ms: {delay_ms}, on_store_error: deny}}\n")
    if store == "redis":
        extra += f'redis: {{url: "{redis_url}", timeout_ms: 1000}}\n'
    return gateway_yaml([upstream.url], route_extra="limits: [provider]", extra=extra)


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        server.flush()
        return "redis", server.url
    return "local", ""


def _decisions(gw: Any) -> dict[str, int]:
    return {d: n for (p, d), n in gw.signals._limits.items() if p == "provider"}


@pytest.mark.timeout(60)
async def test_a_burst_of_20_at_10_per_second_is_spread_over_2_s_without_429(
        tmp_path: Path, store: tuple[str, str]) -> None:
    up = Upstream()
    await up.start()
    try:
        async with running_gateway(tmp_path, _yaml(up, *store)) as gw:
            # 20 different clients: `key: global` is one bucket for all of them
            async def one(i: int) -> tuple[int, float]:
                async with aiohttp.ClientSession() as s, \
                        s.get(url_of(gw, "/"), headers={"X-User-Id": f"u{i}"}) as r:
                    await r.read()
                    return r.status, time.monotonic()

            t0 = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(20)))
            statuses = [s for s, _ in results]
            done = sorted(t - t0 for _, t in results)
            assert statuses == [200] * 20
            # capacity 1 at 10/s: the first at once, the 20th 1.9 s later
            assert 1.75 <= done[-1] <= 3.2, done
            assert done[0] < 0.5 and done[9] >= 0.8, done
            assert up.requests == 20
            d = _decisions(gw)
            assert d.get("delayed") == 19 and d.get("allowed") == 1 and not d.get("limited"), d
            from gateway import metrics
            text = metrics.render(gw.signals).decode()
            assert 'gateway_ratelimit_decisions_total{decision="delayed",policy="provider"} ' \
                   '19.0' in text
    finally:
        await up.stop()


@pytest.mark.timeout(60)
async def test_a_wait_longer_than_delay_max_is_a_429(tmp_path: Path,
                                                      store: tuple[str, str]) -> None:
    up = Upstream()
    await up.start()
    try:
        async with running_gateway(tmp_path, _yaml(up, *store, delay_ms=250)) as gw, \
                aiohttp.ClientSession() as s:
            async def one() -> tuple[int, float]:
                t = time.monotonic()
                async with s.get(url_of(gw, "/")) as r:
                    await r.read()
                    return r.status, time.monotonic() - t

            results = await asyncio.gather(*(one() for _ in range(6)))
            statuses = sorted(st for st, _ in results)
            # one at once, two reserved within 250 ms (at 100 and 200 ms), the rest refused
            assert statuses == [200, 200, 200, 429, 429, 429], results
            assert max(w for st, w in results if st == 200) < 0.25 + 0.3
            assert _decisions(gw).get("limited") == 3
    finally:
        await up.stop()


@pytest.mark.timeout(30)
async def test_a_client_that_leaves_while_held_frees_its_place(tmp_path: Path) -> None:
    up = Upstream()
    await up.start()
    try:
        async with running_gateway(tmp_path, _yaml(up, "local", "", delay_ms=5000)) as gw:
            host, port = "127.0.0.1", gw.proxy_address[1]  # type: ignore[index]
            async with aiohttp.ClientSession() as s, s.get(url_of(gw, "/")) as r:
                assert r.status == 200                    # takes the only token
            loop = asyncio.get_running_loop()
            socks = []
            for _ in range(3):                            # each reserves one more token
                c = socket.create_connection((host, port))
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(c)
            deadline = loop.time() + 5
            while gw.signals.inflight < 3 and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert gw.signals.inflight == 3               # held requests count in flight
            for c in socks:
                c.close()
            deadline = loop.time() + 2
            while gw.signals.inflight and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert gw.signals.inflight == 0               # freed long before the 0.3 s wait
            assert up.requests == 1
            # their reservations were given back: the next one waits ~0.1 s, not ~0.4 s
            t = time.monotonic()
            async with aiohttp.ClientSession() as s, s.get(url_of(gw, "/")) as r:
                assert r.status == 200
            assert time.monotonic() - t < 0.3
            assert isinstance(gw.runtime.limiter, Limiter)
    finally:
        await up.stop()
