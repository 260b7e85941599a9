"""The notification delivery log (`store.deliveries`)."""

from __future__ import annotations

from typing import Any

from gateway.control.store.repository import Repository


class DeliveryRepo(Repository):
    """The notification delivery log."""

    def add_delivery(self, at: float, target: str, alert_id: int | None, event: str,
                     status: str, attempts: int, http_status: int | None, error: str,
                     incident_id: str | None = None) -> int:
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO notification_deliveries(at, target, alert_id, incident_id, event, "
                "status, attempts, http_status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (at, target, alert_id, incident_id, event, status, attempts, http_status,
                 error))
            return int(cur.lastrowid or 0)

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        cols = ("id", "at", "target", "alert_id", "incident_id", "event", "status", "attempts",
                "http_status", "error")
        with self._lock:
            rows = self._db.execute("SELECT " + ", ".join(cols) + " FROM "
                                    "notification_deliveries ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [dict(zip(cols, r)) for r in rows]
