"""SLO maths against hand-computed cases; SLO validation (config and API alike); /v1/slos;
/v1/error-budgets with exact numbers, latency SLIs from the merged HDR histograms."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.control.config import load_text
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.slo import Counts
from gateway.control.domain.sloreport import Counter, budget_report
from gateway.control.store import Store
from gateway.errors import ConfigError
from tests.fakes import FakeClock
from tests.test_control_slo_support import (
    DAY,
    DAY0,
    HOUR,
    MIN,
    add_slo,
    call,
    feed,
    make_slo,
    slo_plane,
)
from tests.test_control_support import batch, database_of, ingest, series, store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

# ---------------------------------------------------------------------------------------------
# Pure maths, by hand


def test_budget_and_burn_rate_by_hand():
    # 99.9 %: 100 000 events allow 100 bad; 50 bad spend half of it
    b = slo_mod.budget(Counts(100_000, 50), 99.9)
    assert b.allowed_bad == pytest.approx(100.0)
    assert b.consumed_fraction == pytest.approx(0.5)
    assert b.remaining_fraction == pytest.approx(0.5)
    assert b.remaining_events == pytest.approx(50.0)
    # overspent: 250 bad of 100 allowed -> remaining -1.5
    assert slo_mod.budget(Counts(100_000, 250), 99.9).remaining_fraction == pytest.approx(-1.5)
    # no traffic: nothing spent
    assert slo_mod.budget(Counts(0, 0), 99.9).remaining_fraction == 1.0
    # burn rate = error ratio / (1 - objective): 1 % errors against 99.9 % burn 10x
    assert slo_mod.burn_rate(Counts(1_000, 10), 99.9) == pytest.approx(10.0)
    assert slo_mod.burn_rate(Counts(1_000, 2), 99.9) == pytest.approx(2.0)
    assert slo_mod.burn_rate(Counts(200, 1), 99.0) == pytest.approx(0.5)
    assert slo_mod.burn_rate(Counts(0, 0), 99.9) == 0.0
    # 99.9 % over 30 days, half the budget left, burning 10x: 0.5 * 30 d / 10 = 1.5 days
    assert slo_mod.time_to_exhaustion(0.5, 30 * DAY, 10.0) == pytest.approx(1.5 * DAY)
    assert slo_mod.time_to_exhaustion(0.5, 30 * DAY, 0.0) is None
    assert slo_mod.time_to_exhaustion(-0.1, 30 * DAY, 3.0) == 0.0


@pytest.mark.parametrize("window,expected", [
    ("30d", {"1h/5m": 14.4, "6h/30m": 6.0, "1d/2h": 3.0, "3d/6h": 1.0}),
    ("month", {"1h/5m": 14.4, "6h/30m": 6.0, "1d/2h": 3.0, "3d/6h": 1.0}),
    ("28d", {"1h/5m": 13.44, "6h/30m": 5.6, "1d/2h": 2.8, "3d/6h": 0.1 * 28 / 3}),
    ("7d", {"1h/5m": 3.36, "6h/30m": 1.4, "1d/2h": 0.7, "3d/6h": 0.1 * 7 / 3}),
    ("week", {"1h/5m": 3.36, "6h/30m": 1.4, "1d/2h": 0.7, "3d/6h": 0.1 * 7 / 3}),
    ("1d", {"1h/5m": 0.48, "6h/30m": 0.2, "1d/2h": 0.1}),      # no 3d rule on a 1-day window
    ("1h", {"1h/5m": 0.02}),
])
def test_thresholds_scale_with_the_window(window, expected):
    got = {f"{r.long}/{r.short}": t for r, t in make_slo(window=window).rules()}
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("rate,severity", [
    (1.0, "SEV-1"), (0.51, "SEV-1"), (0.50, "SEV-2"), (0.25, "SEV-2"), (0.2499, "SEV-3"),
    (0.05, "SEV-3"), (0.0499, "SEV-4"), (0.01, "SEV-4"), (0.0, "SEV-4")])
def test_incident_severity_from_the_error_rate(rate, severity):
    assert slo_mod.incident_severity(rate) == severity


def test_firing_rules_need_both_windows_and_min_events():
    s = make_slo(min_events=100)
    w = {name: Counts(10_000, 0) for name in slo_mod.BURN_WINDOWS}
    w["1h"] = Counts(10_000, 150)         # burn 15 > 14.4 ...
    w["5m"] = Counts(1_000, 10)           # ... but the short window burns only 10
    rules = {f"{r['long_window']}/{r['short_window']}": r for r in slo_mod.firing_rules(s, w)}
    assert not rules["1h/5m"]["firing"] and rules["1h/5m"]["long_burn"] == pytest.approx(15)
    w["5m"] = Counts(1_000, 15)           # both > 14.4
    rules = {f"{r['long_window']}/{r['short_window']}": r for r in slo_mod.firing_rules(s, w)}
    assert rules["1h/5m"]["firing"]
    w = {name: Counts(99, 99) for name in slo_mod.BURN_WINDOWS}   # all bad, but 99 < 100 events
    assert not any(r["firing"] for r in slo_mod.firing_rules(s, w))


def test_period_rolling_and_calendar_in_a_time_zone():
    now = datetime(2024, 3, 15, 12, 0, tzinfo=UTC).timestamp()
    assert slo_mod.period(make_slo(window="7d"), now) == (now - 7 * DAY, now)

    def utc(*a):
        return datetime(*a, tzinfo=UTC).timestamp()

    berlin = {"timezone": "Europe/Berlin"}
    # March 2024 in Berlin: from Mar 1 00:00 CET (UTC+1) to Apr 1 00:00 CEST (UTC+2)
    assert slo_mod.period(make_slo(window="month", **berlin), now) == (
        utc(2024, 2, 29, 23), utc(2024, 3, 31, 22))
    assert slo_mod.period(make_slo(window="month"), now) == (utc(2024, 3, 1), utc(2024, 4, 1))
    # weeks start on Monday; the week of the DST change is 167 hours long
    assert slo_mod.period(make_slo(window="week", **berlin), now) == (
        utc(2024, 3, 10, 23), utc(2024, 3, 17, 23))
    dst = utc(2024, 3, 30, 12)
    assert slo_mod.period(make_slo(window="week", **berlin), dst) == (
        utc(2024, 3, 24, 23), utc(2024, 3, 31, 22))
    # December rolls into the next year
    assert slo_mod.period(make_slo(window="month"), utc(2024, 12, 31, 23, 59)) == (
        utc(2024, 12, 1), utc(2025, 1, 1))


@pytest.mark.parametrize("span", [5 * MIN, 30 * MIN, HOUR, 2 * HOUR, 6 * HOUR, DAY, 3 * DAY])
def test_plan_counts_like_the_minute_buckets(tmp_path, span):
    """Coarse buckets in the middle, minutes at the edges: the same counts as summing every
    1-minute bucket (for ranges whose minutes are still retained)."""
    store = Store(database_of(tmp_path, "c.db"))
    start = DAY0 - 4 * DAY
    # a different error count every minute: any misplaced bucket changes the sum
    for day in range(5):
        feed(store, start + day * DAY, 24 * 60, 100, 0.37 + day * 0.11)
    now = DAY0 + 17 * MIN + 25
    first = -(-(now - span) // 60) * 60
    total, bad = store.rollups.sli_sums(60, "svc", "*", first, now)[:2]
    pieces = slo_mod.plan(now - span, now, now, retention={w: 10 * DAY for w in slo_mod.LEVELS})
    sums = [store.rollups.sli_sums(w, "svc", "*", a, b) for w, a, b in pieces]
    assert (sum(x[0] for x in sums), sum(x[1] for x in sums)) == (total, bad)
    assert len(pieces) <= 7
    # with the real retention (minutes kept 1 day) an older edge is rounded to 5 minutes
    got = Counter(store, make_slo(), now).counts(now - span, now)
    if span <= DAY:
        assert (got.total, got.bad) == (total, bad)
    else:
        assert abs(got.total - total) <= 5 * 100 / 2
    store.close()


def test_plan_prefers_coarse_buckets():
    now = DAY0 + 5 * DAY + 3 * HOUR + 7 * MIN + 30
    pieces = slo_mod.plan(now - 30 * DAY, now, now)
    assert len(pieces) <= 8 and pieces[-1] == (60, DAY0 + 5 * DAY + 3 * HOUR + 5 * MIN, now)


def test_latency_good_events_are_exact_at_hdr_resolution():
    from gateway.control.domain import histogram
    h = histogram.new()
    for v, n in ((1_000, 50), (120_000, 40), (499_000, 5), (500_000, 3), (900_000, 2)):
        for _ in range(n):
            h.record_value(v)
    assert slo_mod.good_below(h, 500_000) == 95          # 500 ms itself is not faster than 500
    assert slo_mod.good_below(h, 130_000) == 90
    assert slo_mod.good_below(h, 1_000) == 0
    assert slo_mod.good_below(h, 60_000_000) == 100
    assert slo_mod.good_below(histogram.new(), 1_000) == 0


# ---------------------------------------------------------------------------------------------
# Validation: control.yaml and the API say the same thing

BAD_SLOS = [
    ({"service": "svc", "objective": 99.9}, "name: is required"),
    ({"name": "a", "service": "svc", "objective": 0.999},
     "objective: is a percentage (e.g. 99.9), got 0.999 (did you mean 99.9?)"),
    ({"name": "a", "service": "svc", "objective": 100},
     "objective: must be a percentage above 0 and below 100 (e.g. 99.9), got 100"),
    ({"name": "a", "service": "svc", "objective": "high"}, "objective: must be a number, got 'high'"),
    ({"name": "a", "service": "svc", "objective": 99, "sli": "errors"},
     "sli: must be one of availability, latency, got 'errors'"),
    ({"name": "a", "service": "svc", "objective": 99, "sli": "latency"},
     "threshold_ms: is required for a latency SLI"),
    ({"name": "a", "service": "svc", "objective": 99, "threshold_ms": 300},
     "threshold_ms: applies to latency SLIs only"),
    ({"name": "a", "service": "svc", "objective": 99, "window": "2w"},
     "window: must be one of 1h, 1d, 7d, 28d, 30d, week, month (rolling or calendar), got '2w'"),
    ({"name": "a", "service": "svc", "objective": 99, "timezone": "Mars/Olympus"},
     "timezone: unknown time zone 'Mars/Olympus' (e.g. UTC, Europe/Berlin)"),
    ({"name": "a", "service": "svc", "objective": 99, "min_events": -1},
     "min_events: must be >= 0, got -1"),
    ({"name": "a", "service": "svc", "objective": 99, "windw": "30d"},
     "windw: unknown key (did you mean 'window'?)"),
    ({"name": "a", "service": "svc", "objective": 99,
      "deploy_gate": {"allow_above": 0.1, "low_traffic_above": 0.2}},
     "deploy_gate: must have allow_above >= low_traffic_above >= critical_above"),
    ({"name": "a b", "service": "svc", "objective": 99},
     "name: may contain only letters, digits, '_', '.', ':' and '-', got 'a b'"),
]


@pytest.mark.parametrize("doc,error", BAD_SLOS, ids=[e.split(":")[0] for _d, e in BAD_SLOS])
def test_bad_slos_in_control_yaml(doc, error):
    import yaml
    text = "tokens: [{name: a, role: admin, token: t}]\n" + yaml.safe_dump({"slos": [doc]})
    with pytest.raises(ConfigError) as exc:
        load_text(text, env={})
    assert exc.value.errors == [f"slos[0].{error}"]


def test_slos_in_control_yaml():
    with pytest.raises(ConfigError) as exc:
        load_text("tokens: [{name: a, role: admin, token: t}]\nslos:\n"
                  "  - {name: avail, service: pay, objective: 99.9}\n"
                  "  - {name: avail, service: other, objective: 99}\n", env={})
    assert exc.value.errors == ["slos[1].name: duplicate name 'avail' (also slos[0])"]
    cfg = load_text("tokens: [{name: a, role: admin, token: t}]\nslos:\n"
                    "  - {name: avail, service: pay, objective: 99.9}\n"
                    "  - {name: slow, service: pay, route: pay-api, objective: 99, sli: latency,"
                    " threshold_ms: 300, window: month, timezone: Europe/Berlin, min_events: 10,"
                    " deploy_gate: {allow_above: 0.6}}\n", env={})
    avail, slow = cfg.slos
    assert (avail.window, avail.count_429, avail.min_events, avail.route) == (
        "30d", False, 100, None)
    assert (slow.sli, slow.threshold_ms, slow.window, slow.timezone, slow.calendar) == (
        "latency", 300.0, "month", "Europe/Berlin", True)
    assert slow.deploy_gate == slo_mod.GateTiers(0.6, 0.2, 0.05)


async def test_slo_api_validates_like_the_config(tmp_path):
    async with slo_plane(tmp_path, FakeClock(wall=DAY0)) as (url, s, _app):
        for doc, error in BAD_SLOS:
            status, body = await call(s, url, "POST", "/v1/slos", json=doc)
            assert status == 400 and body["detail"] == error, body
            assert body["errors"] == [error]
        status, body = await call(s, url, "POST", "/v1/slos", json=[1])
        assert status == 400 and body["detail"] == "body: must be a JSON object, got a list"


# ---------------------------------------------------------------------------------------------
# /v1/slos


async def test_slo_crud_is_audited_and_config_slos_are_read_only(tmp_path):
    clock = FakeClock(wall=DAY0)
    cfg_slo = make_slo(name="from-yaml", service="pay")
    async with slo_plane(tmp_path, clock, slos=(cfg_slo,)) as (url, s, _app):
        status, doc = await call(s, url, "GET", "/v1/slos")
        assert status == 200 and [(x["id"], x["source"]) for x in doc["slos"]] == [
            ("from-yaml", "config")]
        new = {"name": "checkout", "service": "pay", "route": "pay-api", "objective": 99.5,
               "window": "7d", "reason": "new SLO for checkout"}
        status, doc = await call(s, url, "POST", "/v1/slos", json=new)
        assert status == 201, doc
        assert (doc["id"], doc["objective"], doc["window"], doc["window_type"], doc["source"],
                doc["count_429"]) == ("checkout", 99.5, "7d", "rolling", "api", False)
        status, doc = await call(s, url, "POST", "/v1/slos", json=new)
        assert status == 409
        status, doc = await call(s, url, "PUT", "/v1/slos/checkout",
                                 json={**new, "objective": 99.9, "count_429": True})
        assert status == 200 and doc["objective"] == 99.9 and doc["count_429"] is True
        status, doc = await call(s, url, "PUT", "/v1/slos/checkout", json={**new, "name": "x"})
        assert status == 400 and doc["detail"].startswith("name:")
        status, doc = await call(s, url, "PUT", "/v1/slos/from-yaml",
                                 json={"service": "pay", "objective": 99})
        assert status == 409 and "control.yaml" in doc["detail"]
        assert (await call(s, url, "DELETE", "/v1/slos/from-yaml"))[0] == 409
        assert (await call(s, url, "GET", "/v1/slos/nope"))[0] == 404
        status, doc = await call(s, url, "GET", "/v1/slos/checkout", role="monitor")
        assert status == 200 and doc["objective"] == 99.9
        for method, path in (("POST", "/v1/slos"), ("PUT", "/v1/slos/checkout"),
                             ("DELETE", "/v1/slos/checkout")):
            assert (await call(s, url, method, path, role="monitor", json=new))[0] == 403
        assert (await call(s, url, "GET", "/v1/slos", role="reader"))[0] == 403
        status, doc = await call(s, url, "DELETE", "/v1/slos/checkout",
                                 json={"reason": "retired"})
        assert status == 200 and doc["deleted"] == "checkout"
        status, doc = await call(s, url, "GET", "/v1/audit")
        got = [(e["actor"], e["action"], e["target"], e["reason"]) for e in doc["entries"]]
        assert got[:3] == [("admin-user", "delete", "slo/checkout", "retired"),
                           ("admin-user", "update", "slo/checkout", "new SLO for checkout"),
                           ("admin-user", "create", "slo/checkout", "new SLO for checkout")]
        assert ("control.yaml", "sync", "slos", "SLOs as code") in got


async def test_config_slos_are_synced_at_start(tmp_path):
    clock = FakeClock(wall=DAY0)
    async with slo_plane(tmp_path, clock, slos=(make_slo(name="a"), make_slo(name="b"))) as (
            url, s, _app):
        assert (await call(s, url, "POST", "/v1/slos",
                           json={"name": "api-made", "service": "svc", "objective": 99}))[0] == 201
    async with slo_plane(tmp_path, clock, slos=(make_slo(name="b", objective=99.0),)) as (
            url, s, _app):
        _, doc = await call(s, url, "GET", "/v1/slos")
        assert [(x["id"], x["source"], x["objective"]) for x in doc["slos"]] == [
            ("api-made", "api", 99.0), ("b", "config", 99.0)]


# ---------------------------------------------------------------------------------------------
# /v1/error-budgets


async def test_error_budgets_by_hand(tmp_path):
    now = DAY0 + 10 * DAY
    clock = FakeClock(wall=now)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        store = store_of(app)
        add_slo(store, make_slo(name="avail", window="7d"))
        add_slo(store, make_slo(name="avail-429", window="7d", count_429=True))
        add_slo(store, make_slo(name="other", service="other"))
        # 7 days ago and older: outside the window. Inside: 6 days of 100 req/min, one bad
        # request every 20 minutes (burn 0.5), then an hour of 1 % errors (burn 10)
        feed(store, now - 8 * DAY, 24 * 60, 100, 50.0)            # 8 days ago: not counted
        feed(store, now - 6 * DAY, 6 * 24 * 60 - 60, 100, 0.05, limited_per_minute=1)
        feed(store, now - 60 * MIN, 60, 100, 1.0, limited_per_minute=1)  # last hour: 1 % errors
        status, doc = await call(s, url, "GET", "/v1/error-budgets/svc", role="monitor")
        assert status == 200, doc
        b = {x["slo_id"]: x for x in doc["budgets"]}
        assert set(b) == {"avail", "avail-429"}
        a = b["avail"]
        total = 6 * 24 * 60 * 100
        bad = (6 * 24 * 60 - 60) // 20 + 60
        assert a["events"] == {"total": total, "bad": bad, "good": total - bad}
        assert a["allowed_bad"] == pytest.approx(total * 0.001)
        assert a["consumed"] == bad
        assert a["remaining_fraction"] == pytest.approx(1 - bad / (total * 0.001))
        assert a["burn_rates"]["1h"] == pytest.approx(10.0)        # 1 % against 0.1 %
        assert a["burn_rates"]["5m"] == pytest.approx(10.0)
        assert a["burn_rates"]["2h"] == pytest.approx((60 + 3) / 12_000 / 0.001)
        assert a["burn_rates"]["1d"] == pytest.approx((60 + 69) / 144_000 / 0.001)
        assert a["remaining_fraction"] == pytest.approx(1 - 489 / 864)
        assert a["time_to_exhaustion_s"] == pytest.approx(
            a["remaining_fraction"] * 7 * DAY / 10.0)
        assert a["window"] == {"name": "7d", "type": "rolling", "timezone": "UTC",
                               "since": now - 7 * DAY, "until": now, "seconds": 7 * DAY}
        # the same SLO counting 429s: one more bad event every minute
        assert b["avail-429"]["events"]["bad"] == bad + 6 * 24 * 60
        status, doc = await call(s, url, "GET", "/v1/error-budgets")
        assert {x["slo_id"] for x in doc["budgets"]} == {"avail", "avail-429", "other"}
        assert doc["budgets"][-1]["remaining_fraction"] == 1.0      # no traffic: untouched
        assert (await call(s, url, "GET", "/v1/error-budgets/nope"))[0] == 404
        assert (await call(s, url, "GET", "/v1/error-budgets", role="reader"))[0] == 403


async def test_latency_budget_from_ingested_histograms(tmp_path):
    t = DAY0 + HOUR
    clock = FakeClock(wall=t + 10 * MIN)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        add_slo(store_of(app), make_slo(name="fast", sli="latency", threshold_ms=500,
                                        objective=99.0, window="1d", min_events=1))
        for i in range(5):   # 5 batches: 198 fast, 1 at 499 ms (fast), 1 at 800 ms (slow)
            doc = batch(f"b{i}", t + i * MIN, [
                series("r1", "svc", 200, latencies_us=[100_000] * 198 + [499_000]),
                series("r1", "svc", 500, latencies_us=[800_000])], seq=i)
            assert (await ingest(s, url, doc))[0] == 200
        _, doc = await call(s, url, "GET", "/v1/error-budgets/svc")
        (b,) = doc["budgets"]
        assert b["events"] == {"total": 1000, "bad": 5, "good": 995}
        assert b["allowed_bad"] == pytest.approx(10.0)
        assert b["remaining_fraction"] == pytest.approx(0.5)
        assert b["burn_rates"]["1h"] == pytest.approx(0.5)
        # the same rows through budget_report directly
        report = budget_report(store_of(app), make_slo(name="fast", sli="latency",
                                                       threshold_ms=800.001, objective=99.0,
                                                       window="1d"), clock.time())
        assert report["events"]["bad"] == 5        # 800 ms sits in a bucket reaching past it
        report = budget_report(store_of(app), make_slo(name="fast", sli="latency",
                                                       threshold_ms=900, objective=99.0,
                                                       window="1d"), clock.time())
        assert report["events"]["bad"] == 0


async def test_each_burn_window_counts_exactly_the_requests_of_its_window(tmp_path):
    """Traffic at irregular times, with batches one second either side of every window edge:
    each burn window's event count is the count of requests in exactly that window (named in
    the answer), read at several seconds of a minute."""
    t_end = DAY0 + 4 * DAY + 17 * MIN                 # the reads happen in the minute after it
    reads = (t_end + 1, t_end + 29.5, t_end + 59)
    edges = {e for now in reads for sec in slo_mod.BURN_WINDOWS.values()
             for e in slo_mod.burn_window(now, sec)}
    times = {t_end - 3 * DAY - HOUR + i * 601 for i in range(int((3 * DAY + HOUR) / 601))}
    for e in edges:
        times.update({e - 1, e, e + 1, e + 59})
    batches = sorted((t, 1 + int(t) % 7, int(t) % 3) for t in times if t < t_end)
    clock = FakeClock(wall=batches[0][0] + 2)
    async with slo_plane(tmp_path, clock, slos=(make_slo(window="30d"),)) as (url, s, _app):
        for i, (t, ok, bad) in enumerate(batches):
            clock.advance(max(0.0, t + 2 - clock.time()))
            doc = batch(f"b{i}", t, [series("r1", "svc", 200, count=ok, upstream="up"),
                                     series("r1", "svc", 500, count=bad, upstream="up")],
                        length=1.0)
            status, body = await ingest(s, url, doc)
            assert status == 200, body
        for now in reads:
            clock.advance(now - clock.time())
            status, doc = await call(s, url, "GET", "/v1/error-budgets/svc")
            assert status == 200, doc
            by_window = doc["budgets"][0]["events_by_window"]
            for name, sec in slo_mod.BURN_WINDOWS.items():
                since, until = slo_mod.burn_window(now, sec)
                assert (by_window[name]["since"], by_window[name]["until"],
                        by_window[name]["seconds"]) == (since, until, sec), name
                assert until <= now and until - since == sec
                inside = [(ok, bad) for t, ok, bad in batches if since <= t < until]
                assert by_window[name]["total"] == sum(ok + bad for ok, bad in inside), name
                assert by_window[name]["bad"] == sum(bad for _ok, bad in inside), name
