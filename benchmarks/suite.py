"""The benchmark suite: every scenario and its anchors in one run, one command.

    python benchmarks/suite.py [--quick] [--duration S] [--out benchmarks/results]
                               [--connections 32,256] [--only a,d,nginx,...] [--soak]

Each scenario runs the real `gateway run` (workers: 1) as a subprocess in front of
benchmarks/upstream.py (raw asyncio on uvloop, 12-byte body; a second one with a 1 MiB body):

  a  plain proxy route                       e  the 429 path (limit 1/hour, burst 0)
  b  + a local limit that admits everything  f  the open-breaker 503 path (dead endpoint,
  c  the same limit with the Redis store        failure_threshold 1, tripped before measuring)
  d  everything on: local limit, breaker     g  a 1 MiB response streamed
     with error-rate rule, signals, shipping
     every 1 s to a running `gateway control`

Anchors, in the same run: the upstream hit directly, nginx as a reverse proxy with one worker
(benchmarks/nginx.py), and benchmarks/baseline_aiohttp.py (an aiohttp server + ClientSession
proxy, "what a user would write"); each for the 12-byte and the 1 MiB upstream.

Every target is measured with wrk (benchmarks/wrk/report.lua prints p50/p99/p99.9) at each
connection count (32 and 256; --quick: 32 only, shorter runs) after a short warm-up, with the
server's RSS after the run and its CPU (cpu_times delta / wall time, process tree) beside it.
Then: RSS flatness (`soak`: 1,000,000 requests to a fresh scenario-(d) gateway in fixed-count
wrk runs, RSS at 200k and at 1M; --quick: 200k, RSS at 40k and 200k) and the control plane's
ingest and /v1/signals figures (benchmarks/bench_control.py, as a subprocess).

Writes <out>/<date>.json and <out>/<date>.md (and latest.json / latest.md) and prints the
Markdown. The JSON (schema 1):

  {"schema": 1, "date", "machine": {cpu, cores, memory_bytes, kernel, python, hostname},
   "versions": {nginx, wrk, redis}, "settings": {quick, duration_s, warmup_s, rounds,
   connections, load_generator, only, command, gateway_workers, soak_requests, control_batches},
   "loadavg_start", "loadavg_end", "wall_s", "interrupted": null | why,
   "results": {<id>: {label, kind: scenario|anchor, body_bytes,
                      by_connections: {"32": POINT, ...}, rounds: {"32": [POINT, ...]}}},
   "soak": {requests_target, checkpoint, connections, samples: [{requests, rss_bytes, rps}],
            rss_at_checkpoint_bytes, rss_at_end_bytes, rss_growth_pct, non_2xx, socket_errors,
            wall_s, checks},
   "control_plane": {batches, exit_code, output: [lines], inprocess: {...},
                     http_ingest: {batches_per_s, p50_ms, p99_ms, ...},
                     signals: [{query, rows, p50_ms, max_ms}], health_overview_ms},
   "targets": [{target, connections, value, unit, op, threshold, pass: true|false|null,
                detail}],
   "notes": [...], "errors": [...]}
  POINT = {rps, requests, duration_s, bytes_per_s, p50_ms, p90_ms, p99_ms, p999_ms, max_ms,
           non_2xx (status >= 400), socket_errors: {connect, read, write, timeout},
           server_rss_bytes, server_cpu_pct, upstream_cpu_pct, loadgen_cpu_pct, loadavg_1m,
           ratios: {vs_nginx, vs_aiohttp, vs_a}, checks: {gateway metrics after the run},
           rounds_rps (with --rounds > 1)}
  <id>: direct, nginx, aiohttp, a..f (12-byte body); direct_1mib, nginx_1mib, aiohttp_1mib, g.
 Setup installs nginx and wrk with apt-get when missing, and says so; without wrk the
load comes from a bounded Python client. Traffic goes only to 127.0.0.1, every load is bounded
in time or count, and every child process is stopped at the end, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import nginx as nginx_mod  # benchmarks/nginx.py

WRK_REPORT = BENCH / "wrk" / "report.lua"
WRK_STOP_AFTER = BENCH / "wrk" / "stop_after.lua"
MIB = 1 << 20
INGEST_TOKEN = "bench-ingest-token"
READER_TOKEN = "bench-reader-token"
WRK_TIMEOUT_S = 10

SCENARIOS = {
    "a": "(a) plain proxy route",
    "b": "(b) local limit, admits all",
    "c": "(c) Redis limit, admits all",
    "d": "(d) everything on",
    "e": "(e) 429 path",
    "f": "(f) open-breaker 503 path",
    "g": "(g) 1 MiB response",
}
ANCHORS = {
    "direct": "upstream direct",
    "nginx": "nginx, 1 worker",
    "aiohttp": "aiohttp baseline",
    "direct_1mib": "upstream direct, 1 MiB",
    "nginx_1mib": "nginx, 1 worker, 1 MiB",
    "aiohttp_1mib": "aiohttp baseline, 1 MiB",
}
ORDER = ["direct", "nginx", "aiohttp", "a", "b", "c", "d", "e", "f",
         "direct_1mib", "nginx_1mib", "aiohttp_1mib", "g"]
EXPECT_REJECTED = {"e", "f"}   # every measured response is a 429 / 503 there


def log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Processes: every child in its own session, stopped by pid (its process group) at the end.


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that every child is stopped."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Children:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.live: list[Child] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Child:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd or self.tmp,
                                    env=dict(os.environ, **(env or {})), start_new_session=True)
        child = Child(name, proc, log_path)
        self.live.append(child)
        return child

    def stop(self, child: Child, timeout: float = 10.0) -> None:
        if child in self.live:
            self.live.remove(child)
        if child.proc.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGTERM)   # its own group: the child and its own
            except ProcessLookupError:
                pass
            try:
                child.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.proc.wait(timeout=5)
        # the group may outlive its leader (e.g. nginx workers): make sure it is gone
        try:
            os.killpg(child.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for child in reversed(list(self.live)):
            try:
                self.stop(child)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"could not stop {child.name} (pid {child.pid}): {exc}", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, child: Child | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening" + (f"; {child.name} log:\n{child.tail()}"
                                                       if child else ""))


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_ready(url: str, child: Child, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            if http("GET", url, timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{child.name} not ready at {url}; log:\n{child.tail()}")


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        for p in tree(pid):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for p in tree(pid):
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


# --------------------------------------------------------------------------------------------
# Setup: nginx and wrk from apt when missing.


def apt_install(package: str) -> bool:
    if not shutil.which("apt-get"):
        return False
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            return False
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [*prefix, "apt-get", "install", "-y", "-q", package]
    for attempt in range(2):
        try:
            if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=600, check=False).returncode == 0:
                return True
            if attempt == 0:
                subprocess.run([*prefix, "apt-get", "update", "-q"], env=env, timeout=600,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return False


def ensure_tools(want_wrk: bool = True) -> tuple[str | None, str | None, list[str]]:
    notes = []
    wrk = shutil.which("wrk")
    if wrk is None and want_wrk:
        log("setup: wrk is not installed; installing it with `apt-get install -y wrk`")
        ok = apt_install("wrk")
        wrk = shutil.which("wrk")
        notes.append("setup installed wrk with apt-get" if ok and wrk else
                     "wrk could not be installed: load comes from the bounded Python client")
        log(notes[-1])
    nginx = nginx_mod.binary()
    if nginx is None:
        log("setup: nginx is not installed; installing it with `apt-get install -y nginx`")
        ok = apt_install("nginx")
        nginx = nginx_mod.binary()
        notes.append("setup installed nginx with apt-get" if ok and nginx else
                     "nginx could not be installed: the nginx anchor is skipped")
        log(notes[-1])
    if shutil.which("redis-server") is None:
        log("setup: redis-server is not installed; installing it with `apt-get install -y "
            "redis-server`")
        ok = apt_install("redis-server")
        notes.append("setup installed redis-server with apt-get" if ok and
                     shutil.which("redis-server") else
                     "redis-server could not be installed: scenario (c) is skipped")
        log(notes[-1])
    return wrk, nginx, notes


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


# --------------------------------------------------------------------------------------------
# Load generation: wrk (+ a Lua done() hook) or, without wrk, a bounded Python client.


def _wrk_result(summary: dict[str, Any]) -> dict[str, Any]:
    secs = summary["duration_us"] / 1e6
    return {
        "rps": summary["requests"] / secs if secs else 0.0,
        "requests": summary["requests"],
        "duration_s": round(secs, 3),
        "bytes_per_s": summary["bytes"] / secs if secs else 0.0,
        "p50_ms": summary["p50_us"] / 1e3,
        "p90_ms": summary["p90_us"] / 1e3,
        "p99_ms": summary["p99_us"] / 1e3,
        "p999_ms": summary["p999_us"] / 1e3,
        "max_ms": summary["max_us"] / 1e3,
        "non_2xx": summary["status"],     # wrk counts status >= 400 (no 3xx occur here)
        "socket_errors": {k: summary[k] for k in ("connect", "read", "write", "timeout")},
    }


def run_wrk(wrk: str, url: str, connections: int, duration: float,
            count: int | None = None) -> dict[str, Any]:
    threads = 1   # one thread drives >100k req/s; a second would steal a core on small boxes
    argv = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", f"{WRK_TIMEOUT_S}s",
            "-s", str(WRK_STOP_AFTER if count else WRK_REPORT), url]
    if count:
        argv += ["--", str(max(1, count // threads))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    watchdog = threading.Timer(duration + 30, proc.kill)   # a hard bound even if wrk hangs
    watchdog.start()
    summary = None
    stopped = 0
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("WRK_THREAD_STOPPED"):
                stopped += 1
                if stopped >= threads:
                    proc.send_signal(signal.SIGINT)   # wrk reports at once instead of sleeping
            elif line.startswith("WRK_JSON "):
                summary = json.loads(line[len("WRK_JSON "):])
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if summary is None:
        raise RuntimeError("wrk printed no summary:\n" + "\n".join(lines[-20:]))
    return _wrk_result(summary)


_CL = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)


async def _py_load(port: int, connections: int, duration: float,
                   count: int | None) -> dict[str, Any]:
    latencies: list[float] = []
    stats = {"non_2xx": 0, "bytes": 0, "connect": 0, "read": 0, "timeout": 0}
    deadline = time.monotonic() + duration
    left = [count if count is not None else -1]
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MIB)
        except OSError:
            stats["connect"] += 1
            return
        try:
            while time.monotonic() < deadline and left[0] != 0:
                if left[0] > 0:
                    left[0] -= 1
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                if (m := _CL.search(head)) is not None:
                    body = await reader.readexactly(int(m.group(1)))
                    stats["bytes"] += len(head) + len(body)
                elif _CHUNKED.search(head):
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        stats["bytes"] += size
                        if size == 0:
                            break
                else:
                    stats["bytes"] += len(await reader.read())
                    break
                latencies.append(time.perf_counter() - t0)
                if status >= 400:
                    stats["non_2xx"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            stats["read"] += 1
        finally:
            writer.close()

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(connections)]
    _, pending = await asyncio.wait(tasks, timeout=duration + WRK_TIMEOUT_S)
    for t in pending:
        t.cancel()
        stats["timeout"] += 1
    elapsed = time.monotonic() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1e3 if latencies \
            else float("nan")

    return {"rps": len(latencies) / elapsed, "requests": len(latencies),
            "duration_s": round(elapsed, 3), "bytes_per_s": stats["bytes"] / elapsed,
            "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
            "max_ms": latencies[-1] * 1e3 if latencies else float("nan"),
            "non_2xx": stats["non_2xx"],
            "socket_errors": {"connect": stats["connect"], "read": stats["read"], "write": 0,
                              "timeout": stats["timeout"]}}


class Load:
    def __init__(self, wrk: str | None) -> None:
        self.wrk = wrk
        self.name = tool_version([wrk, "-v"]).split(" [")[0] if wrk else \
            "bounded Python client (asyncio, one process)"

    def run(self, port: int, connections: int, duration: float,
            count: int | None = None) -> dict[str, Any]:
        if self.wrk:
            return run_wrk(self.wrk, f"http://127.0.0.1:{port}/", connections, duration, count)
        try:
            import uvloop
            return uvloop.run(_py_load(port, connections, duration, count))
        except ImportError:
            return asyncio.run(_py_load(port, connections, duration, count))


# --------------------------------------------------------------------------------------------
# Gateway configs for the scenarios.

ROOMY = '{name: roomy, key: ip_address, rate: "100000000/second", burst: 1000000, store: local}'
ROOMY_REDIS = ('{name: roomy_redis, key: ip_address, rate: "100000000/second", burst: 1000000, '
               'store: redis, on_store_error: local}')
STRICT = '{name: strict, key: ip_address, rate: "1/hour", burst: 0, store: local}'
BREAKER_D = ("{failure_threshold: 5, reset_timeout_s: 30, half_open_successes: 3, "
             "error_rate: {threshold: 0.5, min_requests: 20, window_s: 10}}")
BREAKER_F = "{failure_threshold: 1, reset_timeout_s: 3600}"


def gateway_yaml(port: int, admin: int, upstream_port: int, *, limits: tuple[str, ...] = (),
                 breaker: str | None = None, redis_port: int | None = None,
                 control: tuple[int, Path] | None = None) -> str:
    lines = [f'listen: "127.0.0.1:{port}"', "workers: 1", "drain_s: 2",
             f'admin: {{listen: "127.0.0.1:{admin}"}}']
    if redis_port:
        lines.append(f'redis: {{url: "redis://127.0.0.1:{redis_port}/0", timeout_ms: 25}}')
    lines += ["upstreams:", "  - name: bench",
              f'    endpoints: ["http://127.0.0.1:{upstream_port}"]',
              "    max_connections: 512"]
    if breaker:
        lines.append(f"    breaker: {breaker}")
    if limits:
        lines += ["limits:", *(f"  - {lim}" for lim in limits)]
    lines += ["routes:", "  - name: bench", '    match: {path_prefix: "/"}',
              "    upstream: bench", "    service: bench"]
    if limits:
        names = [re.search(r"name: (\w+)", lim).group(1) for lim in limits]  # type: ignore
        lines.append(f"    limits: [{', '.join(names)}]")
    if control:
        cport, spool = control
        lines += ["control_plane:", "  embedded: false", f'  url: "http://127.0.0.1:{cport}"',
                  f'  token: "{INGEST_TOKEN}"', "  ship_interval_s: 1", f'  spool_dir: "{spool}"']
    return "\n".join(lines) + "\n"


def control_yaml(port: int, db: Path) -> str:
    return (f'listen: "127.0.0.1:{port}"\ndatabase: "{db}"\ntokens:\n'
            f"  - {{name: gw, role: gateway, token: {INGEST_TOKEN}}}\n"
            f"  - {{name: reader, role: reader, token: {READER_TOKEN}}}\n")


def scrape(admin_port: int) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families
    status, body = http("GET", f"http://127.0.0.1:{admin_port}/metrics")
    if status != 200:
        return []
    return [(s.name, dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples]


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str,
               **labels: str) -> float:
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


# --------------------------------------------------------------------------------------------
# The run.


COUNTER_CHECKS = frozenset({"requests_total", "ratelimit_allowed", "ratelimit_limited",
                            "ratelimit_store_error", "shipper_success", "shipper_failure",
                            "shipper_spooled", "shipper_dropped"})


@dataclass
class Target:
    """Something to load: the port, the pids whose RSS/CPU are reported, a check afterwards."""
    id: str
    port: int
    server_pids: list[int]
    upstream_pid: int | None
    admin_port: int | None = None
    after: Callable[[], dict[str, Any]] | None = None
    before: Callable[[], dict[str, Any]] | None = None   # counters before the measured run


@dataclass
class Suite:
    args: argparse.Namespace
    tmp: Path
    children: Children
    load: Load
    nginx: str | None
    results: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    upstream: Child | None = None
    upstream_1mib: Child | None = None
    up_port: int = 0
    up_1mib_port: int = 0
    redis_port: int | None = None

    # -- helpers ---------------------------------------------------------------------------

    def wanted(self, target_id: str) -> bool:
        return self.args.only is None or target_id in self.args.only

    def start_upstreams(self) -> None:
        self.up_port, self.up_1mib_port = free_port(), free_port()
        self.upstream = self.children.start(
            "upstream", [sys.executable, str(BENCH / "upstream.py"), str(self.up_port)])
        self.upstream_1mib = self.children.start(
            "upstream-1mib", [sys.executable, str(BENCH / "upstream.py"), str(self.up_1mib_port),
                              str(MIB)])
        wait_port(self.up_port, self.upstream)
        wait_port(self.up_1mib_port, self.upstream_1mib)

    def start_redis(self) -> int:
        if self.redis_port is None:
            port = free_port()
            rdir = self.tmp / "redis"
            rdir.mkdir()
            child = self.children.start("redis", [
                "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no", "--dir", str(rdir), "--daemonize", "no"])
            wait_port(port, child)
            self.redis_port = port
        return self.redis_port

    def start_gateway(self, name: str, text: str, port: int, admin: int) -> Child:
        gdir = self.tmp / name
        gdir.mkdir(exist_ok=True)
        cfg = gdir / "gateway.yaml"
        cfg.write_text(text)
        child = self.children.start(f"gateway-{name}",
                                    [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
                                    cwd=gdir)
        wait_port(port, child)
        wait_ready(f"http://127.0.0.1:{admin}/readyz", child)
        return child

    def start_control(self, name: str) -> tuple[Child, int]:
        cdir = self.tmp / f"control-{name}"
        cdir.mkdir(exist_ok=True)
        port = free_port()
        cfg = cdir / "control.yaml"
        cfg.write_text(control_yaml(port, cdir / "control.db"))
        child = self.children.start(f"control-{name}", [sys.executable, "-m", "gateway",
                                                        "control", "--config", str(cfg)], cwd=cdir)
        wait_port(port, child)
        return child, port

    def measure(self, target: Target) -> None:
        label = SCENARIOS.get(target.id) or ANCHORS[target.id]
        entry = self.results.setdefault(target.id, {
            "label": label, "kind": "scenario" if target.id in SCENARIOS else "anchor",
            "body_bytes": MIB if target.id in ("g", "direct_1mib", "nginx_1mib",
                                               "aiohttp_1mib") else 12,
            "by_connections": {}})
        for conns in self.args.connections:
            if self.args.warmup > 0:
                self.load.run(target.port, conns, self.args.warmup)
            before = target.before() if target.before is not None else {}
            pids = target.server_pids
            up = [target.upstream_pid] if target.upstream_pid else []
            cpu0, up0 = tree_cpu(pids), tree_cpu(up)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            self0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            r = self.load.run(target.port, conns, self.args.duration)
            wall = time.monotonic() - t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            self1 = resource.getrusage(resource.RUSAGE_SELF)
            r["server_cpu_pct"] = (tree_cpu(pids) - cpu0) / wall * 100
            r["upstream_cpu_pct"] = (tree_cpu(up) - up0) / wall * 100 if up else None
            r["loadgen_cpu_pct"] = ((ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
                                    + (self1.ru_utime + self1.ru_stime - self0.ru_utime
                                       - self0.ru_stime)) / wall * 100
            r["server_rss_bytes"] = tree_rss(pids)
            r["loadavg_1m"] = os.getloadavg()[0]
            if target.after is not None:
                checks = target.after()
                # the gateway's counters are cumulative (warm-ups, other connection counts):
                # what changed during this measured run is what belongs to this point
                checks["during_run"] = {k: v - before.get(k, 0) for k, v in checks.items()
                                        if k in COUNTER_CHECKS}
                r["checks"] = checks
            entry.setdefault("rounds", {}).setdefault(str(conns), []).append(r)
            entry["by_connections"][str(conns)] = median_run(entry["rounds"][str(conns)])
            errs = sum(r["socket_errors"].values())
            log(f"{label:<28} c={conns:<4} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:.2f}  "
                f"p99 {r['p99_ms']:.2f}  p99.9 {r['p999_ms']:.2f} ms  non-2xx {r['non_2xx']}  "
                f"sock.err {errs}  RSS {r['server_rss_bytes'] / MIB:.0f} MiB  "
                f"CPU {r['server_cpu_pct']:.0f}%")

    def guarded(self, target_id: str, fn: Callable[[], None]) -> None:
        if not self.wanted(target_id):
            return
        try:
            fn()
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - one broken target must not sink the run
            msg = f"{target_id}: {type(exc).__name__}: {exc}"
            self.errors.append(msg)
            log(f"ERROR {msg}")
            if self.args.verbose:
                traceback.print_exc()

    # -- anchors ---------------------------------------------------------------------------

    def run_direct(self, target_id: str, child: Child, port: int) -> None:
        self.measure(Target(target_id, port, [child.pid], None))

    def run_nginx(self) -> None:
        ids = [i for i in ("nginx", "nginx_1mib") if self.wanted(i)]
        if not ids:
            return
        if self.nginx is None:
            self.errors.append("nginx: not installed (anchor skipped)")
            return
        p_small, p_big = free_port(), free_port()
        ndir = self.tmp / "nginx"
        conf = nginx_mod.write_config(ndir, [(p_small, self.up_port), (p_big, self.up_1mib_port)])
        child = self.children.start("nginx", nginx_mod.command(self.nginx, ndir, conf), cwd=ndir)
        try:
            wait_port(p_small, child)
            wait_port(p_big, child)
            if self.wanted("nginx"):
                self.measure(Target("nginx", p_small, [child.pid], cast(Child, self.upstream).pid))
            if self.wanted("nginx_1mib"):
                self.measure(Target("nginx_1mib", p_big, [child.pid],
                                    cast(Child, self.upstream_1mib).pid))
        finally:
            self.children.stop(child)

    def run_aiohttp(self, target_id: str, upstream: Child, up_port: int) -> None:
        port = free_port()
        child = self.children.start(target_id, [sys.executable, str(BENCH / "baseline_aiohttp.py"),
                                                str(port), f"http://127.0.0.1:{up_port}"])
        try:
            wait_port(port, child)
            self.measure(Target(target_id, port, [child.pid], upstream.pid))
        finally:
            self.children.stop(child)

    # -- scenarios -------------------------------------------------------------------------

    def gateway_target(self, sid: str, up: Child, up_port: int, **kw: Any) -> None:
        port, admin = free_port(), free_port()
        gw = self.start_gateway(sid, gateway_yaml(port, admin, up_port, **kw), port, admin)
        try:
            self.measure(Target(sid, port, [gw.pid], up.pid, admin,
                                after=lambda: self.gateway_checks(admin),
                                before=lambda: self.gateway_checks(admin)))
        finally:
            self.children.stop(gw)

    def gateway_checks(self, admin: int) -> dict[str, Any]:
        s = scrape(admin)
        out: dict[str, Any] = {"requests_total": metric_sum(s, "gateway_requests_total")}
        for decision in ("allowed", "limited", "store_error"):
            v = metric_sum(s, "gateway_ratelimit_decisions_total", decision=decision)
            if v:
                out[f"ratelimit_{decision}"] = v
        state = metric_sum(s, "gateway_circuit_breaker_state")
        out["breaker_state"] = {0: "closed", 1: "half_open", 2: "open"}.get(int(state), state)
        for result in ("success", "failure", "spooled", "dropped"):
            v = metric_sum(s, "gateway_shipper_batches_total", result=result)
            if v:
                out[f"shipper_{result}"] = v
        return out

    def run_d(self, soak: bool = False) -> None:
        control, cport = self.start_control("soak" if soak else "d")
        try:
            port, admin = free_port(), free_port()
            spool = self.tmp / ("spool-soak" if soak else "spool-d")
            text = gateway_yaml(port, admin, self.up_port, limits=(ROOMY,), breaker=BREAKER_D,
                                control=(cport, spool))
            gw = self.start_gateway("soak" if soak else "d", text, port, admin)
            try:
                if soak:
                    self.soak(gw, port, admin)
                else:
                    self.measure(Target("d", port, [gw.pid], cast(Child, self.upstream).pid, admin,
                                        after=lambda: self.d_checks(admin, cport),
                                before=lambda: self.gateway_checks(admin)))
            finally:
                self.children.stop(gw)
        finally:
            self.children.stop(control)

    def d_checks(self, admin: int, cport: int) -> dict[str, Any]:
        out = self.gateway_checks(admin)
        time.sleep(1.5)   # one ship interval (1 s) and a bit: the latest aggregates land
        status, body = http("GET", f"http://127.0.0.1:{cport}/v1/signals?window=1m",
                            headers={"Authorization": f"Bearer {READER_TOKEN}"}, timeout=30)
        if status == 200:
            out["control_plane_requests_seen"] = sum(r["request_count"]
                                                     for r in json.loads(body)["rows"])
        else:
            out["control_plane_error"] = f"/v1/signals answered {status}"
        return out

    def run_e(self) -> None:
        self.gateway_target("e", cast(Child, self.upstream), self.up_port, limits=(STRICT,))

    def run_f(self) -> None:
        dead = free_port()     # nothing listens there: connect refused
        port, admin = free_port(), free_port()
        text = gateway_yaml(port, admin, dead, breaker=BREAKER_F)
        gw = self.start_gateway("f", text, port, admin)
        try:
            first = http("GET", f"http://127.0.0.1:{port}/")[0]
            second = http("GET", f"http://127.0.0.1:{port}/")[0]
            if second != 503:
                raise RuntimeError(f"breaker did not open: answers {first}, then {second}")
            self.measure(Target("f", port, [gw.pid], None, admin,
                                after=lambda: self.gateway_checks(admin),
                                before=lambda: self.gateway_checks(admin)))
        finally:
            self.children.stop(gw)

    # -- soak ------------------------------------------------------------------------------

    def soak(self, gw: Child, port: int, admin: int) -> None:
        total, checkpoint, chunk = self.args.soak_total, self.args.soak_checkpoint, \
            self.args.soak_chunk
        conns = 32
        log(f"soak: {total:,} requests to a fresh scenario-(d) gateway in runs of {chunk:,}, "
            f"{conns} connections; RSS at {checkpoint:,} and at {total:,}")
        samples: list[dict[str, Any]] = []
        rss_checkpoint = None
        served = 0.0
        t_start = time.monotonic()
        non_2xx = errors = 0
        while served < total:
            if time.monotonic() - t_start > self.args.soak_max_s:
                self.errors.append(f"soak: stopped at {served:,.0f} requests after "
                                   f"{self.args.soak_max_s:.0f} s (time bound)")
                break
            n = int(min(chunk, total - served))
            r = self.load.run(port, conns, duration=max(60.0, n / 500), count=n)
            non_2xx += r["non_2xx"]
            errors += sum(r["socket_errors"].values())
            served = metric_sum(scrape(admin), "gateway_requests_total")
            rss = tree_rss([gw.pid])
            samples.append({"requests": int(served), "rss_bytes": rss, "rps": round(r["rps"])})
            log(f"soak: {served:>9,.0f} requests  RSS {rss / MIB:.1f} MiB  "
                f"{r['rps']:.0f} req/s")
            if rss_checkpoint is None and served >= checkpoint:
                rss_checkpoint = samples[-1]
        final = samples[-1] if samples else None
        out: dict[str, Any] = {
            "requests_target": total, "checkpoint": checkpoint, "connections": conns,
            "samples": samples, "non_2xx": non_2xx, "socket_errors": errors,
            "wall_s": round(time.monotonic() - t_start, 1),
            "checks": self.gateway_checks(admin),
        }
        if rss_checkpoint and final and final["requests"] >= total:
            out["rss_at_checkpoint_bytes"] = rss_checkpoint["rss_bytes"]
            out["rss_at_end_bytes"] = final["rss_bytes"]
            out["rss_growth_pct"] = (final["rss_bytes"] / rss_checkpoint["rss_bytes"] - 1) * 100
        self.results["soak"] = out

    # -- control plane ---------------------------------------------------------------------

    def run_control(self) -> None:
        batches = self.args.control_batches
        log(f"control plane: benchmarks/bench_control.py --batches {batches}")
        proc = subprocess.Popen([sys.executable, str(BENCH / "bench_control.py"), "--batches",
                                 str(batches)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        lines = [ln for ln in out.splitlines() if ln.strip()]
        res: dict[str, Any] = {"batches": batches, "output": lines, "exit_code": proc.returncode}
        if m := re.search(r"parse\+validate\+store ([\d.]+) ms/batch \((\d+) batches/s\); "
                          r"compaction ([\d.]+) ms/batch.*together (\d+) batches/s", out):
            res["inprocess"] = {"ingest_ms_per_batch": float(m[1]),
                                "ingest_batches_per_s": int(m[2]),
                                "compaction_ms_per_batch": float(m[3]),
                                "together_batches_per_s": int(m[4])}
        if m := re.search(r"HTTP ingest: (\d+) batches x (\d+) series, concurrency (\d+): "
                          r"(\d+) batches/s .*?p50 ([\d.]+) ms, p99 ([\d.]+) ms; compaction "
                          r"backlog folded by the next /v1/signals in (\d+) ms", out):
            res["http_ingest"] = {"batches": int(m[1]), "series_per_batch": int(m[2]),
                                  "concurrency": int(m[3]), "batches_per_s": int(m[4]),
                                  "p50_ms": float(m[5]), "p99_ms": float(m[6]),
                                  "backlog_fold_ms": int(m[7])}
        res["signals"] = [{"query": q, "rows": int(n), "p50_ms": float(p), "max_ms": float(x)}
                          for q, n, p, x in re.findall(
                              r"/v1/signals (.+?): (\d+) rows, p50 ([\d.]+) ms, max ([\d.]+) ms",
                              out)]
        if m := re.search(r"/v1/health/overview \((.+?)\): ([\d.]+) ms", out):
            res["health_overview_ms"] = float(m[2])
        if proc.returncode != 0 or "http_ingest" not in res:
            self.errors.append(f"control: bench_control.py exited {proc.returncode}; "
                               f"last lines: {lines[-3:]}")
        self.results["control_plane"] = res
        for ln in lines:
            log(f"control plane: {ln}")

    # -- everything --------------------------------------------------------------------------

    def run_all(self) -> None:
        need_up = self.args.only is None or bool(set(self.args.only) - {"control"})
        if need_up:
            self.start_upstreams()
        up, upb = cast(Child, self.upstream), cast(Child, self.upstream_1mib)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("direct", lambda: self.run_direct("direct", up, self.up_port)),
            ("nginx", self.run_nginx),
            ("aiohttp", lambda: self.run_aiohttp("aiohttp", up, self.up_port)),
            ("a", lambda: self.gateway_target("a", up, self.up_port)),
            ("b", lambda: self.gateway_target("b", up, self.up_port, limits=(ROOMY,))),
            ("c", lambda: self.gateway_target("c", up, self.up_port, limits=(ROOMY_REDIS,),
                                              redis_port=self.start_redis())),
            ("d", self.run_d),
            ("e", self.run_e),
            ("f", self.run_f),
            ("direct_1mib", lambda: self.run_direct("direct_1mib", upb, self.up_1mib_port)),
            ("aiohttp_1mib", lambda: self.run_aiohttp("aiohttp_1mib", upb, self.up_1mib_port)),
            ("g", lambda: self.gateway_target("g", upb, self.up_1mib_port)),
            ("soak", lambda: self.run_d(soak=True)),
            ("control", self.run_control),
        ]
        for rnd in range(self.args.rounds):
            if self.args.rounds > 1:
                log(f"round {rnd + 1} of {self.args.rounds}")
            for sid, fn in steps:
                if rnd and sid in ("soak", "control"):   # once, not per round
                    continue
                if sid == "nginx":   # one nginx serves both bodies: guarded inside
                    if self.wanted("nginx") or self.wanted("nginx_1mib"):
                        self.guarded("nginx" if self.wanted("nginx") else "nginx_1mib", fn)
                    continue
                self.guarded(sid, fn)


# --------------------------------------------------------------------------------------------
# Ratios, targets, report.


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """With --rounds N: the run with the median req/s, whole (its latencies are its own), plus
    every round's req/s for the spread."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    pick = {k: v for k, v in ordered[(len(ordered) - 1) // 2].items() if k != "rounds_rps"}
    if len(runs) > 1:
        pick["rounds_rps"] = [round(r["rps"]) for r in runs]
    return pick


