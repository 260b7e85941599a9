"""HTTP API of costs and budgets: /v1/costs (report, FOCUS-style import) and /v1/budgets
(CRUD, emergency overrides). The maths and the evaluator are domain/costs.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from gateway import validation as valid
from gateway.control import web as control_app
from gateway.control.domain import budgets as bm
from gateway.control.domain.budgets import BudgetSpec
from gateway.control.domain.costs import (
    GROUP_BY,
    FinOps,
    alert_doc,
    cost_report,
    parse_charges,
    spec_json,
    spec_of,
)
from gateway.control.store import Store
from gateway.control.web import FINOPS, json_body, json_response, problem, requires

T = TypeVar("T")


def _ctx(request: web.Request) -> tuple[Any, Store, FinOps, float, str]:
    app = request.app
    db = app[control_app.DB]
    return db, db.store, app[FINOPS], app[control_app.CLOCK].time(), \
        request[control_app.PRINCIPAL].name


_MAX_OVERRIDE_S = 400 * 86_400     # an emergency override lasts at most this long


def _budget_id(request: web.Request) -> int:
    return control_app.path_id(request, "budget")


@requires("costs:read")
async def get_costs(request: web.Request) -> web.Response:
    q = request.query
    db, store, finops, now, _ = _ctx(request)
    tz = q.get("tz") or q.get("timezone") or "UTC"
    try:
        bm.zone(tz)
    except ValueError as exc:
        raise control_app.BadParam("tz", str(exc)) from None
    group_by = q.get("group_by") or None
    if group_by is not None and group_by not in GROUP_BY:
        raise control_app.BadParam("group_by", f"must be one of {', '.join(GROUP_BY)}")
    until = int(control_app.parse_time("to", q["to"])) if "to" in q else int(now)
    since = (int(control_app.parse_time("from", q["from"])) if "from" in q
             else bm.period_bounds("monthly", now, tz)[0])
    if since > until:
        raise control_app.BadParam("from", "must not be after to")
    if until - since > 400 * 86_400:
        raise control_app.BadParam("to", "the window may span at most 400 days")
    service = q.get("service") or None
    doc = await db.call(cost_report, store, finops.models, since, until, service, group_by, tz,
                        now)
    return json_response(doc)


def _import_sync(store: Store, records: list[dict[str, Any]], now: float, actor: str,
                 reason: str) -> dict[str, Any]:
    n = store.costs.add_charges([(r["key"], r["service"], r["cost_type"], r["category"], r["start"],
                            r["end"], r["micros"], r["description"], now, actor)
                           for r in records])
    total = sum(r["micros"] for r in records)
    store.audit.record(actor, "import", "costs", reason,
                {"records": len(records), "imported": n, "billed": bm.money(total)}, at=now)
    return {"imported": n, "skipped": len(records) - n, "billed": bm.money(total)}


@requires("costs:write")
async def post_costs(request: web.Request) -> web.Response:
    db, store, finops, now, actor = _ctx(request)
    doc = await json_body(request, required=True, list_as="records")
    reason = doc.pop("reason", "")
    records, errors = parse_charges(doc)
    if errors:
        return problem(400, errors[0], errors=errors[:50])
    result = await db.call(_import_sync, store, records, now, actor, reason)
    await db.call(finops.evaluate, store, now)
    control_app.publish_queued(request.app, request.app[FINOPS])
    return json_response(result, 201)


def _report_sync(store: Store, finops: FinOps, now: float) -> dict[str, Any]:
    views, directives = finops.evaluate(store, now)
    views.sort(key=lambda v: (-v["utilization_percent"], v["name"]))
    total_budget = sum(v["effective_amount_cents"] for v in views)
    total_usage = sum(v["current_usage_micros"] for v in views)
    return {"budgets": views,
            "total_budget_cents": total_budget,
            "total_usage_cents": bm.cents_of_micros(total_usage),
            "total_usage_micros": total_usage,
            "overall_utilization": bm.percent(total_usage, total_budget * bm.MICROS_PER_CENT),
            "directives": directives,
            "alerts": [alert_doc(a) for a in store.budgets.budget_alerts(None, 100)],
            "alert_delivery": "alerts"}     # also raised in /v1/alerts and notified


@requires("budgets:read")
async def list_budgets(request: web.Request) -> web.Response:
    db, store, finops, now, _ = _ctx(request)
    doc = await db.call(_report_sync, store, finops, now)
    control_app.publish_queued(request.app, request.app[FINOPS])
    return json_response(doc)


def _create_sync(store: Store, finops: FinOps, spec: BudgetSpec, now: float, actor: str,
                 reason: str) -> dict[str, Any] | None:
    with store.transaction():
        bid = store.budgets.insert_budget(spec.name, spec_json(spec), "api", None, now)
        if bid is None:
            return None
        store.audit.record(actor, "create", f"budget:{bid}", reason, {"budget": spec.to_doc()}, at=now)
    finops.evaluate(store, now)
    row = store.budgets.budget(bid)
    assert row is not None
    return finops.view(store, row, now, alerts=True)


def _evaluated_view(store: Any, finops: Any, bid: int, now: float) -> web.Response:
    """After a change to budget `bid`: evaluate every budget again and answer its fresh view."""
    finops.evaluate(store, now)
    new = store.budgets.budget(bid)
    assert new is not None
    return json_response(finops.view(store, new, now, alerts=True))


async def _run_and_publish(request: web.Request, db: Any, run: Callable[[], T]) -> T:
    """Run a change on the database thread, then hand any alerts it raised to the notifier."""
    resp = await db.call(run)
    control_app.publish_queued(request.app, request.app[FINOPS])
    return resp


@requires("budgets:write")
async def create_budget(request: web.Request) -> web.Response:
    db, store, finops, now, actor = _ctx(request)
    doc = await json_body(request, required=True)
    reason = doc.pop("reason", "")
    spec, errors = bm.parse_budget(doc)
    if spec is None:
        return problem(400, errors[0], errors=errors)
    view = await db.call(_create_sync, store, finops, spec, now, actor, reason)
    control_app.publish_queued(request.app, request.app[FINOPS])
    if view is None:
        return problem(409, f"a budget named {spec.name!r} exists already")
    return json_response(view, 201)


@requires("budgets:read")
async def get_budget(request: web.Request) -> web.Response:
    db, store, finops, now, _ = _ctx(request)
    bid = _budget_id(request)

    def run() -> dict[str, Any] | None:
        row = store.budgets.budget(bid)
        if row is None:
            return None
        finops.evaluate(store, now)
        return finops.view(store, row, now, alerts=True)

    view = await db.call(run)
    return json_response(view) if view is not None else problem(404, f"no budget {bid}")


@requires("budgets:write")
async def update_budget(request: web.Request) -> web.Response:
    db, store, finops, now, actor = _ctx(request)
    bid = _budget_id(request)
    doc = await json_body(request, required=True)
    reason = doc.pop("reason", "")

    def run() -> web.Response:
        row = store.budgets.budget(bid)
        if row is None:
            return problem(404, f"no budget {bid}")
        before = spec_of(row)
        spec, errors = bm.parse_budget(doc, base=before)
        if spec is None:
            return problem(400, errors[0], errors=errors)
        try:
            with store.transaction():
                store.budgets.update_budget(bid, spec.name, spec_json(spec), now)
                store.audit.record(actor, "update", f"budget:{bid}", reason,
                            {"before": before.to_doc(), "after": spec.to_doc()}, at=now)
        except sqlite3.IntegrityError:
            return problem(409, f"a budget named {spec.name!r} exists already")
        return _evaluated_view(store, finops, bid, now)

    return await _run_and_publish(request, db, run)


@requires("budgets:write")
async def delete_budget(request: web.Request) -> web.Response:
    db, store, finops, now, actor = _ctx(request)
    bid = _budget_id(request)
    reason = (await json_body(request)).get("reason", "")

    def run() -> bool:
        row = store.budgets.budget(bid)
        if row is None:
            return False
        with store.transaction():
            store.budgets.delete_budget(bid)
            store.audit.record(actor, "delete", f"budget:{bid}", reason,
                        {"budget": spec_of(row).to_doc()}, at=now)
        finops.evaluate(store, now)
        return True

    if not await db.call(run):
        return problem(404, f"no budget {bid}")
    return web.Response(status=204)


@requires("budgets:write")
async def set_override(request: web.Request) -> web.Response:
    """POST /v1/budgets/{id}/override {amount_cents, expires_at | duration_s, reason}: a
    temporary higher amount (emergency override), audited; it lapses by itself at expires_at."""
    db, store, finops, now, actor = _ctx(request)
    bid = _budget_id(request)
    doc = await json_body(request, required=True)
    errs = valid.Errors()
    valid.mapping(doc, "", errs, {"amount_cents", "expires_at", "duration_s", "reason"})
    reason = doc.get("reason", "")
    if not reason.strip():
        errs.add("reason", "is required (an emergency override needs one)")
    cents = None
    if "amount_cents" not in doc:
        errs.add("amount_cents", "is required (the override's amount in cents)")
    else:
        cents = valid.integer(doc["amount_cents"], "amount_cents", errs, minimum=1,
                              maximum=bm.MAX_AMOUNT_CENTS)
    expires = None
    if "expires_at" in doc:
        expires = valid.instant(doc["expires_at"], "expires_at", errs)
        if expires is not None and expires <= now:
            errs.add("expires_at", "must be in the future")
            expires = None
    elif "duration_s" in doc:
        duration = valid.number(doc["duration_s"], "duration_s", errs, minimum=0,
                                exclusive_min=True, maximum=_MAX_OVERRIDE_S)
        expires = None if duration is None else now + duration
    else:
        errs.add("expires_at", "expires_at (a time) or duration_s (seconds, > 0) is required")
    errs.check()
    assert cents is not None and expires is not None

    def run() -> web.Response:
        row = store.budgets.budget(bid)
        if row is None:
            return problem(404, f"no budget {bid}")
        spec = spec_of(row)
        if cents <= spec.amount_cents:
            return problem(400, f"amount_cents: an override must be higher than the budget "
                                 f"({spec.amount_cents}); lower the budget with PUT instead")
        with store.transaction():
            store.budgets.set_budget_override(bid, cents, expires, reason, now)
            store.audit.record(actor, "override", f"budget:{bid}", reason,
                        {"amount_cents": cents, "expires_at": expires,
                         "budget_amount_cents": spec.amount_cents}, at=now)
        return _evaluated_view(store, finops, bid, now)

    return await _run_and_publish(request, db, run)


@requires("budgets:write")
async def clear_override(request: web.Request) -> web.Response:
    db, store, finops, now, actor = _ctx(request)
    bid = _budget_id(request)
    reason = (await json_body(request)).get("reason", "")

    def run() -> web.Response:
        row = store.budgets.budget(bid)
        if row is None:
            return problem(404, f"no budget {bid}")
        with store.transaction():
            store.budgets.set_budget_override(bid, None, None, None, now)
            store.audit.record(actor, "delete", f"budget:{bid}/override", reason, {}, at=now)
        return _evaluated_view(store, finops, bid, now)

    return await _run_and_publish(request, db, run)


def routes(app: web.Application) -> None:
    """/v1/costs and /v1/budgets[/{id}[/override]] (`app[FINOPS]` is set by the wiring)."""
    r = app.router
    r.add_get("/v1/costs", get_costs)
    r.add_post("/v1/costs", post_costs)
    r.add_get("/v1/budgets", list_budgets)
    r.add_post("/v1/budgets", create_budget)
    r.add_get("/v1/budgets/{id}", get_budget)
    r.add_put("/v1/budgets/{id}", update_budget)
    r.add_delete("/v1/budgets/{id}", delete_budget)
    r.add_post("/v1/budgets/{id}/override", set_override)
    r.add_delete("/v1/budgets/{id}/override", clear_override)
