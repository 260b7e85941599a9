"""End to end: a real `gateway run` in front of a dead upstream ships its 502/503s to a real
`gateway control`, whose evaluator pages on the SLO, opens an incident (with the breaker opening
on its timeline) and notifies a webhook receiver; the deploy gate then says no."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port, wait_port
from tests.harness import ControlProcess, GatewayProcess, gateway_yaml, write_config
from tests.test_control_support import running

ADMIN = {"Authorization": "Bearer t-admin"}


async def poll(session: aiohttp.ClientSession, url: str, ok, within_s: float) -> dict:
    deadline = time.monotonic() + within_s
    doc: dict = {}
    while time.monotonic() < deadline:
        async with session.get(url, headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
        if ok(doc):
            return doc
        await asyncio.sleep(0.2)
    raise AssertionError(f"not reached within {within_s}s: {doc}")


@pytest.mark.timeout(150)
async def test_failing_upstream_pages_and_opens_an_incident(tmp_path: Path) -> None:
    hooks: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        return web.Response()

    rx = web.Application()
    rx.router.add_post("/hook", hook)
    async with running(rx) as hook_url:
        control = ControlProcess(tmp_path, (
            "slos:\n"
            "  - {name: svc-availability, service: svc, objective: 99.9, window: 30d,"
            " min_events: 20}\n"
            "notifications:\n"
            f"  - {{name: oncall, url: '{hook_url}/hook', min_severity: page, backoff_s: 0.1}}\n"))
        control.start(wait=False)
        cport = control.port
        dead = free_port()                                # nothing listens: 502, then 503s
        port, admin = free_port(), free_port()
        text = gateway_yaml([f"http://127.0.0.1:{dead}"], listen=f"127.0.0.1:{port}",
                            admin=f"127.0.0.1:{admin}") + (
            "control_plane:\n"
            f"  url: http://127.0.0.1:{cport}\n"
            "  token: t-ingest\n"
            "  ship_interval_s: 0.5\n"
            f"  spool_dir: {tmp_path / 'spool'}\n")
        gw = GatewayProcess(write_config(tmp_path, text), port, admin)
        try:
            wait_port(cport)
            gw.start()
            curl = f"http://127.0.0.1:{cport}"
            async with aiohttp.ClientSession() as session:
                codes = []
                for _ in range(60):
                    async with session.get(f"{gw.url}/pay") as resp:
                        codes.append(resp.status)
                        await resp.read()
                assert set(codes) <= {502, 503} and 503 in codes   # the breaker opened
                # shipped every 0.5 s, evaluated every 5 s, burn windows of complete minutes:
                # a page once the minute of the failures has ended, within 5 s of it
                doc = await poll(session, f"{curl}/v1/alerts",
                                 lambda d: any(a["severity"] == "page" and a["source"] == "slo"
                                               for a in d["alerts"]), within_s=80)
                page = next(a for a in doc["alerts"]
                            if a["severity"] == "page" and a["source"] == "slo")
                assert page["slo_id"] == "svc-availability" and page["incident_id"]
                inc = await poll(session, f"{curl}/v1/incidents/{page['incident_id']}",
                                 lambda d: any(e["kind"] == "breaker" for e in d["timeline"]),
                                 within_s=15)
                assert inc["severity"] == "SEV-1" and inc["affected_service"] == "svc"
                assert inc["status"] == "investigating" and inc["alert_ids"] == [page["id"]]
                assert any("circuit breaker of up opened" in e["text"] for e in inc["timeline"])
                async with session.get(f"{curl}/v1/health/overview", headers=ADMIN) as resp:
                    overview = await resp.json()
                assert [i["id"] for i in overview["incidents"]] == [inc["id"]]
                async with session.get(f"{curl}/v1/deploy-gate/svc", headers=ADMIN) as resp:
                    gate = await resp.json()
                assert gate["decision"] == "blocked" and gate["allowed"] is False
                assert gate["blocking_incidents"] == [inc["id"]]
                deadline = time.monotonic() + 10
                while not hooks and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert hooks and hooks[0]["version"] == "4"
                assert hooks[0]["alerts"][0]["labels"]["slo"] == "svc-availability"
        finally:
            gw.stop()
            control.stop()
