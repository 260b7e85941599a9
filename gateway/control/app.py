"""The control plane HTTP service, wiring only: `create_app` puts the handlers of api/ on one
aiohttp app, opens the store at startup and runs the jobs of jobs/; `run` is the blocking entry
point.

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
  POST /v1/admin/retention/run    admin      run the retention job now (audited; 409 on a
                                             replica that does not hold its lock)
  GET  /v1/me                     (any)      the caller's name, role and permissions
  GET  /healthz, GET /metrics                 no auth
  GET  /, /static/...                         the dashboard (api/dashboard.py), no auth
  /v1/slos, /v1/error-budgets, /v1/deploy-gate, /v1/alerts, /v1/incidents, /v1/admin/evaluate
                                  api/slos.py, api/alerts.py, api/incidents.py, api/admin.py
  /v1/costs, /v1/budgets: api/costs.py; /v1/tenants: api/tenants.py

SQLite work (including ingest parsing, which is CPU-bound) runs on one worker thread so the event
loop stays responsive and the store sees one caller at a time.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvloop
from aiohttp import web

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import split_hostport
from gateway.control.api import (
    admin,
    alerts,
    dashboard,
    incidents,
    ingest,
    metrics,
    signals,
    slos,
    workflow,
)
from gateway.control.api import costs as costs_api
from gateway.control.api import tenants as tenants_api
from gateway.control.auth import Authenticator
from gateway.control.config import ControlConfig, load
from gateway.control.domain import costs, rollup
from gateway.control.domain.costs import sync_config_budgets
from gateway.control.domain.ingest import Batch
from gateway.control.domain.tenants import TenantBook
from gateway.control.jobs import compaction, finops, tenants
from gateway.control.jobs.evaluator import Evaluator, evaluation_loop
from gateway.control.jobs.notify import Notifier
from gateway.control.jobs.schedule import every
from gateway.control.store import Database, Store
from gateway.control.store.groupcommit import GroupCommit
from gateway.control.web import (
    AUTH,
    BOOK,
    CLOCK,
    CONFIG,
    DB,
    EVALUATOR,
    FINOPS,
    INGEST,
    NOTIFIER,
    middleware,
    publish_queued,
)
from gateway.errors import ConfigError

log = logging.getLogger("gateway.control")


def create_app(cfg: ControlConfig, *, clock: Clock = SYSTEM_CLOCK,
               compact_interval_s: float = 2.0,
               retention_interval_s: float = 900.0,
               evaluation_interval_s: float = 5.0,
               budget_interval_s: float = 15.0) -> web.Application:
    """The control plane application. Opens (and migrates) the database at startup."""
    app = web.Application(middlewares=[middleware], client_max_size=1024 ** 2)
    app[CONFIG] = cfg
    app[CLOCK] = clock
    app[AUTH] = Authenticator(cfg.tokens)
    finops_, budget_specs = costs.from_config(cfg.cost_models, cfg.budgets)
    app[FINOPS] = finops_                      # metered and evaluated at ingest too
    app[BOOK] = TenantBook()                   # tenant usage, 80 % alerts, tenant table

    async def database(app: web.Application) -> AsyncIterator[None]:
        db = Database(Store(cfg.database, clock=clock))
        app[DB] = db
        app[metrics.METRICS] = metrics.Metrics()

        async def write(batches: list[Batch]) -> list[tuple[bool, dict[str, Any]]]:
            return await db.call(ingest.ingest_group, db.store, batches, clock.time(),
                                 app.get(FINOPS), app.get(BOOK))
        app[INGEST] = GroupCommit(write)
        try:
            yield
        finally:
            try:
                await db.call(rollup.compact, db.store)
            finally:
                db.close()

    async def background(app: web.Application) -> AsyncIterator[None]:
        """control.yaml's budgets and SLOs into the store, the notifier, the periodic jobs."""
        db = app[DB]
        await db.call(sync_config_budgets, db.store, budget_specs, clock.time())
        await db.call(slos.sync_config_slos, db.store, cfg.slos, clock.time())
        app[EVALUATOR] = Evaluator(db.store)

        async def record(row: dict[str, object]) -> None:
            await db.call(db.store.deliveries.add_delivery, **row)

        notifier = Notifier(tuple(cfg.notifications or ()), record, clock.time)
        app[NOTIFIER] = notifier
        await notifier.start()
        # On PostgreSQL compaction has a connection and a thread of its own: a chunk holds the
        # database thread for ~0.1 s, and ingest groups waited behind it there. (It locks the
        # bucket rows only for its final UPDATE; SQLite has one writer either way.)
        compactor = Database(Store(cfg.database, clock=clock)) if db.store.postgresql else db

        async def evaluate() -> None:
            # the evaluator folds the queue first; most of it is folded here, off ingest's thread
            if compactor is not db:
                await compaction.compact_in_steps(compactor)
            await admin.run_evaluation(app)

        jobs = [
            asyncio.create_task(every(compact_interval_s, "compact",
                                      lambda: compaction.compact_in_steps(compactor))),
            asyncio.create_task(every(retention_interval_s, "retention",
                                      lambda: compaction.retention(db, clock))),
            asyncio.create_task(finops.evaluate_budgets(
                db, clock, finops_, budget_interval_s,
                lambda: publish_queued(app, app[FINOPS]))),
            asyncio.create_task(tenants.housekeeping(
                db, clock, lambda: publish_queued(app, app[BOOK]))),
            asyncio.create_task(evaluation_loop(db, evaluation_interval_s, evaluate),
                name="slo-evaluator"),
        ]
        try:
            yield
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            if compactor is not db:
                compactor.close()
            publish_queued(app, app[BOOK])
            await notifier.stop()

    app.cleanup_ctx.append(database)
    app.cleanup_ctx.append(background)
    dashboard.routes(app)          # GET /, /static/..., /v1/me
    costs_api.routes(app)          # /v1/costs, /v1/budgets[/{id}]
    tenants_api.routes(app)        # /v1/tenants[/{id}[/quotas]]
    workflow.routes(app)           # assignment, action items, reports, SLO history: before slos
    slos.routes(app)               # /v1/slos, /v1/error-budgets, /v1/deploy-gate
    alerts.routes(app)             # /v1/alerts, /v1/notifications/deliveries
    incidents.routes(app)          # /v1/incidents[/{id}[/{action}]]
    metrics.routes(app)            # /healthz, /metrics
    ingest.routes(app)             # POST /v1/ingest
    signals.routes(app)            # /v1/signals, /v1/health/overview, /v1/limits, /v1/breakers
    admin.routes(app)              # /v1/audit, /v1/admin/retention/run, /v1/admin/evaluate
    return app


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
