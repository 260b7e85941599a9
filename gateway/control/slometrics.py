"""The SLO gauges of the control plane's `/metrics`, from the same reports as `/v1/error-budgets`.

Per SLO (labels `slo`, `service`):

  slo_objective_ratio                      the objective as a ratio (99.9 % -> 0.999)
  slo_sli_ratio{window}                    good / total events over each burn-rate window
                                           (5m ... 3d) and over the SLO's own window (its name:
                                           30d, month, ...); absent while a window has no events
  slo_error_budget_remaining_ratio         1 - consumed / allowed over the SLO window (< 0 once
                                           overspent)
  slo_burn_rate{window}                    error ratio / (1 - objective) per burn-rate window

The numbers are `evaluator.budget_report`'s, computed at scrape time on the database thread (the
scrape is what asks; nothing is cached that could disagree with the API).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.control import rollup
from gateway.control.evaluator import budget_report, load_slos
from gateway.control.store import Store


def reports(store: Store, now: float) -> list[dict[str, Any]]:
    """Every SLO's budget report (database thread)."""
    rollup.compact(store)
    return [budget_report(store, s, now) for s in load_slos(store)]


def families(docs: list[dict[str, Any]]) -> list[Metric]:
    objective = GaugeMetricFamily("slo_objective_ratio", "The SLO's objective as a ratio",
                                  labels=["slo", "service"])
    sli = GaugeMetricFamily("slo_sli_ratio", "Good events over all events in the window",
                            labels=["slo", "service", "window"])
    remaining = GaugeMetricFamily("slo_error_budget_remaining_ratio",
                                  "The share of the error budget left over the SLO window",
                                  labels=["slo", "service"])
    burn = GaugeMetricFamily("slo_burn_rate", "Error ratio over the error budget fraction",
                             labels=["slo", "service", "window"])
    for r in docs:
        key = [r["slo_id"], r["service"]]
        objective.add_metric(key, r["objective"] / 100.0)
        windows = dict(r["events_by_window"])
        windows.setdefault(r["window"]["name"], r["events"])
        for name, ev in windows.items():
            if ev["total"]:
                sli.add_metric([*key, name], 1.0 - ev["bad"] / ev["total"])
        if r["remaining_fraction"] is not None:
            remaining.add_metric(key, r["remaining_fraction"])
        for name, rate in r["burn_rates"].items():
            burn.add_metric([*key, name], rate)
    return [objective, sli, remaining, burn]


class SloCollector:
    """A prometheus_client collector yielding the families set by the last `update`."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def update(self, docs: list[dict[str, Any]]) -> None:
        self._families = families(docs)

    def collect(self) -> Iterator[Metric]:
        yield from self._families

    def describe(self) -> list[Metric]:   # no describe-time collect (auto_describe registry)
        return []
