"""HTTP API of SLOs, their error budgets and the deploy gate (changes audited: actor = the
token's name, `reason` from the JSON body).

  GET    /v1/slos                          slos:read       SLO definitions
  POST   /v1/slos                          slos:write      create (201); 409 if the name is taken
  GET    /v1/slos/{id}                     slos:read
  PUT    /v1/slos/{id}                     slos:write      replace (SLOs of control.yaml: 409)
  DELETE /v1/slos/{id}                     slos:write      and resolve its open alerts
  GET    /v1/error-budgets[/{service}]     error_budgets:read
  GET    /v1/deploy-gate/{service}         deploy_gate:read  ?critical=true&low_traffic=true
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import validation as valid
from gateway.control.domain import alerts, deploygate, rollup
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.sloreport import budget_report, load_slos
from gateway.control.store import Store
from gateway.control.web import invalid as _invalid
from gateway.control.web import (
    json_body,
    json_response,
    problem,
    publish,
    requires,
)
from gateway.control.web import on_db as _db
from gateway.control.web import query_flag as _flag
from gateway.control.web import request_actor as _actor
from gateway.control.web import request_store as _store
from gateway.control.web import request_time as _now


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


def sync_config_slos(store: Store, slos: tuple[slo_mod.SLO, ...], now: float) -> None:
    changes = store.slos.sync_config_slos({s.id: (s.service, s.to_doc()) for s in slos}, now)
    if any(changes.values()):
        store.audit.record("control.yaml", "sync", "slos", "SLOs as code", changes, at=now)


def routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/slos", list_slos)
    r.add_post("/v1/slos", create_slo)
    r.add_get("/v1/slos/{id}", get_slo)
    r.add_put("/v1/slos/{id}", update_slo)
    r.add_delete("/v1/slos/{id}", delete_slo)
    r.add_get("/v1/error-budgets", error_budgets)
    r.add_get("/v1/error-budgets/{service}", error_budgets)
    r.add_get("/v1/deploy-gate/{service}", deploy_gate)
