"""The audit log (`store.audit`)."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.control.store.repository import Repository, and_where


class AuditRepo(Repository):
    """The audit log."""

    def record(self, actor: str, action: str, target: str, reason: str = "",
                details: dict[str, Any] | None = None, *, at: float | None = None) -> int:
        """Record a change (create/update/delete/ack/resolve/reset/...): who, what, why."""
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO audit(at, actor, action, target, reason, details) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (self.clock.time() if at is None else at, actor, action, target, reason or "",
                 orjson.dumps(details or {}).decode()))
            return int(cur.lastrowid or 0)

    def entries(self, *, since: float | None = None, actor: str | None = None,
                action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        sql = "SELECT id, at, actor, action, target, reason, details FROM audit WHERE 1 = 1"
        args: list[Any] = []
        sql = and_where(sql, args, ("at >= ?", since), ("actor = ?", actor), ("action = ?", action))
        sql += " ORDER BY at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [{"id": r[0], "at": r[1], "actor": r[2], "action": r[3], "target": r[4],
                 "reason": r[5], "details": orjson.loads(r[6])} for r in rows]
