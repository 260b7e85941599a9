"""Adaptive concurrency end to end: the real `gateway run` process in front of an upstream (its
own process) whose latency climbs from 5 ms to 500 ms when more than 20 requests are in flight,
60 clients that wait 0.1 s after a 503.

The admitted requests' latency is read from the gateway's own histogram
(gateway_upstream_duration_seconds counts only the requests it forwarded) between two scrapes
after the warm-up: on a machine shared with other jobs the clients' own event loop adds
queueing of its own to what they measure (printed too)."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.harness import GatewayProcess, gateway_yaml, write_config
from tests.scripted import KneeProcess, closed_loop, histogram, share_within

CLIENTS = 60
UPSTREAM_DURATION = "gateway_upstream_duration_seconds"


def start_gateway(tmp_path: Path, up: KneeProcess, extra: str, name: str) -> GatewayProcess:
    port, admin = free_port(), free_port()
    text = gateway_yaml([up.url], listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}",
                        upstream_extra=f"timeout_s: 10\nmax_connections: 200\n{extra}")
    gw = GatewayProcess(write_config(tmp_path, text, f"{name}.yaml"), port, admin)
    gw.start()
    return gw


def scrape(gw: GatewayProcess) -> str:
    with urllib.request.urlopen(gw.admin + "/metrics", timeout=5) as resp:
        return resp.read().decode()


async def measure(gw: GatewayProcess, warmup_s: float,
                  duration_s: float) -> tuple[float, float, object, str]:
    """(admitted requests forwarded after the warm-up, the share of them answered by the
    upstream within 100 ms, the clients' LoadResult, the last scrape)."""
    before: dict[float, float] = {}

    async def mark() -> None:
        await asyncio.sleep(warmup_s)
        before.update(histogram(await asyncio.to_thread(scrape, gw), UPSTREAM_DURATION,
                                'upstream="up"'))
    task = asyncio.create_task(mark())
    result = await closed_loop(gw.url + "/", CLIENTS, duration_s=duration_s, warmup_s=warmup_s)
    await task
    text = await asyncio.to_thread(scrape, gw)
    n, share = share_within(before, histogram(text, UPSTREAM_DURATION, 'upstream="up"'), 0.1)
    return n, share, result, text


@pytest.mark.timeout(120)
async def test_adaptive_concurrency_keeps_admitted_latency_low_and_refuses_the_excess_fast(
        tmp_path: Path) -> None:
    up = KneeProcess(threshold=20, fast_s=0.005, slow_s=0.5)
    up.start()
    try:
        gw = start_gateway(tmp_path, up, "", "plain")
        try:
            n_plain, share_plain, plain, _ = await measure(gw, 0.5, 2.0)
        finally:
            gw.stop()
        gw = start_gateway(tmp_path, up, "concurrency: {adaptive: true, min: 4, max: 200}",
                           "adaptive")
        try:
            # The limit starts at max and learns within a few round trips of 500 ms.
            n_adaptive, share_adaptive, adaptive, metrics = await measure(gw, 5.0, 4.0)
        finally:
            gw.stop()
    finally:
        up.stop()
    print(f"\nwithout: {n_plain:.0f} forwarded, {share_plain:.1%} within 100 ms "
          f"(clients: p99 {plain.p99_ms():.0f} ms); "
          f"with: {n_adaptive:.0f} forwarded, {share_adaptive:.2%} within 100 ms "
          f"(clients: p99 {adaptive.p99_ms():.0f} ms), {len(adaptive.refused_s)} refused "
          f"(clients: p99 {adaptive.p99_ms('refused'):.0f} ms)")
    # Without: every request queues in the upstream.
    assert not plain.refused_s and share_plain < 0.5
    # With: p99 of the admitted under 100 ms, the excess refused at once, more work done.
    assert share_adaptive >= 0.99
    assert adaptive.refused_s and adaptive.p99_ms("refused") < 250
    assert n_adaptive > 2 * n_plain
    limit = [line for line in metrics.splitlines()
             if line.startswith('gateway_upstream_concurrency_limit{upstream="up"}')]
    assert limit and 4 <= float(limit[0].rsplit(" ", 1)[1]) <= 24
    assert 'gateway_shed_requests_total{reason="concurrency",route="main"}' in metrics
