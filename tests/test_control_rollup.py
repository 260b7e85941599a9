"""Rollups: exact merged percentiles, 5m/1h/1d windows, late batches, retention (FakeClock)."""

from __future__ import annotations

import asyncio
import base64
import random
import struct
import zlib

import aiohttp
import pytest
from hdrh.histogram import HdrHistogram

from gateway.control.domain import histogram, rollup
from gateway.control.domain.ingest import parse_batch
from gateway.control.store import Store
from tests.fakes import FakeClock
from tests.test_control_support import (
    DAY0,
    batch,
    control_plane,
    database_of,
    get,
    ingest,
    series,
    signals,
    store_of,
)
from tests.test_control_support import (
    hist as hist_text,
)

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql


def _true_percentile(sorted_values: list[int], p: float) -> int:
    # the smallest value with at least p% of the values at or below it (nearest rank)
    import math
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def test_percentiles_merge_exactly_across_three_gateways(tmp_path):
    rng = random.Random(7)
    t = DAY0 + 7_200
    clock = FakeClock(wall=t + 50)
    all_values: list[int] = []
    async with control_plane(tmp_path, clock) as (url, s, _app):
        for g, (lo, hi) in enumerate([(200, 5_000), (1_000, 80_000), (50_000, 2_500_000)]):
            values = [rng.randint(lo, hi) for _ in range(3_000 + 1_000 * g)]
            all_values += values
            # each gateway sends two batches in the same minute, split across two routes
            for k in range(2):
                part = values[k::2]
                doc = batch(f"gw{g}-{k}", t + 20 * k, [series(f"r{k}", "svc", 200,
                                                              latencies_us=part)],
                            gateway_id=f"gw{g}", seq=k, length=20)
                assert (await ingest(s, url, doc))[0] == 200

        reference = HdrHistogram(1, 60_000_000, 2)
        for v in all_values:
            reference.record_value(v)
        expected = reference.get_percentile_to_value_dict([50, 95, 99])
        exact = sorted(all_values)
        for window in ("1m", "5m", "1h", "1d"):
            rows = await signals(s, url, window=window, service="svc")
            assert len(rows) == 1 and rows[0]["request_count"] == len(all_values)
            row = rows[0]
            for p, key in ((50, "latency_p50_ms"), (95, "latency_p95_ms"),
                           (99, "latency_p99_ms")):
                # identical to one histogram holding every value ...
                assert row[key] == expected[p] / 1000.0
                # ... which is the true percentile within HDR precision (2 significant digits)
                assert row[key] * 1000 == pytest.approx(_true_percentile(exact, p), rel=0.01)


def test_percentiles_helper_matches_hdrh():
    rng = random.Random(3)
    h = histogram.new()
    for _ in range(5_000):
        h.record_value(rng.randint(1, 50_000_000))
    ref = h.get_percentile_to_value_dict([50, 95, 99, 100])
    assert histogram.percentiles(h, (50.0, 95.0, 99.0, 100.0)) == \
        (ref[50], ref[95], ref[99], ref[100])
    assert histogram.percentiles(histogram.new()) == (None, None, None)


