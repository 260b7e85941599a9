"""The shipper against a real control plane: delivery, spool, retries, bounds, restarts, stop."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.config import ControlPlaneConfig
from gateway.control.app import create_app
from gateway.control.domain import rollup
from gateway.shipper import Shipper
from tests.conftest import free_port
from tests.fakes import FakeClock
from tests.test_control_support import DAY0, TOKENS, control_config, running, series, store_of

NOW = DAY0 + 3_600


class Snapshots:
    """A snapshot() whose k-th call reports k requests (plus optional incompressible padding)."""

    def __init__(self, clock: FakeClock, padding: int = 0) -> None:
        self.clock = clock
        self.padding = padding
        self.sent: list[int] = []

    def __call__(self) -> dict[str, Any]:
        k = len(self.sent) + 1
        self.sent.append(k)
        t = self.clock.time()
        doc: dict[str, Any] = {
            "schema": 1, "interval_start": t - 10, "interval_end": t,
            "series": [series("r1", "svc", 200, latencies_us=[1000 + k] * k)],
            "upstreams": [], "limits": [], "breaker_transitions": [],
            "saturation": {"inflight_max": 1, "loop_lag_max_s": 0.0, "cpu_percent": 1.0,
                           "rss_bytes": 1}}
        if self.padding:
            doc["padding"] = base64.b64encode(os.urandom(self.padding)).decode()
        return doc


def cp_config(url: str, tmp_path: Path, **kw: Any) -> ControlPlaneConfig:
    kw.setdefault("ship_interval_s", 3600)
    return ControlPlaneConfig(url=url, token=TOKENS["gateway"],
                              spool_dir=str(tmp_path / "spool"), **kw)


def make_shipper(url: str, tmp_path: Path, clock: FakeClock, snap: Callable[[], dict], *,
                 results: Counter, spooled: list[int] | None = None,
                 **kw: Any) -> Shipper:
    cfg_kw = {k: kw.pop(k) for k in ("ship_interval_s", "spool_max_bytes") if k in kw}
    cfg = cp_config(url, tmp_path, **cfg_kw)
    return Shipper(cfg, snap, gateway_id="gw-a", clock=clock,
                   on_result=lambda r: results.update([r]),
                   on_spooled=(spooled.append if spooled is not None else None),
                   timeout_s=kw.pop("timeout_s", 2.0), **kw)


def total_requests(app: web.Application) -> int:
    store = store_of(app)
    rollup.compact(store)
    rows = store.rollups.signals(86_400, 0, 10 ** 11, service="svc", route="*", limit=10)
    return sum(r["request_count"] for r in rows)


def delivered_order(tmp_path: Path) -> list[int]:
    db = sqlite3.connect(tmp_path / "control.db")
    try:
        return [r[0] for r in db.execute("SELECT seq FROM batches ORDER BY rowid")]
    finally:
        db.close()


def new_app(tmp_path: Path, clock: FakeClock) -> web.Application:
    return create_app(control_config(tmp_path), clock=clock, compact_interval_s=3600,
                      retention_interval_s=3600)


async def test_snapshots_are_delivered_with_exact_totals(tmp_path):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock)
    results: Counter = Counter()
    app = new_app(tmp_path, clock)
    async with running(app) as url:
        shipper = make_shipper(url, tmp_path, clock, snap, results=results)
        await shipper.start()
        try:
            for _ in range(10):
                await shipper.tick()
                clock.advance(10)
        finally:
            await shipper.stop()                     # + one final snapshot
        assert results == Counter(success=11)
        assert total_requests(app) == sum(snap.sent) == sum(range(1, 12))
        order = delivered_order(tmp_path)
        assert order == sorted(order) and len(order) == 11
        assert not list((tmp_path / "spool").glob("*.json.gz"))


async def test_background_timer_ships_every_interval(tmp_path):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock)
    results: Counter = Counter()
    app = new_app(tmp_path, clock)
    async with running(app) as url:
        shipper = make_shipper(url, tmp_path, clock, snap, results=results,
                               ship_interval_s=0.05)
        await shipper.start()
        try:
            for _ in range(200):
                if results["success"] >= 4:
                    break
                await asyncio.sleep(0.02)
        finally:
            await shipper.stop()
        assert results["success"] >= 5 and results["failure"] == 0
        assert total_requests(app) == sum(snap.sent)


async def test_control_plane_down_then_back_delivers_oldest_first(tmp_path):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock)
    results: Counter = Counter()
    spooled: list[int] = []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shipper = make_shipper(url, tmp_path, clock, snap, results=results, spooled=spooled,
                           stop_timeout_s=0.5)
    await shipper.start()
    try:
        for _ in range(5):
            await shipper.tick()
            clock.advance(10)
        assert shipper.spooled == 5 and spooled[-1] == 5
        # later ticks queue behind the spool; the drainer's retries add failures
        assert results["spooled"] == 5 and results["failure"] >= 1 and results["success"] == 0
        assert len(list((tmp_path / "spool").glob("*.json.gz"))) == 5

        app = new_app(tmp_path, clock)
        async with running(app, port):
            clock.advance(3600)                            # past any backoff (FakeClock)
            await shipper.tick()                           # queues behind the spool ...
            for _ in range(200):                           # ... the drainer delivers in order
                if shipper.spooled == 0:
                    break
                await asyncio.sleep(0.02)
            assert shipper.spooled == 0 and spooled[-1] == 0
            assert results["success"] == 6
            assert total_requests(app) == sum(snap.sent) == 21
            order = delivered_order(tmp_path)
            assert order == sorted(order)                  # oldest first
            await shipper.stop()
            assert total_requests(app) == sum(snap.sent) == 28
    finally:
        await shipper.stop()


async def test_lost_response_never_double_counts(tmp_path):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock)
    results: Counter = Counter()
    app = new_app(tmp_path, clock)
    drops = {"left": 3}

    @web.middleware
    async def lose_response(request: web.Request, handler):
        resp = await handler(request)                     # the batch IS stored ...
        if request.path == "/v1/ingest" and drops["left"] > 0:
            drops["left"] -= 1
            request.transport.close()                     # ... but the answer never arrives
        return resp

    app.middlewares.append(lose_response)
    async with running(app) as url:
        shipper = make_shipper(url, tmp_path, clock, snap, results=results)
        await shipper.start()
        try:
            await shipper.tick()                           # stored, but seen as a failure
            assert results["failure"] == 1 and shipper.spooled == 1
            await shipper.tick()                           # queued behind it
            assert await shipper.drain() == 2             # first retry's answer lost again
            assert await shipper.drain() == 2             # and again (3 losses)
            assert await shipper.drain() == 0             # replay answered "duplicate"
            assert results["failure"] == 3 and results["success"] == 2
        finally:
            await shipper.stop()
        assert total_requests(app) == sum(snap.sent) == 1 + 2 + 3
        assert len(delivered_order(tmp_path)) == 3


async def test_spool_bound_drops_the_oldest(tmp_path, caplog):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock, padding=600)                   # incompressible: ~1.1 KB a batch
    sample = {"batch_id": "gw-a-17000000000000", "gateway_id": "gw-a", "seq": 1, **snap()}
    snap.sent.clear()
    size = len(gzip.compress(orjson.dumps(sample), compresslevel=6))
    limit = int(size * 3.5)                                # room for 3 batches
    results: Counter = Counter()
    port = free_port()
    shipper = make_shipper(f"http://127.0.0.1:{port}", tmp_path, clock, snap,
                           results=results, spool_max_bytes=limit, stop_timeout_s=0.2)
    await shipper.start()
    caplog.set_level(logging.WARNING, logger="gateway.shipper")
    try:
        for _ in range(6):
            await shipper.tick()
            clock.advance(10)
        files = sorted((tmp_path / "spool").glob("*.json.gz"))
        assert shipper.spooled == len(files) == 3
        assert sum(f.stat().st_size for f in files) <= limit
        assert results["dropped"] == 3 and results["spooled"] == 6
        assert sum("spool full" in r.getMessage() for r in caplog.records) == 3
        app = new_app(tmp_path, clock)
        async with running(app, port):
            assert await shipper.drain() == 0
            assert total_requests(app) == 4 + 5 + 6         # the newest three survived
            await shipper.stop()
    finally:
        await shipper.stop()


async def test_spool_survives_restart_and_corrupt_files_are_skipped(tmp_path, caplog):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock)
    results: Counter = Counter()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = make_shipper(url, tmp_path, clock, snap, results=results, stop_timeout_s=0.2)
    await first.start()
    for _ in range(3):
        await first.tick()
        clock.advance(10)
    await first.stop()                                     # CP still down: final batch spooled
    files = sorted((tmp_path / "spool").glob("*.json.gz"))
    assert len(files) == 4
    files[1].write_bytes(b"\x1f\x8b\x08\x00 not really gzip")  # the disk ate one
    (tmp_path / "spool" / ".0001-gw-a.json.gz.tmp").write_bytes(b"half")  # interrupted write

    caplog.set_level(logging.WARNING, logger="gateway.shipper")
    app = new_app(tmp_path, clock)
    async with running(app, port):
        results2: Counter = Counter()
        second = make_shipper(url, tmp_path, clock, snap, results=results2)
        await second.start()
        try:
            for _ in range(200):
                if second.spooled == 0:
                    break
                await asyncio.sleep(0.02)
            assert second.spooled == 0
            assert results2["dropped"] == 1 and results2["success"] == 3
            assert total_requests(app) == 1 + 3 + 4           # batch 2 was the corrupt one
            corrupt = [r for r in caplog.records if "corrupt spool file" in r.getMessage()]
            assert len(corrupt) == 1 and corrupt[0].file == str(files[1])
            assert (tmp_path / "spool" / (files[1].name + ".corrupt")).exists()
            assert not list((tmp_path / "spool").glob("*.tmp"))
            await second.tick()                              # a new process: new, higher seq
        finally:
            await second.stop()
        order = delivered_order(tmp_path)
        assert order == sorted(order) and len(set(order)) == len(order) == 5
        assert total_requests(app) == sum(snap.sent) - 2


async def test_stop_flushes_the_final_snapshot(tmp_path):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock)
    results: Counter = Counter()
    app = new_app(tmp_path, clock)
    async with running(app) as url:
        shipper = make_shipper(url, tmp_path, clock, snap, results=results)
        await shipper.start()
        await shipper.stop()
        assert snap.sent == [1] and results == Counter(success=1)
        assert total_requests(app) == 1


async def test_rejected_batches_are_dropped_not_retried(tmp_path, caplog):
    clock = FakeClock(wall=NOW)

    def bad() -> dict[str, Any]:
        return {"schema": 1, "interval_start": NOW - 10, "interval_end": NOW,
                "series": [{"route": "r"}]}

    results: Counter = Counter()
    app = new_app(tmp_path, clock)
    caplog.set_level(logging.ERROR, logger="gateway.shipper")
    async with running(app) as url:
        shipper = make_shipper(url, tmp_path, clock, bad, results=results)
        await shipper.start()
        try:
            await shipper.tick()
        finally:
            await shipper.stop()
        assert results == Counter(dropped=2) and shipper.spooled == 0
        assert any(r.getMessage().startswith("control plane rejected") for r in caplog.records)


async def test_wrong_token_is_retried_not_dropped(tmp_path):
    clock = FakeClock(wall=NOW)
    snap = Snapshots(clock)
    results: Counter = Counter()
    app = new_app(tmp_path, clock)
    async with running(app) as url:
        cfg = ControlPlaneConfig(url=url, token="wrong", ship_interval_s=3600,
                                 spool_dir=str(tmp_path / "spool"))
        shipper = Shipper(cfg, snap, gateway_id="gw-a", clock=clock,
                          on_result=lambda r: results.update([r]), stop_timeout_s=0.3)
        await shipper.start()
        try:
            await shipper.tick()
        finally:
            await shipper.stop()
        assert results["success"] == 0 and results["spooled"] == 2
        assert shipper.spooled == 2                          # kept for a fixed token


async def test_real_signals_snapshots_round_trip(tmp_path):
    """The gateway's own signals module, shipped and ingested: counts and percentiles agree."""
    from gateway.signals import Signals

    clock = FakeClock(wall=NOW)
    sig = Signals(clock)
    latencies = [0.001 * (1 + i % 50) for i in range(500)]
    for i, d in enumerate(latencies):
        sig.record("r1", "up1", "svc", "GET", 200 if i % 10 else 503, d, d, 100, 1000)
    sig.record_limit("api", "limited")
    clock.advance(10)
    results: Counter = Counter()
    app = new_app(tmp_path, clock)
    async with running(app) as url:
        shipper = make_shipper(url, tmp_path, clock, lambda: sig.swap().to_wire(),
                               results=results)
        await shipper.start()
        await shipper.stop()
        assert results["success"] == 1, results
        store = store_of(app)
        rollup.compact(store)
        row = store.rollups.signals(60, 0, 10 ** 11, service="svc", route="r1", limit=10)[0]
        assert row["request_count"] == 500 and row["error_count_5xx"] == 50
        assert row["p99_us"] / 1000 == pytest.approx(49.5, rel=0.02)
