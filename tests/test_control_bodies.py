"""Request bodies of the control-plane API, read by one helper (web.json_body) on every write
endpoint: bad JSON, a body that is not an object, a missing body where the body is the change,
and the `reason` every change may carry into the audit log (a string of at most 2000
characters), each a problem+json 400 naming the field. Field checks of one request are
reported together. The body is read before any row is looked up, so these run on SQLite only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.control.web import MAX_REASON
from gateway.errors import PROBLEM_CONTENT_TYPE
from tests.fakes import FakeClock
from tests.test_control_support import DAY0, auth, control_plane, store_of

BUDGET = {"name": "b", "service": "svc", "period": "monthly", "amount_cents": 100}


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    good: Any             # a body the endpoint accepts
    required: bool        # is a request without a body refused?


# Every write endpoint whose body was read by a helper of its own before.
ENDPOINTS = [
    Endpoint("POST", "/v1/costs", {"records": [{
        "ServiceName": "svc", "ChargePeriodStart": DAY0, "ChargePeriodEnd": DAY0 + 3600,
        "BilledCost": "1.50"}]}, True),
    Endpoint("POST", "/v1/budgets", {**BUDGET, "name": "b2"}, True),
    Endpoint("PUT", "/v1/budgets/{bid}", {"amount_cents": 200}, True),
    Endpoint("POST", "/v1/budgets/{bid}/override", {"amount_cents": 500, "duration_s": 60}, True),
    Endpoint("DELETE", "/v1/budgets/{bid}/override", {}, False),
    Endpoint("DELETE", "/v1/budgets/{bid}", {}, False),
    Endpoint("PUT", "/v1/tenants/acme", {"plan": "pro"}, True),
    Endpoint("POST", "/v1/tenants/acme/quotas", {"qps": 5}, True),
    Endpoint("POST", "/v1/admin/retention/run", {}, False),
    Endpoint("POST", "/v1/alerts", {"title": "t", "service": "svc"}, False),
]


async def send(s: aiohttp.ClientSession, url: str, method: str, path: str,
               raw: bytes | None) -> tuple[int, str, Any]:
    headers = auth("admin")
    if raw is not None:
        headers["Content-Type"] = "application/json"
    async with s.request(method, url + path, headers=headers, data=raw) as resp:
        body = await resp.read()
        return resp.status, resp.content_type, orjson.loads(body) if body else None


def assert_problem(answer: tuple[int, str, Any], detail: str) -> None:
    status, ctype, doc = answer
    assert status == 400 and ctype == PROBLEM_CONTENT_TYPE, answer
    assert doc["detail"] == detail and doc["errors"] == [detail], doc


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
async def test_every_write_endpoint_reads_its_body_the_same_way(tmp_path, ep):
    async with control_plane(tmp_path, FakeClock(wall=DAY0 + 600)) as (url, s, app):
        status, _, budget = await send(s, url, "POST", "/v1/budgets", orjson.dumps(BUDGET))
        assert status == 201, budget
        path = ep.path.format(bid=budget["id"])

        status, _, doc = await send(s, url, ep.method, path, b'{"reason": ')
        assert status == 400 and doc["detail"].startswith(
            "body: must be a JSON object, got invalid JSON ("), doc
        # a bare list is the records of a cost import; elsewhere it is not an object
        not_object = b'"reason"' if ep.path == "/v1/costs" else b"[1, 2]"
        kind = "a string" if ep.path == "/v1/costs" else "a list"
        assert_problem(await send(s, url, ep.method, path, not_object),
                       f"body: must be a JSON object, got {kind}")
        assert_problem(await send(s, url, ep.method, path, b"null"),
                       "body: must be a JSON object, got null")
        too_long = {**ep.good, "reason": "x" * (MAX_REASON + 1)}
        assert_problem(await send(s, url, ep.method, path, orjson.dumps(too_long)),
                       f"reason: must be at most {MAX_REASON} characters, got {MAX_REASON + 1}")
        assert_problem(await send(s, url, ep.method, path,
                                  orjson.dumps({**ep.good, "reason": ["why"]})),
                       "reason: must be a string, got a list")

        if ep.required:
            for empty in (None, b"", b"  \n"):
                assert_problem(await send(s, url, ep.method, path, empty),
                               "body: is required (a JSON object)")

        # the longest reason is taken, and audited with the change
        reason = "r" * MAX_REASON
        status, _, doc = await send(s, url, ep.method, path,
                                    orjson.dumps({**ep.good, "reason": reason}))
        assert status in (200, 201, 204), doc
        entries = store_of(app).audit.entries(limit=1)
        assert entries[0]["reason"] == reason, entries[0]


async def test_an_optional_body_may_be_absent(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=DAY0 + 600)) as (url, s, app):
        _, _, budget = await send(s, url, "POST", "/v1/budgets", orjson.dumps(BUDGET))
        for method, path in (("POST", "/v1/admin/retention/run"),
                             ("DELETE", f"/v1/budgets/{budget['id']}/override"),
                             ("DELETE", f"/v1/budgets/{budget['id']}")):
            status, _, doc = await send(s, url, method, path, None)
            assert status in (200, 204), (path, doc)
            assert store_of(app).audit.entries(limit=1)[0]["reason"] == ""


async def test_all_field_errors_of_one_request_are_reported_together(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=DAY0 + 600)) as (url, s, _app):
        _, _, budget = await send(s, url, "POST", "/v1/budgets", orjson.dumps(BUDGET))
        status, _, doc = await send(s, url, "POST", f"/v1/budgets/{budget['id']}/override",
                                    orjson.dumps({"amount_cents": 0, "duraton_s": 60}))
        assert status == 400 and doc["errors"] == [
            "duraton_s: unknown key (did you mean 'duration_s'?)",
            "reason: is required (an emergency override needs one)",
            "amount_cents: must be >= 1, got 0",
            "expires_at: expires_at (a time) or duration_s (seconds, > 0) is required"], doc
        status, _, doc = await send(s, url, "POST", f"/v1/budgets/{budget['id']}/override",
                                    orjson.dumps({"amount_cents": 500, "reason": "launch",
                                                  "expires_at": "yesterday"}))
        assert doc["errors"] == ["expires_at: must be unix seconds or ISO-8601, got 'yesterday'"]

        status, _, doc = await send(s, url, "POST", "/v1/tenants/acme/quotas", orjson.dumps(
            {"qps": -1, "burst": 0, "daily_quota": 1.5, "colour": "red",
             "expires_at": DAY0}))
        assert status == 400 and doc["errors"] == [
            "colour: unknown key",
            "qps: must be > 0, got -1",
            "daily_quota: must be an integer, got 1.5",
            "expires_at: must be after effective_date"], doc
        status, _, doc = await send(s, url, "PUT", "/v1/tenants/acme",
                                    orjson.dumps({"plan": "p" * 129, "pln": "x"}))
        assert doc["errors"] == ["pln: unknown key (did you mean 'plan'?)",
                                 "plan: must be at most 128 characters, got 129"], doc

        status, _, doc = await send(s, url, "POST", "/v1/alerts", orjson.dumps(
            {"title": " ", "severity": "urgent", "labels": {"team": 7}, "cause": ""}))
        assert status == 400 and doc["errors"] == [
            "service: is required",
            "title: must not be empty",
            "severity: must be one of info, ticket, page, got 'urgent'",
            "labels.team: must be a string, got an integer",
            "cause: must not be empty"], doc
        status, _, doc = await send(s, url, "POST", "/v1/incidents", orjson.dumps(
            {"title": "t" * 301, "severity": "SEV-9", "affected_service": "a b",
             "context": []}))
        assert status == 400 and doc["errors"] == [
            "title: must be at most 300 characters, got 301",
            "severity: must be one of SEV-1, SEV-2, SEV-3, SEV-4 (or critical, major, minor, "
            "info), got 'SEV-9'",
            "affected_service: may contain only letters, digits, '_', '.', ':' and '-', "
            "got 'a b'",
            "context: must be a mapping, got a list"], doc


async def test_incident_and_action_item_fields_are_reported_together(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=DAY0 + 600)) as (url, s, _app):
        status, _, inc = await send(s, url, "POST", "/v1/incidents", orjson.dumps(
            {"title": "db down", "severity": "SEV-3", "affected_service": "db"}))
        assert status == 201, inc
        base = f"/v1/incidents/{inc['id']}"
        status, _, doc = await send(s, url, "POST", f"{base}/resolve", orjson.dumps(
            {"resolution_notes": 3, "postmortem": {"lessons": "", "action_items": ["a", 1]}}))
        assert status == 400 and doc["errors"] == [
            "resolution_notes: must be a string, got an integer",
            "root_cause: is required",
            "postmortem.summary: is required",
            "postmortem.action_items[1]: must be a string, got an integer"], doc
        status, _, doc = await send(s, url, "POST", f"{base}/postmortem", b"{}")
        assert status == 400 and doc["errors"] == ["postmortem.summary: is required"], doc
        status, _, doc = await send(s, url, "POST", f"{base}/timeline",
                                    orjson.dumps({"text": "x" * 10_001}))
        assert doc["errors"] == ["text: must be at most 10000 characters, got 10001"], doc
        status, _, doc = await send(s, url, "POST", f"{base}/assign",
                                    orjson.dumps({"assigned_to": 5}))
        assert doc["errors"] == ["assigned_to: must be a string, got an integer"], doc
        status, _, doc = await send(s, url, "POST", f"{base}/action-items", orjson.dumps(
            {"owner": "", "due": "soon", "priority": "asap", "colour": 1}))
        assert status == 400 and doc["errors"] == [
            "colour: unknown key",
            "description: is required",
            "owner: must not be empty",
            "due: must be a date (YYYY-MM-DD), an ISO-8601 time or Unix seconds, got 'soon'",
            "priority: must be one of high, medium, low, got 'asap'"], doc
        # and a body that passes is taken: nothing of the above was stored
        status, _, item = await send(s, url, "POST", f"{base}/action-items", orjson.dumps(
            {"description": "add an index", "owner": "bob", "due": "2023-11-20"}))
        assert status == 201 and item["priority"] == "medium", item


async def test_cost_records_are_checked_by_the_kit(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=DAY0 + 600)) as (url, s, _app):
        status, _, doc = await send(s, url, "POST", "/v1/costs", orjson.dumps([
            {"ServiceName": "svc\x00", "ChargePeriodStart": "yesterday",
             "ChargePeriodEnd": DAY0, "BilledCost": "1", "x_ChargeId": "", "Tags": {}},
            "row",
            {"ChargePeriodStart": DAY0, "ChargePeriodEnd": DAY0 + 60, "BilledCost": 1,
             "ChargeCategory": "Gift", "BillingCurrency": "EUR"}]))
        assert status == 400 and doc["errors"] == [
            "records[0].ServiceName: must not contain a NUL character",
            "records[0].ChargePeriodStart: must be unix seconds or ISO-8601, got 'yesterday'",
            "records[0].x_ChargeId: must not be empty",
            "records[1]: must be a mapping, got a string",
            "records[2].ServiceName: is required",
            "records[2].BillingCurrency: only USD is supported, got 'EUR'",
            "records[2].ChargeCategory: must be one of Usage, Purchase, Tax, Credit, "
            "Adjustment, got 'Gift'"], doc
