"""Upstream retries end to end: a real scripted upstream on 127.0.0.1 (two listeners = two
endpoints), the real listener, aiohttp clients."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import admin_url, gateway_yaml, running_gateway, url_of
from tests.scripted import Answer, ScriptedUpstream, Seen

RETRIES = "retries: {attempts: 2, on: [connect_error, 502, 503, 504], budget_ratio: 0.2}"
# A breaker that does not open during the test: the retries are what is measured.
BREAKER = "breaker: {failure_threshold: 1000}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as s:
        yield s


def flaky(seed: int) -> ScriptedUpstream:
    """Fails 30 % of requests, half with a 503, half with a 502, after the same short delay a
    success takes. (Not with resets: a reset on a reused keep-alive connection before any
    response byte looks like the server closing an idle connection, which the pool resends once
    on a fresh connection by itself, outside the retry budget; test_connection_errors_are_retried
    covers resets.)"""
    rng = random.Random(seed)

    def script(seen: Seen, inflight: int) -> Answer:
        r = rng.random()
        if r < 0.15:
            return Answer(503, delay_s=0.002)
        if r < 0.30:
            return Answer(502, delay_s=0.002)
        return Answer(200, delay_s=0.002)
    return ScriptedUpstream(script)


async def load(session: aiohttp.ClientSession, url: str, total: int,
               concurrency: int) -> int:
    """`total` GETs from `concurrency` clients; how many got a 200."""
    ok = 0
    left = total

    async def client() -> None:
        nonlocal ok, left
        while left > 0:
            left -= 1
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    ok += resp.status == 200
            except aiohttp.ClientError:
                pass
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ok


def metric(text: str, name: str, *labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(x in line for x in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.timeout(120)
async def test_retries_raise_success_while_the_budget_caps_upstream_load(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    total, concurrency = 1500, 40
    rates = {}
    loads = {}
    for variant, extra in (("off", BREAKER), ("on", f"{BREAKER}\n{RETRIES}")):
        up = flaky(7)
        await up.start(listeners=2)
        try:
            async with running_gateway(tmp_path, gateway_yaml(up.urls(),
                                                               upstream_extra=extra)) as gw:
                ok = await load(session, url_of(gw, "/x"), total, concurrency)
                rates[variant] = ok / total
                loads[variant] = len(up.seen) / total
                async with session.get(admin_url(gw, "/metrics")) as resp:
                    text = await resp.text()
        finally:
            await up.stop()
        if variant == "on":
            retried = metric(text, "gateway_upstream_retries_total", 'result="retried"')
            assert retried == len(up.seen) - total
            assert metric(text, "gateway_upstream_retries_total", 'result="budget_exhausted"') > 0
            succeeded = metric(text, "gateway_upstream_retries_total", 'result="succeeded"')
            failed = metric(text, "gateway_upstream_retries_total", 'result="failed"')
            assert succeeded > failed > 0
    print(f"success without retries {rates['off']:.3f}, with {rates['on']:.3f}; "
          f"upstream load {loads['off']:.3f}x / {loads['on']:.3f}x")
    assert 0.62 < rates["off"] < 0.78
    assert rates["on"] >= rates["off"] + 0.05        # success rises ...
    assert loads["off"] == 1.0
    assert loads["on"] <= 1.2                        # ... and the budget holds


async def test_a_retry_goes_to_another_endpoint(tmp_path: Path,
                                                session: aiohttp.ClientSession) -> None:
    first: list[int] = []

    def script(seen: Seen, inflight: int) -> Answer:
        if not first:
            first.append(seen.port)
            return Answer(503)
        return Answer(200)
    up = ScriptedUpstream(script)
    await up.start(listeners=2)
    try:
        async with running_gateway(tmp_path, gateway_yaml(up.urls(), upstream_extra=RETRIES)) \
                as gw, session.get(url_of(gw, "/")) as resp:
            assert resp.status == 200
    finally:
        await up.stop()
    assert [s.port for s in up.seen] == [first[0], next(p for p in up.ports if p != first[0])]


async def test_connection_errors_are_retried(tmp_path: Path,
                                             session: aiohttp.ClientSession) -> None:
    # Each attempt is the first request of its connection (the gateway's pool then cannot take
    # the reset for an idle close): refused by a reset right after the request was read.
    calls: list[int] = []

    def script(seen: Seen, inflight: int) -> Answer:
        calls.append(seen.port)
        return Answer(reset=True) if len(calls) == 1 else Answer(200)
    up = ScriptedUpstream(script)
    await up.start(listeners=2)
    try:
        async with running_gateway(tmp_path, gateway_yaml(up.urls(), upstream_extra=RETRIES)) \
                as gw:
            async with session.get(url_of(gw, "/")) as resp:
                assert resp.status == 200
            async with session.get(admin_url(gw, "/admin/breakers")) as resp:
                assert (await resp.json())[0]["failure_count"] == 0   # the success closed it
            async with session.get(admin_url(gw, "/metrics")) as resp:
                text = await resp.text()
    finally:
        await up.stop()
    assert len(calls) == 2 and calls[0] != calls[1]
    assert metric(text, "gateway_upstream_retries_total", 'result="retried"') == 1
    assert metric(text, "gateway_upstream_retries_total", 'result="succeeded"') == 1


async def test_a_post_is_never_retried(tmp_path: Path,
                                       session: aiohttp.ClientSession) -> None:
    up = ScriptedUpstream(lambda seen, n: Answer(503))
    await up.start(listeners=2)
    try:
        async with running_gateway(tmp_path, gateway_yaml(up.urls(), upstream_extra=RETRIES)) \
                as gw:
            async with session.post(url_of(gw, "/"), data=b"pay once") as resp:
                assert resp.status == 503
            assert [s.method for s in up.seen] == ["POST"]
            async with session.put(url_of(gw, "/"), data=b"idempotent") as resp:
                assert resp.status == 503
            assert [s.method for s in up.seen] == ["POST", "PUT", "PUT", "PUT"]
    finally:
        await up.stop()


async def test_a_body_too_large_to_hold_is_not_retried(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    up = ScriptedUpstream(lambda seen, n: Answer(503))
    await up.start()
    try:
        async with running_gateway(tmp_path, gateway_yaml(up.urls(), upstream_extra=RETRIES)) \
                as gw:
            async with session.put(url_of(gw, "/"), data=b"x" * 200_000) as resp:
                assert resp.status == 503      # streamed upstream: nothing to send again
            assert len(up.seen) == 1
    finally:
        await up.stop()


async def test_no_retry_once_the_response_has_started(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    # Headers and 300 kB of a 1 MB body, then a reset: the client has bytes already.
    up = ScriptedUpstream(lambda seen, n: Answer(200, body=b"y" * 1_000_000, cut_after=300_000))
    await up.start(listeners=2)
    try:
        async with running_gateway(tmp_path, gateway_yaml(up.urls(), upstream_extra=RETRIES)) \
                as gw:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(url_of(gw, "/")) as resp:
                    assert resp.status == 200
                    await resp.read()
            await asyncio.sleep(0.1)
            assert len(up.seen) == 1
            async with session.get(admin_url(gw, "/metrics")) as resp:
                text = await resp.text()
            assert metric(text, "gateway_upstream_retries_total") == 0
    finally:
        await up.stop()


async def test_an_open_circuit_stops_retries(tmp_path: Path,
                                             session: aiohttp.ClientSession) -> None:
    # The first failure opens the circuit: the retry is not let through, and the client gets
    # the upstream's own answer.
    up = ScriptedUpstream(lambda seen, n: Answer(503, body=b"upstream says no\n"))
    await up.start(listeners=2)
    try:
        async with running_gateway(tmp_path, gateway_yaml(
                up.urls(), upstream_extra=f"{RETRIES}\nbreaker: {{failure_threshold: 1}}")) \
                as gw:
            async with session.get(url_of(gw, "/")) as resp:
                assert resp.status == 503 and await resp.read() == b"upstream says no\n"
            assert len(up.seen) == 1
            assert gw.runtime.upstreams["up"].breaker.state == "open"
    finally:
        await up.stop()


async def test_a_timeout_not_listed_is_not_retried(tmp_path: Path,
                                                   session: aiohttp.ClientSession) -> None:
    up = ScriptedUpstream(lambda seen, n: Answer(200, delay_s=2.0))
    await up.start(listeners=2)
    try:
        text = gateway_yaml(up.urls(), upstream_extra=f"{RETRIES}\n{BREAKER}").replace(
            "timeout_s: 2", "timeout_s: 0.3")
        async with running_gateway(tmp_path, text) as gw:
            async with session.get(url_of(gw, "/")) as resp:
                assert resp.status == 504
            assert len(up.seen) == 1
    finally:
        await up.stop()
