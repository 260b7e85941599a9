"""Runtime tenant changes end to end: real `gateway run` + `gateway control` processes.

An override with a future effective_date changes nothing until then and applies within two ship
intervals of it, without a reload; with the control plane gone, the gateway keeps the last table;
the control plane reports the tenant's usage per window from the shipped counts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port, wait_port
from tests.harness import ControlProcess, GatewayProcess, gateway_yaml, write_config

ADMIN = {"Authorization": "Bearer t-admin"}
INTERVAL = 0.5
PACE = 0.02
SLACK = 0.2


@pytest.mark.timeout(90)
async def test_future_override_applies_within_two_intervals_and_survives_control_outage(
        tmp_path: Path) -> None:
    control = ControlProcess(tmp_path)
    control.start(wait=False)
    cport = control.port
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "gateway", "demo-upstream", "--listen",
                                 f"127.0.0.1:{up_port}"], stderr=subprocess.DEVNULL)
    gw: GatewayProcess | None = None
    try:
        wait_port(cport)
        wait_port(up_port)
        port, admin = free_port(), free_port()
        text = gateway_yaml([f"http://127.0.0.1:{up_port}"], listen=f"127.0.0.1:{port}",
                            admin=f"127.0.0.1:{admin}") + (
            "tenants:\n"
            "  default_plan: free\n"
            "  plans:\n"
            "    free: {quotas: {day: 5}}\n"
            "control_plane:\n"
            f"  url: http://127.0.0.1:{cport}\n"
            "  token: t-ingest\n"
            f"  ship_interval_s: {INTERVAL}\n"
            f"  spool_dir: {tmp_path / 'spool'}\n")
        gw = GatewayProcess(write_config(tmp_path, text), port, admin)
        gw.start()
        curl = f"http://127.0.0.1:{cport}"
        hdr = {"X-Tenant-Id": "t1"}
        async with aiohttp.ClientSession() as s:
            async def status() -> int:
                async with s.get(f"{gw.url}/x", headers=hdr) as resp:
                    await resp.read()
                    return resp.status

            assert [await status() for _ in range(6)] == [200] * 5 + [429]
            effective = time.time() + 2.0
            async with s.post(f"{curl}/v1/tenants/t1/quotas", headers=ADMIN,
                              json={"daily_quota": 50, "effective_date": effective,
                                    "reason": "incident"}) as resp:
                assert resp.status == 201, await resp.text()
                assert (await resp.json())["pending"] is True
            # nothing changes before the effective date
            while time.time() < effective - 0.1:
                assert await status() == 429
                await asyncio.sleep(PACE)
            t_lift = None
            while time.time() < effective + 5:
                if await status() == 200:
                    t_lift = time.time()
                    break
                await asyncio.sleep(PACE)
            assert t_lift is not None, gw.logs()[-3000:]
            assert t_lift - effective <= 2 * INTERVAL + SLACK, t_lift - effective
            # the control plane goes away: the gateway keeps the last table
            control.stop()
            await asyncio.sleep(3 * INTERVAL)
            results = [await status() for _ in range(10)]
            assert results.count(200) == 10, results
            print(f"override applied {t_lift - effective:.3f}s after its effective date")
        # usage reached the control plane while it ran
        control.start(wait=False)
        wait_port(cport)
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 10
            day = None
            while time.monotonic() < deadline:
                async with s.get(f"{curl}/v1/tenants/t1", headers=ADMIN) as resp:
                    if resp.status == 200:
                        doc = await resp.json()
                        day = next(u for u in doc["usage"] if u["window"] == "day")
                        if day["current_usage"] >= 16:
                            break
                await asyncio.sleep(0.2)
            assert day is not None and day["current_usage"] == 16, day   # 5 + 1 + 10
            assert day["limit"] == 50 and doc["plan"] == "free"
    finally:
        if gw is not None:
            gw.stop()
        control.stop()
        upstream.terminate()
        upstream.wait(timeout=15)
