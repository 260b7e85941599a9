"""Prometheus exposition of the golden signals: every metric name defined once, here.

Nothing on the hot path touches prometheus_client. `/metrics` renders a custom Collector that
reads `Signals.totals()` at scrape time: the request is recorded once (into the signals), and the
histogram buckets below are counted from the HDR histograms when scraped.

With several worker processes each worker renders its own exposition and the supervisor merges
them with `merge_expositions()`, so one scrape covers every worker exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.signals import BREAKER_STATES, LATENCY_BUCKETS_S, QUANTILES, HistogramTotal, Signals

CONTENT_TYPE: str = CONTENT_TYPE_LATEST

BUCKETS_S: tuple[float, ...] = LATENCY_BUCKETS_S
"""The histograms' `le` bounds (seconds), kept by Signals since they are cumulative; see
gateway.signals.LATENCY_BUCKETS_S for the choice."""


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str           # as exposed (counters end in _total)
    type: str           # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    merge: str = "sum"  # how merge_expositions() combines workers' values (gauges only)


# The public metric names (listed in README "Metrics and golden signals") ...
REQUESTS = MetricDef(
    "gateway_requests_total", "counter",
    "Requests answered, proxied or gateway-generated (method outside the standard set: OTHER).",
    ("route", "upstream", "method", "code"))
REQUEST_DURATION = MetricDef(
    "gateway_request_duration_seconds", "histogram",
    "Total request latency as seen by the gateway, from request received to response sent.",
    ("route", "upstream"))
UPSTREAM_DURATION = MetricDef(
    "gateway_upstream_duration_seconds", "histogram",
    "Upstream latency: request sent upstream to response received.", ("upstream",))
INFLIGHT = MetricDef("gateway_inflight_requests", "gauge", "Requests in flight now.")
RATELIMIT_DECISIONS = MetricDef(
    "gateway_ratelimit_decisions_total", "counter",
    "Rate-limit decisions per policy (allowed, limited, shadow_limited, store_error, delayed).",
    ("policy", "decision"))
BREAKER_STATE = MetricDef(
    "gateway_circuit_breaker_state", "gauge",
    "Circuit breaker state per upstream: 0 closed, 1 half_open, 2 open.", ("upstream",),
    merge="max")
BREAKER_TRANSITIONS = MetricDef(
    "gateway_circuit_breaker_transitions_total", "counter",
    "Circuit breaker state transitions.", ("upstream", "from", "to"))
LOOP_LAG = MetricDef(
    "gateway_event_loop_lag_seconds", "gauge",
    "Event-loop lag at the last sample (how late a timer woke up).", merge="max")
SHIPPER_BATCHES = MetricDef(
    "gateway_shipper_batches_total", "counter",
    "Aggregate batches by shipping result (success, failure, spooled, dropped).", ("result",))
SHIPPER_SPOOLED = MetricDef(
    "gateway_shipper_spooled_batches", "gauge",
    "Batches waiting in the spool directory.",
    # max, not sum: workers sharing one spool_dir each count the same files
    merge="max")
CONFIG_RELOADS = MetricDef(
    "gateway_config_reloads_total", "counter", "Config reloads by result (success, failure).",
    ("result",))
# ... and a few more, all gateway_-prefixed.
REQUEST_BYTES = MetricDef(
    "gateway_request_bytes_total", "counter", "Request body bytes received from clients.",
    ("route", "upstream"))
RESPONSE_BYTES = MetricDef(
    "gateway_response_bytes_total", "counter", "Response body bytes sent to clients.",
    ("route", "upstream"))
POOL_IN_USE = MetricDef(
    "gateway_upstream_pool_connections_in_use", "gauge",
    "Upstream connections in use, over the upstream's endpoints.", ("upstream",))
POOL_MAX = MetricDef(
    "gateway_upstream_pool_connections_max", "gauge",
    "Upstream connection limit, over the upstream's endpoints.", ("upstream",))
CPU_PERCENT = MetricDef(
    "gateway_process_cpu_percent", "gauge",
    "CPU used by the process since the previous scrape, percent of one core (a worker is "
    "single-threaded: 100 is saturated). Merged over workers: the busiest worker.", merge="max")
CPU_SECONDS = MetricDef(
    "gateway_process_cpu_seconds_total", "counter", "User and system CPU time of the process.")
RSS = MetricDef(
    "gateway_process_resident_memory_bytes", "gauge", "Resident set size of the process.")
WORKERS = MetricDef(
    "gateway_worker_processes", "gauge",
    "Worker processes covered by this exposition (1 per worker; summed when merged).")
RATELIMIT_EVICTIONS = MetricDef(
    "gateway_ratelimit_evictions_total", "counter",
    "Local rate-limit buckets evicted before they were full again: more clients active at once "
    "than the bucket table holds (GATEWAY_RATELIMIT_SLOTS).")
# Exact percentiles cannot be summed across workers: with `workers > 1` each worker's come with
# its `worker` label (see render()), so merging keeps them apart.
DURATION_QUANTILES = MetricDef(
    "gateway_request_duration_quantile_seconds", "gauge",
    "Exact HDR percentiles of request latency (as gateway_request_duration_seconds) over the "
    "last completed interval (the shipper's, else 10 s).",
    ("route", "upstream", "quantile"), merge="max")

RATELIMIT_UTILIZATION = MetricDef(
    "gateway_ratelimit_utilization_ratio", "gauge",
    "Per policy, the largest share of its burst capacity one client key had used in the last "
    "15 s or more (1 = some key was limited).", ("policy",), merge="max")

UPSTREAM_RETRIES = MetricDef(
    "gateway_upstream_retries_total", "counter",
    "Upstream retries by result: retried (an extra attempt was sent), budget_exhausted (one was "
    "wanted but the retry budget was spent), succeeded / failed (how a request that was retried "
    "ended).", ("upstream", "result"))
CONCURRENCY_LIMIT = MetricDef(
    "gateway_upstream_concurrency_limit", "gauge",
    "The adaptive concurrency limit on requests in flight to the upstream (per process; summed "
    "over workers).", ("upstream",))
SHED_REQUESTS = MetricDef(
    "gateway_shed_requests_total", "counter",
    "Requests answered 503 to protect an upstream, by reason: concurrency (over the adaptive "
    "limit or the priority's share of it), shedding (a burn-rate alert is open for the service).",
    ("route", "reason"))

METRICS: tuple[MetricDef, ...] = (
    REQUESTS, REQUEST_DURATION, UPSTREAM_DURATION, INFLIGHT, RATELIMIT_DECISIONS, BREAKER_STATE,
    BREAKER_TRANSITIONS, LOOP_LAG, SHIPPER_BATCHES, SHIPPER_SPOOLED, CONFIG_RELOADS,
    REQUEST_BYTES, RESPONSE_BYTES, POOL_IN_USE, POOL_MAX, CPU_PERCENT, CPU_SECONDS,
    RSS, WORKERS, RATELIMIT_EVICTIONS, DURATION_QUANTILES, RATELIMIT_UTILIZATION)
METRICS += (UPSTREAM_RETRIES, CONCURRENCY_LIMIT, SHED_REQUESTS)
_BY_NAME = {m.name: m for m in METRICS}


def sample_names() -> frozenset[str]:
    """Every series name these metrics expose (histograms with _bucket, _sum and _count)."""
    names: set[str] = set()
    for m in METRICS:
        if m.type == "histogram":
            names.update({m.name + "_bucket", m.name + "_sum", m.name + "_count"})
        else:
            names.add(m.name)
    return frozenset(names)


def _go_float(v: float) -> str:
    return str(floatToGoString(v))   # type: ignore[no-untyped-call]


def _counter(m: MetricDef) -> CounterMetricFamily:
    return CounterMetricFamily(m.name, m.help, labels=m.labels)


def _gauge(m: MetricDef) -> GaugeMetricFamily:
    return GaugeMetricFamily(m.name, m.help, labels=m.labels)


def _histogram(family: HistogramMetricFamily, le: tuple[str, ...], labels: list[str],
               h: HistogramTotal) -> None:
    buckets = list(zip(le, (*h.le_counts, h.count), strict=True))
    family.add_metric(labels, buckets, h.sum_s)


class SignalsCollector(Collector):
    """A prometheus-client Collector over a Signals, read at scrape time."""

    def __init__(self, signals: Signals, worker: int | None = None,
                 utilization: Callable[[], dict[str, float]] | None = None) -> None:
        self._signals = signals
        self._worker = worker
        self._utilization = utilization     # Limiter.utilization

    def collect(self) -> Iterator[Metric]:
        t = self._signals.totals()
        le = (*(_go_float(b) for b in t.buckets_s), "+Inf")

        requests = _counter(REQUESTS)
        for (route, upstream, method, code), n in sorted(t.requests.items()):
            requests.add_metric([route, upstream, method, str(code)], n)
        yield requests

        durations = HistogramMetricFamily(REQUEST_DURATION.name, REQUEST_DURATION.help,
                                          labels=REQUEST_DURATION.labels)
        for (route, upstream), h in sorted(t.durations.items()):
            _histogram(durations, le, [route, upstream], h)
        yield durations

        upstream_durations = HistogramMetricFamily(UPSTREAM_DURATION.name, UPSTREAM_DURATION.help,
                                                   labels=UPSTREAM_DURATION.labels)
        for name, h in sorted(t.upstream_durations.items()):
            _histogram(upstream_durations, le, [name], h)
        yield upstream_durations

        for m, values in ((REQUEST_BYTES, t.bytes_in), (RESPONSE_BYTES, t.bytes_out)):
            c = _counter(m)
            for (route, upstream), n in sorted(values.items()):
                c.add_metric([route, upstream], n)
            yield c

        yield GaugeMetricFamily(INFLIGHT.name, INFLIGHT.help, value=t.inflight)

        limits = _counter(RATELIMIT_DECISIONS)
        for (policy, decision), n in sorted(t.limits.items()):
            limits.add_metric([policy, decision], n)
        yield limits

        state = _gauge(BREAKER_STATE)
        for upstream, s in sorted(t.breaker_states.items()):
            state.add_metric([upstream], BREAKER_STATES[s])
        yield state

        transitions = _counter(BREAKER_TRANSITIONS)
        for (upstream, old, new), n in sorted(t.breaker_transitions.items()):
            transitions.add_metric([upstream, old, new], n)
        yield transitions

        yield GaugeMetricFamily(LOOP_LAG.name, LOOP_LAG.help, value=t.loop_lag_s)

        for m, values2 in ((SHIPPER_BATCHES, t.shipper), (CONFIG_RELOADS, t.reloads)):
            c = _counter(m)
            for result, n in sorted(values2.items()):
                c.add_metric([result], n)
            yield c
        yield GaugeMetricFamily(SHIPPER_SPOOLED.name, SHIPPER_SPOOLED.help, value=t.spooled)

        in_use, mx = _gauge(POOL_IN_USE), _gauge(POOL_MAX)
        for upstream, (u, x) in sorted(t.pools.items()):
            in_use.add_metric([upstream], u)
            mx.add_metric([upstream], x)
        yield in_use
        yield mx

        yield GaugeMetricFamily(CPU_PERCENT.name, CPU_PERCENT.help, value=t.cpu_percent)
        yield CounterMetricFamily(CPU_SECONDS.name, CPU_SECONDS.help, value=t.cpu_seconds)
        yield GaugeMetricFamily(RSS.name, RSS.help, value=t.rss_bytes)
        yield GaugeMetricFamily(WORKERS.name, WORKERS.help, value=1)
        yield CounterMetricFamily(RATELIMIT_EVICTIONS.name, RATELIMIT_EVICTIONS.help,
                                  value=t.ratelimit_evictions)

        worker = () if self._worker is None else (str(self._worker),)
        quantiles = GaugeMetricFamily(
            DURATION_QUANTILES.name, DURATION_QUANTILES.help,
            labels=DURATION_QUANTILES.labels + (("worker",) if worker else ()))
        for (route, upstream), at in sorted(t.quantiles.items()):
            for q, v in zip(QUANTILES, at, strict=True):
                quantiles.add_metric([route, upstream, _go_float(q), *worker], v)
        yield quantiles

        retries = _counter(UPSTREAM_RETRIES)
        for (upstream, result), n in sorted(self._signals.retries.items()):
            retries.add_metric([upstream, result], n)
        yield retries
        limits_now = _gauge(CONCURRENCY_LIMIT)
        for upstream, fn in sorted(self._signals.concurrency_sources.items()):
            limits_now.add_metric([upstream], fn())
        yield limits_now
        shed = _counter(SHED_REQUESTS)
        for (route, reason), n in sorted(self._signals.shed.items()):
            shed.add_metric([route, reason], n)
        yield shed

        if self._utilization is not None:
            util = _gauge(RATELIMIT_UTILIZATION)
            for policy, ratio in sorted(self._utilization().items()):
                util.add_metric([policy], ratio)
            yield util


def render(signals: Signals, worker: int | None = None,
           utilization: Callable[[], dict[str, float]] | None = None) -> bytes:
    """This process's Prometheus text exposition (serve with CONTENT_TYPE). Loop thread only.
    `worker`: this worker's index when it is one of several (labels its quantile gauges);
    `utilization`: the limiter's per-policy utilization, read at scrape time."""
    return generate_latest(SignalsCollector(signals, worker, utilization))


