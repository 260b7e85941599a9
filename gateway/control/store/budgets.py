"""Cost budgets, their overrides and the once-per-period alert ledger (`store.budgets`)."""

from __future__ import annotations

from typing import Any

from gateway.control.store.repository import Repository


class BudgetRepo(Repository):
    """Cost budgets, their overrides and the once-per-period alert ledger."""

    _BUDGET_COLS = ("id", "name", "spec", "override_cents", "override_expires_at",
                    "override_reason", "source", "config_hash", "created_at", "updated_at")
    _ALERT_COLS = ("id", "budget_id", "budget_name", "service", "period_start", "period_end",
                   "kind", "threshold", "severity", "spend_micros", "amount_micros", "created_at")

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT " + ", ".join(self._BUDGET_COLS) +
                                    " FROM budgets ORDER BY id").fetchall()
        return [dict(zip(self._BUDGET_COLS, r)) for r in rows]

    def budget(self, budget_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT " + ", ".join(self._BUDGET_COLS) +
                                   " FROM budgets WHERE id = ?", (budget_id,)).fetchone()
        return None if row is None else dict(zip(self._BUDGET_COLS, row))

    def budget_id_by_name(self, name: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM budgets WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def insert_budget(self, name: str, spec: str, source: str, config_hash: str | None,
                      now: float) -> int | None:
        """The new id, or None when the name is taken."""
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO budgets(name, spec, source, config_hash, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO NOTHING",
                (name, spec, source, config_hash, now, now))
            return int(cur.lastrowid) if cur.rowcount == 1 and cur.lastrowid else None

    def update_budget(self, budget_id: int, name: str, spec: str, now: float, *,
                      config_hash: str | None = None) -> bool:
        """False when the id is unknown; raises sqlite3.IntegrityError when the name is taken."""
        with self.transaction():
            sql = "UPDATE budgets SET name = ?, spec = ?, updated_at = ?"
            args: list[Any] = [name, spec, now]
            if config_hash is not None:
                sql += ", config_hash = ?"
                args.append(config_hash)
            return self._db.execute(sql + " WHERE id = ?", (*args, budget_id)).rowcount == 1

    def set_budget_override(self, budget_id: int, cents: int | None, expires_at: float | None,
                            reason: str | None, now: float) -> bool:
        with self.transaction():
            return self._db.execute(
                "UPDATE budgets SET override_cents = ?, override_expires_at = ?, "
                "override_reason = ?, updated_at = ? WHERE id = ?",
                (cents, expires_at, reason, now, budget_id)).rowcount == 1

    def delete_budget(self, budget_id: int) -> bool:
        with self.transaction():
            return self._db.execute("DELETE FROM budgets WHERE id = ?",
                                    (budget_id,)).rowcount == 1

    def add_budget_alert(self, budget_id: int, budget_name: str, service: str,
                         period_start: int, period_end: int, kind: str, threshold: str,
                         severity: str, spend_micros: int, amount_micros: int,
                         now: float) -> int | None:
        """The new alert's id, or None when this (budget, period, kind, threshold) alerted
        already: each threshold alerts once per budget per period, across restarts."""
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO budget_alerts(budget_id, budget_name, service, period_start, "
                "period_end, kind, threshold, severity, spend_micros, amount_micros, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(budget_id, period_start, kind, threshold) DO NOTHING",
                (budget_id, budget_name, service, period_start, period_end, kind, threshold,
                 severity, spend_micros, amount_micros, now))
            return int(cur.lastrowid) if cur.rowcount == 1 and cur.lastrowid else None

    def budget_alerts(self, budget_id: int | None = None, limit: int = 100
                      ) -> list[dict[str, Any]]:
        """Newest first."""
        sql = "SELECT " + ", ".join(self._ALERT_COLS) + " FROM budget_alerts"
        args: list[Any] = []
        if budget_id is not None:
            sql += " WHERE budget_id = ?"
            args.append(budget_id)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(self._ALERT_COLS, r)) for r in rows]
