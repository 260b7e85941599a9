"""HTTP API of the SRE workflow around incidents and SLOs (wiring only; the rules live in
incidents.py, actionitems.py, reports.py and history.py):

  POST  /v1/incidents/{id}/assign          incidents:write  {assigned_to: "name" | null, reason}
  GET   /v1/incidents/{id}/action-items    incidents:read
  POST  /v1/incidents/{id}/action-items    incidents:write  {description, owner, due, priority}
  GET   /v1/action-items                   incidents:read   ?status=open|done&overdue=true
                                                            &owner=
  PATCH /v1/action-items/{id}              incidents:write  {description, owner, due, priority}
  POST  /v1/action-items/{id}/complete     incidents:write
  GET   /v1/reports/{service}              incidents:read   ?period=day|week|month (default
                                                            month) &at=<a time in the period>
  GET   /v1/slos/{id}/history              slos:read        ?kind=day|period&since=&until=

Registered before the incident routes of incidents.py, whose `/v1/incidents/{id}/{action}`
would otherwise take the first three paths.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.control.domain import actionitems, incidents, reports
from gateway.control.domain.incidents import IncidentError
from gateway.control.store import Store
from gateway.control.web import (
    CLOCK,
    DB,
    PRINCIPAL,
    BadParam,
    json_body,
    json_response,
    parse_time,
    path_id,
    problem,
    publish,
    query_limit,
    requires,
)


def _item_id(request: web.Request) -> int:
    return path_id(request, "action item")     # beyond 64 bits: a 404, not a driver error


async def _run(request: web.Request, fn: Any, *args: Any) -> Any:
    return await request.app[DB].call(fn, *args)


@requires("incidents:write")
async def assign(request: web.Request) -> web.Response:
    body = await json_body(request)
    if "assigned_to" not in body:
        return problem(400, "assigned_to: is required (a name, or null to unassign)")
    store: Store = request.app[DB].store
    now = request.app[CLOCK].time()

    def work() -> dict[str, Any]:
        inc = incidents.assign(store, request.match_info["id"], body["assigned_to"],
                               request[PRINCIPAL].name, body.get("reason", ""), now)
        return incidents.doc(store, inc, now, timeline=True)

    try:
        return json_response(await _run(request, work))
    except IncidentError as exc:
        return problem(exc.status, str(exc))


@requires("incidents:read")
async def list_items_of_incident(request: web.Request) -> web.Response:
    store: Store = request.app[DB].store
    now = request.app[CLOCK].time()
    incident_id = request.match_info["id"]

    def work() -> list[dict[str, Any]] | None:
        if store.incidents.incident(incident_id) is None:
            return None
        return [actionitems.doc(i, now) for i in store.incidents.action_items(incident_id=incident_id)]

    out = await _run(request, work)
    if out is None:
        return problem(404, f"no incident {incident_id!r}")
    return json_response({"action_items": out})


@requires("incidents:write")
async def create_item(request: web.Request) -> web.Response:
    body = await json_body(request)
    store: Store = request.app[DB].store
    now = request.app[CLOCK].time()
    try:
        item = await _run(request, actionitems.create, store, request.match_info["id"], body,
                          request[PRINCIPAL].name, body.get("reason", ""), now)
    except IncidentError as exc:
        return problem(exc.status, str(exc))
    return json_response(actionitems.doc(item, now), status=201)


@requires("incidents:read")
async def list_items(request: web.Request) -> web.Response:
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in actionitems.STATUSES:
        raise BadParam("status", f"must be one of {', '.join(actionitems.STATUSES)}")
    overdue = q.get("overdue", "false").lower()
    if overdue not in ("true", "false"):
        raise BadParam("overdue", f"must be true or false, got {overdue!r}")
    now = request.app[CLOCK].time()
    store: Store = request.app[DB].store
    rows = await _run(request, lambda: store.incidents.action_items(
        status="open" if overdue == "true" else status,
        due_before=now if overdue == "true" else None, limit=query_limit(request, 1000, 10_000)))
    owner = q.get("owner")
    return json_response({"action_items": [actionitems.doc(i, now) for i in rows
                                   if owner is None or i["owner"] == owner]})


@requires("incidents:write")
async def update_item(request: web.Request) -> web.Response:
    item_id = _item_id(request)
    body = await json_body(request)
    now = request.app[CLOCK].time()
    try:
        item, events = await _run(request, actionitems.update, request.app[DB].store, item_id,
                                  body, request[PRINCIPAL].name, body.get("reason", ""), now)
    except IncidentError as exc:
        return problem(exc.status, str(exc))
    publish(request.app, events)
    return json_response(actionitems.doc(item, now))


@requires("incidents:write")
async def complete_item(request: web.Request) -> web.Response:
    item_id = _item_id(request)
    body = await json_body(request)
    now = request.app[CLOCK].time()
    try:
        item, events = await _run(request, actionitems.complete, request.app[DB].store,
                                  item_id, request[PRINCIPAL].name, body.get("reason", ""), now)
    except IncidentError as exc:
        return problem(exc.status, str(exc))
    publish(request.app, events)
    return json_response(actionitems.doc(item, now))


@requires("incidents:read")
async def service_report(request: web.Request) -> web.Response:
    period = request.query.get("period", "month")
    if period not in reports.PERIODS:
        raise BadParam("period", f"must be one of {', '.join(reports.PERIODS)}, got "
                                 f"{period!r}")
    now = request.app[CLOCK].time()
    at = parse_time("at", request.query["at"]) if "at" in request.query else now
    doc = await _run(request, reports.report, request.app[DB].store,
                     request.match_info["service"], period, at, now)
    return json_response(doc)


@requires("slos:read")
async def slo_history(request: web.Request) -> web.Response:
    q = request.query
    kind = q.get("kind", "day")
    if kind not in ("day", "period"):
        raise BadParam("kind", f"must be day or period, got {kind!r}")
    since = parse_time("since", q["since"]) if "since" in q else None
    until = parse_time("until", q["until"]) if "until" in q else None
    store: Store = request.app[DB].store
    slo_id = request.match_info["id"]

    def work() -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        return store.slos.slo_doc(slo_id), store.slos.slo_history(slo_id=slo_id, kind=kind, since=since,
                                                        until=until)

    row, rows = await _run(request, work)
    if row is None and not rows:
        return problem(404, f"no SLO {slo_id!r}")
    return json_response({"slo_id": slo_id, "kind": kind,
                  "objective": row["doc"]["objective"] if row else None,
                  "window": row["doc"]["window"] if row else None, "history": rows})


def routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/incidents/{id}/assign", assign)
    r.add_get("/v1/incidents/{id}/action-items", list_items_of_incident)
    r.add_post("/v1/incidents/{id}/action-items", create_item)
    r.add_get("/v1/action-items", list_items)
    r.add_patch("/v1/action-items/{id}", update_item)
    r.add_post("/v1/action-items/{id}/complete", complete_item)
    r.add_get("/v1/reports/{service}", service_report)
    r.add_get("/v1/slos/{id}/history", slo_history)