def point(results: dict[str, Any], tid: str, conns: int) -> dict[str, Any] | None:
    r = results.get(tid)
    return r["by_connections"].get(str(conns)) if r else None


def add_ratios(results: dict[str, Any], connections: list[int]) -> None:
    for tid in ORDER:
        if tid not in results:
            continue
        big = results[tid]["body_bytes"] == MIB
        for conns in connections:
            r = point(results, tid, conns)
            if r is None:
                continue
            ratios = {}
            for key, anchor in (("vs_nginx", "nginx_1mib" if big else "nginx"),
                                ("vs_aiohttp", "aiohttp_1mib" if big else "aiohttp"),
                                ("vs_a", None if big else "a")):
                a = point(results, anchor, conns) if anchor else None
                ratios[key] = r["rps"] / a["rps"] if a and a["rps"] else None
            r["ratios"] = ratios


def targets(results: dict[str, Any], connections: list[int],
            partial: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, conns: int | None, value: float | None, op: str, threshold: float,
            detail: str, unit: str = "x") -> None:
        ok = None if value is None else (value >= threshold if op == ">=" else
                                         value <= threshold if op == "<=" else value < threshold)
        if value is None and partial:
            return   # a run restricted with --only: leave out what it did not measure
        out.append({"target": name, "connections": conns, "value": value, "unit": unit,
                    "op": op, "threshold": threshold, "pass": ok, "detail": detail})

    for conns in connections:
        a, d, e = (point(results, k, conns) for k in "ade")
        ng, ah = point(results, "nginx", conns), point(results, "aiohttp", conns)

        def ratio(x: dict | None, y: dict | None) -> float | None:
            return x["rps"] / y["rps"] if x and y and y["rps"] else None

        def rps(x: dict | None) -> str:
            return f"{x['rps']:,.0f}" if x else "n/a"

        add("(d) req/s >= 50 % of nginx", conns, ratio(d, ng), ">=", 0.5,
            f"{rps(d)} vs {rps(ng)} req/s")
        add("(d) req/s >= 3x the aiohttp baseline", conns, ratio(d, ah), ">=", 3.0,
            f"{rps(d)} vs {rps(ah)} req/s")
        add("(a) -> (d) loses <= 10 %", conns, ratio(d, a), ">=", 0.9,
            f"{rps(a)} -> {rps(d)} req/s")
        add("(e) 429 path >= 1.5x (a)", conns, ratio(e, a), ">=", 1.5,
            f"{rps(e)} vs {rps(a)} req/s")
        if conns == 32:
            val = d["p99_ms"] / ng["p99_ms"] if d and ng and ng["p99_ms"] else None
            add("(d) p99 <= 2x nginx's p99", conns, val, "<=", 2.0,
                f"{d['p99_ms']:.2f} vs {ng['p99_ms']:.2f} ms" if d and ng else "n/a")
    soak = results.get("soak")
    if soak is not None:
        g = soak.get("rss_growth_pct")
        add(f"RSS growth {soak['checkpoint']:,} -> {soak['requests_target']:,} requests < 5 %",
            None, g, "<", 5.0,
            f"{soak['rss_at_checkpoint_bytes'] / MIB:.1f} -> {soak['rss_at_end_bytes'] / MIB:.1f}"
            f" MiB" if g is not None else "soak incomplete", unit="%")
    cp = results.get("control_plane", {}).get("http_ingest")
    if cp:
        add("control plane ingest >= 50 batches/s (500 gateways at 10 s)", None,
            float(cp["batches_per_s"]), ">=", 50.0,
            f"{cp['batches']} batches x {cp['series_per_batch']} series, "
            f"concurrency {cp['concurrency']}", unit="batches/s")
    return out


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "kernel": platform.release(), "python": platform.python_version(),
            "hostname": platform.node()}


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None or math.isnan(v) else f"{v:{spec}}{suffix}"


