"""GET /v1/health/overview: each health threshold hit by crafted data."""

from __future__ import annotations

import pytest

from gateway.control.domain import health
from tests.fakes import FakeClock
from tests.test_control_support import DAY0, batch, control_plane, get, ingest, series

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

NOW = DAY0 + 7_200 + 150          # 02:02:30
MINUTE = DAY0 + 7_200 + 120       # the current 1m bucket
AT = MINUTE - 120                 # 02:00:00: inside the 5-minute window and the traffic window
BASE = AT - 3_600                 # the same minute one hour earlier


def _s(service: str, code: int, n: int, latency_us: int, upstream: str = "up") -> dict:
    return series("r1", service, code, latencies_us=[latency_us] * n, upstream=upstream)


# service -> (series now, series an hour ago, cpu_percent)
CASES: dict[str, tuple[list[dict], list[dict], float]] = {
    "healthy": ([_s("healthy", 200, 100, 100_000)], [], 10.0),
    "lat_warn": ([_s("lat_warn", 200, 100, 600_000, upstream="up-lat")], [], 10.0),
    "lat_crit": ([_s("lat_crit", 200, 100, 2_500_000)], [], 10.0),
    "lat_edge": ([_s("lat_edge", 200, 100, 490_000)], [], 10.0),
    "err_edge": ([_s("err_edge", 200, 99, 1000), _s("err_edge", 503, 1, 1000)], [], 10.0),
    "err_warn": ([_s("err_warn", 200, 98, 1000), _s("err_warn", 500, 2, 1000)], [], 10.0),
    "err_crit": ([_s("err_crit", 200, 90, 1000), _s("err_crit", 502, 10, 1000)], [], 10.0),
    "limited": ([_s("limited", 200, 50, 1000), _s("limited", 429, 50, 1000),
                 _s("limited", 404, 20, 1000)], [], 10.0),
    "cpu_warn": ([_s("cpu_warn", 200, 10, 1000)], [], 75.0),
    "cpu_crit": ([_s("cpu_crit", 200, 10, 1000)], [], 95.0),
    "drop_warn": ([_s("drop_warn", 200, 400, 1000)], [_s("drop_warn", 200, 1000, 1000)], 10.0),
    "drop_crit": ([_s("drop_crit", 200, 100, 1000)], [_s("drop_crit", 200, 1000, 1000)], 10.0),
    "drop_gone": ([], [_s("drop_gone", 200, 500, 1000)], 10.0),
    "quiet": ([_s("quiet", 200, 1, 1000)], [_s("quiet", 200, 99, 1000)], 10.0),
    "-": ([series("-", "-", 404, latencies_us=[10] * 50, upstream="-")], [], 10.0),
}
EXPECTED = {
    "healthy": ("healthy", []),
    "lat_warn": ("warning", [("latency_p95", "warning")]),
    "lat_crit": ("critical", [("latency_p95", "critical")]),
    "lat_edge": ("healthy", []),
    "err_edge": ("healthy", []),
    "err_warn": ("warning", [("error_rate", "warning")]),
    "err_crit": ("critical", [("error_rate", "critical")]),
    "limited": ("healthy", []),
    "cpu_warn": ("warning", [("cpu", "warning")]),
    "cpu_crit": ("critical", [("cpu", "critical")]),
    "drop_warn": ("warning", [("traffic_drop", "warning")]),
    "drop_crit": ("critical", [("traffic_drop", "critical")]),
    "drop_gone": ("critical", [("traffic_drop", "critical")]),
    "quiet": ("healthy", []),
}


