"""HTTP API of incidents (changes audited).

  GET    /v1/incidents                     incidents:read  ?active=true&status=&service=&limit=
  POST   /v1/incidents                     incidents:write declare (201)
  GET    /v1/incidents/{id}                incidents:read  with its timeline
  POST   /v1/incidents/{id}/acknowledge|mitigate|escalate|resolve|timeline|postmortem
                                           incidents:write
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import validation as valid
from gateway.control.domain import incidents
from gateway.control.domain.alerts import MAX_TEXT, MAX_TITLE
from gateway.control.domain.incidents import IncidentError
from gateway.control.web import (
    BadParam,
    json_body,
    json_response,
    problem,
    publish,
    query_limit,
    requires,
)
from gateway.control.web import on_db as _db
from gateway.control.web import query_flag as _flag
from gateway.control.web import request_actor as _actor
from gateway.control.web import request_store as _store
from gateway.control.web import request_time as _now


@requires("incidents:read")
async def list_incidents(request: web.Request) -> web.Response:
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in incidents.STATUSES:
        raise BadParam("status", f"must be one of {', '.join(incidents.STATUSES)}")
    active = _flag(request, "active") if "active" in q else None
    now, store, limit = _now(request), _store(request), query_limit(request, 100, 1000)

    def work() -> list[dict[str, Any]]:
        return [incidents.doc(store, i, now) for i in store.incidents.query(
            active=active, status=status, service=q.get("service") or None, limit=limit)]

    return json_response({"incidents": await _db(request, work)})


@requires("incidents:read")
async def get_incident(request: web.Request) -> web.Response:
    store, now = _store(request), _now(request)
    incident_id = request.match_info["id"]

    def work() -> dict[str, Any] | None:
        inc = store.incidents.incident(incident_id)
        return None if inc is None else incidents.doc(store, inc, now, timeline=True)

    out = await _db(request, work)
    if out is None:
        return problem(404, f"no incident {incident_id!r}")
    return json_response(out)


_DECLARE_KEYS = {"title", "description", "severity", "affected_service", "context", "reason",
                 "cause"}


@requires("incidents:write")
async def declare_incident(request: web.Request) -> web.Response:
    body = await json_body(request)
    errs = valid.Errors()
    valid.mapping(body, "", errs, _DECLARE_KEYS, {"title", "severity", "affected_service"})
    title = valid.string(body["title"], "title", errs, maximum=MAX_TITLE) \
        if "title" in body else None
    description = valid.string(body.get("description", ""), "description", errs,
                               nonempty=False, maximum=MAX_TEXT)
    severity = incidents.parse_severity(body["severity"], "severity", errs) \
        if "severity" in body else None
    service = valid.name(body["affected_service"], "affected_service", errs) \
        if "affected_service" in body else None
    context = valid.mapping(body.get("context", {}), "context", errs, None)
    cause = valid.string(body.get("cause", "manual"), "cause", errs)
    errs.check()
    store, now = _store(request), _now(request)

    def work() -> dict[str, Any]:
        # check() returned: every parser succeeded
        assert severity is not None and service is not None and title is not None
        assert description is not None and context is not None and cause is not None
        inc = incidents.declare(store, title=title, description=description,
                                severity=severity, affected_service=service, context=context,
                                actor=_actor(request), reason=body.get("reason", ""), now=now,
                                cause=cause)
        return incidents.doc(store, inc, now, timeline=True)

    out = await _db(request, work)
    publish(request.app, [incidents.event("opened", out)])
    return json_response(out, status=201)


_ACTIONS = ("acknowledge", "mitigate", "escalate", "resolve", "timeline", "postmortem")


async def _incident_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in _ACTIONS:
        return problem(404, f"no incident action {action!r} ({', '.join(_ACTIONS)})")
    incident_id = request.match_info["id"]
    body = await json_body(request)
    store, now, actor = _store(request), _now(request), _actor(request)
    reason = body.get("reason", "")
    sev = None
    if action == "escalate" and body.get("severity") is not None:
        errs = valid.Errors()
        sev = incidents.parse_severity(body["severity"], "severity", errs)
        errs.check()

    def work() -> dict[str, Any]:
        if action == "acknowledge":
            inc = incidents.acknowledge(store, incident_id, actor, reason, now)
        elif action == "mitigate":
            inc = incidents.mitigate(store, incident_id, actor, reason, now)
        elif action == "escalate":
            inc = incidents.escalate(store, incident_id, actor, reason, now, severity=sev)
        elif action == "resolve":
            inc = incidents.resolve(store, incident_id,
                                    resolution_notes=body.get("resolution_notes"),
                                    root_cause=body.get("root_cause"),
                                    postmortem=body.get("postmortem"), actor=actor,
                                    reason=reason, now=now)
        elif action == "timeline":
            inc = incidents.add_note(store, incident_id, body.get("text", body.get("note")),
                                     actor, now)
        else:
            inc = incidents.record_postmortem(store, incident_id, body, actor, reason, now)
        return incidents.doc(store, inc, now, timeline=True)

    try:
        out = await _db(request, work)
    except IncidentError as exc:
        return problem(exc.status, str(exc))
    kind = {"acknowledge": "acknowledged", "escalate": "escalated",
            "resolve": "resolved"}.get(action)
    if kind is not None:
        publish(request.app, [incidents.event(kind, out)])
    return json_response(out)


incident_action = requires("incidents:write")(_incident_action)


def routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/incidents", list_incidents)
    r.add_post("/v1/incidents", declare_incident)
    r.add_get("/v1/incidents/{id}", get_incident)
    r.add_post("/v1/incidents/{id}/{action}", incident_action)
