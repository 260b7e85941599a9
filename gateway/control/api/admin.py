"""Admin and audit APIs: GET /v1/audit, POST /v1/admin/retention/run, POST /v1/admin/evaluate
(one SLO evaluation pass now; `run_evaluation` is also what the background loop runs). Both jobs
run on the replica holding their lock; any other answers 409."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.control.auth import Principal
from gateway.control.domain import rollup
from gateway.control.domain.alerts import Event
from gateway.control.store import Store
from gateway.control.web import (
    CLOCK,
    DB,
    EVALUATOR,
    PRINCIPAL,
    held_elsewhere,
    json_body,
    json_response,
    parse_time,
    publish,
    query_limit,
    requires,
)


@requires("audit:read")
async def audit(request: web.Request) -> web.Response:
    q = request.query
    since = parse_time("since", q["since"]) if "since" in q else None
    rows = await request.app[DB].call(
        request.app[DB].store.audit.entries, since=since, actor=q.get("actor") or None,
        action=q.get("action") or None, limit=query_limit(request, 100, 1000))
    return json_response({"entries": rows})


def _retention_sync(store: Store, now: float, actor: str, reason: str) -> dict[str, int]:
    deleted = rollup.run_retention(store, now)
    store.audit.record(actor, "run", "retention", reason, {"deleted": deleted}, at=now)
    return deleted


@requires("admin:write")
async def retention_run(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    reason = (await json_body(request)).get("reason", "")
    busy = await held_elsewhere(request, "retention")
    if busy is not None:
        return busy
    now = request.app[CLOCK].time()
    deleted = await request.app[DB].call(_retention_sync, request.app[DB].store, now,
                                         principal.name, reason)
    return json_response({"deleted": deleted})


_EVAL_LOCK = web.AppKey("slo_eval_lock", asyncio.Lock)


async def run_evaluation(app: web.Application) -> list[Event]:
    """One evaluation pass at the app clock's time, then notifications (never awaited)."""
    async with app[_EVAL_LOCK]:
        events: list[Event] = await app[DB].call(app[EVALUATOR].evaluate, app[CLOCK].time())
    publish(app, events)
    return events


@requires("admin:write")
async def evaluate_now(request: web.Request) -> web.Response:
    busy = await held_elsewhere(request, "evaluation")
    if busy is not None:
        return busy
    events = await run_evaluation(request.app)
    return json_response({"events": [{"kind": e.kind, "alert_id": e.alert["id"],
                              "incident_id": e.alert.get("incident_id")} for e in events
                             if e.alert.get("source") != "incident"],
                  "incident_events": [{"kind": e.kind, "incident_id": e.alert["id"]}
                                      for e in events if e.alert.get("source") == "incident"]})


def routes(app: web.Application) -> None:
    app[_EVAL_LOCK] = asyncio.Lock()
    app.router.add_get("/v1/audit", audit)
    app.router.add_post("/v1/admin/retention/run", retention_run)
    app.router.add_post("/v1/admin/evaluate", evaluate_now)