def test_check_counts_what_hdrh_decodes_and_refuses_what_it_should():
    """Ingest validates histograms with `check` (hdrh's C decoder into a scratch array, no
    HdrHistogram built): its total must be hdrh's, its refusals those of a full decode."""
    rng = random.Random(4)
    for n in (0, 1, 7, 200, 5_000):
        h = histogram.new()
        for _ in range(n):
            h.record_value(rng.randint(1, 60_000_000), rng.choice((1, 1, 3, 1 << 40)))
        encoded = histogram.encode(h)
        assert histogram.check(encoded) == histogram.decode(encoded).total_count == h.total_count
        assert histogram.check(encoded.decode()) == h.total_count         # str as on the wire
    # the scratch array is reset between calls: a small one after a big one counts alone
    small = histogram.new()
    small.record_value(10, 2)
    assert histogram.check(histogram.encode(small)) == 2
    # counts near the 64-bit wrap would make totals lie: 2**48 and above are refused
    big = histogram.new()
    big.record_value(100, (1 << 48) - 1)
    assert histogram.check(histogram.encode(big)) == (1 << 48) - 1
    for count in (1 << 48, (1 << 63) - 1):
        h = histogram.new()
        h.record_value(100, count)
        h.record_value(9_000, count)
        with pytest.raises(histogram.HistogramError, match="implausible count"):
            histogram.check(histogram.encode(h))
    # a counts stream that runs past the array, or is not varints, is refused by both paths
    header = struct.pack(">IIIIQQd", 0x1C849313, 0, 0, 2, 1, 60_000_000, 1.0)
    for stream in (bytes([0x02]) * (histogram._COUNTS_LEN + 5), b"\xff\xff\xff"):
        payload = struct.pack(">II", 0x1C849313, len(stream)) + header[8:] + stream
        packed = zlib.compress(payload)
        encoded = base64.b64encode(struct.pack(">II", 0x1C849314, len(packed)) + packed)
        with pytest.raises(histogram.HistogramError):
            histogram.check(encoded)
        with pytest.raises(histogram.HistogramError):
            histogram.decode(encoded)
        assert histogram.check(histogram.encode(small)) == 2    # nothing left behind


def test_counts_merge_exactly_as_hdrh_does():
    """Ingest and compaction merge stored payloads in `Counts` (C decoder and adder, no
    HdrHistogram per histogram, no zlib): the merged counts, total, minimum, maximum and
    percentiles must be hdrh's own `add`'s, and a payload must read back as what was written."""
    rng = random.Random(5)
    encoded = []
    for n in (0, 1, 50, 200, 3_000):
        h = histogram.new()
        for _ in range(n):
            h.record_value(rng.randint(1, 60_000_000), rng.choice((1, 2, 1_000)))
        encoded.append(histogram.encode(h))
    for _ in range(4):
        rng.shuffle(encoded)
        fast, slow = histogram.Counts(), histogram.new()
        for e in encoded:
            total, payload = histogram.validate(e)
            assert fast.add_payload(payload) == total == histogram.decode(e).total_count
            slow.add(histogram.decode(e))
        merged = fast.histogram()
        assert list(merged.counts) == list(slow.counts)
        assert (merged.total_count, merged.get_max_value()) == \
            (slow.total_count, slow.get_max_value())
        # (hdrh's add takes an empty histogram's minimum as 0; the true minimum is kept here)
        assert merged.get_min_value() == min(h.get_min_value() for h in map(
            histogram.decode, encoded) if h.total_count)
        wanted = (50.0, 99.0, 100.0)
        assert fast.percentiles(wanted) == histogram.percentiles(slow, wanted) == \
            tuple(slow.get_value_at_percentile(p) for p in wanted)
        # what the store keeps reads back the same, as Counts and as an HdrHistogram
        stored = fast.payload()
        again = histogram.Counts.of(stored)
        assert (again.total, again.low, again.high) == (fast.total, fast.low, fast.high)
        assert list(again.array) == list(fast.array)
        assert list(histogram.decode_trusted(stored).counts) == list(slow.counts)
        # Counts added to Counts: the same as adding the payloads one by one
        halves = histogram.Counts(), histogram.Counts()
        for i, e in enumerate(encoded):
            halves[i % 2].add_payload(histogram.validate(e)[1])
        halves[0].add(halves[1])
        assert list(halves[0].array) == list(fast.array) and halves[0].total == fast.total
    assert histogram.Counts().percentiles() == (None, None, None)
    assert histogram.Counts.of(None).payload() == histogram.Counts.of(
        histogram.Counts().payload()).payload()


