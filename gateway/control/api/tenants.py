"""HTTP API of tenants: /v1/tenants[/{tenant}[/quotas]] (see domain/tenants.py for the model)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import validation as valid
from gateway.control import web as control_app
from gateway.control.domain.tenants import MAX_ID, OVERRIDE_FIELDS, active_override
from gateway.control.store import Store

MAX_PLAN = 128     # characters of a plan's name


def _tenant_id(request: web.Request) -> str:
    raw = request.match_info["tenant"]
    if not raw or len(raw) > MAX_ID or not raw.isprintable():
        raise web.HTTPNotFound(reason=f"no tenant {raw[:64]!r}")
    return raw


def _view(tenant: str, plan: str | None, overrides: list[dict[str, Any]],
          usage: list[dict[str, Any]], now: float, full: bool) -> dict[str, Any]:
    active = active_override(overrides, now)
    windows = []
    nearest = None
    for u in sorted(usage, key=lambda u: ("day", "week", "month").index(u["window"])
                    if u["window"] in ("day", "week", "month") else 3):
        pct = round(100.0 * u["current_usage"] / u["limit"], 2) if u["limit"] else None
        if pct is not None and (nearest is None or pct > nearest):
            nearest = pct
        windows.append({"window": u["window"], "window_id": u["window_id"],
                        "limit": u["limit"], "current_usage": u["current_usage"],
                        "rejected": u["rejected"], "percent": pct,
                        "updated_at": u["updated_at"]})
    reported_plan = usage[0]["plan"] if usage else None
    doc: dict[str, Any] = {
        "tenant": tenant,
        "plan": plan or reported_plan,
        "plan_source": "control" if plan else ("gateway" if reported_plan else None),
        "override": active,
        "usage": windows,
        "nearest_quota_percent": nearest,
    }
    if full:
        doc["overrides"] = [{**o, "active": o is active,
                             "pending": o["effective_date"] > now} for o in overrides]
    return doc


def _list_sync(store: Store, now: float) -> list[dict[str, Any]]:
    repo = store.tenants
    plans = repo.plans()
    overrides: dict[str, list[dict[str, Any]]] = {}
    for o in repo.overrides():
        overrides.setdefault(o["tenant"], []).append(o)
    usage: dict[str, list[dict[str, Any]]] = {}
    for u in repo.usage():
        usage.setdefault(u["tenant"], []).append(u)
    out = [_view(t, plans.get(t), overrides.get(t, []), usage.get(t, []), now, False)
           for t in set(plans) | set(overrides) | set(usage)]
    # nearest their quota first
    out.sort(key=lambda d: (-(d["nearest_quota_percent"] or 0.0), d["tenant"]))
    return out


def _get_sync(store: Store, tenant: str, now: float) -> dict[str, Any] | None:
    repo = store.tenants
    plan = repo.plans().get(tenant)
    overrides = repo.overrides(tenant)
    usage = repo.usage(tenant)
    if plan is None and not overrides and not usage:
        return None
    return _view(tenant, plan, overrides, usage, now, True)


@control_app.requires("tenants:read")
async def list_tenants(request: web.Request) -> web.Response:
    db = request.app[control_app.DB]
    rows = await db.call(_list_sync, db.store, request.app[control_app.CLOCK].time())
    return control_app.json_response({"tenants": rows})


@control_app.requires("tenants:read")
async def get_tenant(request: web.Request) -> web.Response:
    tenant = _tenant_id(request)
    db = request.app[control_app.DB]
    doc = await db.call(_get_sync, db.store, tenant, request.app[control_app.CLOCK].time())
    if doc is None:
        return control_app.problem(404, f"no tenant {tenant!r} is known to the control plane")
    return control_app.json_response(doc)


@control_app.requires("tenants:write")
async def put_tenant(request: web.Request) -> web.Response:
    tenant = _tenant_id(request)
    doc = await control_app.json_body(request, required=True)
    errs = valid.Errors()
    valid.mapping(doc, "", errs, {"plan", "reason"}, {"plan"})
    plan = valid.name(doc["plan"], "plan", errs, maximum=MAX_PLAN) if "plan" in doc else None
    errs.check()
    assert plan is not None
    reason = doc.get("reason", "")
    actor = request[control_app.PRINCIPAL].name
    now = request.app[control_app.CLOCK].time()
    db = request.app[control_app.DB]

    def run() -> dict[str, Any] | None:
        store = db.store
        with store.transaction():
            store.tenants.set_plan(tenant, plan, actor, now)
            store.audit.record(actor, "update", f"tenant/{tenant}", reason, {"plan": plan}, at=now)
        return _get_sync(store, tenant, now)

    return control_app.json_response(await db.call(run))


def _when(doc: dict[str, Any], key: str, default: float | None, errs: valid.Errors
          ) -> float | None:
    """The time at `key` (unix seconds or RFC 3339), `default` when absent or null."""
    v = doc.get(key)
    return default if v is None else valid.instant(v, key, errs)


def parse_override(doc: dict[str, Any], now: float) -> dict[str, Any]:
    """A quota override from its request body; Invalid with every error found."""
    errs = valid.Errors()
    valid.mapping(doc, "", errs, {*OVERRIDE_FIELDS, "effective_date", "expires_at", "reason"})
    out: dict[str, Any] = {}
    named = False
    for key in OVERRIDE_FIELDS:
        v = doc.get(key)
        if v is None:
            continue
        named = True
        if key == "qps":
            out[key] = valid.number(v, key, errs, minimum=0, exclusive_min=True)
        else:       # a burst of 0 is allowed: no requests beyond the steady rate
            out[key] = valid.integer(v, key, errs, minimum=0 if key == "burst" else 1)
    if not named:
        errs.add("body", f"name at least one of {', '.join(OVERRIDE_FIELDS)}")
    effective = _when(doc, "effective_date", now, errs)
    expires = _when(doc, "expires_at", None, errs)
    if effective is not None and expires is not None and expires <= effective:
        errs.add("expires_at", "must be after effective_date")
    errs.check()
    out["effective_date"] = effective
    out["expires_at"] = expires
    return out


@control_app.requires("tenants:write")
async def post_quotas(request: web.Request) -> web.Response:
    tenant = _tenant_id(request)
    doc = await control_app.json_body(request, required=True)
    now = request.app[control_app.CLOCK].time()
    o = parse_override(doc, now)
    reason = doc.get("reason", "")
    actor = request[control_app.PRINCIPAL].name
    db = request.app[control_app.DB]

    def run() -> tuple[int, dict[str, Any] | None]:
        store = db.store
        with store.transaction():
            oid = store.tenants.add_override(tenant, o, reason, actor, now)
            store.audit.record(actor, "create", f"tenant/{tenant}/quotas/{oid}", reason,
                        {k: v for k, v in o.items() if v is not None}, at=now)
        return oid, _get_sync(store, tenant, now)

    oid, view = await db.call(run)
    return control_app.json_response({"id": oid, "tenant": tenant, **o,
                              "effective_date_rfc3339": _rfc3339(o["effective_date"]),
                              "pending": o["effective_date"] > now, "view": view}, status=201)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/tenants", list_tenants)
    app.router.add_get("/v1/tenants/{tenant}", get_tenant)
    app.router.add_put("/v1/tenants/{tenant}", put_tenant)
    app.router.add_post("/v1/tenants/{tenant}/quotas", post_quotas)
