"""The Redis store's client cost: RedisStore.take() calls/s and client CPU per call, in turns.

    python benchmarks/bench_redis_store.py [--rounds 5] [--duration 3] [--callers 32]
                                           [--baseline-src DIR]

Starts a private redis-server and a 3-master Redis Cluster on 127.0.0.1, then alternates, each
round, one fresh process per variant: `callers` coroutines on uvloop calling the store's take()
(one policy, a roomy limit, one key per caller) for `duration` seconds:

* `single`: this tree's store on the single server (one connection, the batching pump);
* `cluster`: this tree's store with `redis.cluster: true` (a cluster pipeline per batch);
* `baseline`: with `--baseline-src DIR` (another tree, e.g. `git archive <commit> | tar -x -C
  DIR`), that tree's store on the single server, as the anchor of the same run.

Prints each round and the medians; the CPU is the client process's own (Redis runs apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import ROOT, free_port, wait_port

ONE = r'''
import asyncio, json, sys, time
import uvloop
from gateway.config import RedisConfig
from gateway.config import LimitConfig
from gateway.ratelimit import make_bucket
from gateway.ratelimit_redis import RedisStore

url, cluster, duration, callers = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]), int(sys.argv[4])

async def main():
    kw = {"cluster": True} if cluster else {}
    store = RedisStore(RedisConfig(url=url, timeout_ms=1000, **kw))
    await store.start()
    bucket = make_bucket(LimitConfig(name="roomy", key="ip_address", rate_count=100000000,
                                     period_s=1.0, burst=1000000, store="redis"))
    calls = [0]
    stop = [False]

    async def caller(i):
        ident = f"client-{i}"
        while not stop[0]:
            await store.take((bucket,), (ident,), 1, True)
            calls[0] += 1

    tasks = [asyncio.ensure_future(caller(i)) for i in range(callers)]
    await asyncio.sleep(0.5)                                   # warm-up
    n0, c0, t0 = calls[0], time.process_time(), time.monotonic()
    await asyncio.sleep(duration)
    n1, c1, t1 = calls[0], time.process_time(), time.monotonic()
    stop[0] = True
    await asyncio.gather(*tasks)
    await store.close()
    print(json.dumps({"rate": (n1 - n0) / (t1 - t0), "cpu_us": (c1 - c0) / (n1 - n0) * 1e6}))

uvloop.run(main())
'''


def start(cmd: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--baseline-src", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-redis-"))
    script = tmp / "one.py"
    script.write_text(ONE)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        single = free_port()
        procs.append(start(["redis-server", "--port", str(single), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no"], tmp))
        cluster_ports = [free_port() for _ in range(3)]
        for port in cluster_ports:
            d = tmp / str(port)
            d.mkdir()
            procs.append(start(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--cluster-enabled", "yes",
                                "--cluster-port", str(free_port())], d))
        for port in (single, *cluster_ports):
            wait_port(port)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in cluster_ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, stdout=subprocess.DEVNULL, timeout=30)
        time.sleep(1.0)                      # the nodes agree on the slot map
        here = str(ROOT)
        variants = {"single": (here, f"redis://127.0.0.1:{single}/0", "0"),
                    "cluster": (here, f"redis://127.0.0.1:{cluster_ports[0]}/0", "1")}
        if args.baseline_src is not None:
            variants["baseline"] = (str(args.baseline_src.resolve()),
                                    f"redis://127.0.0.1:{single}/0", "0")
        got: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for i in range(args.rounds):
            for name, (src, url, cluster) in variants.items():
                env = {**os.environ, "PYTHONPATH": src}
                out = subprocess.run([sys.executable, str(script), url, cluster,
                                      str(args.duration), str(args.callers)], env=env,
                                     capture_output=True, check=True, timeout=60,
                                     cwd=tmp).stdout
                got[name].append(json.loads(out))
            print(f"round {i + 1}: " + ", ".join(
                f"{n} {got[n][-1]['rate']:,.0f} calls/s ({got[n][-1]['cpu_us']:.1f} us CPU/call)"
                for n in variants))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
    med = {n: (statistics.median(r["rate"] for r in rs), statistics.median(r["cpu_us"] for r in rs))
           for n, rs in got.items()}
    for n, (rate, cpu) in med.items():
        print(f"median {n}: {rate:,.0f} calls/s, {cpu:.1f} us client CPU per call")
    if "baseline" in med:
        ratios = [a["rate"] / b["rate"] for a, b in zip(got["single"], got["baseline"])]
        print(f"single / baseline: median of per-round ratios {statistics.median(ratios):.1%}; "
              f"CPU per call {med['single'][1] / med['baseline'][1]:.1%} of the baseline's")
    print(f"cluster / single: {med['cluster'][0] / med['single'][0]:.1%} of the calls/s, "
          f"CPU per call {med['cluster'][1] / med['single'][1]:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
