"""/metrics: exact counts and buckets, cumulative counters, merging workers, alert rules."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.metrics import BUCKETS_S, CONTENT_TYPE, merge_expositions, render
from gateway.signals import Signals
from tests.conftest import ROOT
from tests.fakes import FakeClock

PROM_DIR = ROOT / "config" / "prometheus"
LE = [*(str(b) for b in BUCKETS_S), "+Inf"]
UPSTREAM_S = web.RequestKey("upstream_s", float)


def parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text.decode("utf-8")):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def val(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
        **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def buckets(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
            **labels: str) -> dict[str, float]:
    return {le: val(samples, name + "_bucket", le=le, **labels) for le in LE}


def expected_buckets(values: list[float]) -> dict[str, float]:
    return {le: float(sum(1 for v in values if v <= float(le))) for le in LE}


# A known mix, every value well inside an HDR slot away from a bucket bound.
MIX = [  # (method, code, duration_s, upstream_s or None, repeat)
    ("GET", 200, 0.0003, 0.0002, 5),
    ("GET", 200, 0.004, 0.003, 10),
    ("GET", 200, 0.04, 0.035, 20),
    ("POST", 201, 0.7, 0.6, 3),
    ("POST", 503, 0.0012, None, 4),     # breaker open: no upstream time
    ("GET", 504, 30.5, 30.4, 2),
    ("GET", 502, 100.0, None, 1),       # beyond the last bucket
]


def feed_mix(s: Signals) -> None:
    for method, code, d, u, n in MIX:
        for _ in range(n):
            s.record("pay", "payments", "payment_service", method, code, d, u, 100, 1000)
    s.record("-", "-", "-", "PROPFIND", 404, 0.0001, None, 0, 120)


def test_contract_names_types_and_labels() -> None:
    contract = {
        "gateway_requests_total": ("counter", ("route", "upstream", "method", "code")),
        "gateway_request_duration_seconds": ("histogram", ("route", "upstream")),
        "gateway_upstream_duration_seconds": ("histogram", ("upstream",)),
        "gateway_inflight_requests": ("gauge", ()),
        "gateway_ratelimit_decisions_total": ("counter", ("policy", "decision")),
        "gateway_circuit_breaker_state": ("gauge", ("upstream",)),
        "gateway_circuit_breaker_transitions_total": ("counter", ("upstream", "from", "to")),
        "gateway_event_loop_lag_seconds": ("gauge", ()),
        "gateway_shipper_batches_total": ("counter", ("result",)),
        "gateway_shipper_spooled_batches": ("gauge", ()),
        "gateway_config_reloads_total": ("counter", ("result",)),
    }
    defs = {m.name: m for m in metrics.METRICS}
    assert len(defs) == len(metrics.METRICS), "a name is defined twice"
    for name, (type_, labels) in contract.items():
        assert (defs[name].type, defs[name].labels) == (type_, labels), name
    for m in metrics.METRICS:
        assert m.name.startswith("gateway_")
        assert (m.type == "counter") == m.name.endswith("_total"), m.name
    # every defined name is exposed, even by an idle process
    exposed = {s for s, _ in parse(render(Signals(FakeClock())))}
    idle_empty = {n for n, d in defs.items() if d.labels}   # labelled families start empty
    assert {n for n in defs if n not in idle_empty} <= exposed


def test_exposition_has_exact_counts_and_buckets() -> None:
    s = Signals(FakeClock())
    feed_mix(s)
    for _ in range(7):
        s.record_limit("api_calls", "allowed")
    s.record_limit("api_calls", "limited")
    s.record_limit("uploads", "shadow_limited")
    s.set_breaker_state("payments", "closed")
    s.record_breaker_transition("payments", "closed", "open", "5 consecutive failures")
    s.set_breaker_state("search", "half_open")
    s.add_pool_source("payments", lambda: (12, 1024))
    s.record_reload("success")
    s.record_reload("failure")
    s.record_shipper("success")
    s.set_spooled(2)
    s.inflight += 3
    s.observe_loop_lag(0.004)

    got = parse(render(s))

    req = "gateway_requests_total"
    assert val(got, req, route="pay", upstream="payments", method="GET", code="200") == 35
    assert val(got, req, route="pay", upstream="payments", method="POST", code="201") == 3
    assert val(got, req, route="pay", upstream="payments", method="POST", code="503") == 4
    assert val(got, req, route="pay", upstream="payments", method="GET", code="504") == 2
    assert val(got, req, route="pay", upstream="payments", method="GET", code="502") == 1
    assert val(got, req, route="-", upstream="-", method="OTHER", code="404") == 1
    assert sum(v for (n, _), v in got.items() if n == req) == 46

    totals = [d for _, _, d, _, n in MIX for _ in range(n)]
    dur = "gateway_request_duration_seconds"
    assert buckets(got, dur, route="pay", upstream="payments") == expected_buckets(totals)
    assert val(got, dur + "_count", route="pay", upstream="payments") == 45
    assert val(got, dur + "_sum", route="pay", upstream="payments") == pytest.approx(sum(totals))
    assert buckets(got, dur, route="-", upstream="-") == expected_buckets([0.0001])

    ups = [u for _, _, _, u, n in MIX for _ in range(n) if u is not None]
    udur = "gateway_upstream_duration_seconds"
    assert buckets(got, udur, upstream="payments") == expected_buckets(ups)
    assert val(got, udur + "_count", upstream="payments") == 40
    assert val(got, udur + "_sum", upstream="payments") == pytest.approx(sum(ups))
    assert not any(n.startswith(udur) and ("upstream", "-") in labels for n, labels in got)

    assert val(got, "gateway_request_bytes_total", route="pay", upstream="payments") == 4500
    assert val(got, "gateway_response_bytes_total", route="pay", upstream="payments") == 45000
    rl = "gateway_ratelimit_decisions_total"
    assert val(got, rl, policy="api_calls", decision="allowed") == 7
    assert val(got, rl, policy="api_calls", decision="limited") == 1
    assert val(got, rl, policy="uploads", decision="shadow_limited") == 1
    assert val(got, "gateway_circuit_breaker_state", upstream="payments") == 2
    assert val(got, "gateway_circuit_breaker_state", upstream="search") == 1
    assert val(got, "gateway_circuit_breaker_transitions_total", upstream="payments",
               **{"from": "closed", "to": "open"}) == 1
    assert val(got, "gateway_config_reloads_total", result="success") == 1
    assert val(got, "gateway_config_reloads_total", result="failure") == 1
    assert val(got, "gateway_shipper_batches_total", result="success") == 1
    assert val(got, "gateway_shipper_spooled_batches") == 2
    assert val(got, "gateway_inflight_requests") == 3
    assert val(got, "gateway_event_loop_lag_seconds") == 0.004
    assert val(got, "gateway_upstream_pool_connections_in_use", upstream="payments") == 12
    assert val(got, "gateway_upstream_pool_connections_max", upstream="payments") == 1024
    assert val(got, "gateway_process_cpu_percent") >= 0
    assert val(got, "gateway_process_resident_memory_bytes") > 0
    assert val(got, "gateway_worker_processes") == 1


def test_counters_stay_cumulative_across_swaps() -> None:
    s = Signals(FakeClock())

    def stable() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {k: v for k, v in parse(render(s)).items() if k[0] in _CUMULATIVE}

    feed_mix(s)
    s.record_limit("api_calls", "allowed")
    before = stable()
    assert before
    s.swap()
    assert stable() == before          # a swap hands the interval over; counters stay
    feed_mix(s)
    s.record_limit("api_calls", "allowed")
    s.swap()
    twice = stable()
    assert twice.keys() == before.keys()
    for key, v in before.items():
        assert twice[key] == pytest.approx(2 * v), key
    s.record("pay", "payments", "payment_service", "GET", 200, 0.004, 0.003, 100, 1000)
    live = parse(render(s))            # cumulative + the live interval
    assert val(live, "gateway_requests_total", route="pay", upstream="payments", method="GET",
               code="200") == 2 * 35 + 1


_CUMULATIVE = {
    "gateway_requests_total", "gateway_request_duration_seconds_bucket",
    "gateway_request_duration_seconds_count", "gateway_request_duration_seconds_sum",
    "gateway_upstream_duration_seconds_bucket", "gateway_upstream_duration_seconds_count",
    "gateway_upstream_duration_seconds_sum", "gateway_request_bytes_total",
    "gateway_response_bytes_total", "gateway_ratelimit_decisions_total",
}


async def test_real_server_latencies_land_in_the_right_buckets() -> None:
    signals = Signals()
    fast_n, slow_n, missing_n = 20, 5, 3

    @web.middleware
    async def record(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if request.path == "/metrics":
            return await handler(request)
        t0 = time.perf_counter()
        signals.inflight += 1
        body = await request.read()
        status, out, route = 500, 0, "-"
        try:
            resp = await handler(request)
            assert isinstance(resp, web.Response) and resp.body is not None
            status, out = resp.status, len(resp.body)   # type: ignore[arg-type]
            route = request.path.strip("/")
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            signals.inflight -= 1
            signals.record(route, "demo" if route != "-" else "-",
                           "demo_service" if route != "-" else "-", request.method, status,
                           time.perf_counter() - t0, request.get(UPSTREAM_S), len(body), out)

    async def fast(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        request[UPSTREAM_S] = time.perf_counter() - t0
        return web.Response(body=b"ok")

    async def slow(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        await asyncio.sleep(0.3)
        request[UPSTREAM_S] = time.perf_counter() - t0
        return web.Response(body=b"slow answer")

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=render(signals), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application(middlewares=[record])
    app.router.add_get("/fast", fast)
    app.router.add_post("/slow", slow)
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def call(method: str, path: str, data: bytes | None = None) -> int:
                async with http.request(method, base + path, data=data) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(
                *(call("POST", "/slow", b"x" * 10) for _ in range(slow_n)),
                *(call("GET", "/fast") for _ in range(fast_n)),
                *(call("GET", f"/nope/{i}?api_key=secret") for i in range(missing_n)))
            assert sorted(statuses) == [200] * (fast_n + slow_n) + [404] * missing_n
            async with http.get(base + "/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == CONTENT_TYPE
                text = await r.read()
    finally:
        await runner.cleanup()

    got = parse(text)
    req = "gateway_requests_total"
    assert val(got, req, route="fast", upstream="demo", method="GET", code="200") == fast_n
    assert val(got, req, route="slow", upstream="demo", method="POST", code="200") == slow_n
    assert val(got, req, route="-", upstream="-", method="GET", code="404") == missing_n
    dur = "gateway_request_duration_seconds"
    fast_b = buckets(got, dur, route="fast", upstream="demo")
    slow_b = buckets(got, dur, route="slow", upstream="demo")
    assert fast_b["0.25"] == fast_b["+Inf"] == fast_n        # loopback + 1 ms sleep
    assert slow_b["0.25"] == 0 and slow_b["60.0"] == slow_b["+Inf"] == slow_n
    assert val(got, dur + "_sum", route="slow", upstream="demo") >= 0.3 * slow_n
    udur = "gateway_upstream_duration_seconds"
    assert val(got, udur + "_count", upstream="demo") == fast_n + slow_n
    assert buckets(got, udur, upstream="demo")["0.25"] == fast_n
    assert val(got, "gateway_request_bytes_total", route="slow", upstream="demo") == 10 * slow_n
    assert val(got, "gateway_response_bytes_total", route="fast", upstream="demo") == 2 * fast_n
    assert val(got, "gateway_inflight_requests") == 0
    assert signals.inflight_max >= slow_n       # the slow ones overlapped


def _worker(clock: FakeClock, n200: int, d200: float, inflight: int, lag: float,
            breaker: str, pool: tuple[int, int]) -> Signals:
    s = Signals(clock)
    for _ in range(n200):
        s.record("pay", "payments", "payment_service", "GET", 200, d200, d200 / 2, 10, 100)
    s.inflight += inflight
    s.observe_loop_lag(lag)
    if breaker == "closed":
        s.set_breaker_state("payments", "closed")
    else:
        s.record_breaker_transition("payments", "closed", breaker, "test")
    s.add_pool_source("payments", lambda: pool)
    s.record_limit("api_calls", "allowed")
    return s


def test_merge_expositions_sums_workers_without_double_counting() -> None:
    clock = FakeClock()
    a = _worker(clock, 3, 0.004, inflight=2, lag=0.010, breaker="closed", pool=(3, 100))
    a.record("pay", "payments", "payment_service", "GET", 500, 0.7, 0.6, 10, 100)
    a.record_reload("success")
    b = _worker(clock, 2, 0.04, inflight=1, lag=0.200, breaker="open", pool=(4, 100))
    b.record("search", "search", "search_service", "POST", 201, 0.002, 0.001, 5, 50)
    b.record_limit("api_calls", "limited")
    b.set_spooled(3)
    a.set_spooled(3)
    ta, tb = render(a), render(b)

    merged = merge_expositions([ta, tb])
    got = parse(merged)
    req = "gateway_requests_total"
    assert val(got, req, route="pay", upstream="payments", method="GET", code="200") == 5
    assert val(got, req, route="pay", upstream="payments", method="GET", code="500") == 1
    assert val(got, req, route="search", upstream="search", method="POST", code="201") == 1
    dur = "gateway_request_duration_seconds"
    assert buckets(got, dur, route="pay", upstream="payments") == expected_buckets(
        [0.004] * 3 + [0.04] * 2 + [0.7])
    assert val(got, dur + "_count", route="pay", upstream="payments") == 6
    assert val(got, dur + "_sum", route="pay", upstream="payments") == pytest.approx(
        0.012 + 0.08 + 0.7)
    assert buckets(got, dur, route="search", upstream="search") == expected_buckets([0.002])
    assert val(got, "gateway_upstream_duration_seconds_count", upstream="payments") == 6
    assert val(got, "gateway_request_bytes_total", route="pay", upstream="payments") == 60
    assert val(got, "gateway_ratelimit_decisions_total", policy="api_calls",
               decision="allowed") == 2
    assert val(got, "gateway_ratelimit_decisions_total", policy="api_calls",
               decision="limited") == 1
    assert val(got, "gateway_circuit_breaker_transitions_total", upstream="payments",
               **{"from": "closed", "to": "open"}) == 1
    assert val(got, "gateway_config_reloads_total", result="success") == 1
    # gauges by their rule
    assert val(got, "gateway_inflight_requests") == 3                   # sum
    assert val(got, "gateway_event_loop_lag_seconds") == 0.2            # max
    assert val(got, "gateway_circuit_breaker_state", upstream="payments") == 2   # most open
    assert val(got, "gateway_upstream_pool_connections_in_use", upstream="payments") == 7
    assert val(got, "gateway_upstream_pool_connections_max", upstream="payments") == 200
    assert val(got, "gateway_shipper_spooled_batches") == 3             # shared spool: max
    assert val(got, "gateway_worker_processes") == 2
    pa, pb = parse(ta), parse(tb)
    cpu = "gateway_process_cpu_percent"
    assert val(got, cpu) == max(val(pa, cpu), val(pb, cpu))
    rss = "gateway_process_resident_memory_bytes"
    assert val(got, rss) == val(pa, rss) + val(pb, rss)

    # merging is associative and one worker merges to itself
    assert parse(merge_expositions([merged])) == got
    assert parse(merge_expositions([merge_expositions([ta]), tb])) == got
    assert parse(merge_expositions([ta])) == pa
    assert merge_expositions([]) == b""


def test_merge_rejects_conflicting_types() -> None:
    a = b"# TYPE x gauge\nx 1\n"
    b = b"# TYPE x counter\nx_total 1\n"
    with pytest.raises(ValueError, match="'x'"):
        merge_expositions([a, b])


def test_render_is_fast_enough_to_scrape() -> None:
    s = Signals(FakeClock())
    for r in range(20):
        for code in (200, 404, 500, 503):
            for m in ("GET", "POST"):
                s.record(f"r{r}", f"u{r % 4}", "svc", m, code, 0.01 * (r + 1), 0.005, 1, 1)
    s.swap()
    for r in range(20):
        s.record(f"r{r}", f"u{r % 4}", "svc", "GET", 200, 0.02, 0.01, 1, 1)
    t0 = time.perf_counter()
    for _ in range(10):
        render(s)
    per_scrape = (time.perf_counter() - t0) / 10
    assert per_scrape < 0.05, per_scrape    # 160 series; typically a few ms


# ---------------------------------------------------------------------------------------------
# config/prometheus: the alert rules, the scrape config and the dashboard


_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_METRIC_TOKEN = re.compile(r"\b(gateway_[a-z0-9_]+)\b")
_BUILTIN_SERIES = {"up"}


def _check_promql_shape(expr: str) -> None:
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    in_str = False
    for ch in expr:
        if ch == '"':
            in_str = not in_str
        elif not in_str and ch in "([{":
            stack.append(ch)
        elif not in_str and ch in ")]}":
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {expr!r}"
    assert not stack and not in_str, f"unbalanced brackets or quotes in {expr!r}"


def _metric_names(expr: str) -> set[str]:
    return set(_METRIC_TOKEN.findall(expr))


def test_alert_rules_are_well_formed_and_use_defined_metrics() -> None:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    assert set(doc) == {"groups"}
    known = metrics.sample_names()
    rules = []
    group_names = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "rules", "interval", "limit"}
        assert group["name"] not in group_names
        group_names.add(group["name"])
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert _DURATION.match(str(rule["for"])), rule["for"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description"} <= set(rule["annotations"])
            _check_promql_shape(rule["expr"])
            used = _metric_names(rule["expr"])
            assert used or any(re.search(rf"\b{b}\b", rule["expr"]) for b in _BUILTIN_SERIES)
            assert used <= known, used - known
            rules.append(rule)

    def find(alert: str, severity: str) -> dict[str, str]:
        (r,) = [r for r in rules if r["alert"] == alert and r["labels"]["severity"] == severity]
        return r

    # the health rules' thresholds and durations
    seed = [
        ("GatewayLatencyP95High", "warning", "> 0.5", "5m"),
        ("GatewayLatencyP95High", "critical", "> 2", "5m"),
        ("GatewayErrorRateHigh", "warning", "> 0.01", "2m"),
        ("GatewayErrorRateHigh", "critical", "> 0.05", "2m"),
        ("GatewayCpuHigh", "warning", "> 70", "5m"),
        ("GatewayCpuHigh", "critical", "> 90", "5m"),
        ("GatewayTrafficDrop", "warning", "< 0.5 *", "3m"),
        ("GatewayTrafficDrop", "critical", "< 0.2 *", "3m"),
    ]
    for alert, severity, threshold, for_ in seed:
        r = find(alert, severity)
        assert threshold in " ".join(r["expr"].split()), (alert, severity)
        assert r["for"] == for_
    assert "histogram_quantile(0.95" in find("GatewayLatencyP95High", "warning")["expr"]
    # the latency thresholds are bucket bounds, so the quantile is exact there
    assert {0.5, 2.0} <= set(BUCKETS_S)


def test_scrape_config_points_at_the_admin_listener_and_the_rules() -> None:
    doc = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    assert (PROM_DIR / doc["rule_files"][0]).exists()
    assert _DURATION.match(doc["global"]["scrape_interval"])
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    gw = jobs["gateway"]
    assert gw["metrics_path"] == "/metrics"
    assert gw["static_configs"][0]["targets"] == ["127.0.0.1:9901"]
    alerts = (PROM_DIR / "alerts.yml").read_text()
    assert 'up{job="gateway"}' in alerts    # the GatewayDown rule names this job


def test_grafana_dashboard_queries_defined_metrics() -> None:
    dash = json.loads((PROM_DIR / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    known = metrics.sample_names()
    used: set[str] = set()
    ids = set()
    for panel in dash["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        for target in panel.get("targets", []):
            _check_promql_shape(target["expr"])
            names = _metric_names(target["expr"])
            assert names and names <= known, (panel["title"], names - known)
            used |= names
    # the four golden signals are all on it
    for name in ("gateway_requests_total", "gateway_request_duration_seconds_bucket",
                 "gateway_upstream_duration_seconds_bucket", "gateway_inflight_requests",
                 "gateway_process_cpu_percent", "gateway_event_loop_lag_seconds"):
        assert name in used, name


def test_promtool_accepts_rules_config_exposition_and_rule_unit_tests() -> None:
    # .ci/run installs promtool (Debian's `prometheus`); a missing one is a failure, not a skip.
    assert shutil.which("promtool"), "promtool is not installed (apt-get install prometheus)"
    def promtool(*args: str, stdin: bytes | None = None) -> None:
        r = subprocess.run(["promtool", *args], cwd=PROM_DIR, input=stdin,
                           capture_output=True, timeout=50, check=False)
        assert r.returncode == 0, (args, r.stdout.decode(), r.stderr.decode())

    promtool("check", "rules", "alerts.yml")
    promtool("check", "config", "prometheus.yml")
    promtool("test", "rules", "alerts_test.yml")      # the thresholds really fire
    s = Signals(FakeClock())
    feed_mix(s)
    s.record_breaker_transition("payments", "closed", "open", "x")
    promtool("check", "metrics", stdin=merge_expositions([render(s), render(s)]))


async def test_response_bytes_count_every_body_the_client_received(tmp_path) -> None:
    """gateway_response_bytes_total is every body byte the client read: the upstream's 200s and
    the gateway's own problem+json answers (404, 429, 502, 503, and a 400 to a bad request)."""
    from gateway import config as config_mod
    from gateway.app import GatewayServer
    from tests.conftest import free_port
    from tests.harness import Upstream, admin_url, url_of

    upstream = Upstream()
    await upstream.start()
    text = (
        'listen: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  - {{name: up, endpoints: ["{upstream.url}"]}}\n'
        f'  - {{name: dead, endpoints: ["http://127.0.0.1:{free_port()}"], connect_timeout_s: 1,'
        " breaker: {failure_threshold: 2, reset_timeout_s: 60}}\n"
        "routes:\n"
        '  - {name: ok, match: {path_prefix: "/ok"}, upstream: up, limits: [few]}\n'
        '  - {name: gone, match: {path_prefix: "/dead"}, upstream: dead}\n'
        'limits: [{name: few, key: ip_address, rate: "1/hour", burst: 4}]\n')
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw = GatewayServer(str(path), config_mod.load(path), clock=FakeClock())
    await gw.start()
    try:
        read = 0
        codes: list[int] = []
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            for p in ["/ok/bytes/1000"] * 8 + ["/dead/x"] * 4 + ["/nowhere"] * 2:
                async with s.get(url_of(gw, p)) as resp:
                    read += len(await resp.read())
                    codes.append(resp.status)
            async with s.head(url_of(gw, "/nowhere")) as resp:     # HEAD: no body
                read += len(await resp.read())
        assert sorted(set(codes)) == [200, 404, 429, 502, 503], codes
        # a request the server refuses before it is whole: 400 and its problem body
        assert gw.proxy_address is not None
        r, w = await asyncio.open_connection("127.0.0.1", gw.proxy_address[1])
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        raw = await asyncio.wait_for(r.read(), 10)
        w.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
        read += len(body)
        async with aiohttp.ClientSession() as s, s.get(admin_url(gw, "/metrics")) as resp:
            samples = parse(await resp.read())
    finally:
        await gw.stop()
        await upstream.stop()
    sent = sum(v for (name, _labels), v in samples.items()
               if name == "gateway_response_bytes_total")
    assert sent == read


