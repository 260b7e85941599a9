"""Alerts besides burn rates: error-budget consumption at 50 % and 90 % once per period, a gateway
that stops reporting (3 ship intervals without a batch), budget_alerts validation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.control.api.admin import run_evaluation
from gateway.control.domain import slo as slo_mod
from gateway.control.jobs.evaluator import Evaluator
from gateway.control.store import Store
from gateway.validation import Errors
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, MIN, add_slo, call, feed, make_slo, slo_plane
from tests.test_control_support import batch, database_of, ingest, series, store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

NOV1 = datetime(2023, 11, 1, tzinfo=UTC).timestamp()
DEC1 = datetime(2023, 12, 1, tzinfo=UTC).timestamp()


def budget_alerts(store: Store) -> list[dict]:
    return [a for a in reversed(store.alerts.slo_alerts(limit=1000)) if a["source"] == "budget"]


def test_consumption_alerts_at_50_and_90_percent_once_per_period(tmp_path):
    store = Store(database_of(tmp_path, "c.db"))
    try:
        s = make_slo(window="month", budget_alerts=[50, 90])
        add_slo(store, s)
        ev = Evaluator(store)
        clock = FakeClock(wall=NOV1 + 10 * DAY)
        feed(store, NOV1, 10 * 24 * 60, 100, 0)            # 1.44 M good events: 1440 allowed
        ev.evaluate(clock.time())
        assert budget_alerts(store) == []
        feed(store, clock.time(), 8, 100, 100)              # 800 bad: 55 %
        clock.advance(10 * MIN)
        ev.evaluate(clock.time())
        (fifty,) = budget_alerts(store)
        assert (fifty["severity"], fifty["status"], fifty["labels"]["threshold"]) == (
            "ticket", "firing", "50%")
        assert fifty["dedup_key"] == f"api-availability:budget50:{int(NOV1)}"
        assert fifty["title"] == "api-availability: 50 % of the error budget consumed"
        assert fifty["details"]["period_end"] == DEC1
        for _ in range(5):                                 # once per period
            clock.advance(10 * MIN)
            ev.evaluate(clock.time())
        assert len(budget_alerts(store)) == 1
        feed(store, clock.time(), 6, 100, 100)             # 1400 bad: 97 %
        clock.advance(10 * MIN)
        ev.evaluate(clock.time())
        # the burn-rate page of this outage is open: the consumption page waits for it
        assert store.alerts.open_slo_alert("api-availability:page") is not None
        assert [a["labels"]["threshold"] for a in budget_alerts(store)] == ["50%"]
        events = []
        while store.alerts.open_slo_alert("api-availability:page") is not None:
            clock.advance(10 * MIN)
            events += ev.evaluate(clock.time())
        fifty, ninety = budget_alerts(store)
        assert fifty["status"] == "resolved"               # superseded
        assert (ninety["severity"], ninety["status"]) == ("page", "firing")
        assert ninety["incident_id"] is None               # budget spending opens no incident
        assert {(e.kind, e.alert["dedup_key"]) for e in events
                if e.alert["source"] == "budget"} == {("resolved", fifty["dedup_key"]),
                                                      ("firing", ninety["dedup_key"])}
        clock.advance(DAY)
        ev.evaluate(clock.time())
        assert len(budget_alerts(store)) == 2
        # December: the November alert resolves; a new period alerts again
        clock = FakeClock(wall=DEC1 + 2 * DAY)
        feed(store, DEC1, 2 * 24 * 60, 100, 0)
        ev.evaluate(clock.time())
        assert [a["status"] for a in budget_alerts(store)] == ["resolved", "resolved"]
        feed(store, clock.time(), 2, 100, 100)            # 200 of 288 allowed: 69 %
        clock.advance(10 * MIN)
        ev.evaluate(clock.time())
        *_, dec = budget_alerts(store)
        assert dec["dedup_key"] == f"api-availability:budget50:{int(DEC1)}"
        assert dec["status"] == "firing"
        assert [e["action"] for e in store.audit.entries(actor="evaluator", limit=100)
                if e["target"] == f"alert/{dec['id']}"] == ["create"]
    finally:
        store.close()


def test_no_consumption_alert_below_min_events_or_when_disabled(tmp_path):
    store = Store(database_of(tmp_path, "c.db"))
    try:
        add_slo(store, make_slo(window="month", budget_alerts=[50, 90], min_events=10_000))
        add_slo(store, make_slo(name="quiet", window="month", budget_alerts=[]))
        t = NOV1 + DAY
        feed(store, NOV1, 60, 100, 10)                     # 6000 events, 10 % bad
        Evaluator(store).evaluate(t)
        assert budget_alerts(store) == []
    finally:
        store.close()


def test_budget_alerts_validation():
    errs = Errors()
    assert slo_mod.parse_slo({"name": "a", "service": "s", "objective": 99,
                              "budget_alerts": [90, 50]}, "slos[0]", errs) is None
    assert slo_mod.parse_slo({"name": "a", "service": "s", "objective": 99,
                              "budget_alerts": [0, 50]}, "slos[1]", errs) is None
    assert slo_mod.parse_slo({"name": "a", "service": "s", "objective": 99,
                              "budget_alerts": "50"}, "slos[2]", errs) is None
    assert errs.lines == [
        "slos[0].budget_alerts: must be ascending without repeats",
        "slos[1].budget_alerts[0]: must be > 0, got 0",
        ("slos[2].budget_alerts: must be a list of percentages of the error budget consumed, "
        "e.g. [50, 90]")]
    ok = slo_mod.parse_slo({"name": "a", "service": "s", "objective": 99}, "x", errs)
    assert ok is not None and ok.budget_alerts == (50.0, 90.0)
    assert slo_mod.slo_from_doc(ok.to_doc()).budget_alerts == (50.0, 90.0)


@pytest.mark.timeout(60)
async def test_a_gateway_that_stops_reporting_raises_an_alert_until_it_is_back(tmp_path):
    t0 = NOV1 + DAY
    clock = FakeClock(wall=t0)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        status, _ = await ingest(s, url, batch("b1", t0 - 10, [series()], gateway_id="gw-a",
                                               length=10))
        assert status == 200
        status, _ = await ingest(s, url, batch("b2", t0 - 5, [series()], gateway_id="gw-b",
                                               length=5))
        assert status == 200

        async def silent() -> list[dict]:
            _, doc = await call(s, url, "GET", "/v1/alerts")
            return [a for a in doc["alerts"] if a["labels"]["alertname"] == "GatewaySilent"]

        clock.advance(25)                              # gw-b: 25 s > 3 x 5 s; gw-a: 25 < 30
        await run_evaluation(app)
        (alert,) = await silent()
        assert alert["labels"]["gateway_id"] == "gw-b" and alert["status"] == "firing"
        assert alert["title"] == "gateway gw-b stopped reporting"
        assert alert["service"] == "gateways" and alert["severity"] == "ticket"
        clock.advance(10)                              # gw-a: 35 s > 30
        await run_evaluation(app)
        await run_evaluation(app)                      # no duplicates
        assert sorted(a["labels"]["gateway_id"] for a in await silent()) == ["gw-a", "gw-b"]
        status, _ = await ingest(s, url, batch("b3", clock.time() - 5, [series()],
                                               gateway_id="gw-b", seq=1, length=5))
        assert status == 200
        await run_evaluation(app)
        by_gw = {a["labels"]["gateway_id"]: a["status"] for a in await silent()}
        assert by_gw == {"gw-a": "firing", "gw-b": "resolved"}
        # gw-a was taken out of service: resolved by hand, it is not raised again
        gw_a = next(a for a in await silent() if a["labels"]["gateway_id"] == "gw-a")
        status, _ = await call(s, url, "POST", f"/v1/alerts/{gw_a['id']}/resolve",
                               json={"reason": "decommissioned"})
        assert status == 200
        clock.advance(60)
        await run_evaluation(app)
        assert [a["status"] for a in await silent()
                if a["labels"]["gateway_id"] == "gw-a"] == ["resolved"]
        # gw-b reported (and its alert resolved); silent again: a new alert
        clock.advance(60)
        await run_evaluation(app)
        assert [a["status"] for a in await silent()
                if a["labels"]["gateway_id"] == "gw-b"] == ["firing", "resolved"]
        assert store_of(app).fleet.gateway_intervals()[1][2] == 5.0
