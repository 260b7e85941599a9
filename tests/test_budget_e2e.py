"""Budget enforcement end to end: real `gateway run` + `gateway control` processes.

A 1-cent budget at $0.001 a request is exhausted by the 10th request; the 429s must begin within
two ship intervals of it, and raising the budget (PUT) must lift them within two ship intervals."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.control.domain import budgets as bm
from tests.conftest import free_port, wait_port
from tests.harness import ControlProcess, GatewayProcess, gateway_yaml, write_config

ADMIN = {"Authorization": "Bearer t-admin"}
INTERVAL = 0.5
PACE = 0.02          # one request every 20 ms
SLACK = 0.15         # one request's round trip and process scheduling on a busy machine


@pytest.mark.timeout(60)
async def test_budget_exhaustion_rejects_within_two_ship_intervals_and_raising_lifts(
        tmp_path: Path) -> None:
    control = ControlProcess(tmp_path, (
        "cost_models:\n"
        "  svc: {per_request: 0.001}\n"
        "budgets:\n"
        "  - {name: tiny, service: svc, period: monthly, amount_cents: 1, enforce: true}\n"))
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
            "control_plane:\n"
            f"  url: http://127.0.0.1:{cport}\n"
            "  token: t-ingest\n"
            f"  ship_interval_s: {INTERVAL}\n"
            f"  spool_dir: {tmp_path / 'spool'}\n")
        gw = GatewayProcess(write_config(tmp_path, text), port, admin)
        gw.start()
        curl = f"http://127.0.0.1:{cport}"
        async with aiohttp.ClientSession() as s:
            # 1. traffic until the first 429
            ok = 0
            t_exhausted = None
            first_429 = None
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                async with s.get(f"{gw.url}/x") as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        ok += 1
                        if ok == 10:              # 10 x $0.001 = 1 cent: the budget is spent
                            t_exhausted = time.monotonic()
                    else:
                        assert resp.status == 429, (resp.status, body)
                        first_429 = (time.monotonic(), dict(resp.headers), body, time.time())
                        break
                await asyncio.sleep(PACE)
            assert first_429 is not None and t_exhausted is not None, gw.logs()[-3000:]
            t_429, headers, body, wall = first_429
            assert t_429 - t_exhausted <= 2 * INTERVAL + SLACK, t_429 - t_exhausted
            assert headers["Content-Type"] == "application/problem+json"
            _, period_end = bm.period_bounds("monthly", wall)
            assert abs(int(headers["Retry-After"]) - (period_end - wall)) <= 3
            import orjson
            doc = orjson.loads(body)
            assert doc["type"] == "https://gateway.dev/problems/budget-exhausted"
            assert doc["status"] == 429 and doc["budget"] == "tiny" and doc["service"] == "svc"
            for _ in range(5):                    # and it stays rejected
                async with s.get(f"{gw.url}/x") as resp:
                    assert resp.status == 429
                    await resp.read()

            # 2. the report agrees; an admin raises the budget
            async with s.get(f"{curl}/v1/budgets", headers=ADMIN) as resp:
                rep = await resp.json()
            (b,) = rep["budgets"]
            assert b["status"] == "OVER_BUDGET" and b["enforcement"] == "rejecting"
            assert rep["directives"]["reject_services"]["svc"]["budget"] == "tiny"
            async with s.put(f"{curl}/v1/budgets/{b['id']}", headers=ADMIN,
                             json={"amount_cents": 100_000, "reason": "e2e"}) as resp:
                assert resp.status == 200, await resp.text()
            t_put = time.monotonic()
            lifted = None
            while time.monotonic() < t_put + 10:
                async with s.get(f"{gw.url}/x") as resp:
                    await resp.read()
                    if resp.status == 200:
                        lifted = time.monotonic()
                        break
                    assert resp.status == 429
                await asyncio.sleep(PACE)
            assert lifted is not None
            assert lifted - t_put <= 2 * INTERVAL + SLACK, lifted - t_put
            print(f"reject after {t_429 - t_exhausted:.3f}s, lift after {lifted - t_put:.3f}s")
    finally:
        if gw is not None:
            gw.stop()
        control.stop()
        upstream.terminate()
        upstream.wait(timeout=15)
