"""Ingested batches, rollup buckets, queued histograms (compaction), limit counts, retention of them
(`store.rollups`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gateway.control.store.repository import Repository, and_where, key_sorted

_COMPACTION_LOCK = 0x6761_7465_0002

_SIGNAL_COLUMNS = ("bucket_start", "service", "route", "request_count", "error_count_4xx",
                   "error_count_5xx", "rate_limited", "bytes_in", "bytes_out", "p50_us",
                   "p95_us", "p99_us", "cpu_percent", "loop_lag_ms", "inflight_max", "rss_bytes",
                   "local_count", "local_4xx", "local_5xx")

# A row for `add_buckets`: win_s, bucket_start, service, route, request_count, error_count_4xx,
# error_count_5xx, rate_limited, bytes_in, bytes_out, cpu_percent, loop_lag_ms, inflight_max,
# rss_bytes
BucketRow = tuple[int, int, str, str, int, int, int, int, int, int, float, float, int, int]
HistKey = tuple[int, int, str, str]   # win_s, bucket_start, service, route
# A row for `add_minutes`: bucket_start of the 1m bucket, service, route, then as BucketRow
MinuteRow = tuple[int, str, str, int, int, int, int, int, int, float, float, int, int]
# A bucket upsert adds the counts and keeps the saturation maxima
_ADD_COUNTS = (
    "request_count = buckets.request_count + excluded.request_count, "
    "error_count_4xx = buckets.error_count_4xx + excluded.error_count_4xx, "
    "error_count_5xx = buckets.error_count_5xx + excluded.error_count_5xx, "
    "rate_limited = buckets.rate_limited + excluded.rate_limited, "
    "bytes_in = buckets.bytes_in + excluded.bytes_in, "
    "bytes_out = buckets.bytes_out + excluded.bytes_out, "
    "cpu_percent = max(buckets.cpu_percent, excluded.cpu_percent), "
    "loop_lag_ms = max(buckets.loop_lag_ms, excluded.loop_lag_ms), "
    "inflight_max = max(buckets.inflight_max, excluded.inflight_max), "
    "rss_bytes = max(buckets.rss_bytes, excluded.rss_bytes)"
)
_SPREAD_ROWS = 1_000       # minutes per statement (14 parameters each: within both engines' limits)


class RollupRepo(Repository):
    """Ingested batches, rollup buckets, queued histograms (compaction), limit counts, retention
    of them."""

    def insert_batches(self, rows: list[tuple[str, str, int, float, float, float]]) -> set[str]:
        """Record batch ids (batch_id, gateway_id, seq, interval_start, interval_end,
        received_at) in one statement per 100; the ids that were new (the others were ingested
        before, here or on another replica). The ids must be distinct."""
        new: set[str] = set()
        for i in range(0, len(rows), 100):
            part = rows[i:i + 100]
            sql = ("INSERT INTO batches(batch_id, gateway_id, seq, interval_start, interval_end, "
                   "received_at) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(part)) +
                   " ON CONFLICT(batch_id) DO NOTHING RETURNING batch_id")
            new.update(r[0] for r in self._db.execute(sql, [v for row in part for v in row]))
        return new

    def add_buckets(self, rows: Iterable[BucketRow]) -> None:
        self._db.executemany(
            "INSERT INTO buckets(win_s, bucket_start, service, route, request_count, "
            "error_count_4xx, error_count_5xx, rate_limited, bytes_in, bytes_out, cpu_percent, "
            "loop_lag_ms, inflight_max, rss_bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(win_s, service, route, bucket_start) DO UPDATE SET " + _ADD_COUNTS,
            key_sorted(rows, 0, 2, 3, 1))

    def add_minutes(self, rows: Sequence[MinuteRow], windows: Sequence[int]) -> None:
        """Add per-minute sums (bucket_start of the 1m bucket, service, route, request_count,
        error_count_4xx, error_count_5xx, rate_limited, bytes_in, bytes_out, cpu_percent,
        loop_lag_ms, inflight_max, rss_bytes) to the buckets of every window (multiples of a
        minute) holding each minute, counts added and saturation maxima kept.

        The database spreads the minutes over the windows and sums the minutes that share a
        larger bucket (GROUP BY), so a group of batches sends each minute's row once, not once
        per window: a quarter of the parameters to encode and send."""
        self._spread_upsert(
            rows, windows, "request_count, error_count_4xx, error_count_5xx, rate_limited, "
            "bytes_in, bytes_out, cpu_percent, loop_lag_ms, inflight_max, rss_bytes",
            "SUM(m.column4), SUM(m.column5), SUM(m.column6), SUM(m.column7), SUM(m.column8), "
            "SUM(m.column9), MAX(m.column10), MAX(m.column11), MAX(m.column12), "
            "MAX(m.column13)",
            _ADD_COUNTS)

    def add_local_minutes(self, rows: Sequence[tuple[int, str, str, int, int, int]],
                          windows: Sequence[int]) -> None:
        """(bucket_start of the 1m bucket, service, route, local_count, local_4xx, local_5xx):
        the part of the minutes' counts the gateways answered themselves, added as
        `add_minutes` adds (call after it)."""
        self._spread_upsert(
            rows, windows, "local_count, local_4xx, local_5xx",
            "SUM(m.column4), SUM(m.column5), SUM(m.column6)",
            "local_count = buckets.local_count + excluded.local_count, "
            "local_4xx = buckets.local_4xx + excluded.local_4xx, "
            "local_5xx = buckets.local_5xx + excluded.local_5xx")

    def _spread_upsert(self, rows: Sequence[tuple[Any, ...]], windows: Sequence[int],
                       columns: str, sums: str, update: str) -> None:
        if not rows:
            return
        width = len(rows[0])
        wins = ", ".join(f"({int(w)})" for w in windows)
        rows = key_sorted(rows, 1, 2, 0)
        for i in range(0, len(rows), _SPREAD_ROWS):
            part = rows[i:i + _SPREAD_ROWS]
            values = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(part))
            # WHERE true: SQLite's parser needs it before ON CONFLICT in an INSERT ... SELECT;
            # ORDER BY: the key order every replica locks the rows in (see key_sorted)
            self._write(
                f"INSERT INTO buckets(win_s, bucket_start, service, route, {columns}) "
                f"SELECT w.column1, (m.column1 / w.column1) * w.column1, m.column2, m.column3, "
                f"{sums} FROM (VALUES {values}) AS m CROSS JOIN (VALUES {wins}) AS w "
                "WHERE true GROUP BY 1, 2, 3, 4 ORDER BY 1, 3, 4, 2 "
                "ON CONFLICT(win_s, service, route, bucket_start) DO UPDATE SET " + update,
                [v for row in part for v in row])

    def add_pending_hists(self, rows: Iterable[tuple[int, str, str, bytes]]) -> None:
        """(bucket_start of the 1m bucket, service, route, histogram payload) rows."""
        self._db.executemany("INSERT INTO pending_hist(bucket_start, service, route, hist) "
                             "VALUES (?, ?, ?, ?)", rows)

    def add_limit_counts(self, rows: Iterable[tuple[int, int, str, str, int]]) -> None:
        self._db.executemany(
            "INSERT INTO limit_counts(win_s, bucket_start, policy, decision, count) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(win_s, policy, decision, bucket_start) "
            "DO UPDATE SET count = limit_counts.count + excluded.count", key_sorted(rows, 0, 2, 3, 1))

    def take_pending(self, limit: int) -> list[tuple[int, int, str, str, bytes | str]]:
        """Inside a transaction: remove and return the oldest `limit` queued histograms (id,
        bucket_start, service, route, stored histogram), in no particular order. One statement
        reads and deletes exactly the rows it returns: a row another replica's ingest commits
        meanwhile (with a smaller id: ids are taken at insert, not at commit) stays queued."""
        return self._db.execute(
            "DELETE FROM pending_hist WHERE id IN (SELECT id FROM pending_hist ORDER BY id "
            "LIMIT ?) RETURNING id, bucket_start, service, route, hist", (limit,)).fetchall()

    def pending_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM pending_hist").fetchone()[0])

    def lock_compaction(self) -> None:
        """Inside a transaction: wait until no other replica compacts (PostgreSQL; SQLite's
        BEGIN IMMEDIATE holds the one writer lock already). Released at COMMIT/ROLLBACK."""
        if self.postgresql:
            self._db.execute("SELECT pg_advisory_xact_lock(?)", (_COMPACTION_LOCK,))

    def bucket_hists(self, keys: list[HistKey]) -> dict[HistKey, bytes | None]:
        """The stored histograms of these buckets (a key without a row is absent): a few
        queries of up to 200 keys, not one round trip per bucket."""
        found: dict[HistKey, bytes | None] = {}
        for i in range(0, len(keys), 200):
            part = keys[i:i + 200]
            sql = ("SELECT win_s, bucket_start, service, route, hist FROM buckets "
                   "WHERE (win_s, bucket_start, service, route) IN (VALUES " +
                   ", ".join(["(?, ?, ?, ?)"] * len(part)) + ")")
            for w, b, svc, route, h in self._db.execute(sql, [v for k in part for v in k]):
                found[(int(w), int(b), svc, route)] = h
        return found

    def set_bucket_hists(self, rows: Iterable[tuple[bytes, int | None, int | None, int | None,
                                                    int, int, str, str]]) -> None:
        """(hist, p50_us, p95_us, p99_us, win_s, bucket_start, service, route) rows."""
        self._db.executemany(
            "UPDATE buckets SET hist = ?, p50_us = ?, p95_us = ?, p99_us = ? "
            "WHERE win_s = ? AND bucket_start = ? AND service = ? AND route = ?",
            key_sorted(rows, 4, 6, 7, 5))     # the order add_buckets locks them in

    def signals(self, win_s: int, since: float, until: float, *, service: str | None,
                route: str, limit: int) -> list[dict[str, Any]]:
        """Bucket rows with since <= bucket_start < until, oldest first."""
        sql = ("SELECT " + ", ".join(_SIGNAL_COLUMNS) + " FROM buckets "
               "WHERE win_s = ? AND route = ? AND bucket_start >= ? AND bucket_start < ?")
        args: list[Any] = [win_s, route, since, until]
        sql = and_where(sql, args, ("service = ?", service))
        sql += " ORDER BY bucket_start, service LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(_SIGNAL_COLUMNS, r)) for r in rows]

    def service_buckets(self, win_s: int, since: float, until: float
                        ) -> list[dict[str, Any]]:
        """Service-total rows (with the histogram) in [since, until), for the health overview."""
        cols = _SIGNAL_COLUMNS + ("hist",)
        with self._lock:
            rows = self._db.execute(
                "SELECT " + ", ".join(cols) + " FROM buckets WHERE win_s = ? AND route = '*' "
                "AND bucket_start >= ? AND bucket_start < ? ORDER BY service, bucket_start",
                (win_s, since, until)).fetchall()
        return [dict(zip(cols, r)) for r in rows]

    def limit_counts(self, win_s: int, since: float, until: float,
                     policy: str | None) -> list[dict[str, Any]]:
        sql = ("SELECT bucket_start, policy, decision, count FROM limit_counts "
               "WHERE win_s = ? AND bucket_start >= ? AND bucket_start < ?")
        args: list[Any] = [win_s, since, until]
        sql = and_where(sql, args, ("policy = ?", policy))
        sql += " ORDER BY bucket_start, policy, decision"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(("bucket_start", "policy", "decision", "count"), r)) for r in rows]

    def delete_buckets_before(self, win_s: int, cutoff: float) -> int:
        with self.transaction():
            n = self._db.execute("DELETE FROM buckets WHERE win_s = ? AND bucket_start < ?",
                                 (win_s, cutoff)).rowcount
            n += self._db.execute("DELETE FROM limit_counts WHERE win_s = ? AND bucket_start < ?",
                                  (win_s, cutoff)).rowcount
            n += self._db.execute("DELETE FROM retry_counts WHERE win_s = ? AND bucket_start < ?",
                                  (win_s, cutoff)).rowcount
            n += self._db.execute("DELETE FROM shed_counts WHERE win_s = ? AND bucket_start < ?",
                                  (win_s, cutoff)).rowcount
            return int(n)

    def delete_batches_before(self, cutoff: float) -> int:
        with self.transaction():
            return int(self._db.execute("DELETE FROM batches WHERE received_at < ?",
                                        (cutoff,)).rowcount)

    def sli_sums(self, win_s: int, service: str, route: str, since: float, until: float
                 ) -> tuple[int, int, int]:
        """(requests, 5xx, 429) summed over buckets with since <= bucket_start < until."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(request_count), 0), COALESCE(SUM(error_count_5xx), 0), "
                "COALESCE(SUM(rate_limited), 0) FROM buckets WHERE win_s = ? AND service = ? "
                "AND route = ? AND bucket_start >= ? AND bucket_start < ?",
                (win_s, service, route, since, until)).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def sli_hists(self, win_s: int, service: str, route: str, since: float, until: float
                  ) -> list[tuple[int, bytes]]:
        """(bucket_start, merged histogram) of the buckets with a histogram in the range."""
        with self._lock:
            return self._db.execute(
                "SELECT bucket_start, hist FROM buckets WHERE win_s = ? AND service = ? "
                "AND route = ? AND bucket_start >= ? AND bucket_start < ? AND hist IS NOT NULL",
                (win_s, service, route, since, until)).fetchall()