async def test_overview_statuses_for_each_threshold(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=NOW)) as (url, s, _app):
        for i, (service, (now_series, base_series, cpu)) in enumerate(CASES.items()):
            sat = {"inflight_max": 1, "loop_lag_max_s": 0.001, "cpu_percent": cpu,
                   "rss_bytes": 1}
            for j, (start, ser) in enumerate(((AT, now_series), (BASE, base_series))):
                if ser:
                    doc = batch(f"{service}-{j}", start, ser, gateway_id=f"gw-{i}",
                                saturation=sat)
                    if service == "lat_warn" and j == 0:
                        doc["upstreams"] = [{"upstream": "up-lat", "latency_us_hdr": None,
                                             "breaker_state": "open", "pool_in_use_max": 3,
                                             "pool_max": 8}]
                    status, body = await ingest(s, url, doc)
                    assert status == 200, body
        status, doc = await get(s, url, "/v1/health/overview", role="reader")
        assert status == 200
        got = {svc["service"]: svc for svc in doc["services"]}
        assert set(got) == set(EXPECTED)                     # "-" (no route) is not a service
        for service, (status_, rules) in EXPECTED.items():
            svc = got[service]
            assert svc["health_status"] == status_, (service, svc["reasons"])
            assert [(r["rule"], r["severity"]) for r in svc["reasons"]] == rules, service
        assert got["err_warn"]["error_rate"] == pytest.approx(0.02)
        assert got["limited"]["rate_limited"] == 50 and got["limited"]["error_count_4xx"] == 20
        assert got["limited"]["error_rate"] == 0.0
        assert got["limited"]["4xx_rate"] == pytest.approx(20 / 120)
        assert got["lat_crit"]["latency_p95_ms"] == pytest.approx(2500, rel=0.01)
        assert got["drop_warn"]["traffic"] == {"requests": 400, "baseline_requests": 1000,
                                               "change": pytest.approx(-0.6)}
        assert got["quiet"]["traffic"]["change"] is None     # baseline under 100 requests
        assert got["drop_gone"]["request_count"] == 0
        assert got["cpu_crit"]["saturation"]["cpu_percent"] == 95.0
        assert [(b["upstream"], b["state"]) for b in got["lat_warn"]["circuit_breakers"]] == \
            [("up-lat", "open")]
        assert [b["state"] for b in doc["circuit_breakers"]] == ["open"]
        assert doc["incidents"] == []
        assert doc["window"] == {"since": MINUTE - 300, "until": MINUTE, "seconds": 300,
                                 "complete_buckets_only": True}


async def test_overview_window_moves_with_the_clock(tmp_path):
    clock = FakeClock(wall=NOW)
    async with control_plane(tmp_path, clock) as (url, s, _app):
        doc = batch("e-1", AT, [_s("svc", 200, 90, 1000), _s("svc", 500, 10, 1000)])
        assert (await ingest(s, url, doc))[0] == 200
        _, doc = await get(s, url, "/v1/health/overview", role="monitor")
        assert doc["services"][0]["health_status"] == "critical"
        clock.advance(5 * 60)                                 # the errors leave the window
        _, doc = await get(s, url, "/v1/health/overview", role="monitor")
        assert doc["services"] == []


@pytest.mark.parametrize("args,status,rules", [
    ((500.0, 0.01, 70.0, 0.5), "healthy", []),
    ((500.1, None, None, None), "warning", ["latency_p95"]),
    ((2000.1, 0.011, None, None), "critical", ["latency_p95", "error_rate"]),
    ((None, 0.0501, 90.0, None), "critical", ["error_rate", "cpu"]),
    ((None, None, 90.5, 0.81), "critical", ["cpu", "traffic_drop"]),
    ((None, None, None, 0.51), "warning", ["traffic_drop"]),
    ((None, None, None, None), "healthy", []),
])
def test_evaluate_edges(args, status, rules):
    got, reasons = health.evaluate(*args)
    assert got == status and [r["rule"] for r in reasons] == rules


async def test_requests_per_second_is_true_at_every_second_of_a_minute(tmp_path):
    """A steady 50 req/s, shipped every second, read at every second of a minute: only complete
    minutes are used, so count / window.seconds is the true rate, never a sawtooth."""
    start = DAY0 + 3_600                        # 01:00:00
    clock = FakeClock(wall=start)
    rate = 50
    async with control_plane(tmp_path, clock) as (url, s, _app):
        async def ship_second(t: float) -> None:
            doc = batch(f"b-{t}", t, [series("r1", "steady", 200, count=rate,
                                             latencies_us=[1000] * rate)], length=1.0)
            assert (await ingest(s, url, doc))[0] == 200

        for _ in range(6 * 60):                     # six minutes of history, one batch a second
            await ship_second(clock.time())
            clock.advance(1)
        for second in range(60):                    # then read at 01:06:00, :01, ... :59
            now = clock.time()
            await ship_second(now)                  # the current minute keeps filling
            clock.advance(0.5)
            _, doc = await get(s, url, "/v1/health/overview", role="reader")
            win = doc["window"]
            assert (win["since"], win["until"], win["seconds"]) == (
                start + 60, start + 6 * 60, 300), second
            (svc,) = doc["services"]
            assert svc["request_count"] / win["seconds"] == rate, second
            assert svc["requests_per_s"] == rate, second
            clock.advance(0.5)


