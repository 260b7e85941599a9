"""Background work: the SLO evaluator, compaction and retention, notifications, budgets, tenant
housekeeping. Imports domain and store; app.py schedules it."""
