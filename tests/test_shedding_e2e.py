"""Shedding by priority end to end: a real `gateway control` (its evaluator, SLOs and alerts), a
real `gateway run` shipping to it every 0.5 s, a real upstream. The service's error budget burns
at 20x (2 % errors against a 99.9 % objective): the page alert opens, the next ingest answers
tell the gateway, its `low` route is shed while the `critical` one keeps answering 200, and the
shedding stops once the alert is resolved.

(The evaluator's burn windows are made of complete minutes, so the page takes up to about a
minute to open; the alert is resolved by hand: resolving by itself needs the 5-minute window to
clear.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port, wait_port
from tests.harness import ControlProcess, GatewayProcess, write_config
from tests.scripted import Answer, ScriptedUpstream, Seen

ADMIN = {"Authorization": "Bearer t-admin"}
SHIP_S = 0.5
REDUCED = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"


def gateway_config(upstream: str, port: int, admin: int, cport: int, spool: Path) -> str:
    return (f'listen: "127.0.0.1:{port}"\n'
            f'admin: {{listen: "127.0.0.1:{admin}"}}\n'
            "upstreams:\n"
            f'  - {{name: up, endpoints: ["{upstream}"], breaker: {{failure_threshold: 1000}}}}\n'
            "routes:\n"
            '  - {name: checkout, match: {path_prefix: "/checkout"}, upstream: up, service: svc,'
            " priority: critical}\n"
            '  - {name: search, match: {path_prefix: "/search"}, upstream: up, service: svc,'
            " priority: low}\n"
            '  - {name: reports, match: {path_prefix: "/reports"}, upstream: up, service: svc}\n'
            "shedding: {on_burn_rate_alert: true}\n"
            "control_plane:\n"
            f"  url: http://127.0.0.1:{cport}\n"
            "  token: t-ingest\n"
            f"  ship_interval_s: {SHIP_S}\n"
            f"  spool_dir: {spool}\n")


@pytest.mark.timeout(180)
async def test_a_burning_budget_sheds_the_low_route_and_spares_the_critical_one(
        tmp_path: Path) -> None:
    def script(seen: Seen, inflight: int) -> Answer:
        return Answer(500 if seen.path.startswith("/reports") else 200)
    up = ScriptedUpstream(script)
    await up.start()
    control = ControlProcess(tmp_path, (
        "slos:\n"
        "  - {name: svc-availability, service: svc, objective: 99.9, window: 30d,"
        " min_events: 20}\n"))
    control.start(wait=False)
    cport = control.port
    port, admin = free_port(), free_port()
    gw = GatewayProcess(write_config(tmp_path, gateway_config(up.urls()[0], port, admin, cport,
                                                              tmp_path / "spool")), port, admin)
    results: dict[str, list[tuple[float, int, str]]] = {"checkout": [], "search": []}
    stop_bad = asyncio.Event()
    stop = asyncio.Event()
    try:
        wait_port(cport)
        gw.start()
        curl = f"http://127.0.0.1:{cport}"
        async with aiohttp.ClientSession() as session:

            async def traffic() -> None:
                # 49 good requests (critical and low) to 1 failing one: 2 % errors, 20x the
                # 0.1 % budget of a 99.9 % objective.
                i = 0
                while not stop.is_set():
                    i += 1
                    if i % 50 == 0:
                        if not stop_bad.is_set():
                            async with session.get(f"{gw.url}/reports") as resp:
                                await resp.read()
                        continue
                    route = "checkout" if i % 2 else "search"
                    async with session.get(f"{gw.url}/{route}") as resp:
                        body = await resp.read()
                        results[route].append((time.monotonic(), resp.status,
                                               body.decode(errors="replace")))
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(traffic())
            try:
                # Evaluate now and then until the page opens.
                page = None
                deadline = time.monotonic() + 120
                while page is None and time.monotonic() < deadline:
                    async with session.post(f"{curl}/v1/admin/evaluate", headers=ADMIN) as resp:
                        assert resp.status == 200, await resp.text()
                    async with session.get(f"{curl}/v1/alerts", headers=ADMIN) as resp:
                        alerts = (await resp.json())["alerts"]
                    page = next((a for a in alerts if a["severity"] == "page"
                                 and a["source"] == "slo" and a["status"] != "resolved"), None)
                    if page is None:
                        await asyncio.sleep(1.0)
                opened = time.monotonic()
                assert page is not None and page["service"] == "svc"

                # Within two ship intervals (and a little for a busy machine) the low route
                # is shed, with the reason.
                while not any(t > opened and s == 503 for t, s, _ in results["search"]):
                    assert time.monotonic() - opened < 2 * SHIP_S + 1.5, "not shed in time"
                    await asyncio.sleep(0.05)
                first_shed = next(t for t, s, _ in results["search"] if t > opened and s == 503)
                shed_after = first_shed - opened
                await asyncio.sleep(1.0)
                shed_body = next(b for t, s, b in results["search"] if s == 503)
                assert '"reason":"shedding"' in shed_body.replace(" ", "")
                assert REDUCED in shed_body
                during = [s for t, s, _ in results["search"] if t > first_shed + 0.1]
                assert during and set(during) == {503}

                # Resolved: the next answers carry no directive and the route serves again.
                stop_bad.set()
                async with session.post(f"{curl}/v1/alerts/{page['id']}/resolve",
                                        headers=ADMIN, json={"reason": "mitigated"}) as resp:
                    assert resp.status == 200, await resp.text()
                resolved = time.monotonic()
                while not any(t > resolved + 0.05 and s == 200 for t, s, _ in results["search"]):
                    assert time.monotonic() - resolved < 2 * SHIP_S + 1.5, "still shedding"
                    await asyncio.sleep(0.05)
                unshed = next(t for t, s, _ in results["search"]
                              if t > resolved + 0.05 and s == 200) - resolved
                await asyncio.sleep(0.5)
                after = [s for t, s, _ in results["search"] if t > resolved + unshed + 0.1]
                assert after and set(after) == {200}
            finally:
                stop.set()
                await task
            async with session.get(f"{gw.admin}/metrics") as resp:
                metrics = await resp.text()
        checkout = [s for _, s, _ in results["checkout"]]
        print(f"\nshed {shed_after:.2f} s after the page opened, served again {unshed:.2f} s "
              f"after it resolved; critical route {checkout.count(200)}/{len(checkout)} 200s")
        assert checkout and set(checkout) == {200}          # critical: 100 % success
        assert 'gateway_shed_requests_total{reason="shedding",route="search"}' in metrics \
            or 'gateway_shed_requests_total{route="search",reason="shedding"}' in metrics
    finally:
        gw.stop()
        control.stop()
        await up.stop()
