"""Metered usage and imported charges (`store.costs`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.control.store.repository import Repository, and_where, key_sorted


class CostRepo(Repository):
    """Metered usage and imported charges."""

    def add_cost_usage(self, rows: Iterable[tuple[str, int, str, str, str, str, int]]) -> None:
        """(service, bucket_start, route, cost_type, unit, price, quantity): quantities add up."""
        self._db.executemany(
            "INSERT INTO cost_usage(service, bucket_start, route, cost_type, unit, price, "
            "quantity) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(service, bucket_start, route, cost_type, unit, price) "
            "DO UPDATE SET quantity = cost_usage.quantity + excluded.quantity",
            key_sorted(rows, 0, 1, 2, 3, 4, 5))

    def note_cost_services(self, rows: Iterable[tuple[str, int]]) -> None:
        """(service, seen_at): remember the earliest time each service was metered."""
        self._db.executemany(
            "INSERT INTO cost_services(service, first_seen) VALUES (?, ?) "
            "ON CONFLICT(service) DO UPDATE SET "
            "first_seen = min(cost_services.first_seen, excluded.first_seen)", key_sorted(rows, 0))

    def cost_services(self) -> dict[str, int]:
        with self._lock:
            return {r[0]: int(r[1]) for r in
                    self._db.execute("SELECT service, first_seen FROM cost_services")}

    def cost_usage(self, since: int, until: int, service: str | None
                   ) -> list[tuple[str, int, str, str, str, str, int]]:
        """Usage rows with since <= bucket_start < until (one service, or all)."""
        sql = ("SELECT service, bucket_start, route, cost_type, unit, price, quantity "
               "FROM cost_usage WHERE bucket_start >= ? AND bucket_start < ?")
        args: list[Any] = [since, until]
        sql = and_where(sql, args, ("service = ?", service))
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add_charges(self, rows: Iterable[tuple[str | None, str, str, str, int, int, int, str,
                                               float, str]]) -> int:
        """(charge_key, service, cost_type, category, period_start, period_end, micros,
        description, imported_at, actor); a charge_key seen before is skipped. Returns how many
        were new."""
        n = 0
        with self.transaction():
            for row in rows:
                n += self._db.execute(
                    "INSERT INTO cost_charges(charge_key, service, cost_type, category, "
                    "period_start, period_end, micros, description, imported_at, actor) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(charge_key) DO NOTHING",
                    row).rowcount
        return n

    def charges(self, since: int, until: int, service: str | None
                ) -> list[tuple[str, str, int, int, int]]:
        """(service, cost_type, period_start, period_end, micros) of the charges that accrue
        anything in [since, until)."""
        sql = ("SELECT service, cost_type, period_start, period_end, micros FROM cost_charges "
               "WHERE period_start < ? AND (period_end > ? OR period_start >= ?)")
        args: list[Any] = [until, since, since]
        sql = and_where(sql, args, ("service = ?", service))
        with self._lock:
            return self._db.execute(sql + " ORDER BY id", args).fetchall()