def test_quantile_gauges_are_exact_hdr_percentiles_of_the_last_completed_interval() -> None:
    from hdrh.histogram import HdrHistogram

    clock = FakeClock()
    s = Signals(clock)
    lat_ms = [1 + (i * 37) % 400 for i in range(1_000)]       # 1..400 ms, spread
    for i, ms in enumerate(lat_ms):
        code = 500 if i % 10 == 0 else 200                      # two series, one label set
        s.record("pay", "payments", "svc", "GET", code, ms / 1000.0, ms / 1000.0, 0, 0)
    s.record_local("pay", "payments", "svc", "GET", 429, 0.00003, 0, "limit")
    assert "gateway_request_duration_quantile_seconds{" not in render(s).decode()  # none closed
    clock.advance(10)
    s.swap()
    s.record("pay", "payments", "svc", "GET", 200, 5.0, 5.0, 0, 0)   # the live interval: unseen
    h = HdrHistogram(1, 60_000_000, 2)
    for ms in [*lat_ms, 0.03]:
        h.record_value(int(ms * 1000))
    samples = parse(render(s))
    for q in (0.5, 0.95, 0.99):
        got = val(samples, "gateway_request_duration_quantile_seconds", route="pay",
                  upstream="payments", quantile=str(q))
        assert got == h.get_value_at_percentile(q * 100) / 1e6
    assert 0.38 <= val(samples, "gateway_request_duration_quantile_seconds", route="pay",
                       upstream="payments", quantile="0.99") <= 0.41
    assert s.quantile_interval == (clock.time() - 10, clock.time())
    clock.advance(10)
    s.swap()
    assert parse(render(s))[("gateway_request_duration_quantile_seconds", (
        ("quantile", "0.5"), ("route", "pay"), ("upstream", "payments")))] == pytest.approx(
        5.0, rel=1 / 128)
    clock.advance(10)
    s.swap()                                   # an idle interval: no stale quantiles
    assert "gateway_request_duration_quantile_seconds{" not in render(s).decode()


