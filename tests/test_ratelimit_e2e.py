"""Rate limits through the whole gateway: real `gateway run` processes, a real redis-server,
real clients receiving 429s."""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.errors import QUOTA_EXCEEDED
from tests.conftest import RedisServer, free_port
from tests.harness import GatewayProcess, gateway_yaml, write_config


def limited_config(tmp_path: Path, upstream: str, limits: str, *, name: str,
                   redis_url: str | None = None, route_limits: str = "[hot]",
                   extra: str = "", redis_timeout_ms: int = 50) -> GatewayProcess:
    port, admin = free_port(), free_port()
    text = gateway_yaml([upstream], listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}",
                        route_extra=f"limits: {route_limits}", extra=extra)
    text += "limits:\n" + "".join(f"  - {line}\n" for line in limits.strip().splitlines())
    if redis_url:
        text += f"redis: {{url: '{redis_url}', timeout_ms: {redis_timeout_ms}}}\n"
    gw = GatewayProcess(write_config(tmp_path, text, name), port, admin)
    gw.start()
    return gw


SF_ITEM = re.compile(r'"([^"]+)"((?:;[a-z]+=-?\d+)*)')


def parse_sf(value: str) -> dict[str, dict[str, int]]:
    """A Structured-Fields list of strings with integer parameters."""
    out = {}
    for name, params in SF_ITEM.findall(value):
        out[name] = {k: int(v) for k, v in re.findall(r";([a-z]+)=(-?\d+)", params)}
    return out


async def test_429_and_ratelimit_headers_through_the_gateway(
        tmp_path: Path, demo_upstream: str) -> None:
    gw = limited_config(tmp_path, demo_upstream, """
{name: hot, key: user_id, rate: "2/minute", burst: 2}
{name: roomy, key: user_id, rate: "100/hour", burst: 9}
""", name="gw.yaml", route_limits="[hot, roomy]")
    try:
        async with aiohttp.ClientSession() as s:
            headers = {"X-User-Id": "alice"}
            seen = []
            for i in range(3):       # capacity = burst + 1 = 3
                async with s.get(f"{gw.url}/", headers=headers) as resp:
                    assert resp.status == 200, i
                    policy = parse_sf(resp.headers["RateLimit-Policy"])
                    assert policy == {"hot": {"q": 2, "w": 60}, "roomy": {"q": 100, "w": 3600}}
                    seen.append(parse_sf(resp.headers["RateLimit"]))
            # "hot" is the one closest to rejecting: 2, 1, 0 whole tokens left
            assert [list(x) for x in seen] == [["hot"]] * 3
            assert [x["hot"]["r"] for x in seen] == [2, 1, 0]
            # t = seconds until full again: (3 - r) tokens at 2/minute = 30 s per token
            assert [x["hot"]["t"] for x in seen] == [30, 60, 90]

            async with s.get(f"{gw.url}/", headers=headers) as resp:
                assert resp.status == 429
                assert resp.headers["Content-Type"] == "application/problem+json"
                doc = orjson.loads(await resp.read())
                retry = int(resp.headers["Retry-After"])
                assert 29 <= retry <= 30 and retry >= 1
                assert doc["type"] == QUOTA_EXCEEDED and doc["status"] == 429
                assert doc["violated-policies"] == ["hot"]
                rl = parse_sf(resp.headers["RateLimit"])
                assert rl["hot"]["r"] == 0 and 89 <= rl["hot"]["t"] <= 90
            # a different client is not affected
            async with s.get(f"{gw.url}/", headers={"X-User-Id": "bob"}) as resp:
                assert resp.status == 200
            # the admin test endpoint agrees and consumes nothing
            for _ in range(2):
                async with s.post(f"{gw.admin}/admin/limits/test",
                                  json={"limit": "hot", "key": "alice", "requests": 1}) as resp:
                    doc = await resp.json()
                    assert doc["allowed"] is False and doc["remaining"] == 0
                    assert math.isclose(doc["retry_after_s"], retry, abs_tol=1)
            async with s.post(f"{gw.admin}/admin/limits/test",
                              json={"limit": "nope", "key": "x"}) as resp:
                assert resp.status == 404
            async with s.get(f"{gw.admin}/metrics") as resp:
                text = await resp.text()
            assert 'gateway_ratelimit_decisions_total{decision="limited",policy="hot"} 1.0' in text
            assert 'gateway_ratelimit_decisions_total{decision="allowed",policy="hot"} 4.0' in text
    finally:
        gw.stop()


