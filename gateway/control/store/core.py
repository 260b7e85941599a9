"""SQLite persistence of the control plane: the only module with SQL (parameterised queries only).

WAL mode, one connection guarded by a lock (the app calls it from one worker thread), versioned
schema migrations recorded in `schema_version` and applied at open. Methods are synchronous;
the app runs them off the event loop.

Tables (migration 1):
  batches            ingested batch ids (idempotency), kept 2 days
  buckets            rollups per (win_s, service, route, bucket_start); route '*' = service total.
                     Counts and saturation maxima are added at ingest; the merged HDR histogram
                     (`hist`, hdrh base64 encoding) and its p50/p95/p99 are folded in by compaction
                     from `pending_hist` (see rollup.compact).
  pending_hist       the latency histograms of ingested series not yet merged into `buckets`
  limit_counts       limit decisions per (win_s, policy, decision, bucket_start)
  upstream_state     breaker state and pool use per (gateway_id, upstream), as last reported
  service_upstreams  which upstreams serve which service (seen in series)
  breaker_transitions, gateways, audit
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.control.store import database
from gateway.control.store.tenants import TenantRepo

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE batches (
             batch_id TEXT PRIMARY KEY,
             gateway_id TEXT NOT NULL,
             seq INTEGER NOT NULL,
             interval_start REAL NOT NULL,
             interval_end REAL NOT NULL,
             received_at REAL NOT NULL)""",
        "CREATE INDEX batches_received ON batches(received_at)",
        """CREATE TABLE buckets (
             win_s INTEGER NOT NULL,
             bucket_start INTEGER NOT NULL,
             service TEXT NOT NULL,
             route TEXT NOT NULL,
             request_count INTEGER NOT NULL DEFAULT 0,
             error_count_4xx INTEGER NOT NULL DEFAULT 0,
             error_count_5xx INTEGER NOT NULL DEFAULT 0,
             rate_limited INTEGER NOT NULL DEFAULT 0,
             bytes_in INTEGER NOT NULL DEFAULT 0,
             bytes_out INTEGER NOT NULL DEFAULT 0,
             hist BLOB,
             p50_us INTEGER,
             p95_us INTEGER,
             p99_us INTEGER,
             cpu_percent REAL NOT NULL DEFAULT 0,
             loop_lag_ms REAL NOT NULL DEFAULT 0,
             inflight_max INTEGER NOT NULL DEFAULT 0,
             rss_bytes INTEGER NOT NULL DEFAULT 0,
             PRIMARY KEY (win_s, service, route, bucket_start)) WITHOUT ROWID""",
        "CREATE INDEX buckets_by_route_time ON buckets(win_s, route, bucket_start)",
        """CREATE TABLE pending_hist (
             id INTEGER PRIMARY KEY,
             bucket_start INTEGER NOT NULL,
             service TEXT NOT NULL,
             route TEXT NOT NULL,
             hist TEXT NOT NULL)""",
        """CREATE TABLE limit_counts (
             win_s INTEGER NOT NULL,
             bucket_start INTEGER NOT NULL,
             policy TEXT NOT NULL,
             decision TEXT NOT NULL,
             count INTEGER NOT NULL,
             PRIMARY KEY (win_s, policy, decision, bucket_start)) WITHOUT ROWID""",
        """CREATE TABLE upstream_state (
             gateway_id TEXT NOT NULL,
             upstream TEXT NOT NULL,
             breaker_state TEXT NOT NULL,
             pool_in_use_max INTEGER NOT NULL,
             pool_max INTEGER NOT NULL,
             reported_at REAL NOT NULL,
             PRIMARY KEY (gateway_id, upstream)) WITHOUT ROWID""",
        """CREATE TABLE service_upstreams (
             service TEXT NOT NULL,
             upstream TEXT NOT NULL,
             last_seen REAL NOT NULL,
             PRIMARY KEY (service, upstream)) WITHOUT ROWID""",
        """CREATE TABLE breaker_transitions (
             id INTEGER PRIMARY KEY,
             gateway_id TEXT NOT NULL,
             upstream TEXT NOT NULL,
             from_state TEXT NOT NULL,
             to_state TEXT NOT NULL,
             at REAL NOT NULL,
             reason TEXT NOT NULL)""",
        "CREATE INDEX breaker_transitions_at ON breaker_transitions(at)",
        """CREATE TABLE gateways (
             gateway_id TEXT PRIMARY KEY,
             last_seq INTEGER NOT NULL,
             last_seen REAL NOT NULL,
             cpu_percent REAL NOT NULL,
             loop_lag_ms REAL NOT NULL,
             inflight_max INTEGER NOT NULL,
             rss_bytes INTEGER NOT NULL)""",
        """CREATE TABLE audit (
             id INTEGER PRIMARY KEY,
             at REAL NOT NULL,
             actor TEXT NOT NULL,
             action TEXT NOT NULL,
             target TEXT NOT NULL,
             reason TEXT NOT NULL,
             details TEXT NOT NULL)""",
        "CREATE INDEX audit_at ON audit(at)",
    ]),
    # --- SLOs, alerts, incidents: migration 2 -------------------------------------------------
    # slos                 SLO definitions (doc = slo.SLO.to_doc() as JSON); source config|api
    # alerts               burn-rate (source slo) and hand-made (source manual) alerts;
    #                      dedup_key = "<slo id>:<tier>", at most one open (firing|acknowledged)
    # incidents            INC-YYYY-NNN (incident_counters: the last NNN of each year);
    #                      cause + affected_service: one open auto-incident per service and cause
    # incident_timeline    status changes, alerts, breaker openings, escalations, notes
    # notification_deliveries  the webhook delivery log
    (2, [
        """CREATE TABLE slos (
             id TEXT PRIMARY KEY,
             service TEXT NOT NULL,
             doc TEXT NOT NULL,
             source TEXT NOT NULL,
             created_at REAL NOT NULL,
             updated_at REAL NOT NULL)""",
        """CREATE TABLE alerts (
             id INTEGER PRIMARY KEY,
             dedup_key TEXT NOT NULL,
             source TEXT NOT NULL,
             slo_id TEXT,
             service TEXT NOT NULL,
             severity TEXT NOT NULL,
             status TEXT NOT NULL,
             title TEXT NOT NULL,
             description TEXT NOT NULL,
             labels TEXT NOT NULL,
             details TEXT NOT NULL,
             fingerprint TEXT NOT NULL,
             started_at REAL NOT NULL,
             updated_at REAL NOT NULL,
             acknowledged_at REAL,
             acknowledged_by TEXT,
             resolved_at REAL,
             incident_id TEXT)""",
        "CREATE INDEX alerts_key ON alerts(dedup_key, status)",
        "CREATE INDEX alerts_started ON alerts(started_at)",
        """CREATE TABLE incident_counters (
             year INTEGER PRIMARY KEY,
             last INTEGER NOT NULL)""",
        """CREATE TABLE incidents (
             id TEXT PRIMARY KEY,
             title TEXT NOT NULL,
             description TEXT NOT NULL,
             severity TEXT NOT NULL,
             affected_service TEXT NOT NULL,
             cause TEXT NOT NULL,
             context TEXT NOT NULL,
             status TEXT NOT NULL,
             escalation_level INTEGER NOT NULL,
             created_at REAL NOT NULL,
             created_by TEXT NOT NULL,
             acknowledged_at REAL,
             mitigated_at REAL,
             resolved_at REAL,
             resolution_notes TEXT,
             root_cause TEXT,
             postmortem TEXT,
             breaker_cursor INTEGER NOT NULL DEFAULT 0,
             updated_at REAL NOT NULL)""",
        "CREATE INDEX incidents_open ON incidents(status, affected_service)",
        """CREATE TABLE incident_timeline (
             id INTEGER PRIMARY KEY,
             incident_id TEXT NOT NULL REFERENCES incidents(id),
             at REAL NOT NULL,
             kind TEXT NOT NULL,
             actor TEXT NOT NULL,
             text TEXT NOT NULL,
             data TEXT NOT NULL)""",
        "CREATE INDEX incident_timeline_of ON incident_timeline(incident_id, at)",
        """CREATE TABLE notification_deliveries (
             id INTEGER PRIMARY KEY,
             at REAL NOT NULL,
             target TEXT NOT NULL,
             alert_id INTEGER,
             event TEXT NOT NULL,
             status TEXT NOT NULL,
             attempts INTEGER NOT NULL,
             http_status INTEGER,
             error TEXT NOT NULL)""",
        "CREATE INDEX notification_deliveries_at ON notification_deliveries(at)",
    ]),
    # --- Costs and budgets: migration 3 ------------------------------------------------------
    # cost_usage     metered quantities per 15-minute bucket, (service, route, cost_type, unit,
    #                price); money is derived per row (see costs.py), so every grouping of the
    #                same rows adds up to the same integer micro-dollars
    # cost_charges   imported costs (POST /v1/costs, FOCUS fields) accruing over their period
    # cost_services  first time a service was metered (fixed monthly fees accrue from then)
    # budgets, budget_alerts (one row per budget, period, kind, threshold: alert dedup)
    (3, [
        """CREATE TABLE cost_usage (
             service TEXT NOT NULL,
             bucket_start INTEGER NOT NULL,
             route TEXT NOT NULL,
             cost_type TEXT NOT NULL,
             unit TEXT NOT NULL,
             price TEXT NOT NULL,
             quantity INTEGER NOT NULL,
             PRIMARY KEY (service, bucket_start, route, cost_type, unit, price)) WITHOUT ROWID""",
        "CREATE INDEX cost_usage_time ON cost_usage(bucket_start)",
        """CREATE TABLE cost_charges (
             id INTEGER PRIMARY KEY,
             charge_key TEXT UNIQUE,
             service TEXT NOT NULL,
             cost_type TEXT NOT NULL,
             category TEXT NOT NULL,
             period_start INTEGER NOT NULL,
             period_end INTEGER NOT NULL,
             micros INTEGER NOT NULL,
             description TEXT NOT NULL,
             imported_at REAL NOT NULL,
             actor TEXT NOT NULL)""",
        "CREATE INDEX cost_charges_span ON cost_charges(period_start, period_end)",
        """CREATE TABLE cost_services (
             service TEXT PRIMARY KEY,
             first_seen INTEGER NOT NULL)""",
        """CREATE TABLE budgets (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             name TEXT NOT NULL UNIQUE,
             spec TEXT NOT NULL,
             override_cents INTEGER,
             override_expires_at REAL,
             override_reason TEXT,
             source TEXT NOT NULL,
             config_hash TEXT,
             created_at REAL NOT NULL,
             updated_at REAL NOT NULL)""",
        """CREATE TABLE budget_alerts (
             id INTEGER PRIMARY KEY,
             budget_id INTEGER NOT NULL,
             budget_name TEXT NOT NULL,
             service TEXT NOT NULL,
             period_start INTEGER NOT NULL,
             period_end INTEGER NOT NULL,
             kind TEXT NOT NULL,
             threshold TEXT NOT NULL,
             severity TEXT NOT NULL,
             spend_micros INTEGER NOT NULL,
             amount_micros INTEGER NOT NULL,
             created_at REAL NOT NULL,
             UNIQUE (budget_id, period_start, kind, threshold))""",
        "CREATE INDEX budget_alerts_created ON budget_alerts(created_at)",
    ]),
    # --- SRE follow-ups: migration 4 -------------------------------------------------------
    # notification_deliveries.incident_id  deliveries of incident events (alert_id NULL)
    # incidents.assigned_to                who owns the incident
    # gateways.interval_s                  the ship interval of the gateway's last batch
    # action_items       post-mortem action items (owner, due date, priority, status);
    #                    overdue_alert_id: the alert raised when it went overdue
    # slo_history        the attainment of each closed SLO period: calendar periods
    #                    (kind 'period') and rolling-window snapshots at each UTC day's end
    #                    (kind 'day'), one row per (slo, kind, period_end)
    (4, [
        "ALTER TABLE notification_deliveries ADD COLUMN incident_id TEXT",
        "ALTER TABLE incidents ADD COLUMN assigned_to TEXT",
        "ALTER TABLE gateways ADD COLUMN interval_s REAL",
        """CREATE TABLE action_items (
             id INTEGER PRIMARY KEY,
             incident_id TEXT NOT NULL REFERENCES incidents(id),
             description TEXT NOT NULL,
             owner TEXT NOT NULL,
             due_at REAL NOT NULL,
             priority TEXT NOT NULL,
             status TEXT NOT NULL,
             created_at REAL NOT NULL,
             created_by TEXT NOT NULL,
             updated_at REAL NOT NULL,
             completed_at REAL,
             overdue_alert_id INTEGER)""",
        "CREATE INDEX action_items_open ON action_items(status, due_at)",
        """CREATE TABLE slo_history (
             slo_id TEXT NOT NULL,
             kind TEXT NOT NULL,
             period_start REAL NOT NULL,
             period_end REAL NOT NULL,
             service TEXT NOT NULL,
             sli TEXT NOT NULL,
             objective REAL NOT NULL,
             total INTEGER NOT NULL,
             bad INTEGER NOT NULL,
             attainment REAL,
             budget_remaining REAL,
             met INTEGER NOT NULL,
             closed_at REAL NOT NULL,
             PRIMARY KEY (slo_id, kind, period_end))""",
    ]),
    # Requests the gateway answered itself (a limit's 429, an open breaker's 503, ...): part of
    # request_count and of the error counts, kept apart so that health and signals can report
    # the admitted requests (request_count - local_count, error_count_5xx - local_5xx, ...).
    (5, [
        "ALTER TABLE buckets ADD COLUMN local_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE buckets ADD COLUMN local_4xx INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE buckets ADD COLUMN local_5xx INTEGER NOT NULL DEFAULT 0",
    ]),
    # --- Tenants (migration 6). SQL in tenants_store.py.
    # tenants           plan set at runtime per tenant (PUT /v1/tenants/{id})
    # tenant_overrides  quota/rate overrides with effective_date / expires_at (newest wins)
    # tenant_usage      admitted/rejected per (tenant, window kind, window id) from the gateways
    # tenant_alerts     one row per (tenant, window kind, window id, threshold): alert once
    (6, [
        """CREATE TABLE tenants (
             tenant_id TEXT PRIMARY KEY,
             plan TEXT NOT NULL,
             updated_at REAL NOT NULL,
             actor TEXT NOT NULL)""",
        """CREATE TABLE tenant_overrides (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             tenant_id TEXT NOT NULL,
             qps REAL,
             burst INTEGER,
             daily_quota INTEGER,
             monthly_quota INTEGER,
             effective_date REAL NOT NULL,
             expires_at REAL,
             reason TEXT NOT NULL,
             actor TEXT NOT NULL,
             created_at REAL NOT NULL)""",
        "CREATE INDEX tenant_overrides_by_tenant ON tenant_overrides(tenant_id, effective_date)",
        """CREATE TABLE tenant_usage (
             tenant_id TEXT NOT NULL,
             kind TEXT NOT NULL,
             window_id TEXT NOT NULL,
             plan TEXT NOT NULL,
             quota_limit INTEGER NOT NULL,
             admitted INTEGER NOT NULL,
             rejected INTEGER NOT NULL,
             updated_at REAL NOT NULL,
             PRIMARY KEY (tenant_id, kind, window_id)) WITHOUT ROWID""",
        """CREATE TABLE tenant_alerts (
             tenant_id TEXT NOT NULL,
             kind TEXT NOT NULL,
             window_id TEXT NOT NULL,
             threshold REAL NOT NULL,
             created_at REAL NOT NULL,
             PRIMARY KEY (tenant_id, kind, window_id, threshold)) WITHOUT ROWID""",
    ]),
    # --- Overload protection (migration 7)
    # retry_counts   upstream retries per (win_s, upstream, result, bucket_start)
    # shed_counts    requests refused by shedding or a concurrency limit per (win_s, service,
    #                route, reason, bucket_start); reason is the shipped `local` (shed|concurrency)
    # upstream_state gains each gateway's adaptive concurrency limit (NULL: none configured)
    #                and whether it refused requests in the last reported interval
    (7, [
        """CREATE TABLE retry_counts (
             win_s INTEGER NOT NULL,
             bucket_start INTEGER NOT NULL,
             upstream TEXT NOT NULL,
             result TEXT NOT NULL,
             count INTEGER NOT NULL,
             PRIMARY KEY (win_s, upstream, result, bucket_start)) WITHOUT ROWID""",
        """CREATE TABLE shed_counts (
             win_s INTEGER NOT NULL,
             bucket_start INTEGER NOT NULL,
             service TEXT NOT NULL,
             route TEXT NOT NULL,
             reason TEXT NOT NULL,
             count INTEGER NOT NULL,
             PRIMARY KEY (win_s, service, route, reason, bucket_start)) WITHOUT ROWID""",
        "ALTER TABLE upstream_state ADD COLUMN concurrency_limit INTEGER",
        "ALTER TABLE upstream_state ADD COLUMN concurrency_saturated INTEGER NOT NULL DEFAULT 0",
    ]),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]
