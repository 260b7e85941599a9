"""What one feature costs in throughput: two gateways that differ only in it, measured in turns.

    python benchmarks/ab.py signals [--rounds 5] [--duration 5] [--connections 32]
    python benchmarks/ab.py limit   [...]
    python benchmarks/ab.py redis   [...]

`signals`: the shipped gateway vs one whose Signals.record is a no-op (target: <= 5 %).
`limit`: a route with a local limit that admits everything (RateLimit headers on) vs the same
route without it (target: <= 5 %).
`overload`: the plain route whose upstream has retries and adaptive concurrency configured (not
triggered: a fast upstream that never fails) vs the same route without them (target: <= 5 %);
afterwards the "with" gateway's shed and retry counters are printed (they must be 0).
`redis`: that limit in Redis (a private redis-server, the gateway's own RESP client) vs in memory
(issue 3's target: Redis keeps >= 70 % of the local throughput).

Starts benchmarks/upstream.py and the two `gateway run` processes; wrk alternates between them
`--rounds` times so drift on a shared machine hits both alike; prints each round and the median
ratio. Traffic only to 127.0.0.1, every run bounded by --duration.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
from run import GATEWAY_YAML, ROOT, free_port, wait_port, wrk

ROOMY_LOCAL = ('  - {name: roomy_headers, key: ip_address, rate: "100000000/second", '
               'burst: 1000000, headers: true}\n')
ROOMY_HEADERS = (ROOMY_LOCAL +
                 '  - {name: roomy_redis, key: ip_address, rate: "100000000/second", '
                 'burst: 1000000, headers: true, store: redis, on_store_error: local}\n')
OVERLOAD = ("    retries: {attempts: 2, on: [connect_error, 502, 503, 504], budget_ratio: 0.2}\n"
            "    concurrency: {adaptive: true, min: 4, max: 512}\n")
STUBBED = ("import sys; import gateway.signals as s; "
           "s.Signals.record = lambda self, *a, **k: None; "
           "from gateway.__main__ import main; sys.exit(main(sys.argv[1:]))")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=("signals", "limit", "redis", "overload"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    up = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "upstream.py"), str(up)])]
    ports = {}
    redis_line = ""
    try:
        wait_port(up)
        if args.variant == "redis":
            rport = free_port()
            procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--save", "",
                                           "--appendonly", "no", "--bind", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, cwd=tmp))
            wait_port(rport)
            redis_line = f'redis: {{url: "redis://127.0.0.1:{rport}/0", timeout_ms: 25}}\n'
        shipped = ["-m", "gateway"]
        variants = {
            "signals": (("with", shipped, ""), ("without", ["-c", STUBBED], "")),
            "limit": (("with", shipped, "limits: [roomy_headers]"), ("without", shipped, "")),
            "redis": (("with", shipped, "limits: [roomy_redis]"),
                      ("without", shipped, "limits: [roomy_headers]")),
            "overload": (("with", shipped, ""), ("without", shipped, "")),
        }[args.variant]
        admins = {}
        gateways = []
        for name, prefix, limits in variants:
            port = free_port()
            cfg = tmp / f"{port}.yaml"
            admins[name] = free_port()
            text = GATEWAY_YAML.format(port=port, admin=admins[name], upstream=up, workers=1,
                                       limits=limits)
            if args.variant == "overload" and name == "with":
                text = text.replace("    max_connections: 512\n", "    max_connections: 512\n"
                                    + OVERLOAD, 1)
            # (the Redis policy only where a redis: section exists: check refuses it otherwise)
            roomy = ROOMY_HEADERS if redis_line else ROOMY_LOCAL
            cfg.write_text(redis_line + text.replace("limits:\n", "limits:\n" + roomy, 1))
            gateways.append(subprocess.Popen([sys.executable, *prefix, "run", "--config",
                                              str(cfg)], stderr=subprocess.DEVNULL, cwd=tmp))
            procs.append(gateways[-1])
            wait_port(port)
            ports[name] = port
        url = {name: f"http://127.0.0.1:{port}/" for name, port in ports.items()}
        for name in url:
            wrk(url[name], 2, args.connections)  # warm-up
        rps: dict[str, list[float]] = {name: [] for name in url}
        cpu_us: dict[str, list[float]] = {name: [] for name in url}  # gateway CPU per request
        gw_proc = {name: psutil.Process(p.pid) for name, p in zip(url, gateways)}
        for i in range(args.rounds):
            for name in url:
                t0 = gw_proc[name].cpu_times()
                r = wrk(url[name], args.duration, args.connections)["rps"]
                t1 = gw_proc[name].cpu_times()
                used = (t1.user + t1.system) - (t0.user + t0.system)
                rps[name].append(r)
                cpu_us[name].append(used / (r * args.duration) * 1e6)
            print(f"round {i + 1}: " + ", ".join(
                f"{n} {rps[n][-1]:,.0f} req/s ({cpu_us[n][-1]:.1f} us CPU/request)" for n in url))
        if args.variant == "overload":
            with urllib.request.urlopen(f"http://127.0.0.1:{admins['with']}/metrics") as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith(("gateway_shed_requests_total{",
                                        "gateway_upstream_retries_total{",
                                        "gateway_upstream_concurrency_limit{")):
                        print("with:", line)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
    on, off = statistics.median(rps["with"]), statistics.median(rps["without"])
    c_on, c_off = statistics.median(cpu_us["with"]), statistics.median(cpu_us["without"])
    if args.variant == "redis":
        print(f"redis: median Redis {on:,.0f} req/s, local {off:,.0f} req/s: Redis keeps "
              f"{on / off:.0%} (target >= 70 %); gateway CPU per request {c_on:.1f} vs "
              f"{c_off:.1f} us")
        return 0
    print(f"{args.variant}: median with {on:,.0f} req/s, without {off:,.0f} req/s; "
          f"throughput cost {1 - on / off:+.1%} (target <= 5 %)")
    print(f"{args.variant}: gateway CPU per request with {c_on:.1f} us, without {c_off:.1f} us; "
          f"cost {c_on / c_off - 1:+.1%} (what the gateway itself spends; the load generator "
          f"shares the cores, so throughput also moves with the bytes it has to parse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
