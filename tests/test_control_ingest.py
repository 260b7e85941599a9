"""POST /v1/ingest end to end: exact counts, idempotency, validation, hostile payloads."""

from __future__ import annotations

import base64
import copy
import gzip
import struct
import zlib
from typing import Any

import orjson
import pytest

from gateway.control.store import Store
from gateway.control.store.database import UnstorableText
from tests.fakes import FakeClock
from tests.test_control_support import (
    DAY0,
    auth,
    batch,
    control_plane,
    database_of,
    get,
    ingest,
    series,
    signals,
    store_of,
)

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

T = DAY0 + 3_600          # batches start at 01:00:00 UTC


def _clock() -> FakeClock:
    return FakeClock(wall=T + 30)


async def test_ingest_then_signals_exact_counts(tmp_path):
    async with control_plane(tmp_path, _clock()) as (url, s, _app):
        doc = batch("gw1-1", T, [
            series("r1", "svc", 200, latencies_us=[1000] * 7),
            series("r1", "svc", 404, latencies_us=[500] * 2),
            series("r1", "svc", 429, latencies_us=[100] * 3),
            series("r1", "svc", 503, latencies_us=[9000] * 1, method="POST"),
            series("r2", "svc", 200, latencies_us=[2000] * 5),
            series("r9", "other", 500, latencies_us=[3000] * 4),
        ])
        status, body = await ingest(s, url, doc)
        assert status == 200, body
        assert body == {"accepted": True, "duplicate": False, "batch_id": "gw1-1",
                        "directives": {}}

        rows = await signals(s, url, window="1m", service="svc", route="r1")
        assert len(rows) == 1
        r = rows[0]
        assert r["bucket_start"] == T and r["service"] == "svc" and r["route"] == "r1"
        assert (r["request_count"], r["error_count_4xx"], r["error_count_5xx"],
                r["rate_limited"]) == (13, 2, 1, 3)
        assert r["error_rate"] == pytest.approx(1 / 13)
        assert r["4xx_rate"] == pytest.approx(2 / 13)
        assert r["saturation"] == {"cpu_percent": 12.5, "loop_lag_ms": 2.0, "inflight_max": 3,
                                   "rss_bytes": 50_000_000}
        assert r["bytes_in"] == 40 and r["bytes_out"] == 80

        total = await signals(s, url, window="1m", service="svc")
        assert [(x["route"], x["request_count"], x["error_count_5xx"]) for x in total] == \
            [("*", 18, 1)]
        every = await signals(s, url, window="1m")
        assert {(x["service"], x["request_count"]) for x in every} == {("svc", 18), ("other", 4)}

        # gzip bodies are accepted the same way
        status, body = await ingest(s, url, batch("gw1-2", T + 10, [series("r2", "svc", 200)]),
                                    compress=True)
        assert status == 200 and body["duplicate"] is False
        rows = await signals(s, url, window="1m", service="svc", route="r2")
        assert rows[0]["request_count"] == 6


async def test_replayed_batch_changes_nothing(tmp_path):
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        doc = batch("gw1-7", T, [series("r1", "svc", 200, latencies_us=[1000, 2000, 3000]),
                                 series("r1", "svc", 500, latencies_us=[4000])],
                    limits=[{"policy": "api", "decision": "limited", "count": 2}])
        assert (await ingest(s, url, doc))[0] == 200
        before = await signals(s, url, window="1m", service="svc", route="r1")
        counts_before = store_of(app).table_counts()
        for compress in (False, True):
            status, body = await ingest(s, url, doc, compress=compress)
            assert status == 200
            assert body["duplicate"] is True and body["accepted"] is True
        assert await signals(s, url, window="1m", service="svc", route="r1") == before
        for w in ("5m", "1h", "1d"):
            rows = await signals(s, url, window=w, service="svc", route="r1")
            assert rows[0]["request_count"] == 4
        assert store_of(app).table_counts() == counts_before
        status, lim = await get(s, url, "/v1/limits", window="1m")
        assert [(r["policy"], r["decision"], r["count"]) for r in lim["rows"]] == \
            [("api", "limited", 2)]


