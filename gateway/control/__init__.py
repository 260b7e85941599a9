"""The control plane: ingest of gateway aggregates, rollups, golden signals, health, SLOs, alerts,
incidents, costs, tenants, auth, audit, the dashboard.

Layers, imports pointing one way only (tests/test_control_layers.py checks it):

  app.py     wiring only: create_app (startup, cleanup, background jobs), serve, run
  web.py     the web kit: app keys, middleware, problem/JSON answers, body/path/query helpers,
             the `requires` guard (auth.py: tokens, roles, the access matrix)
  api/       aiohttp handlers per resource; each module's `routes(app)`
  domain/    rules and maths: no aiohttp, no SQL; a store is handed in, never imported
  jobs/      background work: evaluator, compaction and retention, notifications, budgets
  store/     the database seam (SQLite | PostgreSQL), Store and its repositories, migrations
  config.py  control.yaml; backup.py, slorules.py: the `control-db` and `slo-rules` commands
"""

import sys

from gateway.control.domain import costs, slo
from gateway.control.jobs import notify
from gateway.control.store import database

# config.py still imports check_config, parse_notifications, parse_slos and is_postgresql by
# their old module paths: the same modules under those names until it imports them from here.
for _name, _module in (("costs", costs), ("notify", notify), ("slo", slo),
                       ("database", database)):
    sys.modules.setdefault(f"{__name__}.{_name}", _module)
