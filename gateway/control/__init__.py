"""The control plane: ingest of gateway aggregates, rollups, golden signals, health, auth, audit.

Modules: `config` (control.yaml), `auth` (tokens, roles, the access matrix), `ingest` (wire format
validation, bounded body reading), `store` (SQLite; the only module with SQL), `rollup` (bucket
maths, HDR histogram merging, compaction and retention), `health` (golden-signal thresholds),
`app` (the aiohttp application and `run`).
"""
