"""A real Prometheus (Debian's `prometheus`) scraping a real `gateway run` every second: the
response-bytes counter it stores equals the body bytes a client read, for 200s, the gateway's own
429s and 502s."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port, wait_port
from tests.harness import GatewayProcess, Upstream, write_config

PROMETHEUS = "prometheus"


async def _query(s: aiohttp.ClientSession, base: str, expr: str) -> dict[str, float]:
    """{route label: value} of an instant query."""
    async with s.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        doc = await resp.json()
    assert doc["status"] == "success", doc
    return {r["metric"].get("route", ""): float(r["value"][1]) for r in doc["data"]["result"]}


@pytest.mark.timeout(60)
async def test_prometheus_stores_exactly_the_bytes_the_client_read(tmp_path: Path) -> None:
    upstream = Upstream()
    await upstream.start()
    port, admin = free_port(), free_port()
    gw = GatewayProcess(write_config(tmp_path, (
        f'listen: "127.0.0.1:{port}"\n'
        f'admin: {{listen: "127.0.0.1:{admin}"}}\n'
        "upstreams:\n"
        f'  - {{name: up, endpoints: ["{upstream.url}"]}}\n'
        f'  - {{name: dead, endpoints: ["http://127.0.0.1:{free_port()}"],'
        " connect_timeout_s: 1, breaker: {failure_threshold: 1000}}\n"
        "routes:\n"
        '  - {name: ok, match: {path_prefix: "/ok"}, upstream: up, strip_prefix: true,'
        " limits: [few]}\n"
        '  - {name: gone, match: {path_prefix: "/gone"}, upstream: dead}\n'
        'limits: [{name: few, key: ip_address, rate: "1/hour", burst: 29}]\n')), port, admin)
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: gateway\n"
        "    scrape_interval: 1s\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{admin}']}}]\n")
    prom: asyncio.subprocess.Process | None = None
    try:
        gw.start()
        prom = await asyncio.create_subprocess_exec(
            PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path)
        read: dict[str, int] = {"ok": 0, "gone": 0}
        codes: list[int] = []
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            for i in range(50):                 # 30 admitted (bodies of 0..2900 bytes), 20 429s
                async with s.get(f"{gw.url}/ok/bytes/{i * 100}") as resp:
                    read["ok"] += len(await resp.read())
                    codes.append(resp.status)
            for _ in range(10):
                async with s.get(f"{gw.url}/gone/x") as resp:
                    read["gone"] += len(await resp.read())
                    codes.append(resp.status)
            assert (codes.count(200), codes.count(429), codes.count(502)) == (30, 20, 10)

        async with aiohttp.ClientSession() as s:
            wait_port(prom_port, timeout=20)
            base = f"http://127.0.0.1:{prom_port}"
            # the port opens before the TSDB is ready: queries answer 503 until /-/ready is 200
            ready_by = time.monotonic() + 20
            while True:
                async with s.get(f"{base}/-/ready") as resp:
                    if resp.status == 200:
                        break
                assert time.monotonic() < ready_by, "prometheus never became ready"
                await asyncio.sleep(0.2)
            expr = "sum by (route) (gateway_response_bytes_total)"
            got: dict[str, float] = {}
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:      # scraped every second
                got = await _query(s, base, expr)
                if got == {k: float(v) for k, v in read.items()}:
                    break
                await asyncio.sleep(0.5)
            assert got == {k: float(v) for k, v in read.items()}, (got, read)
            # and the requests of the same scrapes, per status
            for code, n in (("200", 30), ("429", 20), ("502", 10)):
                assert await _query(s, base, f'sum(gateway_requests_total{{code="{code}"}})') \
                    == {"": float(n)}, code
    finally:
        if prom is not None and prom.returncode is None:
            prom.terminate()
            try:
                await asyncio.wait_for(prom.wait(), 10)
            except TimeoutError:
                prom.kill()
                await asyncio.wait_for(prom.wait(), 5)
        gw.stop()
        await upstream.stop()
