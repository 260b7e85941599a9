"""Adaptive concurrency against an upstream that collapses under load, both figures in one run.

    python benchmarks/overload.py [--clients 60] [--duration 5] [--warmup 5]

The upstream (tests/scripted.py, its own process) answers in 5 ms while at most 20 requests are
in flight and in 500 ms beyond. `--clients` loops send GETs back to back (waiting 0.1 s after a
503) through two `gateway run` processes in turn: the same route without and with
`concurrency: {adaptive: true, min: 4, max: 200}`. Printed for each: requests forwarded per
second, the share of them the upstream answered within 100 ms and their p99 (from the gateway's
gateway_upstream_duration_seconds between two scrapes after the warm-up), the clients' own p99
of the 200s and of the 503s. Traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port
from tests.harness import GatewayProcess, gateway_yaml, write_config
from tests.scripted import KneeProcess, closed_loop, histogram, share_within

H = "gateway_upstream_duration_seconds"


def scrape(gw: GatewayProcess) -> str:
    with urllib.request.urlopen(gw.admin + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def p99_from_buckets(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the bucket holding the 99th percentile (seconds)."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    for le in sorted(after):
        if after[le] - before.get(le, 0.0) >= 0.99 * total:
            return le
    return float("inf")


async def run(name: str, extra: str, up: KneeProcess, args: argparse.Namespace,
              tmp: Path) -> None:
    port, admin = free_port(), free_port()
    text = gateway_yaml([up.url], listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}",
                        upstream_extra=f"timeout_s: 10\nmax_connections: 200\n{extra}")
    gw = GatewayProcess(write_config(tmp, text, f"{name}.yaml"), port, admin)
    gw.start()
    try:
        before: dict[float, float] = {}

        async def mark() -> None:
            await asyncio.sleep(args.warmup)
            before.update(histogram(await asyncio.to_thread(scrape, gw), H, 'upstream="up"'))
        task = asyncio.create_task(mark())
        r = await closed_loop(gw.url + "/", args.clients, args.duration, args.warmup)
        await task
        after = histogram(await asyncio.to_thread(scrape, gw), H, 'upstream="up"')
    finally:
        gw.stop()
    n, share = share_within(before, after, 0.1)
    print(f"{name:>9}: {n / args.duration:7,.0f} forwarded/s, {share:6.1%} within 100 ms, "
          f"p99 <= {p99_from_buckets(before, after) * 1000:.0f} ms (gateway); clients: "
          f"p99 {r.p99_ms():.0f} ms of {len(r.admitted_s)} 200s, "
          f"p99 {r.p99_ms('refused'):.0f} ms of {len(r.refused_s)} 503s", flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=60)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gw-overload-"))
    up = KneeProcess(threshold=20, fast_s=0.005, slow_s=0.5)
    up.start()
    try:
        await run("without", "", up, args, tmp)
        await run("adaptive", "concurrency: {adaptive: true, min: 4, max: 200}", up, args, tmp)
    finally:
        up.stop()


if __name__ == "__main__":
    asyncio.run(main())
