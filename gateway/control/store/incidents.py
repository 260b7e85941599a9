"""Incidents, their timelines and action items (`store.incidents`)."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.control.store.repository import Repository, and_where


class IncidentRepo(Repository):
    """Incidents, their timelines and action items."""

    _INCIDENT_COLS = ("id", "title", "description", "severity", "affected_service", "cause",
                      "context", "status", "escalation_level", "created_at", "created_by",
                      "acknowledged_at", "mitigated_at", "resolved_at", "resolution_notes",
                      "root_cause", "postmortem", "breaker_cursor", "updated_at",
                      "assigned_to")
    _INCIDENT_JSON = ("context", "postmortem")
    _ACTION_ITEM_COLS = ("id", "incident_id", "description", "owner", "due_at", "priority",
                         "status", "created_at", "created_by", "updated_at", "completed_at",
                         "overdue_alert_id")

    def _incident(self, row: tuple[Any, ...]) -> dict[str, Any]:
        doc = dict(zip(self._INCIDENT_COLS, row))
        for key in self._INCIDENT_JSON:
            doc[key] = None if doc[key] is None else orjson.loads(doc[key])
        return doc

    def insert_incident(self, year: int, fields: dict[str, Any]) -> str:
        """Allocate INC-YYYY-NNN (per-year sequence) and insert; return the id."""
        with self.transaction():
            self._db.execute("INSERT INTO incident_counters(year, last) VALUES (?, 1) "
                             "ON CONFLICT(year) DO UPDATE SET last = incident_counters.last + 1",
                             (year,))
            n = int(self._db.execute("SELECT last FROM incident_counters WHERE year = ?",
                                     (year,)).fetchone()[0])
            incident_id = f"INC-{year:04d}-{n:03d}"
            row = dict(fields, id=incident_id)
            cols = [c for c in self._INCIDENT_COLS if c in row]
            vals = [None if c in self._INCIDENT_JSON and row[c] is None else
                    orjson.dumps(row[c]).decode() if c in self._INCIDENT_JSON else row[c]
                    for c in cols]
            self._db.execute(f"INSERT INTO incidents({', '.join(cols)}) "
                             f"VALUES ({', '.join('?' * len(cols))})", vals)
        return incident_id

    def update_incident(self, incident_id: str, fields: dict[str, Any]) -> bool:
        return self._update_row("incidents", self._INCIDENT_COLS, self._INCIDENT_JSON,
                                incident_id, fields)

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT " + ", ".join(self._INCIDENT_COLS) +
                                   " FROM incidents WHERE id = ?", (incident_id,)).fetchone()
        return None if row is None else self._incident(row)

    def query(self, *, active: bool | None = None, status: str | None = None,
                service: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first. active=True: not resolved."""
        sql = "SELECT " + ", ".join(self._INCIDENT_COLS) + " FROM incidents WHERE 1 = 1"
        args: list[Any] = []
        if active is True:
            sql += " AND status != 'resolved'"
        elif active is False:
            sql += " AND status = 'resolved'"
        sql = and_where(sql, args, ("status = ?", status), ("affected_service = ?", service))
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [self._incident(r) for r in rows]

    def open_incident_for(self, service: str, cause: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT " + ", ".join(self._INCIDENT_COLS) +
                                   " FROM incidents WHERE affected_service = ? AND cause = ? "
                                   "AND status != 'resolved' ORDER BY created_at LIMIT 1",
                                   (service, cause)).fetchone()
        return None if row is None else self._incident(row)

    def add_timeline(self, incident_id: str, at: float, kind: str, actor: str, text: str,
                     data: dict[str, Any] | None = None) -> int:
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO incident_timeline(incident_id, at, kind, actor, text, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (incident_id, at, kind, actor, text, orjson.dumps(data or {}).decode()))
            return int(cur.lastrowid or 0)

    def timeline(self, incident_id: str) -> list[dict[str, Any]]:
        """Oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT at, kind, actor, text, data FROM incident_timeline "
                                    "WHERE incident_id = ? ORDER BY at, id",
                                    (incident_id,)).fetchall()
        return [{"at": r[0], "kind": r[1], "actor": r[2], "text": r[3],
                 "data": orjson.loads(r[4])} for r in rows]

    def insert_action_item(self, fields: dict[str, Any]) -> int:
        cols = [c for c in self._ACTION_ITEM_COLS if c != "id" and c in fields]
        with self.transaction():
            cur = self._db.execute(f"INSERT INTO action_items({', '.join(cols)}) "
                                   f"VALUES ({', '.join('?' * len(cols))})",
                                   [fields[c] for c in cols])
            return int(cur.lastrowid or 0)

    def update_action_item(self, item_id: int, fields: dict[str, Any]) -> bool:
        return self._update_row("action_items", self._ACTION_ITEM_COLS, (), item_id, fields)

    def action_item(self, item_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT " + ", ".join(self._ACTION_ITEM_COLS) +
                                   " FROM action_items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else dict(zip(self._ACTION_ITEM_COLS, row))

    def action_items(self, *, incident_id: str | None = None, status: str | None = None,
                     due_before: float | None = None, limit: int = 1000
                     ) -> list[dict[str, Any]]:
        """By due date, earliest first."""
        sql = "SELECT " + ", ".join(self._ACTION_ITEM_COLS) + " FROM action_items WHERE 1 = 1"
        args: list[Any] = []
        sql = and_where(sql, args, ("incident_id = ?", incident_id), ("status = ?", status),
                   ("due_at < ?", due_before))
        sql += " ORDER BY due_at, id LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(self._ACTION_ITEM_COLS, r)) for r in rows]
