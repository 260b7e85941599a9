"""HTTP API of alerts and the notification delivery log (changes audited).

  GET    /v1/alerts                        alerts:read     ?status=&service=&open=true&limit=
  POST   /v1/alerts                        alerts:write    by hand (201; 200 if deduplicated)
  POST   /v1/alerts/{id}/ack               alerts:write
  POST   /v1/alerts/{id}/resolve           alerts:write
  GET    /v1/notifications/deliveries      alerts:read     the delivery log (alerts, incidents)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import validation as valid
from gateway.control.domain import alerts, incidents
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.alerts import AlertError, Event
from gateway.control.store import Store
from gateway.control.web import (
    BadParam,
    json_body,
    json_response,
    path_id,
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


@requires("alerts:read")
async def list_alerts(request: web.Request) -> web.Response:
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in alerts.STATUSES:
        raise BadParam("status", f"must be one of {', '.join(alerts.STATUSES)}, got {status!r}")
    rows = await _db(request, _store(request).alerts.slo_alerts, status=status,
                     service=q.get("service") or None, open_only=_flag(request, "open"),
                     limit=query_limit(request, 100, 1000))
    return json_response({"alerts": [alerts.doc(a) for a in rows]})


def _service_error_rate(store: Store, service: str, now: float) -> float:
    requests, e5xx, _ = 0, 0, 0
    for win_s, first, end in slo_mod.plan(*slo_mod.burn_window(now, 300), now):
        r, e, _l = store.rollups.sli_sums(win_s, service, "*", first, end)
        requests, e5xx = requests + r, e5xx + e
    return e5xx / requests if requests else 0.0


def _manual_alert_sync(store: Store, body: dict[str, Any], actor: str, now: float
                       ) -> tuple[int, dict[str, Any], Event | None]:
    with store.transaction():
        key = body["dedup_key"]
        existing = store.alerts.open_slo_alert(key)
        if existing is not None:
            return 200, existing, None
        alert = alerts.raise_alert(
            store, dedup_key=key, source="manual", service=body["service"],
            severity=body["severity"], title=body["title"], description=body["description"],
            labels={"alertname": body["alertname"], **body["labels"]}, details={}, now=now,
            slo_id=body.get("slo_id"))
        store.audit.record(actor, "create", f"alert/{alert['id']}", body.get("reason", ""),
                    {"dedup_key": key, "severity": body["severity"]}, at=now)
        incident = None
        if body["severity"] == "page":
            rate = _service_error_rate(store, body["service"], now)
            incident = incidents.on_page_alert(
                store, alert, cause=body["cause"],
                severity=body["incident_severity"] or slo_mod.incident_severity(rate),
                context={"error_rate_5m": rate, "manual": True}, now=now, actor=actor)
    return 201, store.alerts.slo_alert(alert["id"]) or alert, Event("firing", store.alerts.slo_alert(
        alert["id"]) or alert, incident)


_ALERT_KEYS = {"title", "description", "service", "severity", "labels", "dedup_key", "cause",
               "incident_severity", "slo_id", "reason", "alertname"}


@requires("alerts:write")
async def create_alert(request: web.Request) -> web.Response:
    body = await json_body(request)
    errs = valid.Errors()
    valid.mapping(body, "", errs, _ALERT_KEYS, {"title", "service"})
    title = valid.string(body["title"], "title", errs, maximum=alerts.MAX_TITLE) \
        if "title" in body else None
    service = valid.name(body["service"], "service", errs) if "service" in body else None
    severity = valid.choice(body.get("severity", "ticket"), "severity", errs, alerts.SEVERITIES)
    description = valid.string(body.get("description", ""), "description", errs,
                               nonempty=False, maximum=alerts.MAX_TEXT)
    labels = valid.string_map(body.get("labels", {}), "labels", errs)
    inc_sev = None
    if body.get("incident_severity") is not None:
        inc_sev = incidents.parse_severity(body["incident_severity"], "incident_severity", errs)
    for key in ("dedup_key", "cause", "slo_id", "alertname"):
        if key in body:
            valid.string(body[key], key, errs)
    errs.check()
    doc = {"title": title, "description": description, "service": service,
           "severity": severity, "labels": labels, "reason": body.get("reason", ""),
           "dedup_key": body.get("dedup_key") or f"manual:{service}:{title}",
           "cause": body.get("cause") or "manual", "incident_severity": inc_sev,
           "slo_id": body.get("slo_id"), "alertname": body.get("alertname") or "ManualAlert"}
    status, alert, event = await _db(request, _manual_alert_sync, _store(request), doc,
                                     _actor(request), _now(request))
    if event is not None:
        publish(request.app, [event])
        if event.incident is not None and incidents.opened_by(event.incident, event.alert):
            publish(request.app, [incidents.event("opened", event.incident)])
    return json_response({**alerts.doc(alert), "deduplicated": status == 200}, status=status)


def _alert_id(request: web.Request) -> int:
    return path_id(request, "alert")


@requires("alerts:write")
async def ack_alert(request: web.Request) -> web.Response:
    alert_id = _alert_id(request)
    body = await json_body(request)
    try:
        alert = await _db(request, alerts.acknowledge, _store(request), alert_id,
                          _actor(request), body.get("reason", ""), _now(request))
    except AlertError as exc:
        return problem(exc.status, str(exc))
    publish(request.app, [Event("acknowledged", alert)])
    return json_response(alerts.doc(alert))


def _resolve_alert_sync(store: Store, alert_id: int, actor: str, reason: str, now: float
                        ) -> Event:
    alert = store.alerts.slo_alert(alert_id)
    if alert is None:
        raise AlertError(404, f"no alert {alert_id}")
    if alert["status"] == "resolved":
        raise AlertError(409, f"alert {alert_id} is resolved already")
    return alerts.resolve(store, alert, actor, reason, now)


@requires("alerts:write")
async def resolve_alert(request: web.Request) -> web.Response:
    alert_id = _alert_id(request)
    body = await json_body(request)
    try:
        event = await _db(request, _resolve_alert_sync, _store(request), alert_id,
                          _actor(request), body.get("reason", ""), _now(request))
    except AlertError as exc:
        return problem(exc.status, str(exc))
    publish(request.app, [event])
    return json_response(alerts.doc(event.alert))


@requires("alerts:read")
async def deliveries(request: web.Request) -> web.Response:
    rows = await _db(request, _store(request).deliveries.recent, query_limit(request, 100, 1000))
    return json_response({"deliveries": rows})


def routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/alerts", list_alerts)
    r.add_post("/v1/alerts", create_alert)
    r.add_post("/v1/alerts/{id}/ack", ack_alert)
    r.add_post("/v1/alerts/{id}/resolve", resolve_alert)
    r.add_get("/v1/notifications/deliveries", deliveries)