async def test_sql_in_strings_is_stored_verbatim(tmp_path):
    evil = "x'); DROP TABLE buckets; --"
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        doc = batch("b'; DELETE FROM batches; --", T,
                    [series(evil, "svc\" OR 1=1 --", 200, upstream="u'--")],
                    gateway_id="g'; --")
        assert (await ingest(s, url, doc))[0] == 200
        rows = await signals(s, url, window="1m", service="svc\" OR 1=1 --", route=evil)
        assert len(rows) == 1 and rows[0]["route"] == evil
        assert store_of(app).table_counts()["batches"] == 1
        assert (await ingest(s, url, doc))[1]["duplicate"] is True


def test_a_write_refused_inside_the_pipeline_rolls_the_whole_batch_back(tmp_path, control_backend):
    """The batch's writes after its id go out pipelined on PostgreSQL: an error among them
    surfaces when the pipeline ends, rolls back the whole transaction (batch id included) and
    leaves the store usable. (A NUL in text is such an error there; ingest refuses it earlier.)"""
    store = Store(database_of(tmp_path))
    try:
        row = (60, int(T), "svc", "r\x00x", 1, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0)
        if control_backend == "sqlite":
            with store.transaction():
                assert store.rollups.insert_batches([("b1", "gw1", 1, T, T + 10, T + 10)]) == {"b1"}
                with store.pipeline():
                    store.rollups.add_buckets([row])
            assert store.table_counts()["batches"] == 1
            return
        with pytest.raises(UnstorableText), store.transaction():
            assert store.rollups.insert_batches([("b1", "gw1", 1, T, T + 10, T + 10)]) == {"b1"}
            with store.pipeline():
                store.rollups.add_buckets([row[:3] + ("fine",) + row[4:]])
                store.rollups.add_buckets([row])
        assert store.table_counts()["batches"] == 0 and store.table_counts()["buckets"] == 0
        with store.transaction():
            assert store.rollups.insert_batches([("b1", "gw1", 1, T, T + 10, T + 10)]) == {"b1"}
            with store.pipeline():
                store.rollups.add_buckets([row[:3] + ("fine",) + row[4:]])
        assert store.table_counts()["batches"] == 1 and store.table_counts()["buckets"] == 1
    finally:
        store.close()


def _valid() -> dict[str, Any]:
    return batch("gw1-1", T, [series("r1", "svc", 200), series("r1", "svc", 500),
                              series("r2", "svc", 200), series("r3", "svc", 200)],
                 upstreams=[{"upstream": "up1", "latency_us_hdr": None,
                             "breaker_state": "closed", "pool_in_use_max": 1, "pool_max": 8}],
                 limits=[{"policy": "p", "decision": "allowed", "count": 1}],
                 breaker_transitions=[{"upstream": "up1", "from": "closed", "to": "open",
                                       "at": T + 1, "reason": "5 failures"}])


