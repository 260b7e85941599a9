"""Service health from the golden signals, with fixed warning and critical thresholds.

Rules (strictly greater than the threshold fires; `critical` beats `warning`):

| rule            | value                                                   | warning | critical |
|-----------------|---------------------------------------------------------|---------|----------|
| latency_p95     | p95 of the merged latency histogram, ms                 | > 500   | > 2000   |
| error_rate      | 5xx / admitted requests (4xx and 429 are not errors)     | > 1 %   | > 5 %    |
| cpu             | max cpu_percent reported by the gateways serving it     | > 70    | > 90     |
| traffic_drop    | 1 - current / baseline requests (see below)             | > 50 %  | > 80 %   |

Admitted requests: latency and error rates are of the requests the gateway forwarded or tried to
forward. Those it answered itself (a limit's 429, an open breaker's 503, a budget's 429...) are
counted apart (`rate_limited`, `local_answers`): a flood of 30-microsecond 429s must not turn a
service whose upstream fails 17 % of its requests into a healthy 0.5 % with a p95 of 0.09 ms.
`request_count` and `requests_per_s` are every answer (the traffic); `admitted_count` the rest.

Windows: everything uses whole, complete minutes only: the 5 most recent 1-minute buckets that
have ended (`[minute - 300, minute)` where `minute` is the start of the current, unfinished one).
A partly elapsed minute divided by a full window made requests/s a sawtooth between 0.8x and 1x
of the true rate; complete buckets make `request_count / window.seconds` exact, at the price of
up to a minute's delay. The answer says which window it used (`window.since/until/seconds`).
Traffic compares those 5 minutes against the same 5 minutes one hour earlier, and only when that
baseline had at least 100 requests (a quiet service does not flap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.control.domain import histogram

WINDOW_S = 300
BASELINE_OFFSET_S = 3_600
MIN_BASELINE_REQUESTS = 100

THRESHOLDS: dict[str, tuple[float, float]] = {
    "latency_p95": (500.0, 2_000.0),   # ms
    "error_rate": (0.01, 0.05),        # fraction of requests answered 5xx
    "cpu": (70.0, 90.0),               # percent
    "traffic_drop": (0.5, 0.8),        # fraction lost vs the baseline
}
_UNITS = {"latency_p95": "ms", "error_rate": "", "cpu": "%", "traffic_drop": ""}


@dataclass(slots=True)
class ServiceWindow:
    """A service's golden signals over a window, summed from its 1m service-total buckets."""

    service: str
    request_count: int = 0
    error_count_4xx: int = 0
    error_count_5xx: int = 0
    rate_limited: int = 0
    local_count: int = 0
    local_4xx: int = 0
    local_5xx: int = 0
    cpu_percent: float = 0.0
    loop_lag_ms: float = 0.0
    inflight_max: int = 0
    rss_bytes: int = 0
    hist: Any = field(default_factory=histogram.new)

    def add(self, row: dict[str, Any]) -> None:
        self.request_count += row["request_count"]
        self.error_count_4xx += row["error_count_4xx"]
        self.error_count_5xx += row["error_count_5xx"]
        self.rate_limited += row["rate_limited"]
        self.local_count += row.get("local_count", 0)
        self.local_4xx += row.get("local_4xx", 0)
        self.local_5xx += row.get("local_5xx", 0)
        self.cpu_percent = max(self.cpu_percent, row["cpu_percent"])
        self.loop_lag_ms = max(self.loop_lag_ms, row["loop_lag_ms"])
        self.inflight_max = max(self.inflight_max, row["inflight_max"])
        self.rss_bytes = max(self.rss_bytes, row["rss_bytes"])
        if row.get("hist"):
            self.hist.add(histogram.decode_trusted(row["hist"]))


def evaluate(p95_ms: float | None, error_rate: float | None, cpu_percent: float | None,
             traffic_drop: float | None) -> tuple[str, list[dict[str, Any]]]:
    """(health_status, reasons) for the given signal values (None: not evaluated)."""
    reasons: list[dict[str, Any]] = []
    for rule, value in (("latency_p95", p95_ms), ("error_rate", error_rate),
                        ("cpu", cpu_percent), ("traffic_drop", traffic_drop)):
        if value is None:
            continue
        warning, critical = THRESHOLDS[rule]
        severity = "critical" if value > critical else "warning" if value > warning else None
        if severity is None:
            continue
        threshold = critical if severity == "critical" else warning
        unit = _UNITS[rule]
        reasons.append({"rule": rule, "severity": severity, "value": value,
                        "threshold": threshold,
                        "message": f"{rule} {value:.4g}{unit} > {threshold:g}{unit}"})
    if any(r["severity"] == "critical" for r in reasons):
        return "critical", reasons
    if reasons:
        return "warning", reasons
    return "healthy", reasons


