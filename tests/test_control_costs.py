"""Cost attribution, imported charges, cost reports, budgets API, alerts, directives."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.control.domain import budgets as bm
from gateway.control.domain import costs
from gateway.control.store import Store
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
    store_of,
)

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

MONTH0 = 1_698_796_800          # 2023-11-01 00:00 UTC; DAY0 is 2023-11-15 (a Wednesday)
NOV_S = 30 * 86_400


async def call(s: aiohttp.ClientSession, method: str, url: str, path: str, *,
               role: str = "admin", body: Any = None, **params: Any) -> tuple[int, Any]:
    async with s.request(method, f"{url}{path}", headers=auth(role),
                         data=None if body is None else orjson.dumps(body),
                         params={k: str(v) for k, v in params.items()}) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None


# ---------------------------------------------------------------------------------------------
# Exactness


async def test_a_million_requests_at_a_micro_dollar_cost_exactly_one_dollar(tmp_path):
    clock = FakeClock(wall=DAY0 + 7_200)
    models = {"svc": {"per_request": 0.000001}}
    async with control_plane(tmp_path, clock, cost_models=models) as (url, s, _app):
        # 100 batches of 10 000 requests over 4 routes and 2 hours
        for i in range(100):
            st, body = await ingest(s, url, batch(f"b{i}", DAY0 + 36 * i, [
                series(f"r{i % 4}", "svc", 200, count=10_000)]))
            assert st == 200, body
        st, doc = await get(s, url, "/v1/costs", service="svc", **{"from": DAY0, "to": DAY0 + 7_200})
        assert st == 200, doc
        assert doc["total"] == {"micros": 1_000_000, "cents": 100, "dollars": "1.000000"}
        st, one = await get(s, url, "/v1/costs", **{"from": DAY0, "to": DAY0 + 7_200})
        assert one["total"]["dollars"] == "1.000000"


async def test_groupings_add_up_to_the_total(tmp_path):
    now = DAY0 + 86_400 + 7_200
    clock = FakeClock(wall=now)
    models = {"svc": {"per_request": "0.0000004", "per_upstream_second": "0.0000166667",
                      "per_gb_in": 0.01, "per_gb_out": 0.09, "fixed_monthly": "30"},
              "*": {"per_request": 0.000003}}
    async with control_plane(tmp_path, clock, cost_models=models) as (url, s, _app):
        first = DAY0 + 7_200
        for k in range(30):                      # every ~48 minutes over a day
            t = first + k * 2_900
            st, _ = await ingest(s, url, batch(f"g{k}", t, [
                series(f"r{k % 3}", "svc", 200, count=1_000 + k,
                       latencies_us=[200_000 + 7_000 * k] * 50, bytes_in=12_345 * k,
                       bytes_out=987_654 * k),
                series("other", "svc2", 200, count=333, latencies_us=[50]),
                series("-", "svc", 404, upstream="-", count=999)]))   # not billed
            assert st == 200
        st, res = await call(s, "POST", url, "/v1/costs", body={"records": [
            {"ServiceName": "svc", "ChargePeriodStart": "2023-11-14T00:00:00Z",
             "ChargePeriodEnd": "2023-11-17T00:00:00Z", "BilledCost": "12.345678",
             "ChargeCategory": "Usage", "ServiceCategory": "Storage", "x_ChargeId": "inv-1"}]})
        assert st == 201, res
        span = {"from": DAY0 - 86_400, "to": now}
        _, total = await get(s, url, "/v1/costs", **span)
        sums = {}
        for g in ("day", "route", "cost_type", "service"):
            st, doc = await get(s, url, "/v1/costs", group_by=g, **span)
            assert st == 200, doc
            assert doc["total"] == total["total"]
            sums[g] = sum(x["micros"] for x in doc["groups"])
        st, doc = await get(s, url, "/v1/costs", group_by="day", tz="Asia/Kolkata", **span)
        sums["day-kolkata"] = sum(x["micros"] for x in doc["groups"])
        assert len(doc["groups"]) == 3
        assert set(sums.values()) == {total["total"]["micros"]}

        _, by_type = await get(s, url, "/v1/costs", group_by="cost_type", service="svc", **span)
        types = {x["key"]: x["micros"] for x in by_type["groups"]}
        assert set(types) == {"api_calls", "compute", "bandwidth", "fixed", "storage"}
        # hand-computed parts
        n_req = sum(1_000 + k for k in range(30))
        assert types["api_calls"] == round(n_req * 0.4)                    # per 15-min row
        fixed = bm.share(30_000_000, MONTH0, MONTH0 + NOV_S, first, now)
        assert types["fixed"] == fixed
        storage = bm.share(12_345_678, DAY0 - 86_400, DAY0 + 2 * 86_400, DAY0 - 86_400, now)
        assert types["storage"] == storage
        out_gb = sum(987_654 * k for k in range(30))
        in_gb = sum(12_345 * k for k in range(30))
        assert abs(types["bandwidth"] - (out_gb * 0.09 + in_gb * 0.01) / 1000) <= 30
        _, svc2 = await get(s, url, "/v1/costs", service="svc2", **span)
        assert svc2["total"]["micros"] == 30 * 333 * 3                    # the "*" model


async def test_a_replayed_batch_is_billed_once(tmp_path):
    clock = FakeClock(wall=DAY0 + 600)
    async with control_plane(tmp_path, clock, cost_models={"svc": {"per_request": 1}}) as (
            url, s, _app):
        doc = batch("same", DAY0, [series(count=5)])
        for _ in range(3):
            st, _ = await ingest(s, url, doc)
            assert st == 200
        _, c = await get(s, url, "/v1/costs", **{"from": DAY0})
        assert c["total"]["dollars"] == "5.000000"


async def test_compute_from_the_latency_histogram(tmp_path):
    clock = FakeClock(wall=DAY0 + 600)
    async with control_plane(tmp_path, clock,
                             cost_models={"svc": {"per_upstream_second": 1}}) as (url, s, _app):
        # 1000 requests of 20 ms = 20 s -> $20, within the histogram's 1 % (2 significant figures)
        await ingest(s, url, batch("h", DAY0, [series(latencies_us=[20_000] * 1_000)]))
        _, c = await get(s, url, "/v1/costs", **{"from": DAY0})
        assert abs(c["total"]["micros"] - 20_000_000) <= 20_000_000 // 100


async def test_import_validation_idempotency_and_roles(tmp_path):
    clock = FakeClock(wall=DAY0 + 600)
    async with control_plane(tmp_path, clock) as (url, s, app):
        rec = {"ServiceName": "db", "ChargePeriodStart": DAY0, "ChargePeriodEnd": DAY0,
               "BilledCost": 2.5, "ChargeCategory": "Purchase", "x_CostType": "storage",
               "x_ChargeId": "c-1"}
        st, res = await call(s, "POST", url, "/v1/costs", body={"records": [rec],
                                                                "reason": "invoice 42"})
        assert st == 201 and res["imported"] == 1 and res["billed"]["dollars"] == "2.500000"
        st, res = await call(s, "POST", url, "/v1/costs", body=[rec])
        assert st == 201 and res == {"imported": 0, "skipped": 1, "billed": bm.money(2_500_000)}
        _, c = await get(s, url, "/v1/costs", **{"from": DAY0})
        assert c["total"]["micros"] == 2_500_000
        st, err = await call(s, "POST", url, "/v1/costs", body={"records": [
            {"ServiceName": "", "ChargePeriodStart": "yesterday", "ChargePeriodEnd": DAY0,
             "BilledCost": "0.0000001", "ChargeCategory": "Gift", "BillingCurrency": "EUR"}]})
        assert st == 400 and len(err["errors"]) == 5, err
        assert (await call(s, "POST", url, "/v1/costs", role="monitor", body=[rec]))[0] == 403
        assert (await call(s, "GET", url, "/v1/costs", role="monitor"))[0] == 200
        assert (await call(s, "GET", url, "/v1/costs", role="reader"))[0] == 403
        st, err = await call(s, "GET", url, "/v1/costs", group_by="week")
        assert st == 400 and "group_by" in err["detail"]
        audit = store_of(app).audit.entries(action="import")
        assert audit[-1]["actor"] == "admin-user" and audit[-1]["reason"] == "invoice 42"


# ---------------------------------------------------------------------------------------------
# Budgets API


BUDGET_PATHS = [("GET", "/v1/budgets"), ("POST", "/v1/budgets"), ("GET", "/v1/budgets/1"),
                ("PUT", "/v1/budgets/1"), ("DELETE", "/v1/budgets/1"),
                ("POST", "/v1/budgets/1/override")]


async def test_budgets_are_admin_only(tmp_path):
    clock = FakeClock(wall=DAY0 + 600)
    async with control_plane(tmp_path, clock) as (url, s, _app):
        for role in ("monitor", "reader", "gateway"):
            for method, path in BUDGET_PATHS:
                st, doc = await call(s, method, url, path, role=role, body={})
                assert st == 403, (role, method, path, doc)
        for method, path in BUDGET_PATHS:
            async with s.request(method, f"{url}{path}") as resp:
                assert resp.status == 401
        assert (await call(s, "GET", url, "/v1/budgets"))[0] == 200


async def test_budget_crud_report_and_audit(tmp_path):
    clock = FakeClock(wall=DAY0 + 3_600)
    models = {"svc": {"per_request": "0.01"}, "web": {"per_request": "0.01"}}
    async with control_plane(tmp_path, clock, cost_models=models) as (url, s, app):
        await ingest(s, url, batch("a", DAY0, [series("r", "svc", count=80),
                                              series("r", "web", count=10)]))
        st, b = await call(s, "POST", url, "/v1/budgets", body={
            "name": "svc monthly", "service": "svc", "period": "monthly",
            "amount_cents": 100, "reason": "Q4 plan"})
        assert st == 201, b
        assert (b["current_usage_cents"], b["utilization_percent"], b["status"]) == \
            (80, 80.0, "MODERATE_USAGE")
        assert b["period_start"] == MONTH0 and b["period_end"] == MONTH0 + NOV_S
        assert [(a["kind"], a["threshold"], a["severity"]) for a in b["alerts"]
                if a["kind"] == "actual"] == [("actual", 0.8, "info")]
        st, _ = await call(s, "POST", url, "/v1/budgets", body={
            "name": "svc monthly", "period": "daily", "amount_cents": 1})
        assert st == 409
        # the same alert path as the SLO alerts: /v1/alerts, source "budget"
        st, listed = await call(s, "GET", url, "/v1/alerts")
        assert st == 200, listed
        rows = listed["alerts"] if isinstance(listed, dict) else listed
        mine = [a for a in rows if a["source"] == "budget"]
        assert {(a["severity"], a["labels"]["kind"], a["labels"]["threshold"]) for a in mine} \
            >= {("info", "actual", "0.8")}
        assert all(a["service"] == "svc" and a["status"] == "firing" for a in mine)
        st, err = await call(s, "POST", url, "/v1/budgets", body={"name": "x", "period": "hourly"})
        assert st == 400 and any("amount_cents" in e for e in err["errors"])
        st, allb = await call(s, "POST", url, "/v1/budgets", body={
            "name": "all daily", "period": "daily", "amount_cents": 1_000})
        assert st == 201 and allb["service"] == "*" and allb["current_usage_cents"] == 90

        st, rep = await call(s, "GET", url, "/v1/budgets")
        assert st == 200
        assert [x["name"] for x in rep["budgets"]] == ["svc monthly", "all daily"]   # by use
        assert rep["total_budget_cents"] == 1_100 and rep["total_usage_cents"] == 170
        assert rep["overall_utilization"] == round(170 / 1_100 * 100, 2)

        st, up = await call(s, "PUT", url, f"/v1/budgets/{b['id']}", body={"amount_cents": 85})
        assert st == 200 and up["amount_cents"] == 85 and up["status"] == "HIGH_USAGE"
        assert up["name"] == "svc monthly"
        st, one = await call(s, "GET", url, f"/v1/budgets/{b['id']}")
        assert st == 200 and {a["threshold"] for a in one["alerts"] if a["kind"] == "actual"} == {0.8, 0.9}
        assert (await call(s, "GET", url, "/v1/budgets/999"))[0] == 404
        assert (await call(s, "PUT", url, "/v1/budgets/999", body={}))[0] == 404
        assert (await call(s, "DELETE", url, f"/v1/budgets/{allb['id']}"))[0] == 204
        assert (await call(s, "DELETE", url, f"/v1/budgets/{allb['id']}"))[0] == 404
        actions = [(e["action"], e["target"]) for e in
                   store_of(app).audit.entries(actor="admin-user")]
        assert actions == [("delete", f"budget:{allb['id']}"), ("update", f"budget:{b['id']}"),
                           ("create", f"budget:{allb['id']}"), ("create", f"budget:{b['id']}")]


async def test_enforcement_directives_and_shadow_mode(tmp_path):
    clock = FakeClock(wall=DAY0 + 600)
    models = {"svc": {"per_request": "0.001"}, "web": {"per_request": "0.001"}}
    async with control_plane(tmp_path, clock, cost_models=models) as (url, s, _app):
        st, b = await call(s, "POST", url, "/v1/budgets", body={
            "name": "tiny", "service": "svc", "period": "daily", "amount_cents": 1,
            "enforce": True})
        await call(s, "POST", url, "/v1/budgets", body={
            "name": "web shadow", "service": "web", "period": "daily", "amount_cents": 1,
            "enforce": True, "mode": "shadow"})
        st, r = await ingest(s, url, batch("1", DAY0, [series(count=9),
                                                       series("w", "web", count=50)]))
        assert r["directives"] == {}
        st, r = await ingest(s, url, batch("2", DAY0 + 10, [series(count=1)]))
        assert r["directives"] == {"reject_services": {
            "svc": {"until": DAY0 + 86_400, "budget": "tiny"}}}
        _, rep = await call(s, "GET", url, "/v1/budgets")
        assert {x["name"]: x["enforcement"] for x in rep["budgets"]} == {
            "tiny": "rejecting", "web shadow": "shadow"}
        # an admin raises the budget: the next ingest response lifts the rejection
        await call(s, "PUT", url, f"/v1/budgets/{b['id']}", body={"amount_cents": 5})
        st, r = await ingest(s, url, batch("3", DAY0 + 20, [series("r", "other", count=1)]))
        assert r["directives"] == {}
        # the period rolls over: nothing spent in the new day
        _st, r = await ingest(s, url, batch("4", DAY0 + 30, [series(count=500)]))
        assert "svc" in r["directives"]["reject_services"]
        clock.advance(86_400)
        _st, r = await ingest(s, url, batch("5", DAY0 + 86_400 + 5, [series("r", "x", count=1)]))
        assert r["directives"] == {}


async def test_emergency_override_and_its_expiry(tmp_path):
    clock = FakeClock(wall=DAY0 + 600)
    async with control_plane(tmp_path, clock, cost_models={"svc": {"per_request": "0.001"}}
                             ) as (url, s, app):
        _, b = await call(s, "POST", url, "/v1/budgets", body={
            "name": "tiny", "service": "svc", "period": "monthly", "amount_cents": 1,
            "enforce": True})
        _, r = await ingest(s, url, batch("1", DAY0, [series(count=20)]))
        assert "svc" in r["directives"]["reject_services"]
        path = f"/v1/budgets/{b['id']}/override"
        st, err = await call(s, "POST", url, path, body={"amount_cents": 50, "duration_s": 3600})
        assert st == 400 and "reason" in err["detail"]
        st, err = await call(s, "POST", url, path, body={"amount_cents": 1, "duration_s": 60,
                                                         "reason": "x"})
        assert st == 400
        st, v = await call(s, "POST", url, path, body={"amount_cents": 50, "duration_s": 3_600,
                                                       "reason": "launch day"})
        assert st == 200, v
        assert v["effective_amount_cents"] == 50 and v["override"]["active"]
        assert v["status"] == "LOW_USAGE" and v["enforcement"] == "armed"
        _, r = await ingest(s, url, batch("2", DAY0 + 10, [series("q", "other", count=1)]))
        assert r["directives"] == {}
        clock.advance(3_600)                              # the override lapses by itself
        _, r = await ingest(s, url, batch("3", DAY0 + 20, [series("q", "other", count=1)]))
        assert "svc" in r["directives"]["reject_services"]
        _, v = await call(s, "GET", url, f"/v1/budgets/{b['id']}")
        assert v["effective_amount_cents"] == 1 and not v["override"]["active"]
        entry = store_of(app).audit.entries(action="override")[0]
        assert entry["reason"] == "launch day" and entry["details"]["amount_cents"] == 50


async def test_config_budgets_are_synced_at_startup(tmp_path):
    clock = FakeClock(wall=DAY0 + 600)
    spec = {"name": "cfg", "service": "svc", "period": "weekly", "amount_cents": 700}
    async with control_plane(tmp_path, clock, budgets=(spec,)) as (url, s, _app):
        _, rep = await call(s, "GET", url, "/v1/budgets")
        (b,) = rep["budgets"]
        assert b["source"] == "config" and b["period_start"] == DAY0 - 2 * 86_400   # Monday
        await call(s, "PUT", url, f"/v1/budgets/{b['id']}", body={"amount_cents": 900})
    async with control_plane(tmp_path, clock, budgets=(spec,)) as (url, s, _app):
        _, rep = await call(s, "GET", url, "/v1/budgets")
        assert rep["budgets"][0]["amount_cents"] == 900       # the API change stands
    async with control_plane(tmp_path, clock, budgets=({**spec, "amount_cents": 800},)) as (
            url, s, _app):
        _, rep = await call(s, "GET", url, "/v1/budgets")
        assert rep["budgets"][0]["amount_cents"] == 800       # the config entry changed


# ---------------------------------------------------------------------------------------------
# Alerts: once per threshold per period, across restarts


def _usage(store: Store, t: int, service: str, micros: int) -> None:
    with store.transaction():
        store.costs.add_cost_usage([(service, t - t % 900, "r", "api_calls", "request", "0.000001",
                               micros)])


def test_threshold_alerts_once_per_period_across_restarts(tmp_path):
    path = database_of(tmp_path, "c.db")
    models, _ = costs.parse_cost_models({"svc": {"per_request": 0.000001}})
    clock = FakeClock(wall=DAY0 + 12 * 3_600)
    store = Store(path, clock=clock)
    spec, _ = bm.parse_budget({"name": "d", "service": "svc", "period": "daily",
                               "amount_cents": 100, "forecast_thresholds": [1.0]})
    assert spec is not None
    bid = store.budgets.insert_budget("d", costs.spec_json(spec), "api", None, clock.time())
    finops = costs.FinOps(models)
    _usage(store, DAY0 + 3_600, "svc", 850_000)            # 85 % at noon: forecast 170 %
    finops.evaluate(store, clock.time())
    finops.evaluate(store, clock.time())
    got = {(a["kind"], a["threshold"], a["severity"]) for a in store.budgets.budget_alerts(bid)}
    assert got == {("actual", "0.8", "info"), ("forecast", "1", "critical")}
    fc = next(a for a in store.budgets.budget_alerts(bid) if a["kind"] == "forecast")
    assert fc["spend_micros"] == 1_700_000                # 850 000 * 24 h / 12 h
    store.close()

    store = Store(path, clock=clock)                       # a restart: a new process state
    finops = costs.FinOps(models)
    finops.evaluate(store, clock.time())
    assert len(store.budgets.budget_alerts(bid)) == 2
    _usage(store, DAY0 + 7_200, "svc", 200_000)            # 105 %
    clock.advance(60)
    finops.evaluate(store, clock.time())
    assert sorted(a["threshold"] for a in store.budgets.budget_alerts(bid)
                  if a["kind"] == "actual") == ["0.8", "0.9", "1"]
    store.close()

    store = Store(path, clock=clock)
    clock.advance(86_400)                                  # the next day: alerts again
    _usage(store, DAY0 + 86_400 + 3_600, "svc", 950_000)
    costs.FinOps(models).evaluate(store, clock.time())
    costs.FinOps(models).evaluate(store, clock.time())
    today = [a for a in store.budgets.budget_alerts(bid) if a["period_start"] == DAY0 + 86_400]
    assert sorted((a["kind"], a["threshold"]) for a in today) == [
        ("actual", "0.8"), ("actual", "0.9"), ("forecast", "1")]
    store.close()


def test_migrations_apply_in_either_order(tmp_path, monkeypatch):
    from gateway.control.store import core as store_mod
    v2 = (2, ["CREATE TABLE other_feature (id INTEGER PRIMARY KEY)"])
    # (later migrations may build on 2's tables: only 1 and 3 here)
    original = [m for m in store_mod.MIGRATIONS if m[0] in (1, 3)]
    monkeypatch.setattr(store_mod, "MIGRATIONS", original)
    s = Store(tmp_path / "m.db")                           # 1 and 3 first ...
    s.close()
    monkeypatch.setattr(store_mod, "MIGRATIONS", sorted([*original, v2]))
    s = Store(tmp_path / "m.db")                           # ... then 2 lands
    assert s.schema_version() == max(v for v, _ in store_mod.MIGRATIONS)
    assert s._db.execute("SELECT COUNT(*) FROM other_feature").fetchone()[0] == 0
    assert s.budgets.all() == []
    s.close()


@pytest.mark.parametrize("doc,error", [
    ({"svc": {"per_request": "abc"}}, "cost_models.svc.per_request: must be a decimal number"),
    ({"svc": {"per_call": 1}}, "cost_models.svc.per_call: unknown key"),
    ({"svc": 3}, "cost_models.svc: must be a mapping of prices"),
    ({"*": {"fixed_monthly": 3}}, "cost_models.*.fixed_monthly: only for a named service"),
    ({"svc": {"per_gb_out": -1}}, "cost_models.svc.per_gb_out: must be between 0"),
])
def test_cost_model_errors_name_the_key(doc, error):
    import yaml

    from gateway.control.config import load_text
    from gateway.errors import ConfigError
    text = "tokens: [{name: a, role: admin, token: t}]\n" + yaml.safe_dump({"cost_models": doc})
    with pytest.raises(ConfigError) as exc:
        load_text(text)
    assert any(line.startswith(error) for line in exc.value.errors), exc.value.errors


def test_budget_config_errors_name_the_key():
    from gateway.control.config import load_text
    from gateway.errors import ConfigError
    text = ("tokens: [{name: a, role: admin, token: t}]\n"
            "budgets:\n"
            "  - {name: a, period: monthly, amount_cents: 5}\n"
            "  - {name: a, period: monthly, amount_cents: 5}\n"
            "  - {name: b, period: fortnightly, amount_cents: 5}\n")
    with pytest.raises(ConfigError) as exc:
        load_text(text)
    assert exc.value.errors == [
        "budgets[1].name: duplicate name 'a' (also budgets[0])",
        "budgets[2].period: must be one of daily, weekly, monthly, got 'fortnightly'"]


# ---------------------------------------------------------------------------------------------
# What the gateway answered itself is not billed


async def test_a_limit_rejecting_90_percent_bills_only_the_admitted_requests(tmp_path):
    """A real gateway (FakeClock: the limit's bucket never refills) in front of a real upstream:
    100 requests, a capacity of 10, so 90 rate-limited 429s. Its recorded batch, ingested by a
    real control plane, bills 10 requests and only their upstream time."""
    from gateway import config as config_mod
    from gateway.app import GatewayServer
    from tests.harness import Upstream, gateway_yaml

    clock = FakeClock(wall=DAY0 + 600)
    upstream = Upstream()
    await upstream.start()
    text = gateway_yaml([upstream.url], route_extra="limits: [tight]") + (
        'limits: [{name: tight, key: ip_address, rate: "1/hour", burst: 9}]\n')
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw = GatewayServer(str(path), config_mod.load(path), clock=clock)
    await gw.start()
    try:
        assert gw.proxy_address is not None
        host, port = gw.proxy_address
        codes = []
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(f"http://{host}:{port}/delay/2") as resp:
                    await resp.read()
                    codes.append(resp.status)
        assert codes.count(200) == 10 and codes.count(429) == 90
        assert upstream.requests == 10
        agg = gw.signals.swap()
    finally:
        await gw.stop()
        await upstream.stop()
    admitted = [x for x in agg.series if not x.local]
    assert [(x.code, x.count, x.local) for x in agg.series if x.local] == [(429, 90, "limit")]
    assert sum(x.count for x in admitted) == 10
    upstream_us = sum(costs.hist_sum_us(x.histogram()) for x in admitted)

    models = {"svc": {"per_request": "0.001", "per_upstream_second": "1"}}
    async with control_plane(tmp_path, clock, cost_models=models) as (url, s, _app):
        doc = {**agg.to_wire(), "batch_id": "b1", "gateway_id": "gw1", "seq": 1}
        st, body = await ingest(s, url, doc)
        assert st == 200, body
        st, rep = await get(s, url, "/v1/costs", service="svc", group_by="cost_type",
                            **{"from": int(DAY0)})
        assert st == 200, rep
        by_type = {g["key"]: g["micros"] for g in rep["groups"]}
        assert by_type["api_calls"] == 10 * 1_000            # 10 x $0.001, not 100
        assert by_type["compute"] == upstream_us               # $1 a second of admitted time
        assert rep["total"]["micros"] == 10_000 + upstream_us
