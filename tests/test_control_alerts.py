"""/v1/alerts: burn-rate alerts through the app's evaluator, hand-made alerts, dedup, ack,
resolve, roles and audit."""

from __future__ import annotations

import pytest

from gateway.control.api.admin import run_evaluation
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, DAY0, MIN, add_slo, call, feed, make_slo, slo_plane
from tests.test_control_support import store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql


async def test_burn_rate_alert_through_the_api_ack_and_auto_resolve(tmp_path):
    t0 = DAY0 + DAY
    clock = FakeClock(wall=t0)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        store = store_of(app)
        add_slo(store, make_slo())
        feed(store, t0 - DAY, 24 * 60, 100, 0)
        feed(store, t0, 10, 100, 60)                   # 10 minutes at 60 % errors
        feed(store, t0 + 10 * MIN, 120, 100, 0)
        clock.advance(3 * MIN)
        status, doc = await call(s, url, "POST", "/v1/admin/evaluate")
        assert status == 200 and [e["kind"] for e in doc["events"]] == ["firing"]
        status, doc = await call(s, url, "GET", "/v1/alerts", role="monitor")
        assert status == 200
        (alert,) = doc["alerts"]
        assert (alert["severity"], alert["status"], alert["source"], alert["slo_id"],
                alert["dedup_key"]) == ("page", "firing", "slo", "api-availability",
                                        "api-availability:page")
        assert alert["labels"] == {"alertname": "SLOBurnRate", "slo": "api-availability",
                                   "sli": "availability", "tier": "page", "severity": "page",
                                   "service": "svc"}
        assert len(alert["fingerprint"]) == 16 and alert["incident_id"].startswith("INC-")
        clock.advance(MIN)
        await run_evaluation(app)                      # still firing: the same alert
        assert len((await call(s, url, "GET", "/v1/alerts"))[1]["alerts"]) == 1
        assert (await call(s, url, "POST", f"/v1/alerts/{alert['id']}/ack",
                           role="monitor"))[0] == 403
        status, doc = await call(s, url, "POST", f"/v1/alerts/{alert['id']}/ack",
                                 json={"reason": "looking into it"})
        assert status == 200 and doc["status"] == "acknowledged"
        assert doc["acknowledged_by"] == "admin-user" and doc["acknowledged_at"] == clock.time()
        assert (await call(s, url, "POST", f"/v1/alerts/{alert['id']}/ack"))[0] == 409
        assert (await call(s, url, "POST", "/v1/alerts/999/ack"))[0] == 404
        for _ in range(60):                            # the errors stop at +10 min
            clock.advance(MIN)
            await run_evaluation(app)
        status, doc = await call(s, url, "GET", "/v1/alerts", status="resolved")
        assert [a["id"] for a in doc["alerts"]] == [alert["id"]]
        status, doc = await call(s, url, "GET", "/v1/alerts", open="true")
        assert all(a["severity"] == "ticket" for a in doc["alerts"])
        _, audit = await call(s, url, "GET", "/v1/audit", limit=1000)
        got = {(e["actor"], e["action"], e["target"]) for e in audit["entries"]}
        assert {("evaluator", "create", f"alert/{alert['id']}"),
                ("admin-user", "ack", f"alert/{alert['id']}"),
                ("evaluator", "resolve", f"alert/{alert['id']}")} <= got
        ack = next(e for e in audit["entries"] if e["action"] == "ack")
        assert ack["reason"] == "looking into it"


async def test_manual_alerts_dedup_page_opens_an_incident_and_resolve_by_hand(tmp_path):
    t0 = DAY0 + DAY
    clock = FakeClock(wall=t0)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        feed(store_of(app), t0 - 5 * MIN, 5, 100, 30)          # 30 % 5xx now: SEV-2
        body = {"title": "Disk almost full on db-1", "service": "db", "severity": "ticket",
                "description": "92 % used", "labels": {"host": "db-1"}, "reason": "by hand"}
        status, doc = await call(s, url, "POST", "/v1/alerts", json=body)
        assert status == 201 and doc["deduplicated"] is False
        assert doc["source"] == "manual" and doc["incident_id"] is None
        assert doc["labels"] == {"alertname": "ManualAlert", "host": "db-1",
                                 "severity": "ticket", "service": "db"}
        first = doc["id"]
        status, doc = await call(s, url, "POST", "/v1/alerts", json=body)
        assert status == 200 and doc["deduplicated"] is True and doc["id"] == first
        page = {"title": "Checkout down", "service": "svc", "severity": "page",
                "cause": "checkout-outage"}
        status, doc = await call(s, url, "POST", "/v1/alerts", json=page)
        assert status == 201 and doc["incident_id"]
        status, inc = await call(s, url, "GET", f"/v1/incidents/{doc['incident_id']}")
        assert (inc["severity"], inc["cause"], inc["affected_service"], inc["alert_ids"]) == (
            "SEV-2", "checkout-outage", "svc", [doc["id"]])
        # a second page of the same service and cause joins the open incident
        status, doc2 = await call(s, url, "POST", "/v1/alerts",
                                  json={**page, "title": "Checkout still down"})
        assert status == 201 and doc2["incident_id"] == doc["incident_id"]
        status, doc3 = await call(s, url, "POST", "/v1/alerts",
                                  json={**page, "title": "Search down", "cause": "search"})
        assert doc3["incident_id"] != doc["incident_id"]
        status, doc = await call(s, url, "POST", f"/v1/alerts/{first}/resolve",
                                 json={"reason": "cleaned up"})
        assert status == 200 and doc["status"] == "resolved" and doc["resolved_at"] == t0
        assert (await call(s, url, "POST", f"/v1/alerts/{first}/resolve"))[0] == 409
        status, doc = await call(s, url, "POST", "/v1/alerts", json=body)   # a new one now
        assert status == 201 and doc["id"] != first
        for bad, field in (({"service": "x"}, "title"), ({"title": "t"}, "service"),
                           ({"title": "t", "service": "x", "severity": "urgent"}, "severity"),
                           ({"title": "t", "service": "x", "colour": "red"}, "colour"),
                           ({"title": "t", "service": "x", "labels": {"a": 1}}, "labels.a")):
            status, doc = await call(s, url, "POST", "/v1/alerts", json=bad)
            assert status == 400 and doc["detail"].startswith(field + ":"), doc
        assert (await call(s, url, "GET", "/v1/alerts", status="open"))[0] == 400
        assert (await call(s, url, "GET", "/v1/alerts", role="reader"))[0] == 403
        assert (await call(s, url, "POST", "/v1/alerts", role="monitor", json=body))[0] == 403
        status, doc = await call(s, url, "GET", "/v1/alerts", service="db")
        assert [a["status"] for a in doc["alerts"]] == ["firing", "resolved"]
