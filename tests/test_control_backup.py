"""`gateway control-db backup|restore` on SQLite: a consistent snapshot taken while a real
`gateway control` ingests, restored into a new file that a new control plane then serves."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.harness import ControlProcess
from tests.test_control_support import batch, series
from tests.test_shipping_e2e import ADMIN

T0 = int(time.time()) // 60 * 60   # fixed query bounds: answers compared across processes
INGEST = {"Authorization": "Bearer t-ingest", "Content-Type": "application/json"}


def control_db(action: str, config: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "control-db", action, "--config",
                           str(config), str(path)], capture_output=True, text=True, timeout=60,
                          check=False)


def control_in(tmp_path: Path, name: str) -> ControlProcess:
    (tmp_path / name).mkdir()
    return ControlProcess(tmp_path / name)


async def signals(session: aiohttp.ClientSession, cp: ControlProcess, window: str) -> Any:
    async with session.get(f"{cp.url}/v1/signals",
                           params={"service": "svc", "window": window,
                                   "since": str(T0 - 7200), "until": str(T0 + 3600)},
                           headers=ADMIN) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def total(doc: Any) -> int:
    return sum(r["request_count"] for r in doc["rows"])    # the service's total (route *)


def counts_of_backup(path: Path) -> int:
    """The requests of the batches the backup says it holds (batch k carries k requests)."""
    db = sqlite3.connect(path)
    try:
        ids = [r[0] for r in db.execute("SELECT batch_id FROM batches")]
    finally:
        db.close()
    return sum(int(i.rsplit("-", 1)[1]) for i in ids)


@pytest.mark.timeout(120)
async def test_backup_while_ingesting_restores_to_the_same_signals(tmp_path: Path) -> None:
    live = control_in(tmp_path, "live")
    live.start()
    start = time.time() - 600
    stop = asyncio.Event()
    sent: list[int] = []

    async def ingest(session: aiohttp.ClientSession) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            doc = batch(f"gw1-{k}", start + (k % 50) * 10,
                        [series("r1", "svc", 200, latencies_us=[1000 + k] * k),
                         series("r2", "svc", 503, latencies_us=[2000] * k)],
                        gateway_id="gw1", seq=k)
            async with session.post(f"{live.url}/v1/ingest", data=orjson.dumps(doc),
                                    headers=INGEST) as resp:
                assert resp.status == 200, await resp.text()
            sent.append(k)

    procs: list[ControlProcess] = [live]
    try:
        async with aiohttp.ClientSession() as session:
            feeder = asyncio.create_task(ingest(session))
            while len(sent) < 20:
                await asyncio.sleep(0.05)
            mid = tmp_path / "mid.db"
            done = await asyncio.to_thread(control_db, "backup", live.path, mid)
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"ok: {live.path.parent / 'control.db'} copied to")
            await asyncio.sleep(0.3)               # ingest goes on after the snapshot
            stop.set()
            await feeder
            in_mid = counts_of_backup(mid)
            assert 0 < in_mid < sum(sent)          # taken mid-stream, not before or after

            # The mid-stream snapshot restores to exactly the batches it holds: one instant.
            first = control_in(tmp_path, "first")
            done = await asyncio.to_thread(control_db, "restore", first.path, mid)
            assert done.returncode == 0, done.stderr
            first.start()
            procs.append(first)
            assert total(await signals(session, first, "1m")) == 2 * in_mid

            # After ingest: backup of the running control plane, restore, same answers.
            end = tmp_path / "end.db"
            done = await asyncio.to_thread(control_db, "backup", live.path, end)
            assert done.returncode == 0, done.stderr
            second = control_in(tmp_path, "second")
            done = await asyncio.to_thread(control_db, "restore", second.path, end)
            assert done.returncode == 0, done.stderr
            second.start()
            procs.append(second)
            assert total(await signals(session, live, "1m")) == 2 * sum(sent)
            for window in ("1m", "5m", "1h"):
                deadline = time.monotonic() + 15   # compaction folds the latencies in on both
                while True:
                    a, b = await signals(session, live, window), await signals(session, second,
                                                                               window)
                    if a == b or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert a == b, window

            # Refusals: a non-empty target, an existing backup file.
            done = await asyncio.to_thread(control_db, "restore", second.path, end)
            assert done.returncode == 2
            assert "is not empty" in done.stderr and "restore only into a new database" in \
                done.stderr
            done = await asyncio.to_thread(control_db, "backup", live.path, end)
            assert done.returncode == 2 and "already exists" in done.stderr
    finally:
        stop.set()
        for cp in procs:
            cp.stop()


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    cp = control_in(tmp_path, "cp")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    done = control_db("restore", cp.path, junk)
    assert done.returncode == 2 and "not a control-plane SQLite backup" in done.stderr
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    done = control_db("restore", cp.path, empty)
    assert done.returncode == 2 and "no schema_version table" in done.stderr
    done = control_db("restore", cp.path, tmp_path / "missing.db")
    assert done.returncode == 2 and "missing.db: no such file" in done.stderr
    assert not (tmp_path / "cp" / "control.db").exists()


@pytest.mark.timeout(120)
async def test_postgresql_backup_and_restore(tmp_path: Path, postgres_cluster: Any) -> None:
    """pg_dump -Fc of a database a running control plane ingests into; pg_restore into a new,
    empty database; a control plane on it answers /v1/signals the same; a non-empty target is
    refused."""
    source = postgres_cluster.create_database()
    live = control_in(tmp_path, "live")
    live.path.write_text(live.path.read_text().replace(
        f'database: "{live.path.parent / "control.db"}"', f'database: "{source}"'))
    live.start()
    try:
        async with aiohttp.ClientSession() as session:
            start = time.time() - 600
            for k in range(1, 21):
                doc = batch(f"gw1-{k}", start + k * 10, [series("r1", "svc", 200,
                                                                latencies_us=[1000 + k] * k)],
                            gateway_id="gw1", seq=k)
                async with session.post(f"{live.url}/v1/ingest", data=orjson.dumps(doc),
                                        headers=INGEST) as resp:
                    assert resp.status == 200
            dump = tmp_path / "control.dump"
            done = await asyncio.to_thread(control_db, "backup", live.path, dump)
            assert done.returncode == 0, done.stderr
            assert "pg_dump" in done.stdout and "postgres@" in done.stdout

            target = postgres_cluster.create_database(template="template0")     # empty
            restored = control_in(tmp_path, "restored")
            restored.path.write_text(restored.path.read_text().replace(
                f'database: "{restored.path.parent / "control.db"}"', f'database: "{target}"'))
            done = await asyncio.to_thread(control_db, "restore", restored.path, dump)
            assert done.returncode == 0, done.stderr
            restored.start()
            try:
                for window in ("1m", "1h"):
                    deadline = time.monotonic() + 15
                    while True:
                        a = await signals(session, live, window)
                        b = await signals(session, restored, window)
                        if a == b or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.2)
                    assert a == b and total(a) == sum(range(1, 21)), window
            finally:
                restored.stop()
            done = await asyncio.to_thread(control_db, "restore", restored.path, dump)
            assert done.returncode == 2 and "is not empty" in done.stderr
    finally:
        live.stop()