def markdown(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    res = doc["results"]
    rounds = (f", median of {s['rounds']} interleaved rounds" if s.get("rounds", 1) > 1 else "")
    lines = [
        f"## Benchmark {doc['date']}{' (--quick)' if s['quick'] else ''}",
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.1f} GiB, Linux "
         f"{m['kernel']}, Python {m['python']}; {doc['versions']['nginx']}; load: "
         f"{s['load_generator']}, {s['duration_s']:g} s per point after {s['warmup_s']:g} s "
         f"warm-up{rounds}; load average {doc['loadavg_start'][0]:.2f} at start, "
         f"{doc['loadavg_end'][0]:.2f} at the end."),
        "Command: `" + s["command"] + "`",
        "",
        ("| target | conns | req/s | p50 ms | p99 ms | p99.9 ms | non-2xx | sock. err | RSS MiB "
         "| CPU % | vs nginx | vs aiohttp | vs (a) |"),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    has_rows = any(tid in res for tid in ORDER)
    if not has_rows:
        lines = lines[:-3] + [""]
    for tid in ORDER:
        if tid not in res:
            continue
        entry = res[tid]
        for conns, r in entry["by_connections"].items():
            ratios = r.get("ratios", {})
            label = entry["label"] if entry["kind"] == "scenario" else f"*{entry['label']}*"
            if entry["body_bytes"] == MIB:
                label += f" ({r['bytes_per_s'] / MIB:,.0f} MiB/s)"
            lines.append(
                f"| {label} | {conns} | {r['rps']:,.0f} | {fmt(r['p50_ms'], '.2f')} | "
                f"{fmt(r['p99_ms'], '.2f')} | {fmt(r['p999_ms'], '.2f')} | {r['non_2xx']:,} | "
                f"{sum(r['socket_errors'].values()):,} | {r['server_rss_bytes'] / MIB:.0f} | "
                f"{r['server_cpu_pct']:.0f} | "
                f"{fmt(ratios.get('vs_nginx'), '.0%')} | {fmt(ratios.get('vs_aiohttp'), '.1f', 'x')}"
                f" | {fmt(ratios.get('vs_a'), '.0%')} |")
    lines += [] if not has_rows else [
              "",
              ("*Italic rows are anchors.* RSS and CPU are the server's (process tree; nginx: "
               "master + worker); CPU % is of one core over the measured run. Ratios are req/s; "
               "1 MiB rows compare with the 1 MiB anchors. (e) and (f) answer 429 / 503 by "
               "design: their non-2xx is every response."), ""]
    if doc["targets"]:
        lines += ["### Targets", ""]
        for t in doc["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
            at = f" @ {t['connections']} conns" if t["connections"] else ""
            val, unit = t["value"], t["unit"]
            shown = ("—" if val is None else f"{val:.2f}x" if unit == "x" else
                     f"{val:+.2f} %" if unit == "%" else f"{val:,.0f} {unit}")
            lines.append(f"- **{verdict}** {t['target']}{at}: {shown} ({t['detail']})")
        lines.append("")
    soak = doc.get("soak")
    if soak:
        pts = ", ".join(f"{p['requests']:,}: {p['rss_bytes'] / MIB:.1f}" for p in soak["samples"])
        lines += ["### RSS soak (scenario d)", "",
                  (f"{soak['requests_target']:,} requests at {soak['connections']} connections "
                   f"in {soak['wall_s']:.0f} s, non-2xx {soak['non_2xx']}, socket errors "
                   f"{soak['socket_errors']}. RSS MiB by requests served: {pts}."), ""]
    cp = doc.get("control_plane")
    if cp:
        lines += ["### Control plane (benchmarks/bench_control.py)", ""]
        if "http_ingest" in cp:
            h = cp["http_ingest"]
            lines.append(f"- HTTP ingest: **{h['batches_per_s']} batches/s** ({h['batches']} "
                         f"gzipped batches x {h['series_per_batch']} series, concurrency "
                         f"{h['concurrency']}); request p50 {h['p50_ms']:.1f} ms, p99 "
                         f"{h['p99_ms']:.1f} ms; backlog folded in {h['backlog_fold_ms']} ms")
        if "inprocess" in cp:
            i = cp["inprocess"]
            lines.append(f"- in-process: parse+validate+store {i['ingest_ms_per_batch']:.2f} "
                         f"ms/batch, compaction {i['compaction_ms_per_batch']:.2f} ms/batch, "
                         f"together {i['together_batches_per_s']} batches/s on one core")
        if cp.get("signals"):
            lines += ["", "| /v1/signals query | rows | p50 ms | max ms |", "|---|--:|--:|--:|"]
            lines += [f"| {q['query']} | {q['rows']:,} | {q['p50_ms']:.1f} | {q['max_ms']:.1f} |"
                      for q in cp["signals"]]
        if "health_overview_ms" in cp:
            lines.append(f"\n- /v1/health/overview (20 services): {cp['health_overview_ms']:.1f} ms")
        lines.append("")
    if doc["errors"] or doc["notes"]:
        lines += ["### Notes", ""]
        lines += [f"- {n}" for n in doc["notes"]]
        lines += [f"- error: {e}" for e in doc["errors"]]
        lines.append("")
    return "\n".join(lines)


def sanity_notes(results: dict[str, Any]) -> list[str]:
    """Whatever makes a figure suspect: unexpected non-2xx, socket errors, a busy load generator."""
    notes = []
    for tid in ORDER:
        for conns, r in results.get(tid, {}).get("by_connections", {}).items():
            label = f"{tid} @ {conns}"
            if tid not in EXPECT_REJECTED and r["non_2xx"]:
                notes.append(f"{label}: {r['non_2xx']} unexpected non-2xx responses")
            if tid in EXPECT_REJECTED and r["requests"] and r["non_2xx"] < r["requests"] * 0.99:
                notes.append(f"{label}: only {r['non_2xx']} of {r['requests']} rejected")
            if sum(r["socket_errors"].values()):
                notes.append(f"{label}: socket errors {r['socket_errors']}")
            if r.get("loadgen_cpu_pct", 0) > 90:
                notes.append(f"{label}: the load generator used {r['loadgen_cpu_pct']:.0f} % "
                             f"of a core (it may be the bottleneck)")
            checks = r.get("checks", {})
            run = checks.get("during_run", {})
            if run.get("ratelimit_store_error"):
                notes.append(f"{label}: {run['ratelimit_store_error']:,.0f} of "
                             f"{run.get('requests_total', 0):,.0f} decisions were Redis store "
                             f"errors (redis.timeout_ms 25; on_store_error: local answered them "
                             f"from an in-memory bucket)")
            if tid == "f" and checks.get("breaker_state") != "open":
                notes.append(f"{label}: breaker state {checks.get('breaker_state')}, not open")
            if tid == "d" and "control_plane_requests_seen" in checks:
                notes.append(f"d @ {conns}: the control plane had seen "
                             f"{checks['control_plane_requests_seen']:,} requests "
                             f"(gateway counted {checks['requests_total']:,.0f})")
    return notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="32 connections only, 3 s per point, a 200k-request soak, a small "
                         "control-plane run (under ~3 minutes)")
    ap.add_argument("--duration", type=float, help="seconds per measured point (10; quick: 3)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up per point (2; quick: 1)")
    ap.add_argument("--connections", help="comma-separated (32,256; quick: 32)")
    ap.add_argument("--only", help="comma-separated targets: " + ",".join(ORDER)
                    + ",soak,control")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every measured point N times, interleaved, and report the run "
                         "with the median req/s (steadier ratios on a noisy machine; N times "
                         "longer)")
    ap.add_argument("--soak", action="store_true", help="run only the RSS soak")
    ap.add_argument("--soak-requests", type=int, help="1,000,000 (quick: 200,000)")
    ap.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                    help="load generator: wrk (installed with apt-get when missing), or the "
                         "bounded Python client (the fallback without wrk); default auto")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.connections = ([int(c) for c in args.connections.split(",")] if args.connections
                        else [32] if args.quick else [32, 256])
    if args.soak:
        args.only = ["soak"]
    elif args.only:
        args.only = [o.strip() for o in args.only.split(",") if o.strip()]
        unknown = set(args.only) - set(ORDER) - {"soak", "control"}
        if unknown:
            ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.soak_total = args.soak_requests or (200_000 if args.quick else 1_000_000)
    args.soak_checkpoint = args.soak_total // 5
    args.soak_chunk = max(1_000, args.soak_total // 10)
    args.soak_max_s = 420.0 if args.soak_total >= 1_000_000 else 240.0
    args.control_batches = 200 if args.quick else 1000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C raises KeyboardInterrupt even when started where SIGINT was ignored (`cmd &`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    started = time.monotonic()
    date = dt.datetime.now().astimezone()
    wrk, nginx, setup_notes = ensure_tools(want_wrk=args.load != "python")
    if args.load == "wrk" and wrk is None:
        print("wrk is not available (--load wrk)", file=sys.stderr)
        return 2
    load = Load(wrk if args.load != "python" else None)
    log(f"load generator: {load.name}; connections {args.connections}; {args.duration:g} s per "
        f"point (+{args.warmup:g} s warm-up); {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="gwsuite-"))
    children = Children(tmp)
    suite = Suite(args, tmp, children, load, nginx)
    suite.notes += setup_notes
    loadavg_start = os.getloadavg()
    interrupted = None
    try:
        suite.run_all()
    except (KeyboardInterrupt, Interrupted) as exc:
        interrupted = type(exc).__name__ if isinstance(exc, KeyboardInterrupt) else str(exc)
        log(f"interrupted ({interrupted}): stopping every child, writing what was measured")
    finally:
        children.stop_all()
        if interrupted is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            suite.notes.append(f"logs of the interrupted run kept in {tmp}")
    add_ratios(suite.results, args.connections)
    cmd = "python benchmarks/suite.py" + (" " + " ".join(sys.argv[1:]) if argv is None and
                                          len(sys.argv) > 1 else "")
    doc = {
        "schema": 1,
        "date": date.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {"nginx": tool_version([nginx, "-v"]) if nginx else "nginx: not installed",
                     "wrk": load.name,
                     "redis": tool_version(["redis-server", "--version"]).split(" sha=")[0]},
        "settings": {"quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup,
                     "rounds": args.rounds,
                     "connections": args.connections, "load_generator": load.name,
                     "only": args.only, "command": cmd, "gateway_workers": 1,
                     "soak_requests": args.soak_total,
                     "control_batches": args.control_batches},
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": round(time.monotonic() - started, 1),
        "interrupted": interrupted,
        "results": {k: v for k, v in suite.results.items() if k in ORDER},
        "soak": suite.results.get("soak"),
        "control_plane": suite.results.get("control_plane"),
        "targets": targets(suite.results, args.connections,
                           partial=args.only is not None or interrupted is not None),
        "notes": suite.notes + sanity_notes(suite.results),
        "errors": suite.errors,
    }
    md = markdown(doc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = date.strftime("%Y-%m-%d_%H%M%S") + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(md + "\n")
    shutil.copyfile(out / f"{stem}.json", out / "latest.json")
    shutil.copyfile(out / f"{stem}.md", out / "latest.md")
    print()
    print(md)
    log(f"wrote {out / stem}.json and .md in {doc['wall_s']:.0f} s")
    if interrupted:
        return 130
    return 1 if suite.errors else 0


if __name__ == "__main__":
    sys.exit(main())
