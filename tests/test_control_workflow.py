"""The SRE workflow around incidents: assignment (audited), post-mortem action items with an
overdue alert, KPI reports per service and period, SLO history; a simulated month (FakeClock)
producing the right attainment history and KPIs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.control.api.admin import run_evaluation
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, HOUR, MIN, add_slo, call, feed, make_slo, slo_plane
from tests.test_control_support import store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

NOV1 = datetime(2023, 11, 1, tzinfo=UTC).timestamp()
DEC1 = datetime(2023, 12, 1, tzinfo=UTC).timestamp()


async def declare(s, url, **kw) -> dict:
    body = {"title": "checkout errors", "severity": "SEV-2", "affected_service": "svc", **kw}
    status, doc = await call(s, url, "POST", "/v1/incidents", json=body)
    assert status == 201, doc
    return doc


async def test_assignment_is_settable_audited_and_on_the_timeline(tmp_path):
    clock = FakeClock(wall=NOV1)
    async with slo_plane(tmp_path, clock) as (url, s, _app):
        inc = await declare(s, url)
        assert inc["assigned_to"] is None
        path = f"/v1/incidents/{inc['id']}/assign"
        status, doc = await call(s, url, "POST", path,
                                 json={"assigned_to": "alice", "reason": "on call"})
        assert status == 200 and doc["assigned_to"] == "alice"
        assert doc["timeline"][-1]["text"] == "assigned to alice: on call"
        status, doc = await call(s, url, "GET", f"/v1/incidents/{inc['id']}", role="monitor")
        assert doc["assigned_to"] == "alice"
        _, audit = await call(s, url, "GET", "/v1/audit", action="assign")
        (entry,) = audit["entries"]
        assert (entry["actor"], entry["target"], entry["reason"]) == (
            "admin-user", f"incident/{inc['id']}", "on call")
        assert entry["details"] == {"assigned_to": [None, "alice"]}
        status, doc = await call(s, url, "POST", path, json={"assigned_to": None})
        assert status == 200 and doc["assigned_to"] is None
        assert (await call(s, url, "POST", path, json={"assigned_to": ""}))[0] == 400
        assert (await call(s, url, "POST", path, json={}))[0] == 400
        assert (await call(s, url, "POST", path, role="monitor",
                           json={"assigned_to": "bob"}))[0] == 403
        assert (await call(s, url, "POST", "/v1/incidents/INC-1999-001/assign",
                           json={"assigned_to": "bob"}))[0] == 404
        # the other incident actions still work beside the new paths
        assert (await call(s, url, "POST", f"/v1/incidents/{inc['id']}/acknowledge"))[0] == 200


async def test_action_items_overdue_alert_and_completion(tmp_path):
    clock = FakeClock(wall=NOV1 + 9 * HOUR)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        inc = await declare(s, url)
        path = f"/v1/incidents/{inc['id']}/action-items"
        status, item = await call(s, url, "POST", path, json={
            "description": "alert on queue depth", "owner": "bob", "due": "2023-11-02",
            "priority": "high", "reason": "post-mortem"})
        assert status == 201
        assert (item["owner"], item["priority"], item["status"], item["overdue"]) == (
            "bob", "high", "open", False)
        assert item["due_at"] == NOV1 + 2 * DAY                 # the end of that day, UTC
        status, err = await call(s, url, "POST", path, json={"description": "x", "owner": "b",
                                                             "due": "soon"})
        assert status == 400 and err["detail"].startswith("due: must be a date")
        status, err = await call(s, url, "POST", path, json={"description": "x", "owner": "b",
                                                             "due": "2023-11-05",
                                                             "priority": "urgent"})
        assert status == 400 and err["detail"].startswith("priority: must be one of high")
        assert (await call(s, url, "POST", "/v1/incidents/INC-1999-001/action-items",
                           json={"description": "x", "owner": "b", "due": 1}))[0] == 404

        async def overdue_alerts() -> list[dict]:
            _, doc = await call(s, url, "GET", "/v1/alerts")
            return [a for a in doc["alerts"] if a["labels"]["alertname"] == "ActionItemOverdue"]

        clock.advance(DAY)                                      # Nov 2, 09:00: not yet
        await run_evaluation(app)
        assert await overdue_alerts() == []
        clock.advance(DAY)                                      # Nov 3: overdue
        await run_evaluation(app)
        await run_evaluation(app)
        (alert,) = await overdue_alerts()
        assert (alert["status"], alert["severity"], alert["labels"]["owner"]) == (
            "firing", "ticket", "bob")
        assert alert["title"] == f"action item {item['id']} of {inc['id']} is overdue (bob)"
        _, listed = await call(s, url, "GET", "/v1/action-items", overdue="true",
                               role="monitor")
        assert [i["id"] for i in listed["action_items"]] == [item["id"]]
        assert listed["action_items"][0]["overdue"] is True
        status, done = await call(s, url, "POST", f"/v1/action-items/{item['id']}/complete",
                                  json={"reason": "shipped"})
        assert status == 200 and done["status"] == "done" and not done["overdue"]
        (alert,) = await overdue_alerts()
        assert alert["status"] == "resolved"
        assert (await call(s, url, "POST", f"/v1/action-items/{item['id']}/complete"))[0] == 409
        status, patched = await call(s, url, "PATCH", f"/v1/action-items/{item['id']}",
                                     json={"owner": "carol"})
        assert status == 200 and patched["owner"] == "carol"
        _, doc = await call(s, url, "GET", f"/v1/incidents/{inc['id']}")
        kinds = [t["kind"] for t in doc["timeline"]]
        assert kinds.count("action_item") == 3                  # created, overdue, done
        _, audit = await call(s, url, "GET", "/v1/audit")
        assert {e["action"] for e in audit["entries"]
                if e["target"] == f"action_item/{item['id']}"} == {"create", "complete",
                                                                    "update"}


@pytest.mark.timeout(120)
async def test_a_simulated_month_gives_the_attainment_history_and_the_kpis(tmp_path):
    """November 2023 at 100 requests a minute; a 20-minute outage on the 10th (2000 bad events:
    the month's budget is 4320); two incidents handled by hand; action items. The history must
    hold 30 daily snapshots and the closed month; the report the KPIs worked out by hand."""
    clock = FakeClock(wall=NOV1)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        store = store_of(app)
        add_slo(store, make_slo(window="month", budget_alerts=[50, 90]), now=NOV1)
        outage = NOV1 + 9 * DAY + 12 * HOUR
        feed(store, NOV1, int(outage - NOV1) // MIN, 100, 0)
        feed(store, outage, 20, 100, 100)
        feed(store, outage + 20 * MIN, int(DEC1 + 2 * DAY - outage) // MIN - 20, 100, 0)
        inc1 = inc2 = None

        async def at(t: float) -> None:
            clock.advance(t - clock.time())

        day = NOV1
        while day < DEC1 + DAY:
            day += DAY
            if inc1 is None and day > outage:                   # the outage, by hand
                await at(outage + 5 * MIN)
                inc1 = await declare(s, url, severity="SEV-2")
                await at(outage + 15 * MIN)
                await call(s, url, "POST", f"/v1/incidents/{inc1['id']}/acknowledge")
                await at(outage + 55 * MIN)
                await call(s, url, "POST", f"/v1/incidents/{inc1['id']}/resolve", json={
                    "resolution_notes": "rolled back", "root_cause": "bad deploy"})
                status, item1 = await call(s, url, "POST",
                                           f"/v1/incidents/{inc1['id']}/action-items",
                                           json={"description": "canary deploys",
                                                 "owner": "alice", "due": "2023-11-12"})
                assert status == 201
            if inc2 is None and day > NOV1 + 19 * DAY:          # a SEV-3 on the 20th
                await at(NOV1 + 19 * DAY + 8 * HOUR)
                inc2 = await declare(s, url, severity="SEV-3", title="slow search")
                await at(NOV1 + 19 * DAY + 8 * HOUR + 30 * MIN)
                await call(s, url, "POST", f"/v1/incidents/{inc2['id']}/acknowledge")
                await at(NOV1 + 19 * DAY + 10 * HOUR)
                await call(s, url, "POST", f"/v1/incidents/{inc2['id']}/resolve", json={
                    "resolution_notes": "index rebuilt", "root_cause": "stale index"})
                await call(s, url, "POST", f"/v1/incidents/{inc2['id']}/action-items",
                           json={"description": "index health check", "owner": "bob",
                                 "due": "2023-11-25", "priority": "low"})
            if inc1 is not None and day == NOV1 + 11 * DAY:     # item 1 done on the 11th
                await at(NOV1 + 10 * DAY + 16 * HOUR)
                await call(s, url, "POST", f"/v1/action-items/{item1['id']}/complete")
            await at(day)
            await run_evaluation(app)
        assert clock.time() == DEC1 + DAY

        status, doc = await call(s, url, "GET", "/v1/slos/api-availability/history",
                                 role="monitor", since=NOV1, until=DEC1)
        assert status == 200
        days = doc["history"]
        assert [d["period_end"] for d in days] == [NOV1 + (i + 1) * DAY for i in range(30)]
        assert all(d["period_start"] == NOV1 for d in days)    # the month to date
        assert [d["total"] for d in days] == [(i + 1) * 144_000 for i in range(30)]
        assert [d["bad"] for d in days] == [0] * 9 + [2000] * 21
        # the month to date misses 99.9 % from the 10th (2000 of 1.44 M) until the 14th
        # (2000 of 2.016 M = 0.0992 %): 4 days out of SLO
        assert [d["met"] for d in days] == [True] * 9 + [False] * 4 + [True] * 17
        assert days[9]["attainment"] == pytest.approx(1 - 2000 / 1_440_000)
        assert days[9]["budget_remaining"] == pytest.approx(1 - 2000 / 1440)
        assert days[-1]["budget_remaining"] == pytest.approx(1 - 2000 / 4320)
        status, doc = await call(s, url, "GET", "/v1/slos/api-availability/history",
                                 kind="period")
        (month,) = doc["history"]
        assert (month["period_start"], month["period_end"], month["total"], month["bad"]) == (
            NOV1, DEC1, 4_320_000, 2000)
        assert month["met"] and month["attainment"] == pytest.approx(1 - 2000 / 4_320_000)

        status, rep = await call(s, url, "GET", "/v1/reports/svc", role="monitor",
                                 period="month", at=NOV1 + 15 * DAY)
        assert status == 200
        assert rep["period"] == {"name": "month", "since": NOV1, "until": DEC1,
                                 "complete": True}
        assert rep["incidents"]["total"] == 2
        assert rep["incidents"]["by_severity"] == {"SEV-1": 0, "SEV-2": 1, "SEV-3": 1,
                                                   "SEV-4": 0}
        assert rep["mtta_s"] == (10 * MIN + 30 * MIN) / 2
        assert rep["mttr_s"] == (50 * MIN + 2 * HOUR) / 2
        (slo,) = rep["slos"]
        assert (slo["days"], slo["days_in_slo"]) == (30, 26)
        assert slo["time_in_slo"] == pytest.approx(26 / 30)
        assert slo["period_attainment"] == pytest.approx(1 - 2000 / 4_320_000)
        assert rep["action_items"] == {"total": 2, "open": 1, "overdue": 1, "done": 1}
        # December so far: nothing happened
        _, dec = await call(s, url, "GET", "/v1/reports/svc")
        assert dec["incidents"]["total"] == 0 and dec["mtta_s"] is None
        assert dec["slos"][0]["days"] == 1
        # the consumption alerts: one at 90 % in November (the outage spent 139 %)
        _, al = await call(s, url, "GET", "/v1/alerts")
        consumed = [a for a in al["alerts"] if a["source"] == "budget"]
        assert [(a["labels"]["threshold"], a["status"]) for a in consumed] == [
            ("90%", "resolved")]                              # resolved when November ended
        overdue = [a for a in al["alerts"] if a["source"] == "action_item"]
        assert [a["labels"]["owner"] for a in overdue] == ["bob"]
        assert (await call(s, url, "GET", "/v1/reports/svc", period="year"))[0] == 400
        assert (await call(s, url, "GET", "/v1/reports/svc", role="reader"))[0] == 403


async def test_latency_slo_history_from_ingested_histograms(tmp_path):
    """A latency SLO's daily snapshot counts the slow requests of the merged histograms."""
    from tests.test_control_support import batch, ingest, series
    clock = FakeClock(wall=NOV1 + 12 * HOUR)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        add_slo(store_of(app), make_slo(name="api-latency", sli="latency", threshold_ms=500,
                                        objective=95, window="7d"), now=NOV1)
        lat = [1_000] * 90 + [800_000] * 10                  # 10 of 100 slower than 500 ms
        status, _ = await ingest(s, url, batch("b1", clock.time() - 10,
                                               [series(latencies_us=lat)]))
        assert status == 200
        clock.advance(12 * HOUR)                             # Nov 2, 00:00
        await run_evaluation(app)
        status, doc = await call(s, url, "GET", "/v1/slos/api-latency/history")
        (day,) = doc["history"]
        assert (day["sli"], day["total"], day["bad"], day["met"]) == ("latency", 100, 10, False)
        assert day["attainment"] == pytest.approx(0.9)
        assert day["period_end"] == NOV1 + DAY and day["period_start"] == NOV1 + DAY - 7 * DAY