@pytest.mark.timeout(90)
async def test_two_gateways_sharing_redis_never_overshoot(
        tmp_path: Path, demo_upstream: str, redis_url: str) -> None:
    rate, burst = 200, 199
    # deny: a store error must show as a 503 here, never as a silently per-gateway limit
    limits = (f'{{name: hot, key: user_id, rate: "{rate}/second", burst: {burst}, store: redis, '
              f'on_store_error: deny}}')
    gws = [limited_config(tmp_path, demo_upstream, limits, name=f"gw{i}.yaml",
                          redis_url=redis_url, redis_timeout_ms=1000) for i in range(2)]
    try:
        statuses: list[int] = []
        first_admit: list[float] = []
        last_admit: list[float] = []
        duration = 3.0
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            start = time.monotonic()
            stop_at = start + duration

            async def client(i: int) -> None:
                url = f"{gws[i % 2].url}/"
                while time.monotonic() < stop_at:
                    t0 = time.monotonic()
                    async with s.get(url, headers={"X-User-Id": "the-key"}) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                        if resp.status == 200:
                            if not first_admit:
                                first_admit.append(t0)
                            last_admit.append(time.monotonic())

            await asyncio.gather(*(client(i) for i in range(200)))
        admitted = statuses.count(200)
        assert set(statuses) <= {200, 429}, {s: statuses.count(s) for s in set(statuses)}
        # every admission happened inside [first request sent, last response received]
        span = max(last_admit) - first_admit[0]
        bound = (burst + 1) + rate * span
        assert admitted <= bound, (admitted, bound)
        # and nothing was refused that had a token: over the span the clients kept asking, the
        # admissions come close to the bucket's supply (a slow box shortens the span, not this)
        assert admitted >= 0.9 * (burst + 1 + rate * (span - 0.3)), (admitted, bound)
        assert statuses.count(429) > admitted    # the clients really did hammer
    finally:
        for gw in gws:
            gw.stop()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("on_error,expect", [("allow", {200}), ("deny", {503})])
async def test_redis_killed_under_load(tmp_path: Path, demo_upstream: str,
                                       redis_server: RedisServer, redis_url: str,
                                       on_error: str, expect: set[int]) -> None:
    limits = (f'{{name: hot, key: user_id, rate: "100000/second", burst: 1000, store: redis, '
              f'on_store_error: {on_error}}}')
    gw = limited_config(tmp_path, demo_upstream, limits, name="gw.yaml", redis_url=redis_url,
                        redis_timeout_ms=250)
    try:
        async with aiohttp.ClientSession() as s:
            async def burst_of(n: int) -> tuple[list[int], float]:
                async def one() -> tuple[int, float]:
                    t0 = time.monotonic()
                    async with s.get(f"{gw.url}/", headers={"X-User-Id": "k"}) as resp:
                        await resp.read()
                        if resp.status == 503:
                            assert resp.headers["Retry-After"] == "1"
                        return resp.status, time.monotonic() - t0
                results = await asyncio.gather(*(one() for _ in range(n)))
                return [r[0] for r in results], max(r[1] for r in results)

            statuses, _ = await burst_of(50)
            assert set(statuses) == {200}
            redis_server.stop()
            await burst_of(5)                    # the first failures pay the timeout once
            statuses, slowest = await burst_of(100)
            assert set(statuses) == expect
            assert slowest < 1.0                 # failing fast, not a timeout per request
            redis_server.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:   # reconnects by itself
                statuses, _ = await burst_of(10)
                if set(statuses) == {200}:
                    break
                await asyncio.sleep(0.2)
            assert set(statuses) == {200}
            async with s.get(f"{gw.admin}/metrics") as resp:
                text = await resp.text()
            assert re.search(r'gateway_ratelimit_decisions_total\{decision="store_error",'
                             r'policy="hot"\} [1-9]', text)
    finally:
        gw.stop()
