"""The control plane HTTP service: aiohttp app (`create_app`) and the blocking entry point (`run`).

Endpoints (auth: `Authorization: Bearer <token>`; roles per `auth.ACCESS`):

  POST /v1/ingest                 ingest     a gateway's batch (gzip optional); idempotent by batch_id
  GET  /v1/signals                signals    rolled-up rows (window=1m|5m|1h|1d, since, until,
                                             service, route; no route = the service totals;
                                             with service: `overload`, its retries, concurrency
                                             limits and shed requests in the range)
  GET  /v1/health/overview        health     per-service golden signals + health_status
  GET  /v1/limits                 limits     limit decisions per policy and bucket
  GET  /v1/breakers               breakers   breaker states as last reported + recent transitions
  GET  /v1/audit                  audit      the audit log (admin)
  POST /v1/admin/retention/run    admin      run the retention job now (audited)
  GET  /v1/me                     (any)      the caller's name, role and permissions
  GET  /healthz, GET /metrics                 no auth
  GET  /, /static/...                         the dashboard (see dashboard.py), no auth
  /v1/slos, /v1/error-budgets, /v1/deploy-gate, /v1/alerts, /v1/incidents, /v1/admin/evaluate
                                  SLOs, budgets, alerts, incidents: see reliability.py

SQLite work (including ingest parsing, which is CPU-bound) runs on one worker thread so the event
loop stays responsive and the store sees one caller at a time.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import split_hostport
from gateway.control import (  # costs: budgets, directives; shedding: page alerts
    costs,
    dashboard,
    health,
    incidents,
    reliability,
    rollup,
    shedding,
    slometrics,
    workflow,
)
from gateway.control import tenants as tenant_book  # tenant usage, 80 % alerts, tenant table
from gateway.control.auth import Authenticator, Principal
from gateway.control.config import ControlConfig, load
from gateway.control.ingest import IngestError, parse_batch, read_body
from gateway.control.store import Store
from gateway.control.web import (
    AUTH,
    CLOCK,
    CONFIG,
    DB,
    PRINCIPAL,
    BadParam,
    Database,
    json_response,
    middleware,
    parse_time,
    problem,
    query_limit,
    requires,
)
from gateway.errors import ConfigError

log = logging.getLogger("gateway.control")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_SIGNAL_ROWS = 100_000
DEFAULT_SPAN_BUCKETS = 60      # default since = until - 60 buckets (1m: the last hour)
INGEST_RESULTS = ("accepted", "duplicate", "invalid", "too_large", "unsupported", "error")


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
        # SLO gauges (slometrics.py), refreshed by each scrape
        self.slos = slometrics.SloCollector()
        self.registry.register(self.slos)


METRICS = web.AppKey("metrics", Metrics)


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


# ---------------------------------------------------------------------------------------------
# Handlers


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    # read on the database thread: a scrape never waits on the store's lock in the event loop
    m.pending.set(await request.app[DB].call(request.app[DB].store.pending_count))
    m.slos.update(await request.app[DB].call(slometrics.reports, request.app[DB].store,
                                             request.app[CLOCK].time()))
    body = generate_latest(m.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _ingest_sync(store: Store, body: bytes, now: float, finops: costs.FinOps | None = None,
                 book: tenant_book.TenantBook | None = None
                 ) -> tuple[bool, str, int, dict[str, Any]]:
    batch = parse_batch(body, now=now)
    # --- Costs and budgets: metered in the batch's transaction (a replay is never
    # billed twice); then the budgets are evaluated and the gateways' directives returned.
    with store.transaction():
        stored = rollup.apply(store, batch, now)
        if stored and finops is not None:
            finops.attribute(store, batch)
        if stored and book is not None:
            book.record(store, batch, now)
    directives = finops.directives(store, now) if finops is not None else {}
    if book is not None:
        directives = {**directives, **book.directives(store, now)}
    directives = {**directives, **shedding.directives(store, now)}  # open page alerts
    return stored, batch.batch_id, len(batch.series), directives


@requires("ingest")
async def ingest(request: web.Request) -> web.Response:
    app = request.app
    m = app[METRICS]
    started = time.perf_counter()
    try:
        body = await read_body(request)
        stored, batch_id, n_series, directives = await app[DB].call(
            _ingest_sync, app[DB].store, body, app[CLOCK].time(), app.get(costs.FINOPS),
            app.get(tenant_book.BOOK))
    except IngestError as exc:
        result = {400: "invalid", 413: "too_large", 415: "unsupported"}.get(exc.status, "invalid")
        m.batches.labels(result).inc()
        resp = problem(exc.status, exc.errors[0] if exc.errors else "invalid batch",
                       errors=exc.errors[:50])
        # (A too-large body is not closed on at once: aiohttp's lingering close reads and
        # discards the rest for up to 10 s so that the client gets this answer, not a reset.)
        return resp
    except Exception:
        m.batches.labels("error").inc()
        raise
    m.duration.observe(time.perf_counter() - started)
    m.batches.labels("accepted" if stored else "duplicate").inc()
    if stored:
        m.series.inc(n_series)
    return json_response({"accepted": True, "duplicate": not stored, "batch_id": batch_id,
                  "directives": directives})


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
    rows = store.signals(win, since, until, service=service, route=route,
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
        raw = await request.app[DB].call(request.app[DB].store.overload_counts, win, since,
                                         until, service)
        doc["overload"] = health.overload(raw)
    return json_response(doc)


def _overview_sync(store: Store, now: float) -> dict[str, Any]:
    rollup.compact(store)
    win = health.windows(now)
    rows_now = store.service_buckets(60, win["since"], win["until"])
    rows_traffic = store.service_buckets(60, win["traffic_since"], win["traffic_until"])
    rows_base = store.service_buckets(60, win["baseline_since"], win["baseline_until"])
    return health.overview(rows_now, rows_traffic, rows_base, store.upstream_states(),
                           store.service_upstreams(), win, now,
                           incidents=[incidents.summary(i)
                                      for i in store.incidents(active=True, limit=100)])


@requires("health:read")
async def overview(request: web.Request) -> web.Response:
    now = request.app[CLOCK].time()
    doc = await request.app[DB].call(_overview_sync, request.app[DB].store, now)
    return json_response(doc)


@requires("limits:read")
async def limits(request: web.Request) -> web.Response:
    name, win, since, until = _window(request)
    policy = request.query.get("policy") or None
    rows = await request.app[DB].call(request.app[DB].store.limit_counts, win, since, until,
                                      policy)
    return json_response({"window": name, "since": since, "until": until, "rows": rows})


@requires("breakers:read")
async def breakers(request: web.Request) -> web.Response:
    store = request.app[DB].store
    now = request.app[CLOCK].time()
    since = parse_time("since", request.query["since"]) if "since" in request.query \
        else now - 86_400
    states = await request.app[DB].call(store.upstream_states)
    transitions = await request.app[DB].call(store.breaker_transitions, since,
                                             query_limit(request, 100, 1000))
    gateways = await request.app[DB].call(store.gateways)
    return json_response({"breakers": states, "transitions": transitions, "gateways": gateways})


@requires("audit:read")
async def audit(request: web.Request) -> web.Response:
    q = request.query
    since = parse_time("since", q["since"]) if "since" in q else None
    rows = await request.app[DB].call(
        request.app[DB].store.audit_entries, since=since, actor=q.get("actor") or None,
        action=q.get("action") or None, limit=query_limit(request, 100, 1000))
    return json_response({"entries": rows})


async def _reason(request: web.Request) -> str:
    if not request.can_read_body:
        return ""
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadParam("body", "must be JSON") from None
    reason = doc.get("reason", "") if isinstance(doc, dict) else None
    if not isinstance(reason, str) or len(reason) > 2000:
        raise BadParam("reason", "must be a string of at most 2000 characters")
    return reason


def _retention_sync(store: Store, now: float, actor: str, reason: str) -> dict[str, int]:
    deleted = rollup.run_retention(store, now)
    store.audit(actor, "run", "retention", reason, {"deleted": deleted}, at=now)
    return deleted


@requires("admin:write")
async def retention_run(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    reason = await _reason(request)
    now = request.app[CLOCK].time()
    deleted = await request.app[DB].call(_retention_sync, request.app[DB].store, now,
                                         principal.name, reason)
    return json_response({"deleted": deleted})


# ---------------------------------------------------------------------------------------------
# Application


def create_app(cfg: ControlConfig, *, clock: Clock = SYSTEM_CLOCK,
               compact_interval_s: float = 2.0,
               retention_interval_s: float = 900.0,
               evaluation_interval_s: float = 5.0) -> web.Application:
    """The control plane application. Opens (and migrates) the database at startup."""
    app = web.Application(middlewares=[middleware], client_max_size=1024 ** 2)
    app[CONFIG] = cfg
    app[CLOCK] = clock
    app[AUTH] = Authenticator(cfg.tokens)

    async def database(app: web.Application) -> AsyncIterator[None]:
        db = Database(Store(cfg.database, clock=clock))
        app[DB] = db
        app[METRICS] = Metrics()
        async def compact_in_steps() -> None:
            if not await db.leads("compaction"):
                return
            # one chunk per executor call: ingest requests queue in between, not behind it all
            while await db.call(rollup.compact, db.store, max_chunks=1) >= rollup.CHUNK:
                pass

        async def retention() -> None:
            if await db.leads("retention"):
                await db.call(rollup.run_retention, db.store, clock.time())

        jobs = [asyncio.create_task(_every(compact_interval_s, "compact", compact_in_steps)),
                asyncio.create_task(_every(retention_interval_s, "retention", retention))]
        try:
            yield
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            try:
                await db.call(rollup.compact, db.store)
            finally:
                db.close()

    app.cleanup_ctx.append(database)
    dashboard.setup(app)                       # GET /, /static/..., /v1/me
    costs.setup(app)                           # /v1/costs, /v1/budgets[/{id}]
    tenant_book.setup(app)                     # /v1/tenants[/{id}[/quotas]]
    # --- SLOs, alerts, incidents: /v1/slos, /v1/error-budgets, /v1/deploy-gate,
    # /v1/alerts, /v1/incidents; the evaluator and notifier tasks.
    workflow.setup(app)       # assignment, action items, reports, SLO history: before slo_routes
    reliability.slo_routes(app, cfg, clock=clock, evaluation_interval_s=evaluation_interval_s)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/ingest", ingest)
    app.router.add_get("/v1/signals", signals)
    app.router.add_get("/v1/health/overview", overview)
    app.router.add_get("/v1/limits", limits)
    app.router.add_get("/v1/breakers", breakers)
    app.router.add_get("/v1/audit", audit)
    app.router.add_post("/v1/admin/retention/run", retention_run)
    return app


async def _every(interval_s: float, name: str, job: Callable[[], Awaitable[Any]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic job failed", extra={"job": name})


async def serve(cfg: ControlConfig, stop: asyncio.Event) -> None:
    """Listen on cfg.listen until `stop` is set, then shut down gracefully."""
    runner = web.AppRunner(create_app(cfg), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        host, port = split_hostport(cfg.listen)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0] if runner.addresses else (host, port)
        log.info("control plane listening",
                 extra={"event": "control_started", "listen": f"{bound[0]}:{bound[1]}",
                        "database": cfg.database, "config": cfg.source,
                        "config_version": cfg.version})
        await stop.wait()
        log.info("control plane stopping", extra={"event": "control_stopping"})
    finally:
        await runner.cleanup()


def run(config_path: str) -> int:
    """`gateway control --config PATH`: blocking; uvloop; SIGTERM/SIGINT stop it gracefully.
    Returns the exit status (0 ok, 2 invalid config, 1 cannot start)."""
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(cfg, stop)
        except OSError as exc:
            log.error("control plane cannot start", extra={"error": str(exc),
                                                           "listen": cfg.listen})
            return 1
        return 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
