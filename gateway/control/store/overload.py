"""Retries and shed requests per service (the overload protection figures) (`store.overload`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.control.store.repository import Repository, key_sorted


class OverloadRepo(Repository):
    """Retries and shed requests per service (the overload protection figures)."""

    def add_retry_counts(self, rows: Iterable[tuple[int, int, str, str, int]]) -> None:
        """(win_s, bucket_start, upstream, result, count)."""
        self._db.executemany(
            "INSERT INTO retry_counts(win_s, bucket_start, upstream, result, count) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(win_s, upstream, result, bucket_start) "
            "DO UPDATE SET count = retry_counts.count + excluded.count", key_sorted(rows, 0, 2, 3, 1))

    def add_shed_counts(self, rows: Iterable[tuple[int, int, str, str, str, int]]) -> None:
        """(win_s, bucket_start, service, route, reason, count)."""
        self._db.executemany(
            "INSERT INTO shed_counts(win_s, bucket_start, service, route, reason, count) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(win_s, service, route, reason, bucket_start) "
            "DO UPDATE SET count = shed_counts.count + excluded.count",
            key_sorted(rows, 0, 2, 3, 4, 1))

    def overload_counts(self, win_s: int, since: float, until: float, service: str
                        ) -> dict[str, list[dict[str, Any]]]:
        """A service's overload protection in [since, until): retries per upstream and result
        (the upstreams seen serving it), shed/concurrency refusals per route and reason, and
        each gateway's last reported concurrency limit of those upstreams."""
        with self._lock:
            retries = self._db.execute(
                "SELECT retry_counts.upstream, retry_counts.result, SUM(retry_counts.count) "
                "FROM retry_counts JOIN service_upstreams "
                "ON service_upstreams.upstream = retry_counts.upstream "
                "WHERE service_upstreams.service = ? AND retry_counts.win_s = ? "
                "AND retry_counts.bucket_start >= ? AND retry_counts.bucket_start < ? "
                "GROUP BY retry_counts.upstream, retry_counts.result "
                "ORDER BY retry_counts.upstream, retry_counts.result",
                (service, win_s, since, until)).fetchall()
            shed = self._db.execute(
                "SELECT route, reason, SUM(count) FROM shed_counts WHERE service = ? AND "
                "win_s = ? AND bucket_start >= ? AND bucket_start < ? "
                "GROUP BY route, reason ORDER BY route, reason",
                (service, win_s, since, until)).fetchall()
            limits = self._db.execute(
                "SELECT upstream_state.gateway_id, upstream_state.upstream, "
                "upstream_state.concurrency_limit, upstream_state.concurrency_saturated, "
                "upstream_state.reported_at FROM upstream_state JOIN service_upstreams "
                "ON service_upstreams.upstream = upstream_state.upstream "
                "WHERE service_upstreams.service = ? "
                "AND upstream_state.concurrency_limit IS NOT NULL "
                "ORDER BY upstream_state.upstream, upstream_state.gateway_id",
                (service,)).fetchall()
        return {
            "retries": [{"upstream": r[0], "result": r[1], "count": int(r[2])} for r in retries],
            "shed": [{"route": r[0], "reason": r[1], "count": int(r[2])} for r in shed],
            "limits": [{"gateway_id": r[0], "upstream": r[1], "limit": int(r[2]),
                        "saturated": bool(r[3]), "reported_at": r[4]} for r in limits],
        }
