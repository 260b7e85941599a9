"""Alerts (SLO burn rates, budgets, quotas, by hand) (`store.alerts`)."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.control.store.repository import Repository, and_where


class AlertRepo(Repository):
    """Alerts (SLO burn rates, budgets, quotas, by hand)."""

    _SLO_ALERT_COLS = ("id", "dedup_key", "source", "slo_id", "service", "severity", "status",
                       "title", "description", "labels", "details", "fingerprint",
                       "started_at", "updated_at", "acknowledged_at", "acknowledged_by",
                       "resolved_at", "incident_id")
    _SLO_ALERT_JSON = ("labels", "details")

    def _slo_alert(self, row: tuple[Any, ...]) -> dict[str, Any]:
        doc = dict(zip(self._SLO_ALERT_COLS, row))
        for key in self._SLO_ALERT_JSON:
            doc[key] = None if doc[key] is None else orjson.loads(doc[key])
        return doc

    def insert_slo_alert(self, fields: dict[str, Any]) -> int:
        cols = [c for c in self._SLO_ALERT_COLS if c != "id" and c in fields]
        vals = [orjson.dumps(fields[c]).decode() if c in self._SLO_ALERT_JSON else fields[c]
                for c in cols]
        with self.transaction():
            cur = self._db.execute(f"INSERT INTO alerts({', '.join(cols)}) "
                                   f"VALUES ({', '.join('?' * len(cols))})", vals)
            return int(cur.lastrowid or 0)

    def update_slo_alert(self, alert_id: int, fields: dict[str, Any]) -> bool:
        return self._update_row("alerts", self._SLO_ALERT_COLS, self._SLO_ALERT_JSON,
                                alert_id, fields)

    def slo_alert(self, alert_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT " + ", ".join(self._SLO_ALERT_COLS) +
                                   " FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else self._slo_alert(row)

    def open_slo_alert(self, dedup_key: str) -> dict[str, Any] | None:
        """The open (firing or acknowledged) alert with this dedup key, if any."""
        with self._lock:
            row = self._db.execute("SELECT " + ", ".join(self._SLO_ALERT_COLS) +
                                   " FROM alerts WHERE dedup_key = ? AND status != 'resolved' "
                                   "ORDER BY id DESC LIMIT 1", (dedup_key,)).fetchone()
        return None if row is None else self._slo_alert(row)

    def last_resolved_at(self, dedup_key: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(resolved_at) FROM alerts WHERE dedup_key = ?",
                                   (dedup_key,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def slo_alerts(self, *, status: str | None = None, service: str | None = None,
                   open_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        sql = "SELECT " + ", ".join(self._SLO_ALERT_COLS) + " FROM alerts WHERE 1 = 1"
        args: list[Any] = []
        if open_only:
            sql += " AND status != 'resolved'"
        sql = and_where(sql, args, ("status = ?", status), ("service = ?", service))
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [self._slo_alert(r) for r in rows]

    def alert_ids_of_incident(self, incident_id: str) -> list[int]:
        with self._lock:
            return [int(r[0]) for r in self._db.execute(
                "SELECT id FROM alerts WHERE incident_id = ? ORDER BY id", (incident_id,))]

    def last_started_at(self, dedup_key: str) -> float | None:
        """When the newest alert with this dedup key was raised."""
        with self._lock:
            row = self._db.execute("SELECT MAX(started_at) FROM alerts WHERE dedup_key = ?",
                                   (dedup_key,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def any_alert(self, dedup_key: str) -> bool:
        """Whether an alert (open or resolved) with this dedup key was ever raised."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM alerts WHERE dedup_key = ? LIMIT 1",
                                    (dedup_key,)).fetchone() is not None

    def open_alerts_with_prefix(self, prefix: str) -> list[dict[str, Any]]:
        """Open alerts whose dedup key starts with `prefix`, oldest first."""
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._lock:
            rows = self._db.execute("SELECT " + ", ".join(self._SLO_ALERT_COLS) +
                                    " FROM alerts WHERE dedup_key LIKE ? ESCAPE '\\' AND "
                                    "status != 'resolved' ORDER BY id", (like,)).fetchall()
        return [self._slo_alert(r) for r in rows]
