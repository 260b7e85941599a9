"""RedisStore on Redis topologies started by the tests: Sentinel failover under load, a 3-master
Cluster hammered by two processes over keys in every node's slots (with a slot moved mid-run),
and TLS with a private CA and client certificates (from trustme)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import trustme
from redis.crc import key_slot

from gateway.config import Config, LimitConfig, RedisConfig, RedisTLSConfig
from gateway.ratelimit import Limiter
from tests.conftest import ROOT
from tests.fakes import FakeClock
from tests.redis_servers import ClusterSetup, SentinelSetup, TLSRedis, wait_for
from tests.test_ratelimit import FakeRequest, config, limit, route
from tests.test_ratelimit_redis import run_load, share


@pytest.fixture
async def built() -> AsyncIterator[list[Limiter]]:
    made: list[Limiter] = []
    yield made
    for lim in made:
        await lim.close()


# ---------------------------------------------------------------------------------------------
# Sentinel


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path)
    try:
        setup.start_all()
        yield setup
    finally:
        setup.stop()


@pytest.mark.timeout(90)
async def test_sentinel_failover_under_load_is_followed(sentinel: SentinelSetup,
                                                        built: list[Limiter]) -> None:
    hot = limit("hot", "100000/second", burst=1000, store="redis", on_store_error="local")
    exact = limit("exact", "1/hour", burst=9, store="redis", on_store_error="deny")
    lim = Limiter(config([hot, exact], [route("hot"), route("exact", name="x")],
                         redis_url=sentinel.url, timeout_ms=100))
    built.append(lim)
    await lim.start()
    store = lim.redis
    assert store is not None and store.available
    assert sentinel.master_address() == ("127.0.0.1", sentinel.master_port)

    log: list[tuple[float, float, int, str]] = []
    t0 = time.monotonic()
    load = asyncio.ensure_future(run_load(lim, t0 + 60, log))
    try:
        await asyncio.sleep(0.5)
        t_kill = time.monotonic()
        await asyncio.to_thread(sentinel.kill, sentinel.master_port)
        # down-after 1 s, then the sentinels elect a leader and promote the replica
        await asyncio.to_thread(
            wait_for, "no failover", lambda: sentinel.master_address()[1] == sentinel.replica_port,
            30)
        t_failover = time.monotonic()
        deadline = t_failover + 10
        while not (store.available and log and log[-1][3] == "allowed"):
            assert time.monotonic() < deadline, "the store never came back after the failover"
            await asyncio.sleep(0.05)
        t_back = time.monotonic()
        await asyncio.sleep(1.0)
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
    before = [e for e in log if e[0] + e[1] < t_kill]
    after = [e for e in log if e[0] > t_back]
    assert before and after
    assert share(before, "allowed") > 0.9
    assert share(after, "allowed") > 0.9                # decided by Redis again: the new master
    assert {e[2] for e in log} == {200}                 # the outage fell back to local buckets
    assert t_back - t_failover < 3.0                    # followed within a few probes

    # exact again on the new master: 50 concurrent requests of one client, capacity 10
    outcomes = await asyncio.gather(*(lim.check(route("exact", name="x"),
                                                FakeRequest({"X-User-Id": "fresh"}))
                                      for _ in range(50)))
    assert sum(o.allowed for o in outcomes) == 10
    assert {o.status for o in outcomes} == {200, 429}
    new_master = redis.Redis(port=sentinel.replica_port)
    try:
        assert len(new_master.keys("gw:rl:exact:*")) == 1
    finally:
        new_master.close()


# ---------------------------------------------------------------------------------------------
# Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    try:
        setup.start_all()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def cluster_url(cluster: ClusterSetup) -> str:
    for port in cluster.ports:
        r = redis.Redis(port=port)
        try:
            r.flushall()
        finally:
            r.close()
    return cluster.url


CLUSTER_HAMMER = r'''
import asyncio, json, sys, time
from gateway.config import Config, LimitConfig, RedisConfig, RouteConfig
from gateway.ratelimit import Limiter
from tests.test_ratelimit import FakeRequest

url, start_at, duration, rate, burst, concurrency, nkeys = sys.argv[1:8]
start_at, duration = float(start_at), float(duration)
rate, burst, concurrency, nkeys = int(rate), int(burst), int(concurrency), int(nkeys)

async def main():
    lims = (LimitConfig(name="hot", key="user_id", rate_count=rate, period_s=1.0, burst=burst,
                        store="redis", on_store_error="deny"),
            LimitConfig(name="roomy", key="user_id", rate_count=1, period_s=3600.0,
                        burst=100000, store="redis", on_store_error="deny"))
    route = RouteConfig(name="r", upstream="u", service="s", limits=("hot", "roomy"))
    cfg = Config(limits=lims, routes=(route,),
                 redis=RedisConfig(url=url, timeout_ms=2000, cluster=True))
    lim = Limiter(cfg)
    await lim.start()
    reqs = [FakeRequest({"X-User-Id": f"user-{k}"}) for k in range(nkeys)]
    allowed = [0] * nkeys
    counts = {"limited": 0, "other": 0}
    first, last = [], []
    stop_at = start_at + duration

    async def client(i):
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        first.append(time.time())
        k = i % nkeys
        while time.time() < stop_at:
            o = await lim.check(route, reqs[k])
            if o.allowed:
                allowed[k] += 1
            elif o.status == 429:
                counts["limited"] += 1
            else:
                counts["other"] += 1
            k = (k + 1) % nkeys
        last.append(time.time())

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    store = lim.redis
    redirects = store.redirects
    await lim.close()
    print(json.dumps({**counts, "allowed": allowed, "first": min(first), "last": max(last),
                      "failures": store.failures, "redirects": redirects}))

asyncio.run(main())
'''


@pytest.mark.timeout(90)
def test_cluster_two_processes_exact_per_key_with_a_slot_moved(cluster: ClusterSetup,
                                                                cluster_url: str,
                                                                tmp_path: Path) -> None:
    nkeys, rate, burst, duration = 24, 20, 19, 4.0
    slots = [key_slot(f"user-{k}".encode()) for k in range(nkeys)]   # the hash tag's slot
    nodes = {cluster.node_of_slot(s) for s in slots}
    assert nodes == set(cluster.ports)                  # the keys live on every master
    script = tmp_path / "hammer.py"
    script.write_text(CLUSTER_HAMMER)
    start_at = time.time() + 2.5
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(script), cluster_url, repr(start_at),
                               str(duration), str(rate), str(burst), "100", str(nkeys)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              cwd=str(ROOT)) for _ in range(2)]
    # mid-run, move the slot of user-0 (and its bucket) to another master: ASK, then MOVED
    moved_from = cluster.node_of_slot(slots[0])
    target = next(p for p in cluster.ports if p != moved_from)
    mover_error: list[BaseException] = []

    def move() -> None:
        time.sleep(max(0.0, start_at + duration / 2 - time.time()))
        try:
            cluster.move_slot(slots[0], target)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            mover_error.append(exc)

    mover = threading.Thread(target=move)
    mover.start()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        results.append(json.loads(out))
    mover.join(timeout=10)
    assert not mover_error, mover_error
    assert cluster.node_of_slot(slots[0]) == target
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    capacity = burst + 1
    per_key = [sum(r["allowed"][k] for r in results) for k in range(nkeys)]
    assert all(r["other"] == 0 and r["failures"] == 0 for r in results), results  # no errors
    assert all(r["redirects"] > 0 for r in results), results     # the move was followed
    assert all(r["limited"] > 0 for r in results), results
    upper = capacity + rate * span
    assert max(per_key) <= upper, (per_key, upper)
    expected = capacity + rate * duration
    assert sum(per_key) >= 0.9 * nkeys * expected, (per_key, expected)
    r = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:        # both policies' keys of a client share its hash tag, so one node holds both
        keys = [k for k in r.keys(target_nodes=redis.RedisCluster.ALL_NODES)
                if b"{user-0}" in k]
        assert len(keys) == 2 and {key_slot(k) for k in keys} == {slots[0]}
    finally:
        r.close()


async def test_cluster_noscript_on_a_node_reloads(cluster_url: str, cluster: ClusterSetup,
                                                  built: list[Limiter]) -> None:
    cfg = RedisConfig(url=cluster_url, timeout_ms=1000, cluster=True)
    lim = Limiter(with_redis([limit("n", "1/hour", burst=2, store="redis")], cfg),
                  clock=FakeClock(), redis_fake_time=True)
    built.append(lim)
    await lim.start()
    for port in cluster.ports:          # every node forgets the script
        r = redis.Redis(port=port)
        try:
            r.script_flush()
        finally:
            r.close()
    outcomes = [await lim.check(route("n"), FakeRequest({"X-User-Id": f"u{i % 4}"}))
                for i in range(16)]
    assert sum(o.allowed for o in outcomes) == 12                 # 3 per client, exactly
    assert {o.decision for o in outcomes} == {"allowed", "limited"}
    assert lim.redis is not None and lim.redis.available and lim.redis.failures == 0


def with_redis(limits: list[LimitConfig], cfg: RedisConfig) -> Config:
    return replace(config(limits), redis=cfg)


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client = ca.issue_cert("gateway.client.test")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    other = trustme.CA().issue_cert("gateway.client.test")          # not from the server's CA
    other.cert_chain_pems[0].write_to_path(str(d / "other.pem"))
    other.private_key_pem.write_to_path(str(d / "other.key"))
    return d


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[TLSRedis]:
    server = TLSRedis(tmp_path_factory.mktemp("tls-redis"), certs)
    try:
        server.start_all()
        yield server
    finally:
        server.stop()


def tls_limiter(url: str, tls: RedisTLSConfig) -> Limiter:
    lims = [limit("t", "1/hour", burst=2, store="redis", on_store_error="deny")]
    return Limiter(with_redis(lims, RedisConfig(url=url, timeout_ms=1000, tls=tls)))


async def test_tls_with_private_ca_and_client_certificate(tls_redis: TLSRedis, certs: Path,
                                                          built: list[Limiter]) -> None:
    lim = tls_limiter(tls_redis.url, RedisTLSConfig(
        ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"), key=str(certs / "client.key")))
    built.append(lim)
    await lim.start()
    assert lim.redis is not None and lim.redis.available
    statuses = [(await lim.check(route("t"), FakeRequest())).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


@pytest.mark.parametrize("case", ["no_client_cert", "client_cert_of_another_ca", "system_trust"])
async def test_tls_refused_without_the_right_certificates(case: str, tls_redis: TLSRedis,
                                                          certs: Path,
                                                          built: list[Limiter]) -> None:
    tls = {
        "no_client_cert": RedisTLSConfig(ca=str(certs / "ca.pem")),
        "client_cert_of_another_ca": RedisTLSConfig(
            ca=str(certs / "ca.pem"), cert=str(certs / "other.pem"),
            key=str(certs / "other.key")),
        # the server's certificate is from a private CA: the system store does not trust it
        "system_trust": RedisTLSConfig(cert=str(certs / "client.pem"),
                                       key=str(certs / "client.key")),
    }[case]
    lim = tls_limiter(tls_redis.url, tls)
    built.append(lim)
    await lim.start()                                   # does not raise: starts degraded
    assert lim.redis is not None and not lim.redis.available
    o = await lim.check(route("t"), FakeRequest())
    assert o.status == 503 and o.decision == "store_error"
