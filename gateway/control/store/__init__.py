"""The control plane's persistence: one database seam (`database.py`: SQLite or PostgreSQL),
the `Store` that owns the connection, its migrations (one versioned sequence for both engines)
and the repositories per aggregate it exposes (`store.rollups`, `store.fleet`, `store.overload`,
`store.audit`, `store.costs`, `store.budgets`, `store.slos`, `store.alerts`, `store.incidents`,
`store.deliveries`, `store.tenants`), and `Database`, the store
behind the single worker thread the event loop calls it through.

Imports nothing else of the control plane: handlers and jobs depend on it, never the reverse.
"""

from gateway.control.store.core import MIGRATIONS, SCHEMA_VERSION, Store
from gateway.control.store.rollups import BucketRow, HistKey, MinuteRow
from gateway.control.store.worker import Database

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "BucketRow", "Database", "HistKey", "MinuteRow", "Store"]