# Tables whose integer `id` the database assigns (PostgreSQL: identity columns)
_IDENTITY = database.identity_tables(sql for _v, stmts in MIGRATIONS for sql in stmts)
# Replicas starting together: one migrates, the others wait for it (pg_advisory_xact_lock)
_MIGRATION_LOCK = 0x6761_7465_0001
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


def _sorted(rows: Iterable[tuple[Any, ...]], *key: int) -> list[tuple[Any, ...]]:
    """Upsert rows in primary-key order: two replicas writing the same rows in one transaction
    each then lock them in the same order and wait for each other instead of deadlocking."""
    return sorted(rows, key=lambda r: tuple(r[i] for i in key))


def _and(sql: str, args: list[Any], *conditions: tuple[str, Any]) -> str:
    """`sql` with ` AND <condition>` for each (condition, value) whose value is not None; the
    value joins `args`."""
    for condition, value in conditions:
        if value is not None:
            sql += f" AND {condition}"
            args.append(value)
    return sql


class Store:
    """The control plane database. Open with `Store(path)` (a SQLite file) or
    `Store("postgresql://...")`; `close()` when done. The SQL is SQLite's dialect with qmark
    placeholders, written to be portable; gateway/control/database.py adapts it to PostgreSQL."""

    def __init__(self, path: str | Path, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.path = str(path)
        self.clock = clock
        self.postgresql = database.is_postgresql(self.path)
        self._lock = threading.RLock()
        self._depth = 0
        self._db: database.Connection
        if self.postgresql:
            self._db = database.PostgresConnection(self.path, _IDENTITY)
        else:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = database.connect_sqlite(self.path)
        self.migrate()
        self.tenants = TenantRepo(self)     # repositories per aggregate, on this database

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -----------------------------------------------------------------------------------------
    # Transactions and migrations

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error). Nested uses join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    def schema_version(self) -> int:
        with self._lock:
            self._db.execute(database.ddl("CREATE TABLE IF NOT EXISTS schema_version ("
                                          "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)",
                                          self.postgresql))
            row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            return int(row[0] or 0)

    def migrate(self) -> int:
        """Apply every migration newer than the database's schema_version; return the version."""
        with self._lock, self.transaction():
            if self.postgresql:
                self._db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            current = self.schema_version()
            # Every version not yet applied, in order -- not only those above the highest: two
            # features may land their migrations in either order (e.g. 3 before 2).
            applied = {int(r[0]) for r in self._db.execute("SELECT version FROM schema_version")}
            for version, statements in sorted(MIGRATIONS, key=lambda m: m[0]):
                if version in applied:
                    continue
                with self.transaction():
                    for sql in statements:
                        self._db.execute(database.ddl(sql, self.postgresql))
                    self._db.execute("INSERT INTO schema_version(version, applied_at) "
                                     "VALUES (?, ?)", (version, self.clock.time()))
                current = max(current, version)
            return current

    # -----------------------------------------------------------------------------------------
    # Ingest

    def insert_batch(self, batch_id: str, gateway_id: str, seq: int, interval_start: float,
                     interval_end: float, received_at: float) -> bool:
        """Record a batch id; False if it was already ingested (the caller then rolls back)."""
        cur = self._db.execute(
            "INSERT INTO batches(batch_id, gateway_id, seq, interval_start, interval_end, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(batch_id) DO NOTHING",
            (batch_id, gateway_id, seq, interval_start, interval_end, received_at))
        return cur.rowcount == 1

    def add_buckets(self, rows: Iterable[BucketRow]) -> None:
        self._db.executemany(
            "INSERT INTO buckets(win_s, bucket_start, service, route, request_count, "
            "error_count_4xx, error_count_5xx, rate_limited, bytes_in, bytes_out, cpu_percent, "
            "loop_lag_ms, inflight_max, rss_bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(win_s, service, route, bucket_start) DO UPDATE SET "
            "request_count = buckets.request_count + excluded.request_count, "
            "error_count_4xx = buckets.error_count_4xx + excluded.error_count_4xx, "
            "error_count_5xx = buckets.error_count_5xx + excluded.error_count_5xx, "
            "rate_limited = buckets.rate_limited + excluded.rate_limited, "
            "bytes_in = buckets.bytes_in + excluded.bytes_in, "
            "bytes_out = buckets.bytes_out + excluded.bytes_out, "
            "cpu_percent = max(buckets.cpu_percent, excluded.cpu_percent), "
            "loop_lag_ms = max(buckets.loop_lag_ms, excluded.loop_lag_ms), "
            "inflight_max = max(buckets.inflight_max, excluded.inflight_max), "
            "rss_bytes = max(buckets.rss_bytes, excluded.rss_bytes)", _sorted(rows, 0, 2, 3, 1))

    def add_local_counts(self, rows: Iterable[tuple[int, int, str, str, int, int, int]]) -> None:
        """(win_s, bucket_start, service, route, local_count, local_4xx, local_5xx): the part of
        a bucket's counts that the gateway answered itself (call after add_buckets)."""
        self._db.executemany(
            "INSERT INTO buckets(win_s, bucket_start, service, route, local_count, local_4xx, "
            "local_5xx) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(win_s, service, route, bucket_start) DO UPDATE SET "
            "local_count = buckets.local_count + excluded.local_count, "
            "local_4xx = buckets.local_4xx + excluded.local_4xx, "
            "local_5xx = buckets.local_5xx + excluded.local_5xx", _sorted(rows, 0, 2, 3, 1))

    def add_pending_hists(self, rows: Iterable[tuple[int, str, str, str]]) -> None:
        """(bucket_start of the 1m bucket, service, route, encoded histogram) rows."""
        self._db.executemany("INSERT INTO pending_hist(bucket_start, service, route, hist) "
                             "VALUES (?, ?, ?, ?)", rows)

    def add_limit_counts(self, rows: Iterable[tuple[int, int, str, str, int]]) -> None:
        self._db.executemany(
            "INSERT INTO limit_counts(win_s, bucket_start, policy, decision, count) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(win_s, policy, decision, bucket_start) "
            "DO UPDATE SET count = limit_counts.count + excluded.count", _sorted(rows, 0, 2, 3, 1))

    def report_upstreams(self, rows: Iterable[tuple[str, str, str, int, int, float]]) -> None:
        """(gateway_id, upstream, breaker_state, pool_in_use_max, pool_max, reported_at);
        an older (late) report never overwrites a newer one."""
        self._db.executemany(
            "INSERT INTO upstream_state(gateway_id, upstream, breaker_state, pool_in_use_max, "
            "pool_max, reported_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(gateway_id, upstream) DO UPDATE SET "
            "breaker_state = excluded.breaker_state, pool_in_use_max = excluded.pool_in_use_max, "
            "pool_max = excluded.pool_max, reported_at = excluded.reported_at "
            "WHERE excluded.reported_at >= upstream_state.reported_at", _sorted(rows, 0, 1))

    def add_retry_counts(self, rows: Iterable[tuple[int, int, str, str, int]]) -> None:
        """(win_s, bucket_start, upstream, result, count)."""
        self._db.executemany(
            "INSERT INTO retry_counts(win_s, bucket_start, upstream, result, count) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(win_s, upstream, result, bucket_start) "
            "DO UPDATE SET count = retry_counts.count + excluded.count", _sorted(rows, 0, 2, 3, 1))

    def add_shed_counts(self, rows: Iterable[tuple[int, int, str, str, str, int]]) -> None:
        """(win_s, bucket_start, service, route, reason, count)."""
        self._db.executemany(
            "INSERT INTO shed_counts(win_s, bucket_start, service, route, reason, count) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(win_s, service, route, reason, bucket_start) "
            "DO UPDATE SET count = shed_counts.count + excluded.count",
            _sorted(rows, 0, 2, 3, 4, 1))

    def report_concurrency(self, rows: Iterable[tuple[str, str, int | None, int, float]]
                           ) -> None:
        """(gateway_id, upstream, concurrency_limit, saturated 0|1, reported_at), after
        report_upstreams wrote the same report (a late report changes nothing)."""
        self._db.executemany(
            "UPDATE upstream_state SET concurrency_limit = ?, concurrency_saturated = ? "
            "WHERE gateway_id = ? AND upstream = ? AND reported_at <= ?",
            [(lim, sat, gw, up, at) for gw, up, lim, sat, at in _sorted(rows, 0, 1)])

    def link_service_upstreams(self, rows: Iterable[tuple[str, str, float]]) -> None:
        self._db.executemany(
            "INSERT INTO service_upstreams(service, upstream, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(service, upstream) DO UPDATE SET "
            "last_seen = max(service_upstreams.last_seen, excluded.last_seen)", _sorted(rows, 0, 1))

    def add_transitions(self, rows: Iterable[tuple[str, str, str, str, float, str]]) -> None:
        self._db.executemany(
            "INSERT INTO breaker_transitions(gateway_id, upstream, from_state, to_state, at, "
            "reason) VALUES (?, ?, ?, ?, ?, ?)", rows)

    def report_gateway(self, gateway_id: str, seq: int, seen: float, cpu_percent: float,
                       loop_lag_ms: float, inflight_max: int, rss_bytes: int) -> None:
        self._db.execute(
            "INSERT INTO gateways(gateway_id, last_seq, last_seen, cpu_percent, loop_lag_ms, "
            "inflight_max, rss_bytes) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(gateway_id) DO UPDATE SET last_seq = excluded.last_seq, "
            "last_seen = excluded.last_seen, cpu_percent = excluded.cpu_percent, "
            "loop_lag_ms = excluded.loop_lag_ms, inflight_max = excluded.inflight_max, "
            "rss_bytes = excluded.rss_bytes WHERE excluded.last_seen >= gateways.last_seen",
            (gateway_id, seq, seen, cpu_percent, loop_lag_ms, inflight_max, rss_bytes))

    # -----------------------------------------------------------------------------------------
    # Compaction (histograms)

    def pending_hists(self, limit: int) -> list[tuple[int, int, str, str, str]]:
        with self._lock:
            return self._db.execute(
                "SELECT id, bucket_start, service, route, hist FROM pending_hist "
                "ORDER BY id LIMIT ?", (limit,)).fetchall()

    def pending_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM pending_hist").fetchone()[0])

    def delete_pending(self, ids: list[int]) -> None:
        """Delete exactly the folded rows: on PostgreSQL a replica's ingest may commit a row
        with a smaller id after the chunk was read (ids are taken at insert, not at commit)."""
        self._db.executemany("DELETE FROM pending_hist WHERE id = ?", [(i,) for i in ids])

    def lock_compaction(self) -> None:
        """Inside a transaction: wait until no other replica compacts (PostgreSQL; SQLite's
        BEGIN IMMEDIATE holds the one writer lock already). Released at COMMIT/ROLLBACK."""
        if self.postgresql:
            self._db.execute("SELECT pg_advisory_xact_lock(?)", (_COMPACTION_LOCK,))

    def bucket_hist(self, key: HistKey) -> bytes | None:
        row = self._db.execute(
            "SELECT hist FROM buckets WHERE win_s = ? AND bucket_start = ? AND service = ? "
            "AND route = ?", key).fetchone()
        return row[0] if row else None

    def set_bucket_hists(self, rows: Iterable[tuple[bytes, int | None, int | None, int | None,
                                                    int, int, str, str]]) -> None:
        """(hist, p50_us, p95_us, p99_us, win_s, bucket_start, service, route) rows."""
        self._db.executemany(
            "UPDATE buckets SET hist = ?, p50_us = ?, p95_us = ?, p99_us = ? "
            "WHERE win_s = ? AND bucket_start = ? AND service = ? AND route = ?",
            _sorted(rows, 4, 6, 7, 5))     # the order add_buckets locks them in

    # -----------------------------------------------------------------------------------------
    # Queries

    def signals(self, win_s: int, since: float, until: float, *, service: str | None,
                route: str, limit: int) -> list[dict[str, Any]]:
        """Bucket rows with since <= bucket_start < until, oldest first."""
        sql = ("SELECT " + ", ".join(_SIGNAL_COLUMNS) + " FROM buckets "
               "WHERE win_s = ? AND route = ? AND bucket_start >= ? AND bucket_start < ?")
        args: list[Any] = [win_s, route, since, until]
        sql = _and(sql, args, ("service = ?", service))
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

    def limit_counts(self, win_s: int, since: float, until: float,
                     policy: str | None) -> list[dict[str, Any]]:
        sql = ("SELECT bucket_start, policy, decision, count FROM limit_counts "
               "WHERE win_s = ? AND bucket_start >= ? AND bucket_start < ?")
        args: list[Any] = [win_s, since, until]
        sql = _and(sql, args, ("policy = ?", policy))
        sql += " ORDER BY bucket_start, policy, decision"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(("bucket_start", "policy", "decision", "count"), r)) for r in rows]

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

    def table_counts(self) -> dict[str, int]:
        """Row counts of every data table (tests and diagnostics)."""
        names = ("batches", "buckets", "pending_hist", "limit_counts", "upstream_state",
                 "service_upstreams", "breaker_transitions", "gateways", "audit",
                 "retry_counts", "shed_counts")
        with self._lock:
            # Table names come from the constant tuple above, never from input.
            return {n: int(self._db.execute(f"SELECT COUNT(*) FROM {n}").fetchone()[0])
                    for n in names}

    # -----------------------------------------------------------------------------------------
    # Retention

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

    # -----------------------------------------------------------------------------------------
    # Audit

    def audit(self, actor: str, action: str, target: str, reason: str = "",
              details: dict[str, Any] | None = None, *, at: float | None = None) -> int:
        """Record a change (create/update/delete/ack/resolve/reset/...): who, what, why."""
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO audit(at, actor, action, target, reason, details) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (self.clock.time() if at is None else at, actor, action, target, reason or "",
                 orjson.dumps(details or {}).decode()))
            return int(cur.lastrowid or 0)

    def audit_entries(self, *, since: float | None = None, actor: str | None = None,
                      action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        sql = "SELECT id, at, actor, action, target, reason, details FROM audit WHERE 1 = 1"
        args: list[Any] = []
        sql = _and(sql, args, ("at >= ?", since), ("actor = ?", actor), ("action = ?", action))
        sql += " ORDER BY at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [{"id": r[0], "at": r[1], "actor": r[2], "action": r[3], "target": r[4],
                 "reason": r[5], "details": orjson.loads(r[6])} for r in rows]


    # --- Costs and budgets ------------------------------------------------------------------
    # (SQL only; the money maths is in budgets.py / costs.py)

    def add_cost_usage(self, rows: Iterable[tuple[str, int, str, str, str, str, int]]) -> None:
        """(service, bucket_start, route, cost_type, unit, price, quantity): quantities add up."""
        self._db.executemany(
            "INSERT INTO cost_usage(service, bucket_start, route, cost_type, unit, price, "
            "quantity) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(service, bucket_start, route, cost_type, unit, price) "
            "DO UPDATE SET quantity = cost_usage.quantity + excluded.quantity",
            _sorted(rows, 0, 1, 2, 3, 4, 5))

    def note_cost_services(self, rows: Iterable[tuple[str, int]]) -> None:
        """(service, seen_at): remember the earliest time each service was metered."""
        self._db.executemany(
            "INSERT INTO cost_services(service, first_seen) VALUES (?, ?) "
            "ON CONFLICT(service) DO UPDATE SET "
            "first_seen = min(cost_services.first_seen, excluded.first_seen)", _sorted(rows, 0))

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
        sql = _and(sql, args, ("service = ?", service))
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
        sql = _and(sql, args, ("service = ?", service))
        with self._lock:
            return self._db.execute(sql + " ORDER BY id", args).fetchall()

    _BUDGET_COLS = ("id", "name", "spec", "override_cents", "override_expires_at",
                    "override_reason", "source", "config_hash", "created_at", "updated_at")

    def budgets(self) -> list[dict[str, Any]]:
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

    _ALERT_COLS = ("id", "budget_id", "budget_name", "service", "period_start", "period_end",
                   "kind", "threshold", "severity", "spend_micros", "amount_micros", "created_at")

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


    # --- SLOs, alerts, incidents ------------------------------------------------------------
    # (SQL only; the maths is in slo.py, the rules in evaluator.py / incidents.py)

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

    def _update_row(self, table: str, allowed: tuple[str, ...], json_cols: Any, row_id: Any,
                    fields: dict[str, Any]) -> bool:
        """UPDATE one row by id. Column names come from the constant `allowed` tuple, never from
        input; JSON columns are encoded (None stays NULL)."""
        cols = [c for c in fields if c in allowed and c != "id"]
        if len(cols) != len(fields):
            raise ValueError(f"unknown {table} columns: {sorted(set(fields) - set(cols))}")
        vals = [orjson.dumps(fields[c]).decode() if c in json_cols and fields[c] is not None
                else fields[c] for c in cols]
        with self.transaction():
            return self._db.execute(
                f"UPDATE {table} SET " + ", ".join(f"{c} = ?" for c in cols) + " WHERE id = ?",
                (*vals, row_id)).rowcount == 1

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
        sql = _and(sql, args, ("status = ?", status), ("service = ?", service))
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [self._slo_alert(r) for r in rows]

    def alert_ids_of_incident(self, incident_id: str) -> list[int]:
        with self._lock:
            return [int(r[0]) for r in self._db.execute(
                "SELECT id FROM alerts WHERE incident_id = ? ORDER BY id", (incident_id,))]

    _INCIDENT_COLS = ("id", "title", "description", "severity", "affected_service", "cause",
                      "context", "status", "escalation_level", "created_at", "created_by",
                      "acknowledged_at", "mitigated_at", "resolved_at", "resolution_notes",
                      "root_cause", "postmortem", "breaker_cursor", "updated_at",
                      "assigned_to")
    _INCIDENT_JSON = ("context", "postmortem")

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

    def incidents(self, *, active: bool | None = None, status: str | None = None,
                  service: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first. active=True: not resolved."""
        sql = "SELECT " + ", ".join(self._INCIDENT_COLS) + " FROM incidents WHERE 1 = 1"
        args: list[Any] = []
        if active is True:
            sql += " AND status != 'resolved'"
        elif active is False:
            sql += " AND status = 'resolved'"
        sql = _and(sql, args, ("status = ?", status), ("affected_service = ?", service))
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

    def deliveries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        cols = ("id", "at", "target", "alert_id", "incident_id", "event", "status", "attempts",
                "http_status", "error")
        with self._lock:
            rows = self._db.execute("SELECT " + ", ".join(cols) + " FROM "
                                    "notification_deliveries ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [dict(zip(cols, r)) for r in rows]

    # -----------------------------------------------------------------------------------------
    # SRE follow-ups (migration 4): gateway intervals, action items, SLO history

    def note_gateway_interval(self, gateway_id: str, interval_s: float, seen: float) -> None:
        """The ship interval of the batch that set `last_seen` (a late batch changes nothing)."""
        with self.transaction():
            self._db.execute("UPDATE gateways SET interval_s = ? WHERE gateway_id = ? AND "
                             "last_seen = ?", (interval_s, gateway_id, seen))

    def gateway_intervals(self) -> list[tuple[str, float, float | None]]:
        """(gateway_id, last_seen, interval_s) of every reporting gateway."""
        with self._lock:
            return [(r[0], float(r[1]), None if r[2] is None else float(r[2]))
                    for r in self._db.execute("SELECT gateway_id, last_seen, interval_s "
                                              "FROM gateways ORDER BY gateway_id")]

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

    _ACTION_ITEM_COLS = ("id", "incident_id", "description", "owner", "due_at", "priority",
                         "status", "created_at", "created_by", "updated_at", "completed_at",
                         "overdue_alert_id")

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
        sql = _and(sql, args, ("incident_id = ?", incident_id), ("status = ?", status),
                   ("due_at < ?", due_before))
        sql += " ORDER BY due_at, id LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(self._ACTION_ITEM_COLS, r)) for r in rows]

    _HISTORY_COLS = ("slo_id", "kind", "period_start", "period_end", "service", "sli",
                     "objective", "total", "bad", "attainment", "budget_remaining", "met",
                     "closed_at")

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
        sql = _and(sql, args, ("slo_id = ?", slo_id), ("service = ?", service),
                   ("kind = ?", kind), ("period_end > ?", since), ("period_end <= ?", until))
        sql += " ORDER BY period_end, slo_id, kind"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(self._HISTORY_COLS, r), met=bool(r[11])) for r in rows]
