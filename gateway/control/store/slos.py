"""SLO definitions and their history (`store.slos`)."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.control.store.repository import Repository, and_where


class SloRepo(Repository):
    """SLO definitions and their history."""

    _HISTORY_COLS = ("slo_id", "kind", "period_start", "period_end", "service", "sli",
                     "objective", "total", "bad", "attainment", "budget_remaining", "met",
                     "closed_at")

    def slo_docs(self) -> list[dict[str, Any]]:
        """Every stored SLO: {id, service, doc, source, created_at, updated_at}, by id."""
        cols = ("id", "service", "doc", "source", "created_at", "updated_at")
        with self._lock:
            rows = self._db.execute("SELECT " + ", ".join(cols) + " FROM slos ORDER BY id"
                                    ).fetchall()
        return [dict(zip(cols, r), doc=orjson.loads(r[2])) for r in rows]

    def slo_doc(self, slo_id: str) -> dict[str, Any] | None:
        return next((r for r in self.slo_docs() if r["id"] == slo_id), None)

    def insert_slo(self, slo_id: str, service: str, doc: dict[str, Any], source: str,
                   now: float) -> bool:
        """False when the id is taken."""
        with self.transaction():
            return self._db.execute(
                "INSERT INTO slos(id, service, doc, source, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                (slo_id, service, orjson.dumps(doc).decode(), source, now, now)).rowcount == 1

    def update_slo(self, slo_id: str, service: str, doc: dict[str, Any], now: float) -> bool:
        with self.transaction():
            return self._db.execute(
                "UPDATE slos SET service = ?, doc = ?, updated_at = ? WHERE id = ?",
                (service, orjson.dumps(doc).decode(), now, slo_id)).rowcount == 1

    def delete_slo(self, slo_id: str) -> bool:
        with self.transaction():
            return self._db.execute("DELETE FROM slos WHERE id = ?", (slo_id,)).rowcount == 1

    def sync_config_slos(self, docs: dict[str, tuple[str, dict[str, Any]]], now: float
                         ) -> dict[str, list[str]]:
        """Make the `source = 'config'` SLOs exactly `docs` (id -> (service, doc)); a config SLO
        replaces an API one of the same id. Returns the ids added, changed and removed."""
        out: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        with self.transaction():
            current = {r[0]: (r[1], r[2]) for r in self._db.execute(
                "SELECT id, doc, source FROM slos")}
            for slo_id, (service, doc) in docs.items():
                text = orjson.dumps(doc).decode()
                if slo_id not in current:
                    self._db.execute("INSERT INTO slos(id, service, doc, source, created_at, "
                                     "updated_at) VALUES (?, ?, ?, 'config', ?, ?)",
                                     (slo_id, service, text, now, now))
                    out["added"].append(slo_id)
                elif current[slo_id] != (text, "config"):
                    self._db.execute("UPDATE slos SET service = ?, doc = ?, source = 'config', "
                                     "updated_at = ? WHERE id = ?", (service, text, now, slo_id))
                    out["changed"].append(slo_id)
            for slo_id, (_doc, source) in current.items():
                if source == "config" and slo_id not in docs:
                    self._db.execute("DELETE FROM slos WHERE id = ?", (slo_id,))
                    out["removed"].append(slo_id)
        return out

    def add_slo_history(self, row: dict[str, Any]) -> bool:
        """Record a closed period once (a second write of the same period is ignored)."""
        with self.transaction():
            return self._db.execute(
                f"INSERT INTO slo_history({', '.join(self._HISTORY_COLS)}) "
                f"VALUES ({', '.join('?' * len(self._HISTORY_COLS))}) ON CONFLICT DO NOTHING",
                [row[c] for c in self._HISTORY_COLS]).rowcount == 1

    def last_slo_history(self, slo_id: str, kind: str) -> float | None:
        """The end of the last recorded period of this kind."""
        with self._lock:
            row = self._db.execute("SELECT MAX(period_end) FROM slo_history WHERE slo_id = ? "
                                   "AND kind = ?", (slo_id, kind)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def slo_history(self, *, slo_id: str | None = None, service: str | None = None,
                    kind: str | None = None, since: float | None = None,
                    until: float | None = None) -> list[dict[str, Any]]:
        """Oldest first; `since`/`until` bound period_end."""
        sql = "SELECT " + ", ".join(self._HISTORY_COLS) + " FROM slo_history WHERE 1 = 1"
        args: list[Any] = []
        sql = and_where(sql, args, ("slo_id = ?", slo_id), ("service = ?", service),
                   ("kind = ?", kind), ("period_end > ?", since), ("period_end <= ?", until))
        sql += " ORDER BY period_end, slo_id, kind"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(self._HISTORY_COLS, r), met=bool(r[11])) for r in rows]
