"""The control plane's Store: the connection (SQLite or PostgreSQL through database.py), its
transactions, the versioned schema migrations and the repositories per aggregate it exposes
(`store.rollups`, `store.alerts`, ...: the SQL lives in the store package only, parameterised).

WAL mode on SQLite, one connection guarded by a lock (the app calls it from one worker thread),
migrations recorded in `schema_version` and applied at open. Methods are synchronous; the app runs
them off the event loop.

Tables (migration 1):
  batches            ingested batch ids (idempotency), kept 2 days
  buckets            rollups per (win_s, service, route, bucket_start); route '*' = service total.
                     Counts and saturation maxima are added at ingest; the merged HDR histogram
                     (`hist`, its V2 payload; base64 wire text in rows written before version 8)
                     and its p50/p95/p99 are folded in by compaction from `pending_hist` (see
                     rollup.compact).
  pending_hist       the latency histograms of ingested series not yet merged into `buckets`
  limit_counts       limit decisions per (win_s, policy, decision, bucket_start)
  upstream_state     breaker state and pool use per (gateway_id, upstream), as last reported
  service_upstreams  which upstreams serve which service (seen in series)
  breaker_transitions, gateways, audit
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.control.store import database
from gateway.control.store.alerts import AlertRepo
from gateway.control.store.audit import AuditRepo
from gateway.control.store.budgets import BudgetRepo
from gateway.control.store.costs import CostRepo
from gateway.control.store.deliveries import DeliveryRepo
from gateway.control.store.fleet import FleetRepo
from gateway.control.store.incidents import IncidentRepo
from gateway.control.store.overload import OverloadRepo
from gateway.control.store.rollups import RollupRepo
from gateway.control.store.slos import SloRepo
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
    # Queued histograms are kept as bare payloads (bytes) instead of base64 text; rows already
    # queued keep their text's bytes and are read as before (histogram.stored_payload). SQLite
    # stores bytes as they are whatever the column's declared type.
    (8, [
        database.POSTGRESQL_ONLY + "ALTER TABLE pending_hist ALTER COLUMN hist TYPE BYTEA "
        "USING convert_to(hist, 'UTF8')",
    ]),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]
# Tables whose integer `id` the database assigns (PostgreSQL: identity columns)
_IDENTITY = database.identity_tables(sql for _v, stmts in MIGRATIONS for sql in stmts)
# Replicas starting together: one migrates, the others wait for it (pg_advisory_xact_lock)
_MIGRATION_LOCK = 0x6761_7465_0001

class Store:
    """The control plane database. Open with `Store(path)` (a SQLite file) or
    `Store("postgresql://...")`; `close()` when done. The SQL (in the repositories) is SQLite's
    dialect with qmark placeholders, written to be portable; database.py adapts it to
    PostgreSQL."""

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
        # repositories per aggregate, on this database
        self.rollups = RollupRepo(self)
        self.fleet = FleetRepo(self)
        self.overload = OverloadRepo(self)
        self.audit = AuditRepo(self)
        self.costs = CostRepo(self)
        self.budgets = BudgetRepo(self)
        self.slos = SloRepo(self)
        self.alerts = AlertRepo(self)
        self.incidents = IncidentRepo(self)
        self.deliveries = DeliveryRepo(self)
        self.tenants = TenantRepo(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -----------------------------------------------------------------------------------------
    # Transactions and migrations

    @contextmanager
    def transaction(self, *, pipelined: bool = False) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error). Nested uses join the outer one.

        pipelined (PostgreSQL; nothing changes on SQLite, whose statements cost no round trip):
        bulk writes (`executemany`) do not wait for their replies and leave with the COMMIT; see
        PostgresConnection.begin. For writers that never read a bulk write's row count."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            if isinstance(self._db, database.PostgresConnection):
                self._db.begin(pipelined=pipelined)
            else:
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

    def pipeline(self) -> AbstractContextManager[None]:
        """Writes of one transaction sent together (PostgreSQL); a no-op on SQLite, whose
        statements cost no round trip."""
        if isinstance(self._db, database.PostgresConnection):
            return self._db.pipeline()
        return nullcontext()

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
                        if text := database.ddl(sql, self.postgresql):
                            self._db.execute(text)
                    self._db.execute("INSERT INTO schema_version(version, applied_at) "
                                     "VALUES (?, ?)", (version, self.clock.time()))
                current = max(current, version)
            return current

    # -----------------------------------------------------------------------------------------
    # Diagnostics

    def table_counts(self) -> dict[str, int]:
        """Row counts of every data table (tests and diagnostics)."""
        names = ("batches", "buckets", "pending_hist", "limit_counts", "upstream_state",
                 "service_upstreams", "breaker_transitions", "gateways", "audit",
                 "retry_counts", "shed_counts")
        with self._lock:
            # Table names come from the constant tuple above, never from input.
            return {n: int(self._db.execute(f"SELECT COUNT(*) FROM {n}").fetchone()[0])
                    for n in names}