def _set(path: str, value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[int(last) if last.isdigit() else last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


_DELETE = object()

BAD_CASES = [
    ("series.3.count", -1, "series[3].count: must be a non-negative integer"),
    ("series.3.count", "7", "series[3].count: must be a non-negative integer"),
    ("series.3.count", 1.5, "series[3].count: must be a non-negative integer"),
    ("series.3.count", True, "series[3].count: must be a non-negative integer"),
    ("series.0.code", 99, "series[0].code: must be an HTTP status code"),
    ("series.0.code", "200", "series[0].code: must be an HTTP status code"),
    ("series.1.route", 5, "series[1].route: must be a string"),
    ("series.1.route", "", "series[1].route: must not be empty"),
    ("series.1.route", "*", "series[1].route: '*' is reserved"),
    ("series.1.service", "x" * 300, "series[1].service: must be at most 256 characters"),
    ("series.2.bytes_out", -5, "series[2].bytes_out: must be a non-negative integer"),
    ("series.2.latency_us_hdr", "not base64!", "series[2].latency_us_hdr: is not valid base64"),
    ("series.2.latency_us_hdr", 12, "series[2].latency_us_hdr: must be a string"),
    ("series.2.method", _DELETE, "series[2].method: is required"),
    ("series.2.local", 5, "series[2].local: must be a string"),
    ("series.2.local", "x" * 33, "series[2].local: must be at most 32 characters"),
    ("series.2", "row", "series[2]: must be an object"),
    ("series", {}, "series: must be a list"),
    ("series", _DELETE, "series: is required"),
    ("batch_id", None, "batch_id: must be a string"),
    ("gateway_id", _DELETE, "gateway_id: is required"),
    ("seq", -1, "seq: must be a non-negative integer"),
    ("schema", 2, "schema: must be 1"),
    ("interval_start", "yesterday", "interval_start: must be a number"),
    ("interval_start", T - 2 * 86_400, "interval_start: older than 1 day"),
    ("interval_end", T - 5, "interval_end: must not be before interval_start"),
    ("interval_end", T + 86_400, "interval_end: interval longer than"),
    ("upstreams.0.breaker_state", "broken", "upstreams[0].breaker_state: must be one of"),
    ("upstreams.0.pool_max", -1, "upstreams[0].pool_max: must be a non-negative integer"),
    ("limits.0.decision", "maybe", "limits[0].decision: must be one of"),
    ("limits.0.count", -3, "limits[0].count: must be a non-negative integer"),
    ("breaker_transitions.0.to", "ajar", "breaker_transitions[0].to: must be one of"),
    ("saturation.cpu_percent", -1, "saturation.cpu_percent: must be a number"),
    ("saturation.rss_bytes", "big", "saturation.rss_bytes: must be a non-negative integer"),
    ("saturation", [], "saturation: must be an object"),
]


@pytest.mark.parametrize("path,value,message", BAD_CASES,
                         ids=[f"{c[0]}={str(c[1])[:12]}" for c in BAD_CASES])
async def test_invalid_batches_are_rejected_and_nothing_is_stored(tmp_path, path, value,
                                                                  message):
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        doc = copy.deepcopy(_valid())
        _set(path, value)(doc)
        status, body = await ingest(s, url, doc)
        assert status == 400, body
        assert body["status"] == 400 and body["title"] == "Bad Request"
        assert any(e.startswith(message) for e in body["errors"]), body["errors"]
        assert body["detail"] == body["errors"][0]
        assert store_of(app).table_counts() == dict.fromkeys(store_of(app).table_counts(), 0)


async def test_every_error_is_reported(tmp_path):
    async with control_plane(tmp_path, _clock()) as (url, s, _app):
        doc = _valid()
        doc["series"][0]["count"] = -1
        doc["series"][2]["code"] = 1000
        status, body = await ingest(s, url, doc)
        assert status == 400
        assert body["errors"] == ["series[0].count: must be a non-negative integer",
                                  "series[2].code: must be an HTTP status code (100-599)"]


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400), (b"[]", 400), (b"null", 400), (b"\xff\xfe", 400), (b"", 400),
])
async def test_garbage_bodies(tmp_path, body, status):
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        got, doc = await ingest(s, url, body)
        assert got == status and doc["type"] == "about:blank"
        assert store_of(app).table_counts()["batches"] == 0


async def test_oversized_body_is_413(tmp_path):
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        doc = _valid()
        doc["padding"] = "x" * (10 * 1024 * 1024)   # 10 MB
        status, body = await ingest(s, url, doc)
        assert status == 413 and body["status"] == 413
        assert store_of(app).table_counts()["batches"] == 0
        # the connection and the service are fine afterwards
        assert (await ingest(s, url, _valid()))[0] == 200


async def test_oversized_chunked_body_is_413(tmp_path):
    async def gen():
        chunk = b" " * 65536
        for _ in range(160):                       # 10 MiB without a Content-Length
            yield chunk
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        async with s.post(f"{url}/v1/ingest", data=gen(), headers=auth("gateway")) as resp:
            assert resp.status == 413
        assert store_of(app).table_counts()["batches"] == 0


