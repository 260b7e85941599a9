"""Micro-benchmark of Limiter.check: checks/s per store. Run by hand, not in tests:

    python benchmarks/bench_ratelimit.py [--seconds 2]

Starts its own redis-server on a free port (needs `redis-server` on PATH). Single process, uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import uvloop
from multidict import CIMultiDict

from gateway.config import Config, LimitConfig, RedisConfig, RouteConfig
from gateway.ratelimit import Limiter


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


class _Request:
    def __init__(self, user: str) -> None:
        self.headers = CIMultiDict({"X-User-Id": user, "X-Api-Key": "key-" + user})
        self.transport = _Transport(("192.0.2.1", 5000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(store: str, policies: int, url: str | None,
            timeout_ms: float = 1000) -> tuple[Config, RouteConfig]:
    keys = ["user_id", "ip_address", "api_key"]
    limits = tuple(LimitConfig(name=f"p{i}", key=keys[i % 3], rate_count=10**9, period_s=1.0,
                               burst=1000, store=store) for i in range(policies))
    route = RouteConfig(name="r", upstream="u", service="s", limits=tuple(x.name for x in limits))
    return Config(limits=limits, routes=(route,),
                  redis=RedisConfig(url=url, timeout_ms=timeout_ms) if url else None), route


async def _run(name: str, cfg: Config, route: RouteConfig, seconds: float, concurrency: int,
               shared_dir: str | None = None) -> None:
    lim = Limiter(cfg, shared_dir=shared_dir)
    await lim.start()
    reqs = [_Request(f"user{i}") for i in range(1000)]
    count = 0
    limited = 0
    errors = 0

    async def worker(offset: int) -> None:
        nonlocal count, limited, errors
        i = offset
        deadline = time.perf_counter() + seconds
        while True:
            for _ in range(100):
                o = await lim.check(route, reqs[i % 1000])
                i += 1
                limited += not o.allowed
                errors += o.decision == "store_error"
            count += 100
            if time.perf_counter() >= deadline:
                return
            if concurrency > 1:
                await asyncio.sleep(0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k * 7) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await lim.close()
    print(f"{name:<44} {count / elapsed:>10,.0f} checks/s  ({elapsed * 1e6 / count:6.1f} us "
          f"each, concurrency {concurrency}{', rejected ' + str(limited) if limited else ''}"
          f"{', store errors ' + str(errors) if errors else ''})")


async def main(seconds: float, redis_url: str | None) -> None:
    for policies in (1, 3):
        cfg, route = _config("local", policies, None)
        await _run(f"memory store, {policies} policies", cfg, route, seconds, 1)
    tmp = tempfile.mkdtemp()
    try:
        for policies in (1, 3):
            cfg, route = _config("local", policies, None)
            await _run(f"shared store (workers > 1), {policies} policies", cfg, route, seconds,
                       1, shared_dir=tmp)
    finally:
        shutil.rmtree(tmp)
    if redis_url is None:
        print("redis-server not found: skipping the Redis store")
        return
    for policies, concurrency in ((1, 1), (1, 50), (3, 50)):
        cfg, route = _config("redis", policies, redis_url)
        await _run(f"redis store, {policies} policies", cfg, route, seconds, concurrency)
    # many requests in flight and the production default timeout: any store error is a
    # decision Redis did not answer in time (on_store_error then decides)
    cfg, route = _config("redis", 1, redis_url, timeout_ms=25)
    await _run("redis store, 1 policy, timeout 25 ms", cfg, route, seconds, 256)


def _start_redis(workdir: str) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp()
    proc, url = _start_redis(workdir)
    try:
        uvloop.run(main(args.seconds, url))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
