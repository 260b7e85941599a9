"""Microbenchmark of the per-request signal cost and of the periodic readers.

    python benchmarks/bench_signals.py [--requests 300000]

Per request the proxy does: inflight += 1, one record_limit() per policy (one here), record(),
inflight -= 1. The target is <= 3 us for all of that together. The readers (swap, to_wire,
render) run every ship interval / scrape, off the request path, and are reported per call.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from collections.abc import Callable

from gateway.metrics import render
from gateway.signals import Signals


def _labels(n: int, seed: int = 1) -> list[tuple[str, str, str, str, int, float, float | None]]:
    """A realistic mix: 10 routes over 4 upstreams, 3 methods, 5 codes, lognormal latencies."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.randrange(10)
        code = rng.choices((200, 201, 404, 429, 503), (80, 5, 8, 5, 2))[0]
        d = rng.lognormvariate(-4.5, 1.0)
        out.append((f"route-{r}", f"upstream-{r % 4}", f"service-{r % 4}",
                    rng.choice(("GET", "GET", "POST", "PUT")), code, d,
                    None if code in (429, 503) else d * 0.8))
    return out


def best_of(runs: int, fn: Callable[[], int]) -> float:
    """Best seconds per operation over `runs` runs (fn returns how many operations it did)."""
    best = float("inf")
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        n = fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    mix = _labels(args.requests)
    s = Signals()

    def record_only() -> int:
        rec = s.record
        for route, up, svc, method, code, d, u in mix:
            rec(route, up, svc, method, code, d, u, 120, 2048)
        return len(mix)

    def per_request() -> int:
        rec, lim = s.record, s.record_limit
        for route, up, svc, method, code, d, u in mix:
            s.inflight += 1
            lim("api_calls", "limited" if code == 429 else "allowed")
            rec(route, up, svc, method, code, d, u, 120, 2048)
            s.inflight -= 1
        return len(mix)

    def loop_only() -> int:
        for _route, _up, _svc, _method, _code, _d, _u in mix:
            pass
        return len(mix)

    overhead = best_of(args.runs, loop_only)
    rec_s = best_of(args.runs, record_only) - overhead
    all_s = best_of(args.runs, per_request) - overhead
    s.swap()

    def fill() -> None:
        for route, up, svc, method, code, d, u in mix[:20_000]:
            s.record(route, up, svc, method, code, d, u, 120, 2048)

    fill()
    series = len(s.swap().series)
    swaps = []
    wires = []
    renders = []
    for _ in range(args.runs):
        fill()
        t0 = time.perf_counter()
        agg = s.swap()
        swaps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        agg.to_wire()
        wires.append(time.perf_counter() - t0)
        fill()
        t0 = time.perf_counter()
        render(s)
        renders.append(time.perf_counter() - t0)
    result = {
        "record_us": round(rec_s * 1e6, 3),
        "per_request_all_signals_us": round(all_s * 1e6, 3),
        "target_us": 3.0,
        "series_per_interval": series,
        "swap_ms": round(min(swaps) * 1e3, 3),
        "to_wire_ms": round(min(wires) * 1e3, 3),
        "render_ms": round(min(renders) * 1e3, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
