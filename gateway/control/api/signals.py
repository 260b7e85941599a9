"""Read APIs over the rollups: /v1/signals (golden signals per window; with a service, its
overload block), /v1/health/overview, /v1/limits, /v1/breakers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.control.domain import health, incidents, rollup
from gateway.control.store import Store
from gateway.control.web import (
    CLOCK,
    DB,
    BadParam,
    json_response,
    parse_time,
    query_limit,
    requires,
)

MAX_SIGNAL_ROWS = 100_000
DEFAULT_SPAN_BUCKETS = 60      # default since = until - 60 buckets (1m: the last hour)


def _window(request: web.Request) -> tuple[str, int, float, float]:
    q = request.query
    name = q.get("window", "1m")
    if name not in rollup.WINDOWS:
        raise BadParam("window", f"must be one of {', '.join(rollup.WINDOWS)}, got {name!r}")
    win = rollup.WINDOWS[name]
    now = request.app[CLOCK].time()
    until = parse_time("until", q["until"]) if "until" in q else now + win
    since = (parse_time("since", q["since"]) if "since" in q
             else rollup.bucket_start(now, win) - (DEFAULT_SPAN_BUCKETS - 1) * win)
    if since > until:
        raise BadParam("since", "must not be after until")
    return name, win, since, until


def _signal_row(r: dict[str, Any]) -> dict[str, Any]:
    # Error rates and latencies are of the admitted requests (forwarded or tried to be); what
    # the gateway answered itself is counted apart (rate_limited, local_answers).
    n = r["request_count"]
    admitted = n - r["local_count"]
    e4xx = r["error_count_4xx"] - r["local_4xx"]
    e5xx = r["error_count_5xx"] - r["local_5xx"]
    return {
        "bucket_start": r["bucket_start"],
        "service": r["service"],
        "route": r["route"],
        "request_count": n,
        "admitted_count": admitted,
        "error_count_4xx": e4xx,
        "error_count_5xx": e5xx,
        "error_rate": e5xx / admitted if admitted else 0.0,
        "4xx_rate": e4xx / admitted if admitted else 0.0,
        "rate_limited": r["rate_limited"],
        "local_answers": {"count": r["local_count"], "4xx": r["local_4xx"],
                          "5xx": r["local_5xx"]},
        "latency_p50_ms": None if r["p50_us"] is None else r["p50_us"] / 1000.0,
        "latency_p95_ms": None if r["p95_us"] is None else r["p95_us"] / 1000.0,
        "latency_p99_ms": None if r["p99_us"] is None else r["p99_us"] / 1000.0,
        "saturation": {"cpu_percent": r["cpu_percent"], "loop_lag_ms": r["loop_lag_ms"],
                       "inflight_max": r["inflight_max"], "rss_bytes": r["rss_bytes"]},
        "bytes_in": r["bytes_in"],
        "bytes_out": r["bytes_out"],
    }


def _signals_sync(store: Store, win: int, since: float, until: float, service: str | None,
                  route: str) -> list[dict[str, Any]]:
    rollup.compact(store)
    rows = store.rollups.signals(win, since, until, service=service, route=route,
                         limit=MAX_SIGNAL_ROWS + 1)
    return [_signal_row(r) for r in rows]


@requires("signals:read")
async def signals(request: web.Request) -> web.Response:
    name, win, since, until = _window(request)
    service = request.query.get("service") or None
    route = request.query.get("route") or rollup.TOTAL
    rows = await request.app[DB].call(_signals_sync, request.app[DB].store, win, since, until,
                                      service, route)
    truncated = len(rows) > MAX_SIGNAL_ROWS
    doc = {"window": name, "since": since, "until": until, "service": service,
           "route": route, "truncated": truncated, "rows": rows[:MAX_SIGNAL_ROWS]}
    if service is not None:
        # the service page's overload protection block: retries, concurrency limits, shedding
        raw = await request.app[DB].call(request.app[DB].store.overload.overload_counts, win, since,
                                         until, service)
        doc["overload"] = health.overload(raw)
    return json_response(doc)


def _overview_sync(store: Store, now: float) -> dict[str, Any]:
    rollup.compact(store)
    win = health.windows(now)
    rows_now = store.rollups.service_buckets(60, win["since"], win["until"])
    rows_traffic = store.rollups.service_buckets(60, win["traffic_since"], win["traffic_until"])
    rows_base = store.rollups.service_buckets(60, win["baseline_since"], win["baseline_until"])
    return health.overview(rows_now, rows_traffic, rows_base, store.fleet.upstream_states(),
                           store.fleet.service_upstreams(), win, now,
                           incidents=[incidents.summary(i)
                                      for i in store.incidents.query(active=True, limit=100)])


@requires("health:read")
async def overview(request: web.Request) -> web.Response:
    now = request.app[CLOCK].time()
    doc = await request.app[DB].call(_overview_sync, request.app[DB].store, now)
    return json_response(doc)


@requires("limits:read")
async def limits(request: web.Request) -> web.Response:
    name, win, since, until = _window(request)
    policy = request.query.get("policy") or None
    rows = await request.app[DB].call(request.app[DB].store.rollups.limit_counts, win, since, until,
                                      policy)
    return json_response({"window": name, "since": since, "until": until, "rows": rows})


@requires("breakers:read")
async def breakers(request: web.Request) -> web.Response:
    store = request.app[DB].store
    now = request.app[CLOCK].time()
    since = parse_time("since", request.query["since"]) if "since" in request.query \
        else now - 86_400
    states = await request.app[DB].call(store.fleet.upstream_states)
    transitions = await request.app[DB].call(store.fleet.breaker_transitions, since,
                                             query_limit(request, 100, 1000))
    gateways = await request.app[DB].call(store.fleet.gateways)
    return json_response({"breakers": states, "transitions": transitions, "gateways": gateways})


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/signals", signals)
    app.router.add_get("/v1/health/overview", overview)
    app.router.add_get("/v1/limits", limits)
    app.router.add_get("/v1/breakers", breakers)
