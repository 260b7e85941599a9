"""What one feature costs in throughput: two gateways that differ only in it, measured in turns.

    python benchmarks/ab.py signals [--rounds 5] [--duration 5] [--connections 32]
    python benchmarks/ab.py limit   [...]
    python benchmarks/ab.py redis   [...]
    python benchmarks/ab.py tracing [...] [--sample 0.1]
    python benchmarks/ab.py propagation [...]
    python benchmarks/ab.py tenant  [...]

`signals`: the shipped gateway vs one whose Signals.record is a no-op (target: <= 5 %).
`limit`: a route with a local limit that admits everything (RateLimit headers on) vs the same
route without it (target: <= 5 %).
`redis`: that limit in Redis (a private redis-server, redis-py behind the store's batching pump)
vs in memory (target: Redis keeps >= 70 % of the local throughput). With `--baseline-src DIR`
(another checkout's source tree, e.g. `git archive <commit> | tar -x -C DIR`) a third gateway
runs that tree's Redis store in the same rounds: the new store against the old one.
`tracing`: span export on at sample_ratio 0.1 to a local OTLP/HTTP sink vs no `tracing:` section
(traceparent propagation is in both; target: <= 5 %).
`propagation`: the shipped gateway vs one whose trace context is a constant (what parsing or
generating `traceparent` costs on every forwarded request).
`tenant`: a route whose requests pass a tenant plan in Redis (token bucket + day quota: one Lua
script per request, the calendar window from the gateway's clock) vs the same route with a plain
Redis limit instead (target: the plan costs <= 10 % more). Both admit everything.
`overload`: the plain route whose upstream has retries and adaptive concurrency configured (not
triggered: a fast upstream that never fails) vs the same route without them (target: <= 5 %);
afterwards the "with" gateway's shed and retry counters are printed (they must be 0).

Starts benchmarks/upstream.py and the two `gateway run` processes; wrk alternates between them
`--rounds` times so drift on a shared machine hits both alike; prints each round and the median
ratio. Traffic only to 127.0.0.1, every run bounded by --duration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
from run import GATEWAY_YAML, ROOT, free_port, wait_port, wrk

ROOMY_HEADERS = ('  - {name: roomy_headers, key: ip_address, rate: "100000000/second", '
                 'burst: 1000000, headers: true}\n')
# Only with a redis: section (a redis limit without one is a config error).
ROOMY_REDIS = ('  - {name: roomy_redis, key: ip_address, rate: "100000000/second", '
               'burst: 1000000, headers: true, store: redis, on_store_error: local}\n')
TENANT_PLAN = ('tenants:\n'
               '  store: redis\n'
               '  time_zone: "Europe/Berlin"\n'
               '  default_plan: roomy\n'
               '  plans:\n'
               '    roomy: {rate: "100000000/second", burst: 1000000, '
               'quotas: {day: 1000000000000}}\n')
OVERLOAD = ("    retries: {attempts: 2, on: [connect_error, 502, 503, 504], budget_ratio: 0.2}\n"
            "    concurrency: {adaptive: true, min: 4, max: 512}\n")
STUBBED = ("import sys; import gateway.signals as s; "
           "s.Signals.record = lambda self, *a, **k: None; "
           "from gateway.__main__ import main; sys.exit(main(sys.argv[1:]))")
CONSTANT_TRACE = ("import sys; import gateway.proxy as p; from gateway.tracing import context_for; "
                  "c = context_for(None, None); p.context_for = lambda *a: c; "
                  "from gateway.__main__ import main; sys.exit(main(sys.argv[1:]))")

# A local OTLP/HTTP sink: answers every export with an empty ExportTraceServiceResponse.
OTLP_SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=("signals", "limit", "redis", "tracing", "propagation",
                                        "tenant", "overload"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--sample", type=float, default=0.1, help="tracing: sample_ratio")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="redis: also run this source tree's Redis store (PYTHONPATH=DIR)")
    args = ap.parse_args()
    up = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "upstream.py"), str(up)])]
    ports = {}
    redis_line = ""
    try:
        wait_port(up)
        if args.variant in ("redis", "tenant"):
            rport = free_port()
            procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--save", "",
                                           "--appendonly", "no", "--bind", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, cwd=tmp))
            wait_port(rport)
            redis_line = f'redis: {{url: "redis://127.0.0.1:{rport}/0", timeout_ms: 25}}\n'
        tracing_line = ""
        if args.variant == "tracing":
            sink = free_port()
            procs.append(subprocess.Popen([sys.executable, "-c", OTLP_SINK, str(sink)]))
            wait_port(sink)
            tracing_line = (f'tracing: {{otlp_endpoint: "http://127.0.0.1:{sink}", '
                            f'sample_ratio: {args.sample}}}\n')
        shipped = ["-m", "gateway"]
        variants = {
            "signals": (("with", shipped, ""), ("without", ["-c", STUBBED], "")),
            "limit": (("with", shipped, "limits: [roomy_headers]"), ("without", shipped, "")),
            "redis": (("with", shipped, "limits: [roomy_redis]"),
                      ("without", shipped, "limits: [roomy_headers]")),
            "tracing": (("with", shipped, ""), ("without", shipped, "")),
            "propagation": (("with", shipped, ""), ("without", ["-c", CONSTANT_TRACE], "")),
            "tenant": (("with", shipped, ""), ("without", shipped, "limits: [roomy_redis]")),
            "overload": (("with", shipped, ""), ("without", shipped, "")),
        }[args.variant]
        extra = {"with": TENANT_PLAN} if args.variant == "tenant" else {}
        envs = {name: None for name, _, _ in variants}
        if args.variant == "redis" and args.baseline_src is not None:
            variants = (*variants, ("baseline", shipped, "limits: [roomy_redis]"))
            envs["baseline"] = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
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
            cfg.write_text(redis_line + (tracing_line if name == "with" else "") +
                           extra.get(name, "") +
                           text.replace("limits:\n", "limits:\n" + ROOMY_HEADERS +
                                        (ROOMY_REDIS if redis_line else ""), 1))
            gateways.append(subprocess.Popen([sys.executable, *prefix, "run", "--config",
                                              str(cfg)], stderr=subprocess.DEVNULL, cwd=tmp,
                                             env=envs[name]))
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
        if "baseline" in rps:
            base = statistics.median(rps["baseline"])
            ratios = [w / b for w, b in zip(rps["with"], rps["baseline"])]
            c_base = statistics.median(cpu_us["baseline"])
            print(f"redis: baseline tree's Redis store {base:,.0f} req/s ({c_base:.1f} us CPU/"
                  f"request), keeps {base / off:.0%} of local; this tree's store / baseline: "
                  f"ratio of medians {on / base:.1%}, median of per-round ratios "
                  f"{statistics.median(ratios):.1%} (rounds {', '.join(f'{r:.0%}' for r in ratios)}"
                  f"); CPU per request {c_on / c_base:.1%} of the baseline's")
        return 0
    if args.variant == "tenant":
        ratios = [w / b for w, b in zip(rps["with"], rps["without"])]
        print(f"tenant: median plan (bucket + day quota, Redis) {on:,.0f} req/s, plain Redis "
              f"limit {off:,.0f} req/s; throughput cost {1 - on / off:+.1%} (target <= 10 %); "
              f"per-round ratios {', '.join(f'{r:.0%}' for r in ratios)}")
        print(f"tenant: gateway CPU per request {c_on:.1f} vs {c_off:.1f} us; cost "
              f"{c_on / c_off - 1:+.1%}")
        return 0
    print(f"{args.variant}: median with {on:,.0f} req/s, without {off:,.0f} req/s; "
          f"throughput cost {1 - on / off:+.1%} (target <= 5 %)")
    print(f"{args.variant}: gateway CPU per request with {c_on:.1f} us, without {c_off:.1f} us; "
          f"cost {c_on / c_off - 1:+.1%} (what the gateway itself spends; the load generator "
          f"shares the cores, so throughput also moves with the bytes it has to parse)")
    # Rounds are pairs measured back to back: the median of the per-round ratios cancels the
    # drift that moves both sides of a pair alike (a busy neighbour, frequency changes).
    paired_rps = statistics.median(w / o for w, o in zip(rps["with"], rps["without"]))
    paired_cpu = statistics.median(w / o for w, o in zip(cpu_us["with"], cpu_us["without"]))
    print(f"{args.variant}: median of per-round ratios: throughput cost {1 - paired_rps:+.1%}, "
          f"CPU per request {paired_cpu - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
