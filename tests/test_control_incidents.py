"""Incidents: declaration, ids, lifecycle, resolution rules, post-mortems, escalation timing,
breaker openings and alerts on the timeline, the health overview's active incidents."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.control.api.admin import run_evaluation
from gateway.control.domain import incidents
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, DAY0, HOUR, MIN, call, slo_plane
from tests.test_control_support import batch, ingest, series

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

DECL = {"title": "Database Performance Degradation", "description": "Queries 300 % slower",
        "severity": "SEV-2", "affected_service": "database",
        "context": {"avg_response_ms": 450, "normal_ms": 150}, "reason": "on-call saw it"}


async def test_lifecycle_ids_postmortem_and_audit(tmp_path):
    clock = FakeClock(wall=DAY0)                      # 2023-11-15
    async with slo_plane(tmp_path, clock) as (url, s, _app):
        status, inc = await call(s, url, "POST", "/v1/incidents", json=DECL)
        assert status == 201, inc
        assert inc["id"] == "INC-2023-001"
        assert (inc["status"], inc["severity"], inc["escalation_level"], inc["created_by"],
                inc["context"], inc["postmortem_required"]) == (
            "investigating", "SEV-2", 0, "admin-user", DECL["context"], True)
        assert inc["response_due_at"] == DAY0 + HOUR
        status, second = await call(s, url, "POST", "/v1/incidents",
                                    json={**DECL, "severity": "minor"})
        assert second["id"] == "INC-2023-002" and second["severity"] == "SEV-3"
        iid = inc["id"]
        clock.advance(10 * MIN)
        status, inc = await call(s, url, "POST", f"/v1/incidents/{iid}/acknowledge",
                                 json={"reason": "mine"})
        assert status == 200 and inc["status"] == "acknowledged"
        assert inc["acknowledged_at"] == DAY0 + 10 * MIN and inc["response_due_at"] is None
        assert (await call(s, url, "POST", f"/v1/incidents/{iid}/acknowledge"))[0] == 409
        status, inc = await call(s, url, "POST", f"/v1/incidents/{iid}/timeline",
                                 json={"text": "added an index on user_sessions.created_at"})
        assert status == 200
        status, inc = await call(s, url, "POST", f"/v1/incidents/{iid}/mitigate")
        assert inc["status"] == "mitigated"
        status, doc = await call(s, url, "POST", f"/v1/incidents/{iid}/resolve",
                                 json={"resolution_notes": "optimised slow queries"})
        assert status == 400 and doc["detail"] == "root_cause: is required"
        status, doc = await call(s, url, "POST", f"/v1/incidents/{iid}/resolve",
                                 json={"root_cause": "missing index"})
        assert status == 400 and doc["detail"].startswith("resolution_notes:")
        clock.advance(HOUR)
        status, inc = await call(s, url, "POST", f"/v1/incidents/{iid}/resolve", json={
            "resolution_notes": "optimised slow queries and added indexes",
            "root_cause": "missing database index on user_sessions.created_at"})
        assert status == 200 and inc["status"] == "resolved"
        assert inc["postmortem"] == {"required": True, "status": "pending",
                                     "due_at": clock.time() + 48 * HOUR}
        assert (await call(s, url, "POST", f"/v1/incidents/{iid}/resolve", json={
            "resolution_notes": "x", "root_cause": "y"}))[0] == 409
        status, doc = await call(s, url, "POST", f"/v1/incidents/{iid}/postmortem",
                                 json={"summary": "no index", "action_items": ["lint queries"]})
        assert status == 200 and doc["postmortem"]["status"] == "completed"
        assert doc["postmortem"]["action_items"] == ["lint queries"]
        assert [(e["kind"], e["text"].split(":")[0]) for e in doc["timeline"]] == [
            ("status", "declared SEV-2"), ("status", "investigating -> acknowledged"),
            ("note", "added an index on user_sessions.created_at"),
            ("status", "acknowledged -> mitigated"), ("status", "mitigated -> resolved"),
            ("postmortem", "post-mortem recorded")]
        # SEV-3: no post-mortem needed
        status, doc = await call(s, url, "POST", f"/v1/incidents/{second['id']}/resolve", json={
            "resolution_notes": "x", "root_cause": "y"})
        assert doc["postmortem"] is None and doc["postmortem_required"] is False
        _, audit = await call(s, url, "GET", "/v1/audit", limit=100)
        actions = [(e["action"], e["target"]) for e in reversed(audit["entries"])]
        assert actions[-7:] == [
            ("create", "incident/INC-2023-002"), ("acknowledge", f"incident/{iid}"),
            ("note", f"incident/{iid}"), ("mitigate", f"incident/{iid}"),
            ("resolve", f"incident/{iid}"), ("postmortem", f"incident/{iid}"),
            ("resolve", "incident/INC-2023-002")]
        assert audit["entries"][-1]["reason"] == "on-call saw it"
        status, doc = await call(s, url, "GET", "/v1/incidents", role="monitor", active="false")
        assert [i["id"] for i in doc["incidents"]] == ["INC-2023-002", iid]
        for path in ("/v1/incidents", f"/v1/incidents/{iid}/timeline"):
            assert (await call(s, url, "POST", path, role="monitor", json=DECL))[0] == 403
        assert (await call(s, url, "GET", "/v1/incidents", role="reader"))[0] == 403
        assert (await call(s, url, "GET", "/v1/incidents/INC-1999-001"))[0] == 404
        assert (await call(s, url, "POST", f"/v1/incidents/{iid}/reopen"))[0] == 404


async def test_declaration_is_validated_and_ids_restart_each_year(tmp_path):
    clock = FakeClock(wall=datetime(2024, 12, 31, 23, 59, tzinfo=UTC).timestamp())
    async with slo_plane(tmp_path, clock) as (url, s, _app):
        for bad, field in (({**DECL, "severity": "SEV-5"}, "severity"),
                           ({**DECL, "title": ""}, "title"),
                           ({k: v for k, v in DECL.items() if k != "affected_service"},
                            "affected_service"),
                           ({**DECL, "context": [1]}, "context"),
                           ({**DECL, "owner": "bob"}, "owner")):
            status, doc = await call(s, url, "POST", "/v1/incidents", json=bad)
            assert status == 400 and doc["detail"].startswith(field + ":"), doc
        assert (await call(s, url, "POST", "/v1/incidents", json=DECL))[1]["id"] == "INC-2024-001"
        clock.advance(2 * MIN)
        assert (await call(s, url, "POST", "/v1/incidents", json=DECL))[1]["id"] == "INC-2025-001"
        assert (await call(s, url, "POST", "/v1/incidents", json=DECL))[1]["id"] == "INC-2025-002"


@pytest.mark.parametrize("severity,response_s", [
    ("SEV-1", 15 * MIN), ("SEV-2", HOUR), ("SEV-3", 4 * HOUR)])
async def test_escalation_when_the_response_time_passes(tmp_path, severity, response_s):
    clock = FakeClock(wall=DAY0)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        _, inc = await call(s, url, "POST", "/v1/incidents", json={**DECL, "severity": severity})
        iid = inc["id"]
        clock.advance(response_s - 1)
        await run_evaluation(app)
        assert (await call(s, url, "GET", f"/v1/incidents/{iid}"))[1]["escalation_level"] == 0
        clock.advance(1)
        await run_evaluation(app)
        _, doc = await call(s, url, "GET", f"/v1/incidents/{iid}")
        assert doc["escalation_level"] == 1 and doc["response_due_at"] == DAY0 + 2 * response_s
        assert doc["timeline"][-1]["kind"] == "escalation"
        await run_evaluation(app)                                    # no double escalation
        clock.advance(response_s)
        await run_evaluation(app)
        assert (await call(s, url, "GET", f"/v1/incidents/{iid}"))[1]["escalation_level"] == 2
        await call(s, url, "POST", f"/v1/incidents/{iid}/acknowledge")
        clock.advance(10 * response_s)                                # acknowledged: no more
        await run_evaluation(app)
        assert (await call(s, url, "GET", f"/v1/incidents/{iid}"))[1]["escalation_level"] == 2
        status, doc = await call(s, url, "POST", f"/v1/incidents/{iid}/escalate",
                                 json={"reason": "needs the DBA", "severity": "SEV-1"})
        assert status == 200 and doc["escalation_level"] == 3 and doc["severity"] == "SEV-1"


def test_sev4_escalates_after_one_business_day():
    def ts(*a):
        return datetime(*a, tzinfo=UTC).timestamp()

    # Tuesday 10:00 -> Wednesday 10:00; Friday 10:00 -> Monday 10:00; Saturday -> Monday
    assert incidents.response_deadline("SEV-4", ts(2024, 3, 12, 10)) == ts(2024, 3, 13, 10)
    assert incidents.response_deadline("SEV-4", ts(2024, 3, 15, 10)) == ts(2024, 3, 18, 10)
    assert incidents.response_deadline("SEV-4", ts(2024, 3, 16, 10)) == ts(2024, 3, 18, 10)
    friday = ts(2024, 3, 15, 10)
    assert incidents.auto_level("SEV-4", friday, ts(2024, 3, 17, 23)) == (0, ts(2024, 3, 18, 10))
    assert incidents.auto_level("SEV-4", friday, ts(2024, 3, 18, 10)) == (1, ts(2024, 3, 19, 10))
    assert incidents.auto_level("SEV-1", friday, friday + 46 * MIN) == (3, friday + 60 * MIN)


async def test_breaker_openings_join_the_timeline_and_the_overview_lists_active_ones(tmp_path):
    t = DAY0 + DAY
    clock = FakeClock(wall=t + 5 * MIN)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        _, inc = await call(s, url, "POST", "/v1/incidents",
                            json={**DECL, "affected_service": "svc", "severity": "critical"})
        _, other = await call(s, url, "POST", "/v1/incidents", json=DECL)
        doc = batch("b1", t + 4 * MIN, [series("r1", "svc", 502, upstream="pay-up")],
                    breaker_transitions=[
                        {"upstream": "pay-up", "from": "closed", "to": "open", "at": t + 4 * MIN,
                         "reason": "5 consecutive failures"},
                        {"upstream": "pay-up", "from": "open", "to": "half_open",
                         "at": t + 4.5 * MIN, "reason": "reset timeout"},
                        {"upstream": "elsewhere", "from": "closed", "to": "open",
                         "at": t + 4 * MIN, "reason": "x"}])
        assert (await ingest(s, url, doc))[0] == 200
        await run_evaluation(app)
        await run_evaluation(app)                                     # added once
        _, doc = await call(s, url, "GET", f"/v1/incidents/{inc['id']}")
        breakers = [e for e in doc["timeline"] if e["kind"] == "breaker"]
        assert [(e["at"], e["text"]) for e in breakers] == [
            (t + 4 * MIN,
             "circuit breaker of pay-up opened (closed -> open): 5 consecutive failures")]
        _, doc = await call(s, url, "GET", f"/v1/incidents/{other['id']}")
        assert not [e for e in doc["timeline"] if e["kind"] == "breaker"]
        _, doc = await call(s, url, "POST", f"/v1/incidents/{other['id']}/resolve",
                            json={"resolution_notes": "x", "root_cause": "y"})
        status, doc = await call(s, url, "GET", "/v1/health/overview", role="reader")
        assert status == 200
        assert doc["incidents"] == [{"id": inc["id"], "title": DECL["title"],
                                     "severity": "SEV-1", "status": "investigating",
                                     "affected_service": "svc", "escalation_level": 0,
                                     "created_at": t + 5 * MIN}]
        clock.advance(DAY)
        await run_evaluation(app)
        _, doc = await call(s, url, "GET", "/v1/health/overview")
        assert doc["incidents"][0]["escalation_level"] == incidents.MAX_ESCALATION   # capped
