"""Micro-benchmark of the breaker hot path: ns per acquire() + on_result() pair.

Run by hand: `python benchmarks/bench_breaker.py`. Uses the real SystemClock.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.breaker import CircuitBreaker, EndpointSelector
from gateway.clock import SYSTEM_CLOCK
from gateway.config import BreakerConfig, ErrorRateConfig

N = 1_000_000
REPEAT = 5


def bench(label: str, stmt: str, env: dict[str, object]) -> None:
    best = min(timeit.repeat(stmt, globals=env, number=N, repeat=REPEAT))
    print(f"{label:<58} {best / N * 1e9:7.1f} ns")


def main() -> None:
    plain = CircuitBreaker("bench", BreakerConfig(), SYSTEM_CLOCK)
    rated = CircuitBreaker("bench", BreakerConfig(error_rate=ErrorRateConfig()), SYSTEM_CLOCK)
    selector = EndpointSelector(4, BreakerConfig(), SYSTEM_CLOCK)
    print(f"python {sys.version.split()[0]}, best of {REPEAT} x {N:,}")
    bench("empty loop (timeit overhead)", "pass", {})
    bench("acquire() + on_result(None), closed", "b.acquire(); b.on_result(None)", {"b": plain})
    bench("acquire() + on_result(200), closed", "b.acquire(); b.on_result(200)", {"b": plain})
    bench("acquire() + on_result(200), closed, error_rate on",
          "b.acquire(); b.on_result(200)", {"b": rated})
    bench("acquire() + on_result(None), closed, error_rate on",
          "b.acquire(); b.on_result(None)", {"b": rated})
    bench("selector pick() + on_result(i, False), none ejected",
          "s.on_result(s.pick(), False)", {"s": selector})


if __name__ == "__main__":
    main()