def test_quantiles_of_several_workers_keep_their_worker_label_when_merged() -> None:
    texts = []
    for worker, ms in ((0, 10), (1, 300)):
        s = Signals(FakeClock())
        for _ in range(100):
            s.record("r", "u", "svc", "GET", 200, ms / 1000.0, None, 0, 0)
        s.swap()
        texts.append(render(s, worker))
    merged = parse(merge_expositions(texts))
    p99 = {w: merged[("gateway_request_duration_quantile_seconds", (
        ("quantile", "0.99"), ("route", "r"), ("upstream", "u"), ("worker", w)))]
        for w in ("0", "1")}
    assert p99["0"] == pytest.approx(0.010, rel=0.01)
    assert p99["1"] == pytest.approx(0.300, rel=0.01)       # exact per worker, never summed
    assert val(merged, "gateway_requests_total", route="r", upstream="u", method="GET",
               code="200") == 200


def test_default_buckets_are_dense_between_100_ms_and_1_s() -> None:
    inside = [b for b in BUCKETS_S if 0.1 <= b <= 1.0]
    assert all(b / a <= 1.5 for a, b in itertools.pairwise(inside))
    assert {0.1, 0.5, 1.0, 2.0} <= set(BUCKETS_S)


async def test_configured_latency_buckets_are_the_histograms_le_and_need_a_restart(
        tmp_path) -> None:
    from gateway import config as config_mod
    from gateway.errors import ConfigError
    from tests.harness import Upstream, admin_url, gateway_yaml, running_gateway, url_of

    upstream = Upstream()
    await upstream.start()
    text = gateway_yaml([upstream.url]) + "metrics: {latency_buckets: [0.001, 0.3, 0.35, 7]}\n"
    try:
        async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
            async with s.get(url_of(gw, "/")) as resp:
                await resp.read()
            async with s.get(admin_url(gw, "/metrics")) as resp:
                samples = parse(await resp.read())
            les = sorted(dict(labels)["le"] for (name, labels) in samples
                         if name == "gateway_request_duration_seconds_bucket")
            assert les == sorted(["0.001", "0.3", "0.35", "7.0", "+Inf"])
            path = tmp_path / "changed.yaml"
            path.write_text(gateway_yaml([upstream.url]) + "metrics: {latency_buckets: [1]}\n")
            gw.config_path = str(path)
            with pytest.raises(ConfigError) as info:
                await gw.reload()
            assert info.value.errors[0].startswith("metrics.latency_buckets: cannot change")
            assert config_mod.load(path).metrics.latency_buckets == (1.0,)
    finally:
        await upstream.stop()
