"""Overload protection in the shipped interval: retries as per-interval deltas of the cumulative
counters, each upstream's adaptive concurrency limit at the swap and whether it refused requests."""

from __future__ import annotations

from gateway.signals import Signals
from tests.fakes import FakeClock


def test_swap_ships_interval_retries_limit_and_saturation():
    sig = Signals(FakeClock())
    limit = [40]
    sig.concurrency_sources["api"] = lambda: limit[0]
    sig.set_breaker_state("api", "closed")
    sig.set_breaker_state("plain", "closed")
    sig.retries["api", "retried"] = 5
    sig.retries["api", "succeeded"] = 4
    sig.record("r", "api", "svc", "GET", 200, 0.01, 0.01, 0, 10)
    sig.record_local("r", "api", "svc", "GET", 503, 0.0001, 10, "concurrency")
    first = {u.upstream: u for u in sig.swap().upstreams}
    assert first["api"].retries == (("retried", 5), ("succeeded", 4))
    assert first["api"].concurrency_limit == 40
    assert first["api"].concurrency_saturated is True
    assert first["plain"].concurrency_limit is None and first["plain"].retries == ()

    sig.retries["api", "retried"] = 7           # 2 more in the next interval
    limit[0] = 31
    sig.record("r", "api", "svc", "GET", 200, 0.01, 0.01, 0, 10)
    agg = sig.swap()
    second = {u.upstream: u for u in agg.upstreams}
    assert second["api"].retries == (("retried", 2),)
    assert second["api"].concurrency_limit == 31
    assert second["api"].concurrency_saturated is False
    wire = {u["upstream"]: u for u in agg.to_wire()["upstreams"]}
    assert wire["api"]["retries"] == {"retried": 2}
    assert wire["api"]["concurrency_limit"] == 31
    assert wire["api"]["concurrency_saturated"] is False
    # an upstream without any of it ships exactly what older gateways did
    assert set(wire["plain"]) == {"upstream", "latency_us_hdr", "breaker_state",
                                  "pool_in_use_max", "pool_max"}
