"""The whole program: `gateway run` as a subprocess, driven as an operator would drive it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from tests.conftest import ROOT, free_port, wait_port
from tests.harness import GatewayProcess, gateway_yaml, write_config

MiB = 1024 * 1024


def start_gateway(tmp_path: Path, upstream: str, *, extra: str = "",
                  upstream_extra: str = "") -> GatewayProcess:
    port, admin = free_port(), free_port()
    text = gateway_yaml([upstream], listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}",
                        extra=extra, upstream_extra=upstream_extra).replace(
        "timeout_s: 2", "timeout_s: 20")
    gw = GatewayProcess(write_config(tmp_path, text), port, admin)
    gw.start()
    return gw


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def test_quick_start_default_config_proxies_to_the_demo_upstream(tmp_path: Path) -> None:
    """`gateway run` on the shipped default config (ports moved to free ones)."""
    ports = {p: free_port() for p in ("8080", "9901", "9001", "9000")}
    text = (ROOT / "config" / "gateway.yaml").read_text()
    for old, new in ports.items():
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    control = (ROOT / "config" / "control.yaml").read_text().replace(
        "127.0.0.1:9000", f"127.0.0.1:{ports['9000']}")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "control.yaml").write_text(control)
    cfg = write_config(tmp_path / "config", text)
    gw = GatewayProcess(cfg, ports["8080"], ports["9901"])
    gw.start()
    try:
        import urllib.request
        with urllib.request.urlopen(f"{gw.url}/", timeout=5) as resp:
            body = orjson.loads(resp.read())
            assert resp.status == 200
            assert body["service"] == "demo"
            assert resp.headers["RateLimit-Policy"] == '"api_calls";q=100;w=1'
        wait_port(ports["9000"], timeout=20)  # the embedded control plane came up too
    finally:
        assert gw.stop() == 0, gw.logs()
    first = gw.logs().splitlines()
    started = [orjson.loads(line) for line in first if '"gateway started"' in line]
    assert started and started[0]["version"] and started[0]["listen"].endswith(str(ports["8080"]))


async def test_50mib_upload_and_download_stream_with_flat_rss(
        tmp_path: Path, demo_upstream: str, session: aiohttp.ClientSession) -> None:
    gw = start_gateway(tmp_path, demo_upstream)
    try:
        proc = psutil.Process(gw.proc.pid)  # type: ignore[union-attr]
        async with session.get(f"{gw.url}/") as resp:
            await resp.read()
        rss_before = proc.memory_info().rss
        peak = rss_before

        async def body() -> AsyncIterator[bytes]:
            nonlocal peak
            chunk = b"u" * (256 * 1024)
            for i in range(200):            # 50 MiB
                if i % 20 == 0:
                    peak = max(peak, proc.memory_info().rss)
                yield chunk

        async with session.post(f"{gw.url}/upload", data=body(),
                                headers={"Content-Length": str(50 * MiB)}) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "bytes": 50 * MiB, "sha256": hashlib.sha256(b"u" * (50 * MiB)).hexdigest()}
        async with session.get(f"{gw.url}/bytes/{50 * MiB}") as resp:
            received = 0
            async for chunk in resp.content.iter_chunked(1024 * 1024):
                received += len(chunk)
                if received % (10 * MiB) < MiB:
                    peak = max(peak, proc.memory_info().rss)
        assert received == 50 * MiB
        peak = max(peak, proc.memory_info().rss)
        assert peak - rss_before < 16 * MiB, (rss_before, peak)
    finally:
        gw.stop()


async def _load(url: str, stop: asyncio.Event, results: list[int]) -> None:
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                async with s.get(url) as resp:
                    await resp.read()
                    results.append(resp.status)
            except aiohttp.ClientError as exc:
                results.append(-1)
                print("client error", exc)


async def test_reload_under_load_good_and_bad_files_zero_failures(
        tmp_path: Path, demo_upstream: str, session: aiohttp.ClientSession) -> None:
    gw = start_gateway(tmp_path, demo_upstream)
    try:
        stop = asyncio.Event()
        results: list[int] = []
        workers = [asyncio.create_task(_load(f"{gw.url}/delay/5", stop, results))
                   for _ in range(8)]
        await asyncio.sleep(0.3)
        original = gw.config_path.read_text()
        versions = []
        for i in range(6):
            if i % 2 == 0:   # a good change: a second route, a new drain_s
                gw.config_path.write_text(original.replace("drain_s: 5", f"drain_s: {5 + i}"))
            else:            # a bad file: the old config keeps serving
                gw.config_path.write_text(original + "routes_typo: []\n")
            if i < 3:
                gw.signal(signal.SIGHUP)
                await asyncio.sleep(0.3)
            else:
                async with session.post(f"{gw.admin}/admin/reload") as resp:
                    assert resp.status == (200 if i % 2 == 0 else 400)
                    versions.append((await resp.json()).get("version"))
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*workers)
        assert len(results) > 100
        assert set(results) == {200}, {s: results.count(s) for s in set(results)}
        async with session.get(f"{gw.admin}/metrics") as resp:
            text = await resp.text()
        assert 'gateway_config_reloads_total{result="success"} 3.0' in text
        assert 'gateway_config_reloads_total{result="failure"} 3.0' in text
        logs = gw.logs()
        assert "reload rejected" in logs and "routes_typo: unknown key" in logs
    finally:
        gw.stop()


async def test_sigterm_drains_in_flight_requests(tmp_path: Path, demo_upstream: str) -> None:
    gw = start_gateway(tmp_path, demo_upstream)
    async with aiohttp.ClientSession() as s:
        slow = asyncio.create_task(s.get(f"{gw.url}/delay/1500"))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        resp = await slow
        assert resp.status == 200 and (await resp.json()) == {"delayed_ms": 1500}
        resp.release()
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientError):   # no longer accepting
            async with aiohttp.ClientSession() as s2:
                await s2.get(f"{gw.url}/", timeout=aiohttp.ClientTimeout(total=2))
    code = gw.proc.wait(timeout=10)  # type: ignore[union-attr]
    assert code == 0
    assert time.monotonic() - t0 < 8
    gw.stop()
    assert '"draining"' in gw.logs() and '"stopped"' in gw.logs()


async def test_workers_share_the_port_and_are_restarted(
        tmp_path: Path, demo_upstream: str, session: aiohttp.ClientSession) -> None:
    gw = start_gateway(tmp_path, demo_upstream, extra="workers: 2\n")
    try:
        async with session.get(f"{gw.admin}/admin/config") as resp:
            workers = (await resp.json())["workers"]
        assert len(workers) == 2
        pids = [w["pid"] for w in workers]
        for _ in range(40):
            async with aiohttp.ClientSession() as fresh:   # new connections spread over workers
                async with fresh.get(f"{gw.url}/") as resp:
                    assert resp.status == 200
        async with session.get(f"{gw.admin}/metrics") as resp:
            text = await resp.text()
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("gateway_requests_total{"))
        assert total == 40   # one scrape covers both workers, nothing counted twice
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        new_pids = pids
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            async with session.get(f"{gw.admin}/admin/config") as resp:
                new_pids = [w["pid"] for w in (await resp.json())["workers"]]
            if new_pids[0] != pids[0]:
                break
        assert new_pids[0] != pids[0] and new_pids[1] == pids[1]
        wait_port(gw.port)
        for _ in range(10):
            async with aiohttp.ClientSession() as fresh:
                async with fresh.get(f"{gw.url}/") as resp:
                    assert resp.status == 200
        assert "worker died; restarting" in gw.logs()

        # the supervisor's admin API fans out to every worker (the restarted one included,
        # once it is up)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            async with session.get(f"{gw.admin}/admin/breakers") as resp:
                (up,) = await resp.json()
            if len(up["workers"]) == 2:
                break
            await asyncio.sleep(0.2)
        assert up["upstream"] == "up" and up["state"] == "closed" and len(up["workers"]) == 2
        original = gw.config_path.read_text()
        gw.config_path.write_text(original.replace("drain_s: 5", "drain_s: 6"))
        async with session.post(f"{gw.admin}/admin/reload") as resp:
            assert resp.status == 200
            version = (await resp.json())["version"]
        async with session.get(f"{gw.admin}/admin/config") as resp:
            doc = await resp.json()
        assert doc["version"] == version and doc["config"]["drain_s"] == 6
        gw.config_path.write_text(original + "bogus: 1\n")
        async with session.post(f"{gw.admin}/admin/reload") as resp:
            assert resp.status == 400
            assert (await resp.json())["errors"] == ["bogus: unknown key"]
        for _ in range(5):
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{gw.url}/") as resp:
                assert resp.status == 200
    finally:
        assert gw.stop() == 0
