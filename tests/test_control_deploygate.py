"""The deploy gate: the budget policy's tiers at their boundaries, custom tiers, incidents block."""

from __future__ import annotations

import pytest

from gateway.control.domain.deploygate import decide
from gateway.control.domain.slo import GateTiers
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, DAY0, MIN, add_slo, call, feed, make_slo, slo_plane
from tests.test_control_support import store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql


@pytest.mark.parametrize("remaining,decision", [
    (1.0, "allow"), (0.5001, "allow"), (0.5, "low_traffic_only"), (0.2, "low_traffic_only"),
    (0.1999, "critical_only"), (0.05, "critical_only"), (0.0499, "blocked"), (0.0, "blocked"),
    (-3.0, "blocked"), (None, "blocked")])
def test_default_tiers_at_their_boundaries(remaining, decision):
    assert decide(remaining, GateTiers()) == decision


def test_custom_tiers():
    tiers = GateTiers(allow_above=0.8, low_traffic_above=0.5, critical_above=0.3)
    assert [decide(r, tiers) for r in (0.81, 0.8, 0.5, 0.49, 0.3, 0.29)] == [
        "allow", "low_traffic_only", "low_traffic_only", "critical_only", "critical_only",
        "blocked"]


# 100 000 events over the 1-day window against 99.9 %: 100 bad allowed; bad -> remaining
CASES = {"s49": (49, "allow", 0.51), "s50": (50, "low_traffic_only", 0.5),
         "s80": (80, "low_traffic_only", 0.2), "s81": (81, "critical_only", 0.19),
         "s95": (95, "critical_only", 0.05), "s96": (96, "blocked", 0.04)}


async def test_gate_endpoint_tiers_incidents_and_flags(tmp_path):
    now = DAY0 + DAY
    clock = FakeClock(wall=now)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        store = store_of(app)
        for service, (bad, _d, _r) in CASES.items():
            add_slo(store, make_slo(name=f"{service}-avail", service=service, window="1d"))
            feed(store, now - 1000 * MIN, 999, 100, 0, service=service)
            feed(store, now - MIN, 1, 100, bad, service=service)
        for service, (bad, decision, remaining) in CASES.items():
            status, doc = await call(s, url, "GET", f"/v1/deploy-gate/{service}", role="monitor")
            assert status == 200, doc
            assert doc["decision"] == decision, (service, doc)
            assert doc["remaining_fraction"] == pytest.approx(remaining)
            assert doc["allowed"] is (decision == "allow")
            (slo,) = doc["slos"]
            assert (slo["consumed"], slo["allowed_bad"]) == (bad, pytest.approx(100.0))
            assert doc["reason"].startswith(f"SLO {service}-avail: error budget")
        _, doc = await call(s, url, "GET", "/v1/deploy-gate/s81", critical="true")
        assert doc["decision"] == "critical_only" and doc["allowed"] is True
        _, doc = await call(s, url, "GET", "/v1/deploy-gate/s50", low_traffic="true")
        assert doc["allowed"] is True
        _, doc = await call(s, url, "GET", "/v1/deploy-gate/s96", critical="true")
        assert doc["allowed"] is False
        # the strictest SLO of a service decides
        add_slo(store, make_slo(name="s49-strict", service="s49", window="1d", objective=99.92))
        _, doc = await call(s, url, "GET", "/v1/deploy-gate/s49")
        assert doc["decision"] == "low_traffic_only" and "s49-strict" in doc["reason"]
        # an open SEV-1/SEV-2 incident blocks; SEV-3 does not; resolved ones do not
        await call(s, url, "POST", "/v1/incidents", json={
            "title": "t", "severity": "SEV-3", "affected_service": "s49"})
        assert (await call(s, url, "GET", "/v1/deploy-gate/s49"))[1]["decision"] == \
            "low_traffic_only"
        _, inc = await call(s, url, "POST", "/v1/incidents", json={
            "title": "checkout down", "severity": "SEV-2", "affected_service": "s49"})
        _, doc = await call(s, url, "GET", "/v1/deploy-gate/s49", critical="true")
        assert (doc["decision"], doc["allowed"], doc["blocking_incidents"]) == (
            "blocked", False, [inc["id"]])
        assert doc["reason"].startswith(f"open incident(s) {inc['id']} (SEV-2, investigating)")
        await call(s, url, "POST", f"/v1/incidents/{inc['id']}/resolve",
                   json={"resolution_notes": "x", "root_cause": "y"})
        assert (await call(s, url, "GET", "/v1/deploy-gate/s49"))[1]["decision"] == \
            "low_traffic_only"
        # an incident on a service without SLOs still blocks; nothing at all is a 404
        _, inc = await call(s, url, "POST", "/v1/incidents", json={
            "title": "t", "severity": "SEV-1", "affected_service": "legacy"})
        assert (await call(s, url, "GET", "/v1/deploy-gate/legacy"))[1]["decision"] == "blocked"
        assert (await call(s, url, "GET", "/v1/deploy-gate/unknown"))[0] == 404
        assert (await call(s, url, "GET", "/v1/deploy-gate/s49", critical="maybe"))[0] == 400
        assert (await call(s, url, "GET", "/v1/deploy-gate/s49", role="reader"))[0] == 403


async def test_custom_tiers_from_the_slo(tmp_path):
    now = DAY0 + DAY
    clock = FakeClock(wall=now)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        store = store_of(app)
        add_slo(store, make_slo(window="1d", deploy_gate={"allow_above": 0.9,
                                                          "low_traffic_above": 0.6,
                                                          "critical_above": 0.3}))
        feed(store, now - 1000 * MIN, 1000, 100, 0)
        feed(store, now - MIN, 1, 0, 20)                        # remaining 0.8
        _, doc = await call(s, url, "GET", "/v1/deploy-gate/svc")
        assert doc["decision"] == "low_traffic_only"
        assert doc["slos"][0]["tiers"] == {"allow_above": 0.9, "low_traffic_above": 0.6,
                                           "critical_above": 0.3}