def windows(now: float) -> dict[str, float]:
    """The time ranges the overview uses (bucket_start ranges, half open)."""
    minute = int(now // 60) * 60        # start of the current, unfinished minute
    return {
        "since": minute - WINDOW_S, "until": minute,
        "traffic_since": minute - WINDOW_S, "traffic_until": minute,
        "baseline_since": minute - WINDOW_S - BASELINE_OFFSET_S,
        "baseline_until": minute - BASELINE_OFFSET_S,
    }


def _ms(us: int | None) -> float | None:
    return None if us is None else us / 1000.0


def service_report(current: ServiceWindow, traffic_now: int, traffic_base: int,
                   breakers: list[dict[str, Any]]) -> dict[str, Any]:
    n = current.request_count
    admitted = n - current.local_count
    e4xx = current.error_count_4xx - current.local_4xx
    e5xx = current.error_count_5xx - current.local_5xx
    p50, p95, p99 = histogram.percentiles(current.hist)     # of admitted requests only
    error_rate = e5xx / admitted if admitted else None
    drop = None
    change = None
    if traffic_base >= MIN_BASELINE_REQUESTS:
        change = traffic_now / traffic_base - 1.0
        drop = max(0.0, -change)
    status, reasons = evaluate(_ms(p95), error_rate, current.cpu_percent if n else None, drop)
    return {
        "service": current.service,
        "health_status": status,
        "reasons": reasons,
        "request_count": n,
        "requests_per_s": n / WINDOW_S,
        "admitted_count": admitted,
        "error_count_4xx": e4xx,
        "error_count_5xx": e5xx,
        "rate_limited": current.rate_limited,
        "local_answers": {"count": current.local_count, "4xx": current.local_4xx,
                          "5xx": current.local_5xx},
        "error_rate": error_rate if error_rate is not None else 0.0,
        "4xx_rate": e4xx / admitted if admitted else 0.0,
        "latency_p50_ms": _ms(p50),
        "latency_p95_ms": _ms(p95),
        "latency_p99_ms": _ms(p99),
        "saturation": {"cpu_percent": current.cpu_percent, "loop_lag_ms": current.loop_lag_ms,
                       "inflight_max": current.inflight_max, "rss_bytes": current.rss_bytes},
        "traffic": {"requests": traffic_now, "baseline_requests": traffic_base,
                    "change": change},
        "circuit_breakers": breakers,
    }


def overview(rows_now: list[dict[str, Any]], rows_traffic: list[dict[str, Any]],
             rows_base: list[dict[str, Any]], upstream_states: list[dict[str, Any]],
             service_upstreams: list[tuple[str, str]], win: dict[str, float],
             now: float, incidents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Assemble `GET /v1/health/overview` from service-total 1m rows and breaker reports;
    `incidents`: the active (not resolved) incidents, newest first."""
    current: dict[str, ServiceWindow] = {}
    for row in rows_now:
        current.setdefault(row["service"], ServiceWindow(row["service"])).add(row)
    traffic: dict[str, int] = {}
    for row in rows_traffic:
        traffic[row["service"]] = traffic.get(row["service"], 0) + row["request_count"]
    base: dict[str, int] = {}
    for row in rows_base:
        base[row["service"]] = base.get(row["service"], 0) + row["request_count"]
    breakers = [{"gateway_id": s["gateway_id"], "upstream": s["upstream"],
                 "state": s["breaker_state"], "pool_in_use_max": s["pool_in_use_max"],
                 "pool_max": s["pool_max"], "reported_at": s["reported_at"]}
                for s in upstream_states]
    by_upstream: dict[str, list[dict[str, Any]]] = {}
    for b in breakers:
        by_upstream.setdefault(b["upstream"], []).append(b)
    ups_of: dict[str, list[str]] = {}
    for service, upstream in service_upstreams:
        ups_of.setdefault(service, []).append(upstream)

    # "-" is the gateway's own answers to requests that matched no route: not a service.
    names = sorted((set(current) | set(traffic) | set(base)) - {"-"})
    services = []
    for name in names:
        svc_breakers = [b for up in ups_of.get(name, []) for b in by_upstream.get(up, [])]
        services.append(service_report(current.get(name) or ServiceWindow(name),
                                       traffic.get(name, 0), base.get(name, 0), svc_breakers))
    return {
        "generated_at": now,
        "window": {"since": win["since"], "until": win["until"], "seconds": WINDOW_S,
                   "complete_buckets_only": True},
        "traffic_window": {"since": win["traffic_since"], "until": win["traffic_until"],
                           "baseline_since": win["baseline_since"],
                           "baseline_until": win["baseline_until"],
                           "min_baseline_requests": MIN_BASELINE_REQUESTS},
        "thresholds": {k: {"warning": w, "critical": c} for k, (w, c) in THRESHOLDS.items()},
        "services": services,
        "circuit_breakers": breakers,
        "incidents": list(incidents or []),
    }


def overload(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A service's overload protection for its page, from `Store.overload_counts`: per upstream
    the adaptive concurrency limit each gateway last reported (lowest and highest, and whether
    any refused requests in its last interval) and the retries by result in the range; per route
    the requests refused in the range by shedding (`shed`) and by a concurrency limit
    (`concurrency`). Empty lists when the service has none of these."""
    ups: dict[str, dict[str, Any]] = {}

    def up(name: str) -> dict[str, Any]:
        return ups.setdefault(name, {"upstream": name, "concurrency_limit": None,
                                     "concurrency_limit_max": None, "saturated": False,
                                     "gateways": 0, "retries": {}})
    for row in raw["limits"]:
        u = up(row["upstream"])
        lim = row["limit"]
        u["concurrency_limit"] = lim if u["concurrency_limit"] is None \
            else min(u["concurrency_limit"], lim)
        u["concurrency_limit_max"] = max(u["concurrency_limit_max"] or 0, lim)
        u["saturated"] = u["saturated"] or row["saturated"]
        u["gateways"] += 1
    for row in raw["retries"]:
        up(row["upstream"])["retries"][row["result"]] = row["count"]
    routes: dict[str, dict[str, Any]] = {}
    for row in raw["shed"]:
        r = routes.setdefault(row["route"], {"route": row["route"], "shed": 0, "concurrency": 0})
        r[row["reason"]] = r.get(row["reason"], 0) + row["count"]
    return {"upstreams": [ups[k] for k in sorted(ups)],
            "routes": [routes[k] for k in sorted(routes)]}