async def test_upstream_failing_17_percent_under_a_flood_of_429s_is_critical(tmp_path):
    """A real gateway in front of a real upstream that answers 500 to 17 of the 100 requests it
    receives (each after 20 ms), while a flood of 999 requests is rate-limited by the gateway.
    The control plane judges the admitted requests: 17 % errors (critical), the upstream's p95;
    the 429s are counted apart. (Over every answer it was 1.5 % and a p95 of a 429.)"""
    import asyncio

    import aiohttp
    from aiohttp import web

    from gateway import config as config_mod
    from gateway.app import GatewayServer
    from tests.harness import Upstream, gateway_yaml

    async def work(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        return web.Response(status=500 if request.headers.get("X-Fail") else 200, text="ok")

    t0 = DAY0 + 600 + 10
    clock = FakeClock(wall=t0)
    upstream = Upstream()
    upstream.extra.append(web.get("/work", work))
    await upstream.start()
    text = gateway_yaml([upstream.url], route_extra="limits: [per_client]") + (
        'limits: [{name: per_client, key: "header:X-Client", rate: "1/hour", burst: 0}]\n')
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw = GatewayServer(str(path), config_mod.load(path), clock=clock)
    await gw.start()
    try:
        assert gw.proxy_address is not None
        url = "http://{}:{}/work".format(*gw.proxy_address)
        codes: list[int] = []
        async with aiohttp.ClientSession() as s:
            async def one(headers: dict[str, str]) -> None:
                async with s.get(url, headers=headers) as resp:
                    await resp.read()
                    codes.append(resp.status)

            for i in range(99):             # 99 clients, one request each: all admitted
                await one({"X-Client": f"c{i}", **({"X-Fail": "1"} if i < 17 else {})})
            for _ in range(10):             # the flood: its first request admitted, 999 not
                await asyncio.gather(*(one({"X-Client": "flood"}) for _ in range(100)))
        assert codes.count(429) == 999 and codes.count(500) == 17 and codes.count(200) == 83
        agg = gw.signals.swap()
    finally:
        await gw.stop()
        await upstream.stop()
    admitted = [x for x in agg.series if not x.local]
    merged = admitted[0].histogram()
    for x in admitted[1:]:
        merged.add(x.histogram())
    assert merged.get_total_count() == 100
    true_p95_ms = merged.get_value_at_percentile(95) / 1000.0
    assert 20.0 <= true_p95_ms < 200.0

    from tests.test_control_slo_support import make_slo
    latency_slo = make_slo(name="svc-latency", sli="latency", threshold_ms=10, window="1h")
    async with control_plane(tmp_path, clock, slos=(latency_slo,)) as (url, s, _app):
        doc = {**agg.to_wire(), "batch_id": "b1", "gateway_id": "gw1", "seq": 1}
        st, body = await ingest(s, url, doc)
        assert st == 200, body
        clock.advance(60)                       # the batch's minute is complete
        st, ov = await get(s, url, "/v1/health/overview", role="reader")
        assert st == 200, ov
        (svc,) = ov["services"]
        assert svc["health_status"] == "critical", svc
        assert [r["rule"] for r in svc["reasons"]] == ["error_rate"]
        assert svc["error_rate"] == pytest.approx(0.17)
        assert svc["latency_p95_ms"] == pytest.approx(true_p95_ms)
        assert (svc["request_count"], svc["admitted_count"], svc["error_count_5xx"]) == (
            1099, 100, 17)
        assert svc["rate_limited"] == 999 and svc["local_answers"]["count"] == 999
        st, sig = await get(s, url, "/v1/signals", service="svc", window="1m",
                            since=int(DAY0))
        (row,) = sig["rows"]
        assert row["error_rate"] == pytest.approx(0.17)
        assert row["latency_p95_ms"] == pytest.approx(true_p95_ms)
        assert (row["request_count"], row["admitted_count"], row["rate_limited"]) == (
            1099, 100, 999)
        # the latency SLO judges the 100 admitted requests (all slower than 10 ms), not 1099
        st, budgets = await get(s, url, "/v1/error-budgets/svc")
        assert st == 200, budgets
        assert budgets["budgets"][0]["events"] == {"total": 100, "bad": 100, "good": 0}
