"""First benchmark harness: the upstream hit directly vs through the gateway, in one run.

    python benchmarks/run.py [--duration 10] [--connections 32] [--workers 1]

Starts a minimal upstream (benchmarks/upstream.py), the real `gateway run` as a subprocess in
front of it, and a load generator against each: wrk when installed (apt-get install wrk),
otherwise a bounded Python client. Prints req/s and p50/p99 for both, and the ratio.
Traffic goes only to 127.0.0.1; every run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


GATEWAY_YAML = """
listen: "127.0.0.1:{port}"
workers: {workers}
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  - name: bench
    endpoints: ["http://127.0.0.1:{upstream}"]
    max_connections: 512
limits:
  - {{name: roomy, key: ip_address, rate: "100000000/second", burst: 1000000, headers: false}}
routes:
  - name: bench
    match: {{path_prefix: "/"}}
    upstream: bench
    service: bench
    {limits}
"""


def wrk(url: str, duration: int, connections: int, *, close: bool = False) -> dict[str, float]:
    """`close`: send `Connection: close`, so every request is a new connection."""
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(["wrk", "-t", "1" if connections < 64 else "2", "-c", str(connections),
                          "-d", f"{duration}s", "--latency", *extra, url],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE):
        lat[pct] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": lat.get("50", float("nan")), "p99_ms": lat.get("99", float("nan")),
            "non_2xx": int(errors.group(1)) if errors else 0}


async def _py_load(host: str, port: int, duration: float, connections: int) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.monotonic() + duration
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(n)
            latencies.append(time.perf_counter() - t0)
        writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.monotonic() - t0
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3, "non_2xx": 0}


def load(port: int, duration: int, connections: int) -> dict[str, float]:
    if shutil.which("wrk"):
        return wrk(f"http://127.0.0.1:{port}/", duration, connections)
    return asyncio.run(_py_load("127.0.0.1", port, duration, connections))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    print(f"load generator: {'wrk' if shutil.which('wrk') else 'python client (wrk not installed)'}"
          f"; {args.connections} connections, {args.duration}s per scenario; cores: {os.cpu_count()}")
    up_port, gw_port, gw2_port = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "upstream.py"),
                               str(up_port)])]
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    results = {}
    try:
        wait_port(up_port)
        for _name, port, limits in (("gateway", gw_port, ""),
                                   ("gateway+local limit", gw2_port, "limits: [roomy]")):
            cfg = tmp / f"{port}.yaml"
            cfg.write_text(GATEWAY_YAML.format(port=port, admin=free_port(), upstream=up_port,
                                               workers=args.workers, limits=limits))
            procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config",
                                           str(cfg)], stderr=subprocess.DEVNULL, cwd=tmp))
            wait_port(port)
        load(up_port, 2, args.connections)  # warm-up
        results["direct"] = load(up_port, args.duration, args.connections)
        for name, port in (("gateway", gw_port), ("gateway+local limit", gw2_port)):
            load(port, 2, args.connections)
            results[name] = load(port, args.duration, args.connections)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)
    anchor = results["direct"]["rps"]
    print(f"{'scenario':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'vs direct':>11}")
    for name, r in results.items():
        print(f"{name:<22}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['non_2xx']:>9}{r['rps'] / anchor:>10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
