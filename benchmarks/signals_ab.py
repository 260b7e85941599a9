"""Throughput cost of the golden signals: the same gateway with recording on and stubbed out.

    python benchmarks/signals_ab.py [--rounds 5] [--duration 5] [--connections 32]

Starts benchmarks/upstream.py and two `gateway run` processes on the same config (a plain route):
one as shipped, one whose Signals.record is replaced by a no-op before start-up. wrk alternates
between them `--rounds` times so drift on a shared machine hits both alike; prints each round and
the median ratio. Traffic only to 127.0.0.1, every run bounded by --duration.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from run import GATEWAY_YAML, ROOT, free_port, wait_port, wrk

STUBBED = ("import sys; import gateway.signals as s; "
           "s.Signals.record = lambda self, *a, **k: None; "
           "from gateway.__main__ import main; sys.exit(main(sys.argv[1:]))")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    up = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="gw-signals-ab-"))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "upstream.py"), str(up)])]
    ports = {}
    try:
        wait_port(up)
        for name, prefix in (("signals on", ["-m", "gateway"]), ("signals off", ["-c", STUBBED])):
            port = free_port()
            cfg = tmp / f"{port}.yaml"
            cfg.write_text(GATEWAY_YAML.format(port=port, admin=free_port(), upstream=up,
                                               workers=1, limits=""))
            procs.append(subprocess.Popen([sys.executable, *prefix, "run", "--config", str(cfg)],
                                          stderr=subprocess.DEVNULL, cwd=tmp))
            wait_port(port)
            ports[name] = port
        url = {name: f"http://127.0.0.1:{port}/" for name, port in ports.items()}
        for name in url:
            wrk(url[name], 2, args.connections)  # warm-up
        rps: dict[str, list[float]] = {name: [] for name in url}
        for i in range(args.rounds):
            for name in url:
                rps[name].append(wrk(url[name], args.duration, args.connections)["rps"])
            print(f"round {i + 1}: " + ", ".join(f"{n} {v[-1]:,.0f} req/s" for n, v in rps.items()))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
    on, off = statistics.median(rps["signals on"]), statistics.median(rps["signals off"])
    print(f"median: signals on {on:,.0f} req/s, off {off:,.0f} req/s; "
          f"cost of recording {1 - on / off:+.1%} (target <= 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
