"""Tenants in the control plane: runtime plans and overrides, usage per quota window, 80 % alerts,
the tenant table sent to gateways, and the `/v1/tenants` API.

* The gateways own the plans (`tenants.plans` in their config) and count; the control plane owns
  runtime changes. `PUT /v1/tenants/{id}` `{"plan"}` sets a tenant's plan (a name the gateways'
  config defines; a gateway keeps its static assignment or default plan for a name it does not
  know). `POST /v1/tenants/{id}/quotas` records an override `{"qps", "burst", "daily_quota",
  "monthly_quota", "effective_date", "expires_at"}`; the newest override whose effective_date has
  come and whose expires_at has not is the active one. Both are admin only and audited; monitor
  reads.
* Every ingest answer carries `directives["tenants"]`: the complete table of tenants with a plan
  set here or an active override, `{"<id>": {"plan", "override"}}`. An override with a future
  effective_date is not in it until then, so it changes nothing before; a gateway applies the
  table as it receives it (within one ship interval of the change, two at worst).
* Usage: each batch carries admitted/rejected counts per tenant and quota window (the window ids
  come from the gateway, computed in its time zone); they add up per (tenant, window kind, window
  id) across gateways. Gateways ship configured and table tenants plus at most 100 others per
  interval (see gateway/tenants.py), so this table grows with known tenants, not with clients;
  rows untouched for 400 days are pruned hourly.
* When a window's admitted count passes 80 % of its quota, one alert is raised for that window
  (`source: "quota"`, in /v1/alerts and through the notification targets, as SLO alerts are);
  `tenant_alerts` is the once-per-window ledger.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from gateway.control import alerts as alerts_mod
from gateway.control import web as control_app
from gateway.control.ingest import Batch
from gateway.control.notify import publish
from gateway.control.store import Store

log = logging.getLogger("gateway.control.tenants")

ALERT_THRESHOLD = 0.8
USAGE_RETENTION_S = 400 * 86400     # a year of monthly windows, and then some
MAX_ID = 256
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
OVERRIDE_FIELDS = ("qps", "burst", "daily_quota", "monthly_quota")


# ---------------------------------------------------------------------------------------------
# SQL: a repository of its own on the store's connection (tables: store.py, tenants step)


class TenantRepo:
    """Tenant rows on the control plane's Store (called on the database thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.store._lock:
            return self.store._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self.store._lock:
            return int(self.store._db.execute(sql, args).rowcount)

    def set_plan(self, tenant: str, plan: str, actor: str, now: float) -> None:
        self._exec("INSERT INTO tenants(tenant_id, plan, updated_at, actor) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(tenant_id) DO UPDATE SET plan = excluded.plan, "
                   "updated_at = excluded.updated_at, actor = excluded.actor",
                   (tenant, plan, now, actor))

    def plans(self) -> dict[str, str]:
        return dict(self._rows("SELECT tenant_id, plan FROM tenants"))  # type: ignore[arg-type]

    def add_override(self, tenant: str, o: dict[str, Any], reason: str, actor: str,
                     now: float) -> int:
        with self.store._lock:
            cur = self.store._db.execute(
                "INSERT INTO tenant_overrides(tenant_id, qps, burst, daily_quota, monthly_quota, "
                "effective_date, expires_at, reason, actor, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tenant, o.get("qps"), o.get("burst"), o.get("daily_quota"),
                 o.get("monthly_quota"), o["effective_date"], o.get("expires_at"), reason, actor,
                 now))
            return int(cur.lastrowid or 0)

    def overrides(self, tenant: str | None = None,
                  not_expired_at: float | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, tenant_id, qps, burst, daily_quota, monthly_quota, effective_date, "
               "expires_at, reason, actor, created_at FROM tenant_overrides WHERE 1 = 1")
        args: tuple[Any, ...] = ()
        if tenant is not None:
            sql += " AND tenant_id = ?"
            args = (tenant,)
        if not_expired_at is not None:
            sql += " AND (expires_at IS NULL OR expires_at > ?)"
            args = (*args, not_expired_at)
        cols = ("id", "tenant", "qps", "burst", "daily_quota", "monthly_quota",
                "effective_date", "expires_at", "reason", "actor", "created_at")
        return [dict(zip(cols, r)) for r in self._rows(sql + " ORDER BY id", args)]

    def add_usage(self, rows: list[tuple[str, str, str, str, int, int, int, float]]) -> None:
        """(tenant, kind, window id, plan, limit, admitted, rejected, now): counts add up."""
        with self.store._lock:
            self.store._db.executemany(
                "INSERT INTO tenant_usage(tenant_id, kind, window_id, plan, quota_limit, "
                "admitted, rejected, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(tenant_id, kind, window_id) DO UPDATE SET "
                "admitted = tenant_usage.admitted + excluded.admitted, "
                "rejected = tenant_usage.rejected + excluded.rejected, plan = excluded.plan, "
                "quota_limit = excluded.quota_limit, updated_at = excluded.updated_at", rows)

    def usage(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The latest window of each (tenant, kind): window ids of one kind sort in time."""
        sql = ("SELECT u.tenant_id, u.kind, u.window_id, u.plan, u.quota_limit, u.admitted, "
               "u.rejected, u.updated_at FROM tenant_usage u JOIN (SELECT tenant_id, kind, "
               "MAX(window_id) AS w FROM tenant_usage GROUP BY tenant_id, kind) m "
               "ON u.tenant_id = m.tenant_id AND u.kind = m.kind AND u.window_id = m.w")
        args: tuple[Any, ...] = ()
        if tenant is not None:
            sql += " WHERE u.tenant_id = ?"
            args = (tenant,)
        cols = ("tenant", "window", "window_id", "plan", "limit", "current_usage", "rejected",
                "updated_at")
        return [dict(zip(cols, r)) for r in self._rows(sql, args)]

    def window_usage(self, tenant: str, kind: str, window_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT plan, quota_limit, admitted FROM tenant_usage WHERE "
                          "tenant_id = ? AND kind = ? AND window_id = ?", (tenant, kind, window_id))
        if not rows:
            return None
        plan, limit, admitted = rows[0]
        return {"tenant": tenant, "window": kind, "window_id": window_id, "plan": plan,
                "limit": limit, "current_usage": admitted}

    def prune(self, before: float) -> int:
        """Forget usage and alert rows last touched before `before` (retention)."""
        with self.store.transaction():
            n = self._exec("DELETE FROM tenant_usage WHERE updated_at < ?", (before,))
            n += self._exec("DELETE FROM tenant_alerts WHERE created_at < ?", (before,))
        return n

    def alert_once(self, tenant: str, kind: str, window_id: str, threshold: float,
                   now: float) -> bool:
        return self._exec("INSERT INTO tenant_alerts(tenant_id, kind, window_id, threshold, "
                          "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                          (tenant, kind, window_id, threshold, now)) == 1


# ---------------------------------------------------------------------------------------------
# Rules


def active_override(overrides: list[dict[str, Any]], now: float) -> dict[str, Any] | None:
    """The newest override in force at `now` (effective_date <= now < expires_at)."""
    best = None
    for o in overrides:
        in_force = o["effective_date"] <= now and (o["expires_at"] is None
                                                   or now < o["expires_at"])
        if in_force and (best is None or (o["effective_date"], o["id"])
                         > (best["effective_date"], best["id"])):
            best = o
    return best


def _wire_override(o: dict[str, Any]) -> dict[str, Any]:
    return {**{k: o[k] for k in OVERRIDE_FIELDS if o[k] is not None},
            "expires_at": o["expires_at"]}


class TenantBook:
    """Per control plane process: the ingest hooks and the alert events for the notifier."""

    def __init__(self) -> None:
        self.events: deque[Any] = deque()

    def record(self, store: Store, batch: Batch, now: float) -> None:
        """Add a batch's tenant usage (inside the ingest transaction) and raise 80 % alerts."""
        if not batch.tenants:
            return
        repo = TenantRepo(store)
        rows = []
        for t in batch.tenants:
            for kind, wid, limit in t.windows:
                rows.append((t.tenant, kind, wid, t.plan, limit, t.admitted, t.rejected, now))
        if not rows:
            return
        repo.add_usage(rows)
        touched = {(t.tenant, kind, wid) for t in batch.tenants for kind, wid, _ in t.windows}
        for key in sorted(touched):
            u = repo.window_usage(*key)
            if u is None or u["limit"] <= 0:
                continue
            if u["current_usage"] >= ALERT_THRESHOLD * u["limit"] and repo.alert_once(
                    u["tenant"], u["window"], u["window_id"], ALERT_THRESHOLD, now):
                self._alert(store, u, now)

    def _alert(self, store: Store, u: dict[str, Any], now: float) -> None:
        pct = math.floor(100 * u["current_usage"] / u["limit"])
        doc = {"source": "quota", "tenant": u["tenant"], "window": u["window"],
               "window_id": u["window_id"], "plan": u["plan"], "limit": u["limit"],
               "current_usage": u["current_usage"], "threshold": ALERT_THRESHOLD}
        log.warning("tenant quota threshold passed", extra={"event": "quota_alert", **doc})
        try:
            alert = alerts_mod.raise_alert(
                store, dedup_key=f"quota:{u['tenant']}:{u['window']}:{u['window_id']}:80",
                source="quota", service=f"tenant:{u['tenant']}", severity="ticket",
                title=f"Tenant {u['tenant']!r} used {pct}% of its {u['window']} quota",
                description=f"{u['current_usage']} of {u['limit']} requests in "
                            f"{u['window']} {u['window_id']} (plan {u['plan']})",
                labels={"alertname": "TenantQuota", "tenant": u["tenant"],
                        "window": u["window"]},
                details=doc, now=now)
            self.events.append(alerts_mod.Event("firing", alert))
        except Exception:
            log.exception("quota alert could not be raised")

    def directives(self, store: Store, now: float) -> dict[str, Any]:
        """`{"tenants": {...}}`: every tenant with a plan set here or an override in force."""
        repo = TenantRepo(store)
        plans = repo.plans()
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for o in repo.overrides(not_expired_at=now):
            by_tenant.setdefault(o["tenant"], []).append(o)
        table: dict[str, Any] = {}
        for tenant in set(plans) | set(by_tenant):
            active = active_override(by_tenant.get(tenant, []), now)
            if tenant not in plans and active is None:
                continue
            table[tenant] = {"plan": plans.get(tenant),
                             "override": None if active is None else _wire_override(active)}
        # Without tenants here the key is left out (answers stay as they were for deployments
        # without tenants); a gateway keeps its table then, and drops expired overrides itself.
        return {"tenants": table} if table else {}


def publish_events(app: web.Application) -> None:
    book = app.get(BOOK)
    if book is None or not book.events:
        return
    events = list(book.events)
    book.events.clear()
    publish(app, events)


# ---------------------------------------------------------------------------------------------
# HTTP API


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
    repo = TenantRepo(store)
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
    repo = TenantRepo(store)
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


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise control_app.BadParam("body", "must be a JSON object") from None
    if not isinstance(doc, dict):
        raise control_app.BadParam("body", "must be a JSON object")
    return doc


def _reason(doc: dict[str, Any]) -> str:
    r = doc.get("reason", "")
    if not isinstance(r, str) or len(r) > 2048:
        raise control_app.BadParam("reason", "must be a string of at most 2048 characters")
    return r


@control_app.requires("tenants:write")
async def put_tenant(request: web.Request) -> web.Response:
    tenant = _tenant_id(request)
    doc = await _body(request)
    unknown = set(doc) - {"plan", "reason"}
    if unknown:
        raise control_app.BadParam(min(unknown), "unknown field")
    plan = doc.get("plan")
    if not isinstance(plan, str) or not _NAME.match(plan) or len(plan) > 128:
        raise control_app.BadParam("plan", "must be a plan name (letters, digits, '_', '.', "
                                           "':', '-')")
    reason = _reason(doc)
    actor = request[control_app.PRINCIPAL].name
    now = request.app[control_app.CLOCK].time()
    db = request.app[control_app.DB]

    def run() -> dict[str, Any] | None:
        store = db.store
        with store.transaction():
            TenantRepo(store).set_plan(tenant, plan, actor, now)
            store.audit(actor, "update", f"tenant/{tenant}", reason, {"plan": plan}, at=now)
        return _get_sync(store, tenant, now)

    return control_app.json_response(await db.call(run))


def _when(doc: dict[str, Any], key: str, default: float | None) -> float | None:
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, str):
        return control_app.parse_time(key, v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise control_app.BadParam(key, "must be unix seconds or an RFC 3339 time")
    return float(v)


def parse_override(doc: dict[str, Any], now: float) -> dict[str, Any]:
    unknown = set(doc) - {*OVERRIDE_FIELDS, "effective_date", "expires_at", "reason"}
    if unknown:
        raise control_app.BadParam(min(unknown), "unknown field")
    out: dict[str, Any] = {}
    for key in OVERRIDE_FIELDS:
        v = doc.get(key)
        if v is None:
            continue
        integer = key != "qps"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0 or (integer and not float(v).is_integer()) \
                or (key != "burst" and v == 0):
            what = "an integer" if integer else "a number"
            raise control_app.BadParam(key, f"must be {what} > 0"
                                            f"{' (burst: >= 0)' if key == 'burst' else ''}, "
                                            f"got {v!r}")
        out[key] = int(v) if integer else float(v)
    if not out:
        raise control_app.BadParam("body", f"name at least one of {', '.join(OVERRIDE_FIELDS)}")
    out["effective_date"] = _when(doc, "effective_date", now)
    out["expires_at"] = _when(doc, "expires_at", None)
    if out["expires_at"] is not None and out["expires_at"] <= out["effective_date"]:
        raise control_app.BadParam("expires_at", "must be after effective_date")
    return out


@control_app.requires("tenants:write")
async def post_quotas(request: web.Request) -> web.Response:
    tenant = _tenant_id(request)
    doc = await _body(request)
    now = request.app[control_app.CLOCK].time()
    o = parse_override(doc, now)
    reason = _reason(doc)
    actor = request[control_app.PRINCIPAL].name
    db = request.app[control_app.DB]

    def run() -> tuple[int, dict[str, Any] | None]:
        store = db.store
        with store.transaction():
            oid = TenantRepo(store).add_override(tenant, o, reason, actor, now)
            store.audit(actor, "create", f"tenant/{tenant}/quotas/{oid}", reason,
                        {k: v for k, v in o.items() if v is not None}, at=now)
        return oid, _get_sync(store, tenant, now)

    oid, view = await db.call(run)
    return control_app.json_response({"id": oid, "tenant": tenant, **o,
                              "effective_date_rfc3339": _rfc3339(o["effective_date"]),
                              "pending": o["effective_date"] > now, "view": view}, status=201)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


BOOK = web.AppKey("tenant_book", TenantBook)


def setup(app: web.Application) -> None:
    """Register /v1/tenants, the book the ingest handler feeds, and the alert publisher."""
    app[BOOK] = TenantBook()

    async def publisher(app: web.Application) -> AsyncIterator[None]:
        async def tick() -> None:
            pruned_at = -math.inf
            while True:
                await asyncio.sleep(0.5)
                try:
                    publish_events(app)
                    clock = app[control_app.CLOCK]
                    if clock.monotonic() - pruned_at >= 3600:
                        pruned_at = clock.monotonic()
                        db = app[control_app.DB]
                        await db.call(TenantRepo(db.store).prune,
                                      clock.time() - USAGE_RETENTION_S)
                except Exception:
                    log.exception("tenant housekeeping failed")

        job = asyncio.create_task(tick())
        try:
            yield
        finally:
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            publish_events(app)

    app.cleanup_ctx.append(publisher)
    app.router.add_get("/v1/tenants", list_tenants)
    app.router.add_get("/v1/tenants/{tenant}", get_tenant)
    app.router.add_put("/v1/tenants/{tenant}", put_tenant)
    app.router.add_post("/v1/tenants/{tenant}/quotas", post_quotas)
