"""An SRE reverse-proxy gateway: rate limits, circuit breakers, golden signals, SLOs, cost budgets."""

__version__ = "0.1.0"
