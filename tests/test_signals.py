"""Signals: recording, swap hand-over, wire document, HDR precision, saturation sampling."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import orjson
import pytest
from hdrh.histogram import HdrHistogram

from gateway.signals import (
    COUNTS_LEN,
    MAX_TRACKABLE_US,
    NO_UPSTREAM,
    Aggregates,
    LoopLagMonitor,
    Signals,
    count_le,
    counts_index,
    percentile_s,
)
from tests.fakes import FakeClock

WALL = 1_700_000_000.0


def decode(encoded: str) -> HdrHistogram:
    return HdrHistogram.decode(encoded.encode("ascii"))


def test_inline_index_matches_hdrh_layout() -> None:
    ref = HdrHistogram(1, 60_000_000, 2)
    assert ref.counts_len == COUNTS_LEN
    rng = random.Random(5)
    values = [0, 1, 255, 256, 511, 512, 60_000_000, MAX_TRACKABLE_US]
    values += [rng.randint(0, MAX_TRACKABLE_US) for _ in range(5000)]
    values += [rng.randint(0, 100_000) for _ in range(5000)]
    for v in values:
        assert counts_index(v) == ref._counts_index_for(v), v


def test_known_mix_swaps_into_the_wire_document() -> None:
    clock = FakeClock(wall=WALL)
    s = Signals(clock)
    s.set_breaker_state("payments", "closed")
    for _ in range(90):
        s.record("pay", "payments", "payment_service", "GET", 200, 0.020, 0.015, 100, 2000)
    for _ in range(10):
        s.record("pay", "payments", "payment_service", "POST", 502, 1.5, None, 300, 120)
    s.record("-", NO_UPSTREAM, "-", "GET", 404, 0.0002, None, 0, 150)
    s.record("pay", "payments", "payment_service", "BREW", 200, 0.001, 0.0005, 0, 0)
    s.record_limit("api_calls", "allowed")
    s.record_limit("api_calls", "allowed")
    s.record_limit("api_calls", "limited")
    clock.advance(3)
    s.record_breaker_transition("payments", "closed", "open", "5 consecutive failures")
    s.add_pool_source("payments", lambda: (7, 1024))
    s.inflight += 1
    s.inflight += 1
    s.inflight -= 1
    clock.advance(7)

    agg = s.swap()
    assert isinstance(agg, Aggregates)
    assert (agg.interval_start, agg.interval_end) == (WALL, WALL + 10)
    assert agg.request_count == 102
    wire = orjson.loads(orjson.dumps(agg.to_wire()))   # JSON-clean
    assert set(wire) == {"schema", "interval_start", "interval_end", "series", "upstreams",
                         "limits", "breaker_transitions", "saturation"}
    assert wire["schema"] == 1
    series = {(x["route"], x["method"], x["code"]): x for x in wire["series"]}
    assert set(series) == {("pay", "GET", 200), ("pay", "POST", 502), ("-", "GET", 404),
                           ("pay", "OTHER", 200)}
    ok = series[("pay", "GET", 200)]
    assert (ok["upstream"], ok["service"], ok["count"], ok["bytes_in"], ok["bytes_out"]) == (
        "payments", "payment_service", 90, 9000, 180000)
    h = decode(ok["latency_us_hdr"])
    assert h.get_total_count() == 90
    assert h.values_are_equivalent(h.get_value_at_percentile(50), 20_000)
    bad = decode(series[("pay", "POST", 502)]["latency_us_hdr"])
    assert bad.values_are_equivalent(bad.get_value_at_percentile(99), 1_500_000)
    assert series[("-", "GET", 404)]["upstream"] == "-"

    (up,) = wire["upstreams"]          # "-" is not an upstream
    assert up["upstream"] == "payments"
    assert up["breaker_state"] == "open"
    assert (up["pool_in_use_max"], up["pool_max"]) == (7, 1024)
    uh = decode(up["latency_us_hdr"])
    assert uh.get_total_count() == 91   # 90 GET + 1 BREW were timed upstream
    assert sorted((x["policy"], x["decision"], x["count"]) for x in wire["limits"]) == [
        ("api_calls", "allowed", 2), ("api_calls", "limited", 1)]
    assert wire["breaker_transitions"] == [{"upstream": "payments", "from": "closed",
                                            "to": "open", "at": WALL + 3,
                                            "reason": "5 consecutive failures"}]
    sat = wire["saturation"]
    assert sat["inflight_max"] == 2
    assert sat["loop_lag_max_s"] == 0.0
    assert isinstance(sat["cpu_percent"], float) and sat["cpu_percent"] >= 0
    assert sat["rss_bytes"] > 0

    clock.advance(10)
    nxt = s.swap()
    assert (nxt.interval_start, nxt.interval_end) == (WALL + 10, WALL + 20)
    assert nxt.series == () and nxt.limits == () and nxt.breaker_transitions == ()
    assert nxt.is_empty
    assert nxt.saturation.inflight_max == 1     # the one still in flight
    (up2,) = nxt.to_wire()["upstreams"]
    assert up2["latency_us_hdr"] is None and up2["breaker_state"] == "open"


def test_hdr_percentiles_within_precision() -> None:
    s = Signals(FakeClock())
    rng = random.Random(42)
    values = [rng.lognormvariate(-4.0, 1.2) for _ in range(20_000)]   # ~18 ms median, long tail
    for v in values:
        s.record("r", "u", "svc", "GET", 200, v, v / 2, 0, 0)
    agg = s.swap()
    (series,) = agg.series
    hist = decode(agg.to_wire()["series"][0]["latency_us_hdr"])
    values.sort()
    for q in (50.0, 90.0, 95.0, 99.0, 99.9):
        true_us = values[max(0, int(q / 100 * len(values) + 0.5) - 1)] * 1e6
        got = hist.get_value_at_percentile(q)
        # 2 significant figures: a slot is at most 1/128 of its value wide (+1 us truncation)
        assert abs(got - true_us) <= true_us / 128 + 1, (q, got, true_us)
        assert percentile_s(series.counts, q) == pytest.approx(got / 1e6)
    assert series.sum_s == pytest.approx(sum(values))


def test_out_of_range_durations_are_clamped_not_lost() -> None:
    s = Signals(FakeClock())
    s.record("r", "u", "svc", "GET", 504, 90.0, 75.0, 0, 0)
    s.record("r", "u", "svc", "GET", 504, -0.001, None, 0, 0)   # a clock step backwards
    (series,) = s.swap().series
    assert series.count == 2 and sum(series.counts) == 2
    assert count_le(series.counts, [0, 60_000_000]) == [1, 1]   # 90 s lands above 60 s


async def test_swap_loses_and_double_counts_nothing_under_concurrent_load() -> None:
    clock = FakeClock()
    s = Signals(clock)
    workers, per_worker = 40, 2_500
    routes = [f"r{i}" for i in range(5)]
    codes = [200, 201, 404, 500, 503]
    swapped: list[Aggregates] = []
    done = asyncio.Event()

    async def client(i: int) -> None:
        rng = random.Random(i)
        for n in range(per_worker):
            s.inflight += 1
            if rng.random() < 0.3:
                await asyncio.sleep(0)
            s.record(rng.choice(routes), "u", "svc", "GET", rng.choice(codes),
                     rng.random() * 0.2, rng.random() * 0.1, 10, 20)
            s.record_limit("p", "allowed")
            s.inflight -= 1
            if n % 7 == 0:
                await asyncio.sleep(0)

    async def shipper() -> None:
        while not done.is_set():
            clock.advance(1)
            swapped.append(s.swap())
            await asyncio.sleep(0)

    ship = asyncio.create_task(shipper())
    await asyncio.gather(*(client(i) for i in range(workers)))
    done.set()
    await ship
    swapped.append(s.swap())

    total = workers * per_worker
    assert len(swapped) > 10      # swaps really happened in between
    assert sum(a.request_count for a in swapped) == total
    assert sum(sum(sum(x.counts) for x in a.series) for a in swapped) == total
    assert sum(sum(u.count for u in a.upstreams) for a in swapped) == total
    assert sum(lim.count for a in swapped for lim in a.limits) == total
    assert sum(x.bytes_out for a in swapped for x in a.series) == 20 * total
    # consecutive intervals tile time without gaps
    for a, b in itertools.pairwise(swapped):
        assert a.interval_end == b.interval_start
    # and the cumulative totals /metrics reads agree
    t = s.totals()
    assert sum(t.requests.values()) == total
    assert sum(h.count for h in t.durations.values()) == total
    assert t.limits == {("p", "allowed"): total}


def test_totals_are_cumulative_across_swaps() -> None:
    s = Signals(FakeClock(), buckets_s=[0.005, 0.5])
    s.record("r", "u", "svc", "GET", 200, 0.003, 0.002, 1, 2)
    s.swap()
    s.record("r", "u", "svc", "GET", 200, 0.3, 0.2, 1, 2)
    t = s.totals()
    assert t.buckets_s == (0.005, 0.5)
    assert t.requests == {("r", "u", "GET", 200): 2}
    assert t.durations[("r", "u")].le_counts == (1, 2)
    assert t.durations[("r", "u")].sum_s == pytest.approx(0.303)
    assert t.upstream_durations["u"].le_counts == (1, 2)
    assert t.bytes_in == {("r", "u"): 2}
    # reading totals does not disturb the interval
    (series,) = s.swap().series
    assert series.count == 1


def test_inflight_max_tracks_the_interval_peak() -> None:
    s = Signals(FakeClock())
    for _ in range(5):
        s.inflight += 1
    for _ in range(3):
        s.inflight -= 1
    assert (s.inflight, s.inflight_max) == (2, 5)
    assert s.swap().saturation.inflight_max == 5
    assert s.inflight_max == 2     # the new interval starts from what is in flight now
    s.inflight -= 2
    assert s.swap().saturation.inflight_max == 2
    assert s.swap().saturation.inflight_max == 0


def test_pool_sources_sampled_max_and_replaced() -> None:
    s = Signals(FakeClock())
    use = iter([3, 9, 4, 1])
    s.add_pool_source("a", lambda: (next(use), 512))
    s.add_pool_source("broken", lambda: 1 // 0)    # type: ignore[arg-type,return-value]
    assert s.sample_pools() == {"a": (3, 512)}
    s.sample_pools()
    s.sample_pools()
    (up,) = s.swap().upstreams      # the swap samples once more (1)
    assert (up.upstream, up.pool_in_use_max, up.pool_max) == ("a", 9, 512)
    s.clear_pool_sources()
    assert s.sample_pools() == {}
    assert s.swap().upstreams == ()    # no longer an upstream of this gateway


def test_invalid_values_are_programming_errors() -> None:
    s = Signals(FakeClock())
    with pytest.raises(ValueError, match="limit decision"):
        s.record_limit("p", "maybe")
    with pytest.raises(ValueError, match="breaker state"):
        s.set_breaker_state("u", "half-open")
    with pytest.raises(ValueError, match="breaker state"):
        s.record_breaker_transition("u", "closed", "ajar", "x")
    with pytest.raises(ValueError, match="reload result"):
        s.record_reload("ok")
    with pytest.raises(ValueError, match="shipper result"):
        s.record_shipper("lost")
    s.record_reload("success")
    s.record_shipper("spooled")
    s.set_spooled(3)
    t = s.totals()
    assert (t.reloads, t.shipper, t.spooled) == ({"success": 1}, {"spooled": 1}, 3)


async def test_loop_lag_rises_when_the_loop_is_blocked() -> None:
    s = Signals()                      # real clock: the loop really is blocked
    seen: list[int] = []
    s.add_pool_source("u", lambda: (len(seen), 10))
    mon = LoopLagMonitor(s, interval_s=0.05)
    await mon.start()
    try:
        await asyncio.sleep(0.12)
        assert mon.last_lag_s < 0.2
        time.sleep(0.3)  # noqa: ASYNC251 - block the loop on purpose
        await asyncio.sleep(0.1)
        assert mon.max_lag_s >= 0.2
        assert s.swap().saturation.loop_lag_max_s >= 0.2
        assert mon.max_lag_s < 0.2     # reset by the swap
        seen.append(1)
        await asyncio.sleep(0.12)      # the tick samples the pools too
        assert s.swap().upstreams[0].pool_in_use_max == 1
    finally:
        await mon.stop()
    await mon.stop()                   # idempotent