def test_rows_written_in_the_wire_form_are_still_read():
    """Before payloads, the store kept the wire's base64 text (str from a TEXT column, bytes
    from a BLOB): those rows read as the same histogram."""
    h = histogram.new()
    for v in (5, 5, 120, 7_000, 900_000):
        h.record_value(v)
    text = histogram.encode(h)
    for legacy in (text, text.decode("ascii")):
        assert histogram.stored_payload(legacy) == histogram.validate(text)[1]
        assert list(histogram.Counts.of(legacy).array) == list(h.counts)
        assert list(histogram.decode_trusted(legacy).counts) == list(h.counts)


async def test_rollups_into_5m_1h_1d(tmp_path):
    clock = FakeClock(wall=DAY0 + 86_400 - 30)           # the end of the day
    async with control_plane(tmp_path, clock) as (url, s, _app):
        # one batch every 10 minutes from 00:00 to 23:50, 3 requests each (2 ok + one 503)
        for i in range(144):
            start = DAY0 + 600 * i
            doc = batch(f"gw-{i}", start, [
                series("r1", "svc", 200, latencies_us=[1000 + i, 2000 + i]),
                series("r1", "svc", 503, latencies_us=[9000])], seq=i)
            assert (await ingest(s, url, doc))[0] == 200, i
        since, until = DAY0, DAY0 + 86_400
        one_m = await signals(s, url, window="1m", service="svc", since=since, until=until)
        five_m = await signals(s, url, window="5m", service="svc", since=since, until=until)
        hours = await signals(s, url, window="1h", service="svc", since=since, until=until)
        days = await signals(s, url, window="1d", service="svc", since=since, until=until)
        assert len(one_m) == 144 and len(five_m) == 144 and len(hours) == 24 and len(days) == 1
        assert [r["bucket_start"] for r in five_m[:2]] == [DAY0, DAY0 + 600]
        assert all(r["request_count"] == 3 and r["error_count_5xx"] == 1 for r in five_m)
        assert all(r["request_count"] == 18 and r["error_count_5xx"] == 6 for r in hours)
        assert days[0]["request_count"] == 432 and days[0]["error_count_5xx"] == 144
        assert days[0]["error_rate"] == pytest.approx(1 / 3)
        assert hours[0]["bucket_start"] == DAY0 and hours[-1]["bucket_start"] == DAY0 + 23 * 3600
        # the per-route rows roll up the same way
        route = await signals(s, url, window="1d", service="svc", route="r1", since=since,
                              until=until)
        assert route[0]["request_count"] == 432
        # ISO-8601 bounds work too
        iso = await signals(s, url, window="1h", service="svc", since="2023-11-15T00:00:00Z",
                            until="2023-11-15T02:00:00+00:00")
        assert DAY0 == 1_700_006_400 and [r["bucket_start"] for r in iso] == \
            [DAY0, DAY0 + 3600]
        # percentiles of the day row are the merged ones
        assert days[0]["latency_p99_ms"] == pytest.approx(9.0, rel=0.01)


async def test_late_batch_lands_in_its_own_bucket(tmp_path):
    now = DAY0 + 86_400 + 12 * 3600                       # day 2, noon
    clock = FakeClock(wall=now)
    async with control_plane(tmp_path, clock) as (url, s, _app):
        late_start = now - 20 * 3600 + 17                  # 16:00:17 of day 1
        doc = batch("late-1", late_start, [series("r1", "svc", 200, latencies_us=[5000])])
        assert (await ingest(s, url, doc))[0] == 200
        fresh = batch("fresh-1", now - 30, [series("r1", "svc", 200, latencies_us=[7000])])
        assert (await ingest(s, url, fresh))[0] == 200
        for window, expect_late in (("1m", late_start - 17), ("5m", late_start - 17),
                                    ("1h", late_start - 17), ("1d", DAY0)):
            rows = await signals(s, url, window=window, service="svc", since=DAY0,
                                 until=now + 86_400)
            starts = {r["bucket_start"]: r["request_count"] for r in rows}
            assert starts[expect_late] == 1, (window, starts)
        days = await signals(s, url, window="1d", service="svc", since=DAY0, until=now + 86_400)
        assert [(r["bucket_start"], r["request_count"]) for r in days] == \
            [(DAY0, 1), (DAY0 + 86_400, 1)]
        # more than a day late: refused, so the shipper drops it instead of retrying forever
        too_late = batch("late-2", now - 86_400 - 60, [series("r1", "svc", 200)])
        status, body = await ingest(s, url, too_late)
        assert status == 400 and body["errors"][0].startswith("interval_start: older than 1 day")


