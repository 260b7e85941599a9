"""Control plane benchmark (run by hand): `python benchmarks/bench_control.py [--batches N]`.

1. Ingest throughput over HTTP: the control plane runs as its own process (`run()`, uvloop,
   SQLite WAL in a temp dir); a client POSTs gzipped batches of 50 route series each (5 services
   x 10 routes, ~200 latencies per histogram) with some concurrency. Target: 500 gateways at a
   10 s interval = 50 batches/s. Reported: batches/s, and the time for the rollup compaction
   backlog to be folded (one /v1/signals call after the run).
2. In-process ingest cost (parse + validate + store, no HTTP) and compaction cost per batch.
3. /v1/signals latency over a populated database: 30 days of 1h rows and 1 day of 1m rows for
   20 services (plus 5 routes each), as the 1m retention is 1 day.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.control.domain import histogram, rollup
from gateway.control.domain.ingest import parse_batch
from gateway.control.store import Store
from tests.conftest import free_port, wait_port

TOKEN = "bench-token"


def make_hists(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        h = histogram.new()
        for _ in range(200):
            h.record_value(int(rng.lognormvariate(9.5, 1.0)) + 1)
        out.append(h.encode().decode())
    return out


def make_batch(gw: int, seq: int, t: float, hists: list[str], rng: random.Random) -> dict:
    series = []
    for svc in range(5):
        for route in range(10):
            series.append({"route": f"route-{svc}-{route}", "upstream": f"up-{svc}",
                           "service": f"service-{svc}", "method": "GET",
                           "code": 200 if route else 503, "count": 200,
                           "bytes_in": 20_000, "bytes_out": 400_000,
                           "latency_us_hdr": rng.choice(hists)})
    return {"batch_id": f"gw{gw}-{seq}", "gateway_id": f"gw{gw}", "seq": seq, "schema": 1,
            "interval_start": t - 10, "interval_end": t, "series": series,
            "upstreams": [{"upstream": f"up-{i}", "latency_us_hdr": None,
                           "breaker_state": "closed", "pool_in_use_max": 3, "pool_max": 64}
                          for i in range(5)],
            "limits": [{"policy": "api", "decision": "allowed", "count": 9_000}],
            "breaker_transitions": [],
            "saturation": {"inflight_max": 40, "loop_lag_max_s": 0.003, "cpu_percent": 35.0,
                           "rss_bytes": 80_000_000}}


async def bench_http(n: int, concurrency: int, workdir: Path, database: str | None = None,
                     replicas: int = 1, label: str = "SQLite", rate: float = 0.0) -> float:
    """POST n batches to `replicas` control-plane processes on one database (each client worker
    sticks to one replica, as a gateway does); returns batches/s.

    rate = 0: closed loop, `concurrency` clients each sending its next batch when the last is
    answered. rate > 0: open loop, as a fleet sends (gateways do not wait for each other): batch
    i leaves at i / rate s whatever is still in flight, spread over the replicas; the answer is
    the rate the control plane completed them at, which equals `rate` when it keeps up."""
    database = database or f"{workdir}/http-{time.monotonic_ns()}.db"
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    for _ in range(replicas):
        port = free_port()
        cfg = workdir / f"control-{port}.yaml"
        cfg.write_text(f'listen: "127.0.0.1:{port}"\ndatabase: "{database}"\n'
                       f"tokens: [{{name: gw, role: gateway, token: {TOKEN}}},"
                       f" {{name: r, role: reader, token: reader-{TOKEN}}}]\n")
        with open(workdir / f"control-{port}.log", "wb") as log:   # the child keeps its copy
            procs.append(subprocess.Popen(
                [sys.executable, "-c", ("import sys; from gateway.control.app import run; "
                                        "sys.exit(run(sys.argv[1]))"), str(cfg)],
                cwd=ROOT, stderr=log))
        urls.append(f"http://127.0.0.1:{port}")
        wait_port(port, timeout=30)     # one after the other: the first migrates
    try:
        rng = random.Random(1)
        hists = make_hists(40, rng)
        now = time.time()
        bodies = [gzip.compress(orjson.dumps(make_batch(i % 500, i, now, hists, rng)))
                  for i in range(n)]
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Encoding": "gzip",
                   "Content-Type": "application/json"}
        latencies: list[float] = []
        steady: list[float] = []       # open loop: of the batches sent after the first 2 s
        queue = list(reversed(bodies))
        in_flight = peak = 0
        # open loop: up to 512 connections (gateways), the rest of what is in flight queues in
        # the client and counts in its latency; new connections by the thousand would overflow
        # the server's accept queue and be reset, which no fleet of long-lived shippers does
        connector = aiohttp.TCPConnector(limit=512 if rate else 100)
        async with aiohttp.ClientSession(connector=connector) as s:
            async def post(url: str, body: bytes, warm: bool = False) -> None:
                nonlocal in_flight, peak
                in_flight += 1
                peak = max(peak, in_flight)
                t0 = time.perf_counter()
                async with s.post(f"{url}/v1/ingest", data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        logs = "".join(p.read_text()[-3000:] for p in
                                       workdir.glob("control-*.log"))
                        raise AssertionError(f"ingest answered {r.status}; logs:\n{logs}")
                latencies.append(time.perf_counter() - t0)
                if warm:
                    steady.append(latencies[-1])
                in_flight -= 1

            async def worker(url: str) -> None:
                while queue:
                    await post(url, queue.pop())

            async def fleet() -> None:
                start = time.perf_counter()
                tasks = []
                for i, body in enumerate(bodies):
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.ensure_future(post(urls[i % replicas], body,
                                                            i >= 2 * rate)))
                await asyncio.gather(*tasks)

            t0 = time.perf_counter()
            if rate:
                await fleet()
            else:
                await asyncio.gather(*(worker(urls[i % replicas]) for i in range(concurrency)))
            elapsed = time.perf_counter() - t0
            t1 = time.perf_counter()
            async with s.get(f"{urls[0]}/v1/signals", params={"window": "1m"},
                             headers={"Authorization": f"Bearer reader-{TOKEN}"}) as r:
                rows = (await r.json())["rows"]
            catch_up = time.perf_counter() - t1
        latencies.sort()
        counted = sum(r["request_count"] for r in rows)
        load = f"concurrency {concurrency}"
        if rate:
            steady.sort()
            load = (f"open loop at {rate:.0f}/s (peak {peak} in flight; after the first 2 s: "
                    f"p50 {statistics.median(steady) * 1000:.0f} ms, p99 "
                    f"{steady[int(len(steady) * 0.99)] * 1000:.0f} ms)") if steady else \
                f"open loop at {rate:.0f}/s (peak {peak} in flight)"
        print(f"HTTP ingest, {label}, {replicas} replica(s): {n} batches x 50 series, "
              f"{load}: {n / elapsed:.0f} batches/s ({elapsed:.1f} s); "
              f"request p50 {statistics.median(latencies) * 1000:.1f} ms, p99 "
              f"{latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms; compaction backlog "
              f"folded by the next /v1/signals in {catch_up * 1000:.0f} ms "
              f"({len(rows)} service rows, {counted} requests"
              f"{'' if counted == n * 10_000 else f' != {n * 10_000} expected!'})")
        return n / elapsed
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


def bench_inprocess(n: int, workdir: Path) -> None:
    rng = random.Random(2)
    hists = make_hists(40, rng)
    now = time.time()
    bodies = [orjson.dumps(make_batch(i % 500, i, now, hists, rng)) for i in range(n)]
    store = Store(workdir / "inproc.db")
    try:
        t0 = time.perf_counter()
        for body in bodies:
            rollup.apply(store, parse_batch(body, now=now), now)
        ingest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        folded = rollup.compact(store)
        compact_s = time.perf_counter() - t0
        print(f"in-process: parse+validate+store {ingest_s / n * 1000:.2f} ms/batch "
              f"({n / ingest_s:.0f} batches/s); compaction {compact_s / n * 1000:.2f} ms/batch "
              f"({folded} histograms); together {n / (ingest_s + compact_s):.0f} batches/s "
              f"on one core")
    finally:
        store.close()


def populate(path: Path | str, now: float) -> None:
    store = Store(path)
    rng = random.Random(3)
    enc = histogram.validate(make_hists(1, rng)[0])[1]     # stored as compaction stores it
    p50, p95, p99 = histogram.Counts.of(enc).percentiles()
    routes = ["*"] + [f"route-{i}" for i in range(5)]
    plans = [(3_600, 30 * 24), (60, 24 * 60)]
    for win, count in plans:
        first = rollup.bucket_start(now, win) - (count - 1) * win
        for svc in range(20):
            rows = []
            hist_rows = []
            for k in range(count):
                bs = first + k * win
                for route in routes:
                    rows.append((win, bs, f"service-{svc}", route, 1000, 10, 5, 2, 1, 1, 30.0,
                                 2.0, 10, 1))
                    hist_rows.append((enc, p50, p95, p99, win, bs, f"service-{svc}", route))
            with store.transaction():
                store.rollups.add_buckets(rows)
                store.rollups.set_bucket_hists(hist_rows)
    store.close()


async def bench_signals(workdir: Path, database: str | None = None,
                        label: str = "SQLite") -> None:
    from aiohttp import web

    from gateway.control.app import create_app
    from gateway.control.config import ControlConfig, TokenConfig

    now = time.time()
    db = database or str(workdir / "signals.db")
    t0 = time.perf_counter()
    populate(db, now)
    size = "" if database else f" ({os.path.getsize(db) / 1e6:.0f} MB)"
    print(f"{label}: populated 30 d of 1h + 1 d of 1m rows for 20 services x (total + 5 routes)"
          f" in {time.perf_counter() - t0:.1f} s{size}")
    cfg = ControlConfig(listen="127.0.0.1:0", database=str(db),
                        tokens=(TokenConfig("r", "reader", "rt"),))
    runner = web.AppRunner(create_app(cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}/v1/signals"
    cases = [
        ("1h, 30 days, one service", {"window": "1h", "service": "service-7",
                                      "since": str(now - 30 * 86_400)}),
        ("1h, 30 days, all 20 services", {"window": "1h", "since": str(now - 30 * 86_400)}),
        ("1m, 1 day, one service", {"window": "1m", "service": "service-7",
                                    "since": str(now - 86_400)}),
        ("1m, 1 day, one route", {"window": "1m", "service": "service-7", "route": "route-3",
                                  "since": str(now - 86_400)}),
        ("1m, 1 day, all 20 services", {"window": "1m", "since": str(now - 86_400)}),
        ("1m, last hour (default), all", {"window": "1m"}),
    ]
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer rt"}) as s:
            for name, params in cases:
                times = []
                n_rows = 0
                for _ in range(20):
                    t0 = time.perf_counter()
                    async with s.get(url, params=params) as r:
                        doc = orjson.loads(await r.read())
                    times.append(time.perf_counter() - t0)
                    n_rows = len(doc["rows"])
                times.sort()
                print(f"{label} /v1/signals {name}: {n_rows} rows, p50 {times[10] * 1000:.1f} ms, "
                      f"max {times[-1] * 1000:.1f} ms")
            for _ in range(1):
                t0 = time.perf_counter()
                async with s.get(f"http://{host}:{port}/v1/health/overview") as r:
                    await r.read()
                print(f"{label} /v1/health/overview (20 services): {(time.perf_counter() - t0) * 1000:.1f}"
                      f" ms")
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open loop: send batches at this rate (batches/s) whatever is in "
                         "flight, as a fleet of gateways does, instead of --concurrency clients")
    ap.add_argument("--postgresql", action="store_true",
                    help="also PostgreSQL (a private cluster, as the tests start it): ingest "
                         "with 1 and 2 replicas in rounds alternating with SQLite (the anchor)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        if not args.postgresql:
            bench_inprocess(min(args.batches, 500), work)
            asyncio.run(bench_http(args.batches, args.concurrency, work, rate=args.rate))
            asyncio.run(bench_signals(work))
            return
        from tests.postgres import PostgresCluster
        cluster = PostgresCluster()
        cluster.start()
        try:
            ratios = []
            for r in range(args.rounds):    # alternating A/B rounds: load drifts on a shared box
                print(f"-- round {r + 1}")
                lite = asyncio.run(bench_http(args.batches, args.concurrency, work,
                                              rate=args.rate))
                pg2 = asyncio.run(bench_http(args.batches, args.concurrency, work,
                                             cluster.create_database(), 2, "PostgreSQL",
                                             args.rate))
                pg1 = asyncio.run(bench_http(args.batches, args.concurrency, work,
                                             cluster.create_database(), 1, "PostgreSQL",
                                             args.rate))
                ratios.append((pg2 / lite, pg1 / lite))
                print(f"   PostgreSQL 2 replicas / SQLite = {pg2 / lite:.2f}x, "
                      f"1 replica / SQLite = {pg1 / lite:.2f}x")
            print("ratios per round (2 replicas, 1 replica vs SQLite): " +
                  ", ".join(f"{a:.2f}x/{b:.2f}x" for a, b in ratios))
            asyncio.run(bench_signals(work))
            asyncio.run(bench_signals(work, cluster.create_database(), "PostgreSQL"))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
