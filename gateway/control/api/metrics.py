"""The control plane's own `/metrics` (ingest counters, pending histograms, and the SLO gauges
below, from the same reports as `/v1/error-budgets`) and `/healthz`.

Per SLO (labels `slo`, `service`):

  slo_objective_ratio                      the objective as a ratio (99.9 % -> 0.999)
  slo_sli_ratio{window}                    good / total events over each burn-rate window
                                           (5m ... 3d) and over the SLO's own window (its name:
                                           30d, month, ...); absent while a window has no events
  slo_error_budget_remaining_ratio         1 - consumed / allowed over the SLO window (< 0 once
                                           overspent)
  slo_burn_rate{window}                    error ratio / (1 - objective) per burn-rate window

The numbers are `sloreport.budget_report`'s, computed at scrape time on the database thread (the
scrape is what asks; nothing is cached that could disagree with the API).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.control.domain import rollup
from gateway.control.domain.sloreport import budget_report, load_slos
from gateway.control.store import Store
from gateway.control.web import CLOCK, DB, json_response

INGEST_RESULTS = ("accepted", "duplicate", "invalid", "too_large", "unsupported", "error")


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


class Metrics:
    """The control plane's own Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.batches = Counter("control_ingest_batches_total", "Ingest requests by result",
                               ["result"], registry=self.registry)
        for result in INGEST_RESULTS:
            self.batches.labels(result)
        self.duration = Histogram("control_ingest_duration_seconds",
                                  "Time to read, validate and store one ingest batch",
                                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                  registry=self.registry)
        self.series = Counter("control_ingest_series_total", "Series rows accepted",
                              registry=self.registry)
        self.pending = Gauge("control_pending_histograms",
                             "Ingested histograms not yet merged into rollups",
                             registry=self.registry)
        # SLO gauges (SloCollector below), refreshed by each scrape
        self.slos = SloCollector()
        self.registry.register(self.slos)


METRICS = web.AppKey("metrics", Metrics)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    # read on the database thread: a scrape never waits on the store's lock in the event loop
    m.pending.set(await request.app[DB].call(request.app[DB].store.rollups.pending_count))
    m.slos.update(await request.app[DB].call(reports, request.app[DB].store,
                                             request.app[CLOCK].time()))
    body = generate_latest(m.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
