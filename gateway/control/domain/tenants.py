"""Tenants in the control plane: runtime plans and overrides, usage per quota window, 80 % alerts,
the tenant table sent to gateways (the `/v1/tenants` API is api/tenants.py).

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

import logging
import math
import re
from collections import deque
from typing import TYPE_CHECKING, Any

from gateway.control.domain import alerts as alerts_mod
from gateway.control.domain.ingest import Batch

if TYPE_CHECKING:   # the store is handed in; domain code never opens or imports it
    from gateway.control.store import Store

log = logging.getLogger("gateway.control.tenants")

ALERT_THRESHOLD = 0.8
USAGE_RETENTION_S = 400 * 86400     # a year of monthly windows, and then some
MAX_ID = 256
NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
OVERRIDE_FIELDS = ("qps", "burst", "daily_quota", "monthly_quota")


# ---------------------------------------------------------------------------------------------
# SQL: a repository of its own on the store's connection (tables: store.py, tenants step)


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
        repo = store.tenants
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
        repo = store.tenants
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