def _ingest_direct(store: Store, batch_id: str, start: float, now: float) -> None:
    import orjson
    doc = batch(batch_id, start, [series("r1", "svc", 200, latencies_us=[1000])])
    assert rollup.apply(store, parse_batch(orjson.dumps(doc), now=now), now)


def test_retention_job_with_fake_clock(tmp_path):
    clock = FakeClock(wall=DAY0 + 3600)
    store = Store(database_of(tmp_path, "c.db"), clock=clock)
    try:
        _ingest_direct(store, "b1", DAY0 + 3600 - 10, clock.time())
        rollup.compact(store)

        def windows() -> dict[int, int]:
            return {w: len(store.rollups.signals(w, 0, 10 ** 11, service="svc", route="*", limit=100))
                    for w in rollup.WINDOWS.values()}

        assert windows() == {60: 1, 300: 1, 3600: 1, 86_400: 1}
        steps = [(86_400, {60: 0, 300: 1, 3600: 1, 86_400: 1}),       # +1 day: 1m gone
                 (6 * 86_400, {60: 0, 300: 0, 3600: 1, 86_400: 1}),   # +7 days: 5m gone
                 (23 * 86_400, {60: 0, 300: 0, 3600: 0, 86_400: 1}),  # +30 days: 1h gone
                 (335 * 86_400, {60: 0, 300: 0, 3600: 0, 86_400: 0})]  # +365 days: 1d gone
        for advance, expected in steps:
            assert rollup.run_retention(store, clock.time())["1d"] == 0   # nothing due yet
            clock.advance(advance)
            deleted = rollup.run_retention(store, clock.time())
            assert windows() == expected, (advance, deleted)
        counts = store.table_counts()
        assert counts["batches"] == 0 and counts["buckets"] == 0 and counts["pending_hist"] == 0
    finally:
        store.close()


def test_retention_keeps_what_is_inside_the_window(tmp_path):
    clock = FakeClock(wall=DAY0 + 86_400)
    store = Store(database_of(tmp_path, "c.db"), clock=clock)
    try:
        _ingest_direct(store, "old", DAY0 + 30, clock.time())        # 23h59m ago
        deleted = rollup.run_retention(store, clock.time())
        assert deleted["1m"] == 0
        assert len(store.rollups.signals(60, 0, 10 ** 11, service="svc", route="*", limit=10)) == 1
        clock.advance(60)
        assert rollup.run_retention(store, clock.time())["1m"] == 2    # the route and total rows
    finally:
        store.close()


def test_migrations_are_versioned_and_idempotent(tmp_path):
    path = tmp_path / "c.db"
    from gateway.control.store import MIGRATIONS, SCHEMA_VERSION
    s1 = Store(path)
    assert s1.schema_version() == SCHEMA_VERSION == max(v for v, _ in MIGRATIONS)
    s1.close()
    s2 = Store(path)                      # reopening applies nothing twice
    assert s2.migrate() == SCHEMA_VERSION
    import sqlite3
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
    db.close()
    s2.close()


