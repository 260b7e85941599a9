"""The control plane's /metrics SLO gauges, parsed with prometheus_client's parser, equal
/v1/error-budgets."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.control.domain import slo as slo_mod
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, DAY0, MIN, add_slo, call, feed, make_slo, slo_plane
from tests.test_control_support import store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql


async def _scrape(s, url: str) -> dict[str, dict[tuple, float]]:
    async with s.get(f"{url}/metrics") as resp:          # no auth, like the gateway's
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("slo_"):
            for sample in fam.samples:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                    sample.value
    return out


async def test_slo_gauges_equal_the_error_budgets(tmp_path):
    t0 = DAY0 + 3 * DAY
    clock = FakeClock(wall=t0)
    async with slo_plane(tmp_path, clock) as (url, s, app):
        store = store_of(app)
        add_slo(store, make_slo())                                          # 99.9 %, 30d
        add_slo(store, make_slo(name="api-month", objective=99.5, window="month",
                                service="other"))
        add_slo(store, make_slo(name="idle", service="nobody"))             # no traffic
        feed(store, t0 - 3 * DAY, 3 * 24 * 60 - 60, 100, 0.05)
        feed(store, t0 - 60 * MIN, 60, 100, 1)                             # the last hour: 1 %
        feed(store, t0 - 3 * DAY, 3 * 24 * 60, 50, 0.5, service="other")
        metrics = await _scrape(s, url)
        status, doc = await call(s, url, "GET", "/v1/error-budgets", role="monitor")
        assert status == 200 and len(doc["budgets"]) == 3
        for b in doc["budgets"]:
            key = (("service", b["service"]), ("slo", b["slo_id"]))
            assert metrics["slo_objective_ratio"][key] == b["objective"] / 100
            assert metrics["slo_error_budget_remaining_ratio"][key] == b["remaining_fraction"]
            for window, rate in b["burn_rates"].items():
                assert metrics["slo_burn_rate"][(*key, ("window", window))] == rate
            windows = {**b["events_by_window"], b["window"]["name"]: b["events"]}
            for window, ev in windows.items():
                label = tuple(sorted((*key, ("window", window))))
                if ev["total"]:
                    assert math.isclose(metrics["slo_sli_ratio"][label],
                                        1 - ev["bad"] / ev["total"], rel_tol=1e-12)
                else:                                  # no events, no ratio
                    assert label not in metrics["slo_sli_ratio"]
        main = (("service", "svc"), ("slo", "api-availability"))
        assert metrics["slo_burn_rate"][(*main, ("window", "1h"))] == 10.0     # 1 % / 0.1 %
        assert math.isclose(metrics["slo_sli_ratio"][(*main, ("window", "5m"))], 0.99)
        assert (*main, ("window", "30d")) in metrics["slo_sli_ratio"]
        other = (("service", "other"), ("slo", "api-month"))
        assert (("service", "other"), ("slo", "api-month"), ("window", "month")) in \
            metrics["slo_sli_ratio"]
        assert metrics["slo_objective_ratio"][other] == 0.995
        assert {dict(k)["window"] for k in metrics["slo_burn_rate"]} == set(slo_mod.BURN_WINDOWS)
        # a new SLO shows on the next scrape; a deleted one is gone
        status, _ = await call(s, url, "DELETE", "/v1/slos/idle")
        assert status == 200
        metrics = await _scrape(s, url)
        assert (("service", "nobody"), ("slo", "idle")) not in metrics["slo_objective_ratio"]
