"""The control plane's tenants (gateway/control/tenants.py): the API and its roles, audit,
overrides with a future effective_date, the tenant table in ingest answers, usage per window from
shipped batches, and the 80 % alert once per window through the notification path."""

from __future__ import annotations

import asyncio

import pytest

from gateway.control.jobs.notify import Target
from gateway.control.web import NOTIFIER
from tests.fakes import FakeClock
from tests.test_control_notify import Receiver
from tests.test_control_slo_support import call, slo_plane
from tests.test_control_support import DAY0, batch, ingest, running, series

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

T0 = float(DAY0) + 3600


def usage_batch(bid: str, start: float, rows: list[tuple[str, int, int]],
                windows: list[tuple[str, str, int]], plan: str = "free") -> dict:
    return batch(bid, start, [series()], tenants=[
        {"tenant": t, "plan": plan, "admitted": a, "rejected": r,
         "windows": [{"window": k, "id": i, "limit": lim} for k, i, lim in windows]}
        for t, a, r in rows])


async def test_api_roles_audit_and_the_tenant_table(tmp_path):
    clock = FakeClock(wall=T0)
    async with slo_plane(tmp_path, clock) as (url, s, _app):
        status, doc = await call(s, url, "GET", "/v1/tenants", role="monitor")
        assert status == 200 and doc == {"tenants": []}
        assert (await call(s, url, "GET", "/v1/tenants", role="reader"))[0] == 403
        assert (await call(s, url, "PUT", "/v1/tenants/acme", role="monitor",
                           json={"plan": "pro"}))[0] == 403
        assert (await call(s, url, "POST", "/v1/tenants/acme/quotas", role="monitor",
                           json={"daily_quota": 5}))[0] == 403
        status, doc = await call(s, url, "PUT", "/v1/tenants/acme",
                                 json={"plan": "professional", "reason": "upgrade"})
        assert status == 200 and doc["plan"] == "professional"
        assert doc["plan_source"] == "control"
        status, doc = await call(s, url, "PUT", "/v1/tenants/acme", json={"plan": "a b"})
        assert status == 400 and doc["detail"].startswith("plan:")
        status, doc = await call(s, url, "POST", "/v1/tenants/acme/quotas",
                                 json={"daily_quota": -1})
        assert status == 400 and doc["detail"].startswith("daily_quota:")
        status, doc = await call(s, url, "POST", "/v1/tenants/acme/quotas",
                                 json={"qps": 50, "colour": 1})
        assert status == 400 and doc["detail"] == "colour: unknown key"
        # an override from tomorrow: recorded, pending, not in the table yet
        status, doc = await call(s, url, "POST", "/v1/tenants/acme/quotas", json={
            "qps": 40, "burst": 80, "daily_quota": 1000, "monthly_quota": 20000,
            "effective_date": "2023-11-16T00:00:00Z", "expires_at": T0 + 7 * 86400,
            "reason": "incident 42"})
        assert status == 201 and doc["pending"] is True
        assert doc["effective_date"] == DAY0 + 86400 and doc["effective_date"] > T0
        status, resp = await ingest(s, url, batch("b1", T0 - 10, [series()]))
        assert status == 200
        assert resp["directives"]["tenants"] == {
            "acme": {"plan": "professional", "override": None}}
        clock.advance(86400)                    # effective now
        status, resp = await ingest(s, url, batch("b2", clock.time() - 10, [series()]))
        assert resp["directives"]["tenants"]["acme"]["override"] == {
            "qps": 40.0, "burst": 80, "daily_quota": 1000, "monthly_quota": 20000,
            "expires_at": T0 + 7 * 86400}
        status, doc = await call(s, url, "GET", "/v1/tenants/acme", role="monitor")
        assert status == 200 and doc["override"]["daily_quota"] == 1000
        assert [o["active"] for o in doc["overrides"]] == [True]
        assert (await call(s, url, "GET", "/v1/tenants/nobody"))[0] == 404
        status, audit = await call(s, url, "GET", "/v1/audit")
        actions = {(e["action"], e["target"]) for e in audit["entries"]} \
            if isinstance(audit, dict) else {(e["action"], e["target"]) for e in audit}
        assert ("update", "tenant/acme") in actions
        assert any(t.startswith("tenant/acme/quotas/") for _, t in actions)
        clock.advance(7 * 86400)                # expired: back to the plan alone
        status, resp = await ingest(s, url, batch("b3", clock.time() - 10, [series()]))
        assert resp["directives"]["tenants"] == {
            "acme": {"plan": "professional", "override": None}}