def test_queued_wire_text_from_before_the_payload_migration_is_folded(tmp_path, monkeypatch):
    """A database last written by a version that queued histograms as base64 text: migration 8
    keeps the queued rows (PostgreSQL: the column becomes bytes) and compaction folds them with
    the payloads queued after it, exactly."""
    from gateway.control.store import core
    from tests import test_control_support as support
    # an empty database (not the migrated template the other tests start from)
    path = support.NEW_DATABASE("template0") if support.NEW_DATABASE else str(tmp_path / "c.db")
    now = DAY0 + 600
    before = [m for m in core.MIGRATIONS if m[0] < 8]
    monkeypatch.setattr(core, "MIGRATIONS", before)
    old = Store(path)
    assert old.schema_version() == 7
    with old.transaction():
        old.rollups._db.execute(
            "INSERT INTO pending_hist(bucket_start, service, route, hist) VALUES (?, ?, ?, ?)",
            (rollup.bucket_start(DAY0, 60), "svc", "r1", hist_text([50_000, 70_000])))
    old.close()
    monkeypatch.undo()
    store = Store(path)
    try:
        assert store.schema_version() == 8
        _ingest_direct(store, "new", DAY0, now)         # 1000 us, same minute and route
        assert rollup.compact(store) == 2
        for route in ("r1", "*"):
            (row,) = store.rollups.signals(60, 0, 10 ** 11, service="svc", route=route, limit=5)
            assert (row["p50_us"], row["p99_us"]) == histogram.percentiles(
                _merged_reference([50_000, 70_000, 1000]), (50.0, 99.0))
        (_b, stored), = store.rollups.sli_hists(60, "svc", "r1", 0, 10 ** 11)
        assert histogram.decode_trusted(stored).total_count == 3
    finally:
        store.close()


def _merged_reference(values: list[int]) -> HdrHistogram:
    h = histogram.new()
    for v in values:
        h.record_value(v)
    return h


async def test_the_periodic_job_folds_the_queue_by_itself(tmp_path):
    """Compaction runs every compact_interval_s without a reader asking (on PostgreSQL on a
    connection and thread of its own, beside ingest's): the queue empties and the buckets get
    their percentiles; the app stops cleanly with it."""
    from gateway.control.app import create_app
    from tests.test_control_support import control_config, running
    clock = FakeClock(wall=DAY0 + 600)
    app = create_app(control_config(tmp_path), clock=clock, compact_interval_s=0.05,
                     retention_interval_s=3600)
    async with running(app) as url, aiohttp.ClientSession() as s:
        doc = batch("b1", DAY0, [series("r1", "svc", 200, latencies_us=[2_000, 4_000])])
        assert (await ingest(s, url, doc))[0] == 200
        store = store_of(app)
        for _ in range(200):
            if store.table_counts()["pending_hist"] == 0:
                break
            await asyncio.sleep(0.025)
        assert store.table_counts()["pending_hist"] == 0
        (row,) = store.rollups.signals(60, 0, 10 ** 11, service="svc", route="r1", limit=5)
        assert row["p99_us"] == histogram.percentiles(_merged_reference([2_000, 4_000]),
                                                      (99.0,))[0]


async def test_limits_are_rolled_up_per_policy(tmp_path):
    t = DAY0 + 3_600
    async with control_plane(tmp_path, FakeClock(wall=t + 600)) as (url, s, app):
        for i in range(3):
            doc = batch(f"b{i}", t + 100 * i, [], limits=[
                {"policy": "api", "decision": "allowed", "count": 10},
                {"policy": "api", "decision": "limited", "count": i},
                {"policy": "api", "decision": "limited", "count": 1}], seq=i)
            assert (await ingest(s, url, doc))[0] == 200
        status, doc = await get(s, url, "/v1/limits", window="1h", role="monitor")
        assert status == 200
        assert [(r["decision"], r["count"]) for r in doc["rows"]] == [("allowed", 30),
                                                                      ("limited", 6)]
        assert store_of(app).table_counts()["pending_hist"] == 0
