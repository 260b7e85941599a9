"""Aggregates from a real `gateway run` to a real `gateway control`: exact, lossless, idempotent."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from hdrh.histogram import HdrHistogram

from tests.conftest import free_port, wait_port
from tests.harness import ControlProcess, GatewayProcess, gateway_yaml, write_config

ADMIN = {"Authorization": "Bearer t-admin"}


async def route_rows(session: aiohttp.ClientSession, control: ControlProcess) -> list[dict]:
    async with session.get(f"{control.url}/v1/signals",
                           params={"service": "svc", "route": "main", "window": "1h",
                                   "since": str(int(time.time()) - 7200)},
                           headers=ADMIN) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    return doc["rows"] if isinstance(doc, dict) else doc


async def request_count(session: aiohttp.ClientSession, control: ControlProcess) -> int:
    return sum(r["request_count"] for r in await route_rows(session, control))


async def wait_for_count(session: aiohttp.ClientSession, control: ControlProcess,
                         expected: int, within_s: float) -> int:
    deadline = time.monotonic() + within_s
    count = -1
    while time.monotonic() < deadline:
        count = await request_count(session, control)
        if count >= expected:
            break
        await asyncio.sleep(0.1)
    return count


@pytest.mark.timeout(90)
async def test_counts_are_exact_through_a_control_plane_outage(tmp_path: Path) -> None:
    control = ControlProcess(tmp_path)
    control.start()
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "gateway", "demo-upstream", "--listen",
                                 f"127.0.0.1:{up_port}"], stderr=subprocess.DEVNULL)
    wait_port(up_port)
    port, admin = free_port(), free_port()
    interval = 0.5
    text = gateway_yaml([f"http://127.0.0.1:{up_port}"], listen=f"127.0.0.1:{port}",
                        admin=f"127.0.0.1:{admin}") + (
        "control_plane:\n"
        f"  url: {control.url}\n"
        "  token: t-ingest\n"
        f"  ship_interval_s: {interval}\n"
        f"  spool_dir: {tmp_path / 'spool'}\n")
    gw = GatewayProcess(write_config(tmp_path, text), port, admin)
    gw.start()
    observed_ms: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            async def send(n: int) -> None:
                for i in range(n):
                    t0 = time.perf_counter()
                    async with session.get(f"{gw.url}/delay/{(i % 5) * 4}") as resp:
                        assert resp.status == 200
                        await resp.read()
                    observed_ms.append((time.perf_counter() - t0) * 1000)

            n = 120
            await send(n)
            assert await wait_for_count(session, control, n, within_s=2 * interval + 3) == n

            control.stop()                      # the control plane goes away ...
            m = 80
            await send(m)
            await asyncio.sleep(3 * interval)   # ... batches are spooled meanwhile
            spooled = list((tmp_path / "spool").glob("*"))
            assert spooled, "nothing was spooled while the control plane was down"
            control.start()
            assert await wait_for_count(session, control, n + m, within_s=15) == n + m
            await asyncio.sleep(3 * interval)   # and nothing arrives twice afterwards
            assert await request_count(session, control) == n + m

            rows = await route_rows(session, control)
            hist = HdrHistogram(1, 60_000_000, 2)
            for ms in observed_ms:
                hist.record_value(int(ms * 1000))
            # The gateway's own latency is below what the client observed, never above it.
            p50 = max(r["latency_p50_ms"] for r in rows)
            p99 = max(r["latency_p99_ms"] for r in rows)
            assert 0 < p50 <= hist.get_value_at_percentile(50) / 1000 * 1.01 + 0.5
            assert 0 < p99 <= hist.get_value_at_percentile(99) / 1000 * 1.01 + 0.5
            assert p50 >= 8 * 0.99             # the median upstream delay was 8 ms
            assert p99 >= 16 * 0.99            # the slowest upstream delay was 16 ms
    finally:
        gw.stop()
        control.stop()
        upstream.terminate()
        upstream.wait(timeout=10)
