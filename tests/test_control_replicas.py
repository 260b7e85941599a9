"""Two `gateway control` replicas on one PostgreSQL database behind a gateway's URL list: one
is killed under load; every request is still counted exactly once, background jobs move to the
survivor, and the burn-rate page is raised exactly once."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port, wait_port
from tests.harness import GatewayProcess, gateway_yaml, write_config

ADMIN = {"Authorization": "Bearer t-admin"}


class Replica:
    def __init__(self, tmp_path: Path, name: str, database: str) -> None:
        self.port = free_port()
        self.path = tmp_path / f"control-{name}.yaml"
        self.log_path = tmp_path / f"control-{name}.log"
        self.path.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'database: "{database}"\n'
            "tokens:\n"
            "  - {name: admin, role: admin, token: t-admin}\n"
            "  - {name: gw, role: gateway, token: t-ingest}\n"
            "slos:\n"
            "  - {name: svc-availability, service: svc, objective: 99.9, window: 30d,"
            " min_events: 20}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "control", "--config",
                                      str(self.path)], stderr=self.log)
        wait_port(self.port, timeout=30)

    def runs(self, job: str) -> bool:
        """Whether this replica took the job's lock (its log says so)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "job_lock_acquired" and doc.get("job") == job:
                return True
        return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
            self.proc = None
        if hasattr(self, "log"):
            self.log.close()


async def get(session: aiohttp.ClientSession, url: str, **params: Any) -> Any:
    async with session.get(url, params=params, headers=ADMIN) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def count(session: aiohttp.ClientSession, replica: Replica) -> int:
    doc = await get(session, f"{replica.url}/v1/signals", service="svc", window="1h",
                    since=str(int(time.time()) - 7200))
    return sum(r["request_count"] for r in doc["rows"])


async def until(check: Any, within_s: float) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        got = await check()
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)
async def test_two_replicas_one_killed_under_load(tmp_path: Path, postgres_cluster: Any,
                                                  demo_upstream: str) -> None:
    # An empty database, migrated by the first replica.
    database = postgres_cluster.create_database(template="template0")
    a, b = Replica(tmp_path, "a", database), Replica(tmp_path, "b", database)
    port, admin = free_port(), free_port()
    text = gateway_yaml([demo_upstream], listen=f"127.0.0.1:{port}",
                        admin=f"127.0.0.1:{admin}") + (
        "control_plane:\n"
        f"  url: [{a.url}, {b.url}]\n"
        "  token: t-ingest\n"
        "  ship_interval_s: 0.5\n"
        f"  spool_dir: {tmp_path / 'spool'}\n")
    gw = GatewayProcess(write_config(tmp_path, text), port, admin)
    try:
        # a: the gateways' first URL and the replica running the jobs (it starts first)
        await asyncio.to_thread(a.start)
        assert await until(lambda: _true(a.runs("evaluation")), 20)
        await asyncio.to_thread(b.start)
        gw.start()
        async with aiohttp.ClientSession() as session:
            sent = 0

            async def send(n: int, pace_s: float = 0.0) -> None:
                nonlocal sent
                for _ in range(n):
                    async with session.get(f"{gw.url}/status/500") as resp:
                        assert resp.status in (500, 503)
                        await resp.read()
                    sent += 1
                    await asyncio.sleep(pace_s)

            n = 150
            await send(n)
            assert await until(lambda: _equals(count(session, b), n), 15)
            assert await count(session, a) == n                    # any replica answers

            # The page: raised once, by whichever replica evaluates.
            async def pages(replica: Replica = b) -> list[dict[str, Any]]:
                doc = await get(session, f"{replica.url}/v1/alerts")
                return [x for x in doc["alerts"] if x["source"] == "slo"
                        and x["severity"] == "page"]
            assert len(await until(pages, 90)) == 1
            assert not b.runs("evaluation") and not b.runs("compaction")

            # Kill a in the middle of more traffic: the gateway moves on to b, b takes the jobs.
            m = 200
            load = asyncio.create_task(send(m, pace_s=0.01))   # ~2 s: several shipments
            while sent < n + m // 2:
                await asyncio.sleep(0.01)
            a.kill()
            await load
            other = b
            assert await until(lambda: _equals(count(session, other), n + m), 20)
            assert await until(lambda: _true(other.runs("evaluation")), 20)   # jobs moved
            await asyncio.sleep(6)          # > one evaluation pass on the survivor
            assert await count(session, other) == n + m             # nothing twice
            doc = await get(session, f"{other.url}/v1/alerts")
            slo_alerts = [(x["severity"], x["dedup_key"]) for x in doc["alerts"]
                          if x["source"] == "slo"]
            assert len(slo_alerts) == len(set(slo_alerts))          # each alert once
            assert len(await pages(other)) == 1
    finally:
        gw.stop()
        a.stop()
        b.stop()


async def _equals(awaitable: Any, expected: int) -> bool:
    return await awaitable == expected


async def _true(value: bool) -> bool:
    return value


def test_replicas_starting_together_migrate_once(postgres_cluster: Any) -> None:
    """Four stores open one empty database at once: one applies the migrations, the others
    wait for it (advisory lock) and find them applied; each version recorded once."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.control.store import SCHEMA_VERSION, Store

    database = postgres_cluster.create_database(template="template0")
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: Store(database), range(4)))
    try:
        assert {s.schema_version() for s in stores} == {SCHEMA_VERSION}
        rows = stores[0]._db.execute("SELECT version, COUNT(*) FROM schema_version "
                                     "GROUP BY version").fetchall()
        assert all(n == 1 for _v, n in rows) and len(rows) == SCHEMA_VERSION
    finally:
        for s in stores:
            s.close()