async def test_usage_per_window_and_the_80_percent_alert_once_per_window(tmp_path):
    rx = Receiver()
    clock = FakeClock(wall=T0)
    async with running(rx.app) as hook:
        targets = (Target("am", f"{hook}/am"),)
        async with slo_plane(tmp_path, clock, notifications=targets) as (url, s, app):
            day = [("day", "2023-11-15", 100), ("month", "2023-11", 1000)]
            for i, (a, r) in enumerate([(50, 0), (29, 0)]):
                st, _ = await ingest(s, url, usage_batch(f"u{i}", T0 - 10 + i, [("t1", a, r)],
                                                         day))
                assert st == 200
            # 79 of 100: no alert yet; another gateway adds 2 -> 81 %: one alert
            await ingest(s, url, usage_batch("g2", T0 - 5, [("t1", 2, 0)], day))
            await ingest(s, url, usage_batch("g2b", T0 - 4, [("t1", 15, 3)], day))
            await ingest(s, url, usage_batch("g2b", T0 - 4, [("t1", 15, 3)], day))  # replay
            status, doc = await call(s, url, "GET", "/v1/tenants/t1", role="monitor")
            assert status == 200 and doc["plan"] == "free" and doc["plan_source"] == "gateway"
            assert [(u["window"], u["current_usage"], u["limit"], u["rejected"])
                    for u in doc["usage"]] == [("day", 96, 100, 3), ("month", 96, 1000, 3)]
            assert doc["nearest_quota_percent"] == 96.0
            for _ in range(100):
                if rx.got.get("am"):
                    break
                await asyncio.sleep(0.05)
            await asyncio.wait_for(app[NOTIFIER].idle(), 10)
            (note,) = rx.got["am"]
            (alert,) = note["alerts"]
            assert alert["labels"]["alertname"] == "TenantQuota"
            assert alert["labels"]["tenant"] == "t1" and alert["labels"]["window"] == "day"
            status, alerts = await call(s, url, "GET", "/v1/alerts")
            quota = [a for a in (alerts["alerts"] if isinstance(alerts, dict) else alerts)
                     if a["source"] == "quota"]
            assert len(quota) == 1 and quota[0]["details"]["current_usage"] == 81
            # the next day is a new window: a new alert when it passes 80 %
            nxt = [("day", "2023-11-16", 100), ("month", "2023-11", 1000)]
            clock.advance(86400)
            await ingest(s, url, usage_batch("n1", T0 + 86400 - 10, [("t1", 85, 0)], nxt))
            for _ in range(100):
                if len(rx.got["am"]) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(rx.got["am"]) == 2
            status, doc = await call(s, url, "GET", "/v1/tenants", role="monitor")
            (t1,) = doc["tenants"]
            assert [(u["window"], u["window_id"], u["current_usage"]) for u in t1["usage"]] == \
                [("day", "2023-11-16", 85), ("month", "2023-11", 181)]


async def test_usage_rows_are_pruned_after_retention(tmp_path):
    from gateway.control.store.tenants import TenantRepo
    from tests.test_control_support import store_of
    clock = FakeClock(wall=T0)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        await ingest(s, url, usage_batch("p1", T0 - 10, [("old", 5, 0)],
                                         [("day", "2023-11-15", 100)]))
        repo = TenantRepo(store_of(app))
        assert repo.prune(T0 - 60) == 0
        assert repo.prune(T0 + 60) == 1
        assert (await call(s, url, "GET", "/v1/tenants/old"))[0] == 404
