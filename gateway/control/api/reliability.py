"""HTTP API of SLOs, error budgets, alerts, incidents, the deploy gate and evaluation on demand.

`routes(app)` registers everything below; app.py syncs the SLOs of control.yaml into the store
at startup (`sync_config_slos`), starts the notifier and runs `run_evaluation` every interval.

  GET    /v1/slos                          slos:read       SLO definitions
  POST   /v1/slos                          slos:write      create (201); 409 if the name is taken
  GET    /v1/slos/{id}                     slos:read
  PUT    /v1/slos/{id}                     slos:write      replace (SLOs of control.yaml: 409)
  DELETE /v1/slos/{id}                     slos:write      and resolve its open alerts
  GET    /v1/error-budgets[/{service}]     error_budgets:read
  GET    /v1/deploy-gate/{service}         deploy_gate:read  ?critical=true&low_traffic=true
  GET    /v1/alerts                        alerts:read     ?status=&service=&open=true&limit=
  POST   /v1/alerts                        alerts:write    by hand (201; 200 if deduplicated)
  POST   /v1/alerts/{id}/ack               alerts:write
  POST   /v1/alerts/{id}/resolve           alerts:write
  GET    /v1/notifications/deliveries      alerts:read     the delivery log (alerts, incidents)
  GET    /v1/incidents                     incidents:read  ?active=true&status=&service=&limit=
  POST   /v1/incidents                     incidents:write declare (201)
  GET    /v1/incidents/{id}                incidents:read  with its timeline
  POST   /v1/incidents/{id}/acknowledge|mitigate|escalate|resolve|timeline|postmortem
                                           incidents:write
  POST   /v1/admin/evaluate                admin:write     run one evaluation pass now

Every change is audited (actor = the token's name, `reason` from the JSON body).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway import validation as valid
from gateway.control.domain import alerts, deploygate, incidents, rollup
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.alerts import AlertError, Event
from gateway.control.domain.incidents import IncidentError
from gateway.control.domain.sloreport import budget_report, load_slos
from gateway.control.store import Store
from gateway.control.web import (
    CLOCK,
    DB,
    EVALUATOR,
    PRINCIPAL,
    BadParam,
    held_elsewhere,
    json_body,
    json_response,
    path_id,
    problem,
    publish,
    query_limit,
    requires,
)

log = logging.getLogger("gateway.control.reliability")

_EVAL_LOCK = web.AppKey("slo_eval_lock", asyncio.Lock)


# ---------------------------------------------------------------------------------------------
# Helpers


def _actor(request: web.Request) -> str:
    return request[PRINCIPAL].name


def _now(request: web.Request) -> float:
    return request.app[CLOCK].time()


def _store(request: web.Request) -> Store:
    return request.app[DB].store


async def _db(request: web.Request, fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await request.app[DB].call(fn, *args, **kwargs)


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise BadParam(name, f"must be true or false, got {raw!r}")
    return raw in ("true", "1", "yes")


def _invalid(errors: list[str]) -> web.Response:
    return problem(400, errors[0], errors=errors[:50])


# ---------------------------------------------------------------------------------------------
# SLOs


def _slo_row_doc(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["doc"], "source": row["source"], "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


@requires("slos:read")
async def list_slos(request: web.Request) -> web.Response:
    rows = await _db(request, _store(request).slos.slo_docs)
    service = request.query.get("service")
    return json_response({"slos": [_slo_row_doc(r) for r in rows
                           if service is None or r["service"] == service]})


@requires("slos:read")
async def get_slo(request: web.Request) -> web.Response:
    row = await _db(request, _store(request).slos.slo_doc, request.match_info["id"])
    if row is None:
        return problem(404, f"no SLO {request.match_info['id']!r}")
    return json_response(_slo_row_doc(row))


def _parse_body_slo(body: dict[str, Any]) -> tuple[slo_mod.SLO | None, list[str]]:
    errs = valid.Errors()
    definition = {k: v for k, v in body.items() if k != "reason"}
    parsed = slo_mod.parse_slo(definition, "", errs)
    return parsed, errs.lines


def _create_slo_sync(store: Store, s: slo_mod.SLO, actor: str, reason: str, now: float
                     ) -> dict[str, Any] | None:
    with store.transaction():
        if not store.slos.insert_slo(s.id, s.service, s.to_doc(), "api", now):
            return None
        store.audit.record(actor, "create", f"slo/{s.id}", reason, s.to_doc(), at=now)
    return store.slos.slo_doc(s.id)


@requires("slos:write")
async def create_slo(request: web.Request) -> web.Response:
    body = await json_body(request)
    parsed, errors = _parse_body_slo(body)
    if parsed is None:
        return _invalid(errors)
    row = await _db(request, _create_slo_sync, _store(request), parsed, _actor(request),
                    body.get("reason", ""), _now(request))
    if row is None:
        return problem(409, f"name: an SLO named {parsed.name!r} exists already")
    return json_response(_slo_row_doc(row), status=201)


def _update_slo_sync(store: Store, slo_id: str, s: slo_mod.SLO, actor: str, reason: str,
                     now: float) -> tuple[int, Any]:
    with store.transaction():
        row = store.slos.slo_doc(slo_id)
        if row is None:
            return 404, f"no SLO {slo_id!r}"
        if row["source"] == "config":
            return 409, f"SLO {slo_id!r} is defined in control.yaml: change it there"
        store.slos.update_slo(slo_id, s.service, s.to_doc(), now)
        store.audit.record(actor, "update", f"slo/{slo_id}", reason,
                    {"before": row["doc"], "after": s.to_doc()}, at=now)
    return 200, store.slos.slo_doc(slo_id)


@requires("slos:write")
async def update_slo(request: web.Request) -> web.Response:
    slo_id = request.match_info["id"]
    body = await json_body(request)
    body.setdefault("name", slo_id)
    if body["name"] != slo_id:
        return problem(400, f"name: is the SLO's id and cannot change ({slo_id!r}, got "
                            f"{body['name']!r})")
    parsed, errors = _parse_body_slo(body)
    if parsed is None:
        return _invalid(errors)
    status, out = await _db(request, _update_slo_sync, _store(request), slo_id, parsed,
                            _actor(request), body.get("reason", ""), _now(request))
    if status != 200:
        return problem(status, out)
    return json_response(_slo_row_doc(out))


def _delete_slo_sync(store: Store, slo_id: str, actor: str, reason: str, now: float
                     ) -> tuple[int, Any]:
    with store.transaction():
        row = store.slos.slo_doc(slo_id)
        if row is None:
            return 404, f"no SLO {slo_id!r}"
        if row["source"] == "config":
            return 409, f"SLO {slo_id!r} is defined in control.yaml: remove it there"
        store.slos.delete_slo(slo_id)
        store.audit.record(actor, "delete", f"slo/{slo_id}", reason, row["doc"], at=now)
        events = []
        for tier in slo_mod.TIERS:
            alert = store.alerts.open_slo_alert(f"{slo_id}:{tier}")
            if alert is not None:
                events.append(alerts.resolve(store, alert, actor, "SLO deleted", now))
    return 200, events


@requires("slos:write")
async def delete_slo(request: web.Request) -> web.Response:
    slo_id = request.match_info["id"]
    body = await json_body(request)
    status, out = await _db(request, _delete_slo_sync, _store(request), slo_id,
                            _actor(request), body.get("reason", ""), _now(request))
    if status != 200:
        return problem(status, out)
    publish(request.app, out)
    return json_response({"deleted": slo_id, "resolved_alerts": [e.alert["id"] for e in out]})


# ---------------------------------------------------------------------------------------------
# Error budgets and the deploy gate


def _budgets_sync(store: Store, now: float, service: str | None
                  ) -> list[tuple[slo_mod.SLO, dict[str, Any]]]:
    rollup.compact(store)
    return [(s, budget_report(store, s, now)) for s in load_slos(store)
            if service is None or s.service == service]


@requires("error_budgets:read")
async def error_budgets(request: web.Request) -> web.Response:
    service = request.match_info.get("service")
    now = _now(request)
    pairs = await _db(request, _budgets_sync, _store(request), now, service)
    if service is not None and not pairs:
        return problem(404, f"no SLO covers service {service!r}")
    return json_response({"generated_at": now, "service": service,
                  "budgets": [report for _s, report in pairs]})


def _gate_sync(store: Store, now: float, service: str) -> tuple[list[Any], list[Any]]:
    return _budgets_sync(store, now, service), store.incidents.query(active=True, service=service,
                                                               limit=1000)


@requires("deploy_gate:read")
async def deploy_gate(request: web.Request) -> web.Response:
    service = request.match_info["service"]
    critical, low_traffic = _flag(request, "critical"), _flag(request, "low_traffic")
    now = _now(request)
    pairs, open_incidents = await _db(request, _gate_sync, _store(request), now, service)
    if not pairs and not open_incidents:
        return problem(404, f"no SLO covers service {service!r} (nothing to decide on)")
    doc = deploygate.gate(service, pairs, open_incidents, critical=critical,
                          low_traffic=low_traffic)
    doc["generated_at"] = now
    return json_response(doc)


# ---------------------------------------------------------------------------------------------
# Alerts


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


@requires("alerts:write")
async def create_alert(request: web.Request) -> web.Response:
    body = await json_body(request)
    errs = valid.Errors()
    allowed = {"title", "description", "service", "severity", "labels", "dedup_key", "cause",
               "incident_severity", "slo_id", "reason", "alertname"}
    for key in sorted(set(body) - allowed):
        errs.add(key, "unknown key")
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > 300:
        errs.add("title", "is required (a string of 1 to 300 characters)")
    service = valid.name(body["service"], "service", errs) if "service" in body else None
    if "service" not in body:
        errs.add("service", "is required")
    severity = body.get("severity", "ticket")
    if severity not in alerts.SEVERITIES:
        errs.add("severity", f"must be one of {', '.join(alerts.SEVERITIES)}, got {severity!r}")
    description = body.get("description", "")
    if not isinstance(description, str):
        errs.add("description", "must be a string")
    labels = body.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        errs.add("labels", "must be a mapping of strings to strings")
    inc_sev = None
    if body.get("incident_severity") is not None:
        inc_sev = incidents.severity_of(body["incident_severity"])
        if inc_sev is None:
            errs.add("incident_severity", f"must be one of {', '.join(incidents.SEVERITIES)}")
    for key in ("dedup_key", "cause", "slo_id", "alertname"):
        if key in body and (not isinstance(body[key], str) or not body[key].strip()):
            errs.add(key, "must be a non-empty string")
    if errs.lines:
        return _invalid(errs.lines)
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


# ---------------------------------------------------------------------------------------------
# Incidents


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


@requires("incidents:write")
async def declare_incident(request: web.Request) -> web.Response:
    body = await json_body(request)
    errs = valid.Errors()
    allowed = {"title", "description", "severity", "affected_service", "context", "reason",
               "cause"}
    for key in sorted(set(body) - allowed):
        errs.add(key, "unknown key")
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > 300:
        errs.add("title", "is required (a string of 1 to 300 characters)")
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 10_000:
        errs.add("description", "must be a string of at most 10000 characters")
    severity = incidents.severity_of(body.get("severity"))
    if severity is None:
        errs.add("severity", f"must be one of {', '.join(incidents.SEVERITIES)} (or critical, "
                             f"major, minor, info), got {body.get('severity')!r}")
    service = None
    if "affected_service" not in body:
        errs.add("affected_service", "is required")
    else:
        service = valid.name(body["affected_service"], "affected_service", errs)
    context = body.get("context", {})
    if not isinstance(context, dict):
        errs.add("context", "must be an object")
    cause = body.get("cause", "manual")
    if not isinstance(cause, str) or not cause.strip():
        errs.add("cause", "must be a non-empty string")
    if errs.lines or severity is None or service is None or not isinstance(title, str):
        return _invalid(errs.lines)
    store, now = _store(request), _now(request)

    def work() -> dict[str, Any]:
        assert severity is not None and service is not None and isinstance(title, str)
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

    def work() -> dict[str, Any]:
        if action == "acknowledge":
            inc = incidents.acknowledge(store, incident_id, actor, reason, now)
        elif action == "mitigate":
            inc = incidents.mitigate(store, incident_id, actor, reason, now)
        elif action == "escalate":
            sev = None
            if body.get("severity") is not None:
                sev = incidents.severity_of(body["severity"])
                if sev is None:
                    raise IncidentError(400, "severity: must be one of "
                                             + ", ".join(incidents.SEVERITIES))
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


# ---------------------------------------------------------------------------------------------
# Evaluation


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


def sync_config_slos(store: Store, slos: tuple[slo_mod.SLO, ...], now: float) -> None:
    changes = store.slos.sync_config_slos({s.id: (s.service, s.to_doc()) for s in slos}, now)
    if any(changes.values()):
        store.audit.record("control.yaml", "sync", "slos", "SLOs as code", changes, at=now)


def routes(app: web.Application) -> None:
    """The SLO, alert, incident and deploy-gate API (the evaluator and the notifier are wired by
    app.py: `app[EVALUATOR]`, `app[NOTIFIER]`)."""
    app[_EVAL_LOCK] = asyncio.Lock()
    r = app.router
    r.add_get("/v1/slos", list_slos)
    r.add_post("/v1/slos", create_slo)
    r.add_get("/v1/slos/{id}", get_slo)
    r.add_put("/v1/slos/{id}", update_slo)
    r.add_delete("/v1/slos/{id}", delete_slo)
    r.add_get("/v1/error-budgets", error_budgets)
    r.add_get("/v1/error-budgets/{service}", error_budgets)
    r.add_get("/v1/deploy-gate/{service}", deploy_gate)
    r.add_get("/v1/alerts", list_alerts)
    r.add_post("/v1/alerts", create_alert)
    r.add_post("/v1/alerts/{id}/ack", ack_alert)
    r.add_post("/v1/alerts/{id}/resolve", resolve_alert)
    r.add_get("/v1/notifications/deliveries", deliveries)
    r.add_get("/v1/incidents", list_incidents)
    r.add_post("/v1/incidents", declare_incident)
    r.add_get("/v1/incidents/{id}", get_incident)
    r.add_post("/v1/incidents/{id}/{action}", incident_action)
    r.add_post("/v1/admin/evaluate", evaluate_now)