async def test_gzip_bomb_is_413_without_inflating_it(tmp_path):
    bomb = gzip.compress(b"{" + b" " * (40 * 1024 * 1024), compresslevel=9)   # 40 MB -> ~40 KB
    assert len(bomb) < 1024 * 1024
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        headers = {**auth("gateway"), "Content-Encoding": "gzip"}
        async with s.post(f"{url}/v1/ingest", data=bomb, headers=headers) as resp:
            assert resp.status == 413
            assert "decompressed" in orjson.loads(await resp.read())["detail"]
        headers["Content-Encoding"] = "compress"   # aiohttp itself answers 400 for br/zstd
        async with s.post(f"{url}/v1/ingest", data=b"{}", headers=headers) as resp:
            assert resp.status == 415
        headers["Content-Encoding"] = "gzip"
        async with s.post(f"{url}/v1/ingest", data=b"\x1f\x8b garbage",
                          headers=headers) as resp:
            assert resp.status == 400
        assert store_of(app).table_counts()["batches"] == 0


async def test_histogram_bomb_and_foreign_histograms_are_rejected(tmp_path):
    payload = struct.pack(">IIIIQQd", 0x1C849313, 10 ** 7, 0, 2, 1, 60_000_000, 1.0) \
        + b"\0" * 10 ** 7
    packed = zlib.compress(payload, 9)
    bomb = base64.b64encode(struct.pack(">II", 0x1C849314, len(packed)) + packed).decode()
    from hdrh.histogram import HdrHistogram
    foreign = HdrHistogram(1, 1000, 3)
    foreign.record_value(5)
    async with control_plane(tmp_path, _clock()) as (url, s, app):
        for value, message in ((bomb, "inflates beyond"),
                               (foreign.encode().decode(), "must be HdrHistogram(1, 60000000, 2)")):
            doc = _valid()
            doc["series"][1]["latency_us_hdr"] = value
            status, body = await ingest(s, url, doc)
            assert status == 400
            assert body["errors"][0].startswith("series[1].latency_us_hdr: " + message)
        assert store_of(app).table_counts()["batches"] == 0


async def test_breakers_and_gateways_are_recorded(tmp_path):
    async with control_plane(tmp_path, _clock()) as (url, s, _app):
        assert (await ingest(s, url, _valid()))[0] == 200
        # a late batch from the same gateway does not overwrite the newer breaker state
        older = _valid()
        older["batch_id"] = "gw1-0"
        older["interval_start"] = T - 600
        older["interval_end"] = T - 590
        older["upstreams"][0]["breaker_state"] = "open"
        assert (await ingest(s, url, older))[0] == 200
        status, doc = await get(s, url, "/v1/breakers", role="monitor")
        assert status == 200
        assert [(b["gateway_id"], b["upstream"], b["breaker_state"]) for b in doc["breakers"]] \
            == [("gw1", "up1", "closed")]
        assert doc["transitions"][0]["to_state"] == "open"
        assert doc["gateways"][0]["gateway_id"] == "gw1"


async def test_local_series_are_counted_apart_and_queue_no_latency(tmp_path):
    """Series the gateway answered itself (`local`) count in request_count and the error counts
    of the bucket, and again in local_*; the signals rows report the admitted ones."""
    async with control_plane(tmp_path, _clock()) as (url, s, _app):
        doc = batch("loc", T, [
            series("r1", "svc", 200, latencies_us=[50_000] * 10),
            series("r1", "svc", 500, latencies_us=[50_000] * 5),
            {**series("r1", "svc", 429, latencies_us=[30] * 80), "local": "limit"},
            {**series("r1", "svc", 503, latencies_us=[40] * 5), "local": "breaker"},
            {**series("r1", "svc", 499, latencies_us=[40] * 2), "local": "client_gone"}])
        status, body = await ingest(s, url, doc)
        assert status == 200, body
        (row,) = await signals(s, url, service="svc", window="1m", since=T - 60)
        assert (row["request_count"], row["admitted_count"]) == (102, 15)
        assert (row["error_count_5xx"], row["error_count_4xx"], row["rate_limited"]) == (5, 0, 80)
        assert row["local_answers"] == {"count": 87, "4xx": 2, "5xx": 5}
        assert row["error_rate"] == 5 / 15
        assert 49 <= row["latency_p50_ms"] <= 51            # the admitted ones only
