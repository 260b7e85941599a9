"""The tenants aggregate: plans, overrides, usage per quota window and the 80 % alert ledger
(`store.tenants`; called on the database thread)."""

from __future__ import annotations

from typing import Any

from gateway.control.store.repository import Repository


class TenantRepo(Repository):
    """Tenant rows on the control plane's Store (called on the database thread)."""

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return int(self._db.execute(sql, args).rowcount)

    def set_plan(self, tenant: str, plan: str, actor: str, now: float) -> None:
        self._exec("INSERT INTO tenants(tenant_id, plan, updated_at, actor) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(tenant_id) DO UPDATE SET plan = excluded.plan, "
                   "updated_at = excluded.updated_at, actor = excluded.actor",
                   (tenant, plan, now, actor))

    def plans(self) -> dict[str, str]:
        return dict(self._rows("SELECT tenant_id, plan FROM tenants"))  # type: ignore[arg-type]

    def add_override(self, tenant: str, o: dict[str, Any], reason: str, actor: str,
                     now: float) -> int:
        with self._lock:
            cur = self._db.execute(
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
        with self._lock:
            self._db.executemany(
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
        with self.transaction():
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
