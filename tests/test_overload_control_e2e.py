"""Overload protection reaches the control plane: a real `gateway control`, a real `gateway run`
shipping to it every 0.5 s, a real upstream. The gateway retries an upstream that fails every
other request and refuses requests over its adaptive concurrency limit; the service's signals
(what the dashboard's service page reads) then show the retries, the limit and the refusals."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port, wait_port
from tests.harness import ControlProcess, GatewayProcess, write_config
from tests.scripted import Answer, ScriptedUpstream, Seen

ADMIN = {"Authorization": "Bearer t-admin"}
SHIP_S = 0.5


def gateway_config(upstream: str, port: int, admin: int, cport: int, spool: Path) -> str:
    return (f'listen: "127.0.0.1:{port}"\n'
            f'admin: {{listen: "127.0.0.1:{admin}"}}\n'
            "upstreams:\n"
            f'  - name: up\n    endpoints: ["{upstream}"]\n'
            "    breaker: {failure_threshold: 1000}\n"
            "    retries: {attempts: 2, on: [503], budget_ratio: 0.2}\n"
            "    concurrency: {adaptive: true, min: 2, max: 4}\n"
            "routes:\n"
            '  - {name: flaky, match: {path_prefix: "/flaky"}, upstream: up, service: svc}\n'
            '  - {name: slow, match: {path_prefix: "/slow"}, upstream: up, service: svc}\n'
            "control_plane:\n"
            f"  url: http://127.0.0.1:{cport}\n"
            "  token: t-ingest\n"
            f"  ship_interval_s: {SHIP_S}\n"
            f"  spool_dir: {spool}\n")


@pytest.mark.timeout(120)
async def test_retries_concurrency_limit_and_refusals_arrive_in_the_control_plane(
        tmp_path: Path) -> None:
    flaky = itertools.count()

    def script(seen: Seen, inflight: int) -> Answer:
        if seen.path.startswith("/slow"):
            return Answer(200, delay_s=0.3)
        return Answer(503 if next(flaky) % 2 == 0 else 200)
    up = ScriptedUpstream(script)
    await up.start()
    control = ControlProcess(tmp_path)
    control.start(wait=False)
    cport = control.port
    port, admin = free_port(), free_port()
    gw = GatewayProcess(write_config(tmp_path, gateway_config(up.urls()[0], port, admin, cport,
                                                              tmp_path / "spool")), port, admin)
    try:
        wait_port(cport)
        gw.start()
        async with aiohttp.ClientSession() as session:
            # Every other upstream answer is a 503: the retry turns it into a 200.
            flaky_codes = []
            for _ in range(20):
                async with session.get(f"{gw.url}/flaky") as resp:
                    await resp.read()
                    flaky_codes.append(resp.status)
            assert flaky_codes.count(200) == 20

            # 16 requests at once against a limit of at most 4: the excess is refused.
            async def slow() -> int:
                async with session.get(f"{gw.url}/slow") as resp:
                    await resp.read()
                    return resp.status
            slow_codes = await asyncio.gather(*(slow() for _ in range(16)))
            refused = slow_codes.count(503)
            assert refused >= 12 - 4, slow_codes

            overload: dict[str, Any] = {}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                now = time.time()
                async with session.get(
                        f"http://127.0.0.1:{cport}/v1/signals", headers=ADMIN,
                        params={"service": "svc", "window": "1m", "since": str(now - 600),
                                "until": str(now + 120)}) as resp:
                    assert resp.status == 200, await resp.text()
                    overload = (await resp.json())["overload"]
                routes = {r["route"]: r for r in overload["routes"]}
                ups = overload["upstreams"]
                if ups and ups[0]["retries"].get("retried", 0) >= 20 \
                        and routes.get("slow", {}).get("concurrency", 0) >= refused:
                    break
                await asyncio.sleep(SHIP_S)
    finally:
        gw.stop()
        control.stop()
        await up.stop()
    print(f"\ncontrol plane overload block: {overload}")
    [u] = overload["upstreams"]
    assert u["upstream"] == "up"
    # each request's first attempt got the 503, its retry the 200
    assert u["retries"]["retried"] == 20 and u["retries"]["succeeded"] == 20
    assert 2 <= u["concurrency_limit"] <= 4 and u["gateways"] == 1
    routes = {r["route"]: r for r in overload["routes"]}
    assert routes["slow"] == {"route": "slow", "shed": 0, "concurrency": refused}
    assert "flaky" not in routes
