"""What the gateways report of themselves and their upstreams: gateways, breaker states and
transitions, service-upstream links, concurrency limits, report intervals (`store.fleet`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.control.store.repository import Repository, key_sorted


class FleetRepo(Repository):
    """What the gateways report of themselves and their upstreams: gateways, breaker states and
    transitions, service-upstream links, concurrency limits, report intervals."""

    def report_upstreams(self, rows: Iterable[tuple[str, str, str, int, int, int | None, int,
                                                    float]]) -> None:
        """(gateway_id, upstream, breaker_state, pool_in_use_max, pool_max, concurrency_limit,
        concurrency_saturated 0|1, reported_at); an older (late) report never overwrites a
        newer one."""
        self._db.executemany(
            "INSERT INTO upstream_state(gateway_id, upstream, breaker_state, pool_in_use_max, "
            "pool_max, concurrency_limit, concurrency_saturated, reported_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(gateway_id, upstream) DO UPDATE SET "
            "breaker_state = excluded.breaker_state, pool_in_use_max = excluded.pool_in_use_max, "
            "pool_max = excluded.pool_max, concurrency_limit = excluded.concurrency_limit, "
            "concurrency_saturated = excluded.concurrency_saturated, "
            "reported_at = excluded.reported_at "
            "WHERE excluded.reported_at >= upstream_state.reported_at", key_sorted(rows, 0, 1))

    def link_service_upstreams(self, rows: Iterable[tuple[str, str, float]]) -> None:
        self._db.executemany(
            "INSERT INTO service_upstreams(service, upstream, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(service, upstream) DO UPDATE SET "
            "last_seen = max(service_upstreams.last_seen, excluded.last_seen)", key_sorted(rows, 0, 1))

    def add_transitions(self, rows: Iterable[tuple[str, str, str, str, float, str]]) -> None:
        self._db.executemany(
            "INSERT INTO breaker_transitions(gateway_id, upstream, from_state, to_state, at, "
            "reason) VALUES (?, ?, ?, ?, ?, ?)", rows)

    def report_gateways(self, rows: Iterable[tuple[str, int, float, float, float, int, int,
                                                   float]]) -> None:
        """(gateway_id, seq, seen, cpu_percent, loop_lag_ms, inflight_max, rss_bytes,
        interval_s) per batch: a gateway's row follows its latest batch (a late batch changes
        nothing), with that batch's ship interval (the silent-gateway check's yardstick)."""
        self._db.executemany(
            "INSERT INTO gateways(gateway_id, last_seq, last_seen, cpu_percent, loop_lag_ms, "
            "inflight_max, rss_bytes, interval_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(gateway_id) DO UPDATE SET last_seq = excluded.last_seq, "
            "last_seen = excluded.last_seen, cpu_percent = excluded.cpu_percent, "
            "loop_lag_ms = excluded.loop_lag_ms, inflight_max = excluded.inflight_max, "
            "rss_bytes = excluded.rss_bytes, interval_s = excluded.interval_s "
            "WHERE excluded.last_seen >= gateways.last_seen", key_sorted(rows, 0))

    def upstream_states(self) -> list[dict[str, Any]]:
        cols = ("gateway_id", "upstream", "breaker_state", "pool_in_use_max", "pool_max",
                "reported_at")
        with self._lock:
            rows = self._db.execute("SELECT " + ", ".join(cols) + " FROM upstream_state "
                                    "ORDER BY upstream, gateway_id").fetchall()
        return [dict(zip(cols, r)) for r in rows]

    def service_upstreams(self) -> list[tuple[str, str]]:
        with self._lock:
            return self._db.execute("SELECT service, upstream FROM service_upstreams "
                                    "ORDER BY service, upstream").fetchall()

    def breaker_transitions(self, since: float, limit: int) -> list[dict[str, Any]]:
        cols = ("gateway_id", "upstream", "from_state", "to_state", "at", "reason")
        with self._lock:
            rows = self._db.execute(
                "SELECT " + ", ".join(cols) + " FROM breaker_transitions WHERE at >= ? "
                "ORDER BY at DESC, id DESC LIMIT ?", (since, limit)).fetchall()
        return [dict(zip(cols, r)) for r in rows]

    def gateways(self) -> list[dict[str, Any]]:
        cols = ("gateway_id", "last_seq", "last_seen", "cpu_percent", "loop_lag_ms",
                "inflight_max", "rss_bytes")
        with self._lock:
            rows = self._db.execute("SELECT " + ", ".join(cols) + " FROM gateways "
                                    "ORDER BY gateway_id").fetchall()
        return [dict(zip(cols, r)) for r in rows]

    def delete_reports_before(self, cutoff: float) -> int:
        """Stale per-gateway reports: breaker transitions, upstream states, gateways."""
        with self.transaction():
            n = self._db.execute("DELETE FROM breaker_transitions WHERE at < ?",
                                 (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM upstream_state WHERE reported_at < ?",
                                  (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM gateways WHERE last_seen < ?", (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM service_upstreams WHERE last_seen < ?",
                                  (cutoff,)).rowcount
            return int(n)

    def breaker_openings_after(self, after_id: int, upstreams: Iterable[str]
                               ) -> list[dict[str, Any]]:
        """Transitions to 'open' with id > after_id for these upstreams, oldest first."""
        ups = list(upstreams)
        if not ups:
            return []
        cols = ("id", "gateway_id", "upstream", "from_state", "to_state", "at", "reason")
        with self._lock:
            rows = self._db.execute(
                "SELECT " + ", ".join(cols) + " FROM breaker_transitions WHERE id > ? AND "
                "to_state = 'open' AND upstream IN (" + ", ".join("?" * len(ups)) + ") "
                "ORDER BY id", (after_id, *ups)).fetchall()
        return [dict(zip(cols, r)) for r in rows]

    def last_transition_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM breaker_transitions").fetchone()
        return int(row[0] or 0)

    def gateway_intervals(self) -> list[tuple[str, float, float | None]]:
        """(gateway_id, last_seen, interval_s) of every reporting gateway."""
        with self._lock:
            return [(r[0], float(r[1]), None if r[2] is None else float(r[2]))
                    for r in self._db.execute("SELECT gateway_id, last_seen, interval_s "
                                              "FROM gateways ORDER BY gateway_id")]