# ---------------------------------------------------------------------------------------------


def _combine(rule: str, a: float, b: float) -> float:
    if rule == "max":
        return max(a, b)
    if rule == "min":
        return min(a, b)
    return a + b


def merge_expositions(texts: list[bytes]) -> bytes:
    """Merge several workers' text expositions into one, counting each worker once.

    Counters and histograms (buckets, _sum, _count) are summed. Gauges follow their MetricDef's
    merge rule: sum (in-flight, pool use, RSS, worker count) or max (event-loop lag, breaker
    state = the most open, CPU percent = the busiest worker, spooled batches); gauges not
    defined here are summed.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text.decode("utf-8")):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                     fam.unit)
                values[fam.name] = {}
            elif merged.type != fam.type:
                raise ValueError(f"metric {fam.name!r} is a {merged.type} in one exposition "
                                 f"and a {fam.type} in another")
            exposed = fam.name + "_total" if fam.type == "counter" else fam.name
            d = _BY_NAME.get(exposed)
            rule = d.merge if (fam.type == "gauge" and d is not None) else "sum"
            vals = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = vals.get(key)
                vals[key] = s.value if old is None else _combine(rule, old, s.value)

    out: list[Metric] = []
    for name, merged in families.items():
        for (sample_name, labels), v in values[name].items():
            merged.add_sample(sample_name, dict(labels), v)
        out.append(merged)

    class _Merged(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(out)

    return generate_latest(_Merged())
