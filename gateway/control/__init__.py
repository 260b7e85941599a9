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
