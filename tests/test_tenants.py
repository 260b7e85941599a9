"""Tenants (gateway/tenants.py): config, plans, calendar quotas, all-or-nothing, the control
plane's table. Memory and Redis stores with one suite; time from a FakeClock (the Redis script
takes the fake time too)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from gateway.config import ConfigError, RedisConfig, load_text
from gateway.ratelimit_redis import RedisStore
from gateway.tenants import Tenancy, TenantTable
from tests.fakes import FakeClock

BASE = """
upstreams: [{name: up, endpoints: ["http://127.0.0.1:9"]}]
routes: [{name: r, upstream: up}]
redis: {url: "redis://127.0.0.1:1/0"}
"""

TENANTS = """
tenants:
  key: "header:X-Tenant-Id"
  time_zone: "Europe/Berlin"
  plans:
    free: {rate: "1/second", burst: 2, quotas: {day: 5}}
    monthly: {quotas: {day: 4, month: 6}}
    enterprise: {}
  assignments: {acme: enterprise, m: monthly}
"""


class FakeRequest:
    def __init__(self, headers: list[tuple[str, str]] | None = None,
                 peer_ip: str = "10.0.0.1") -> None:
        self.headers = headers or []
        self.peer_ip = peer_ip

    def getall(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def tenant(t: str) -> FakeRequest:
    return FakeRequest([("X-Tenant-Id", t)])


def _utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def cfg_with(extra: str = "", store: str = "local") -> Any:
    text = BASE + TENANTS.replace('key: "header:X-Tenant-Id"',
                                  f'key: "header:X-Tenant-Id"\n  store: {store}') + extra
    return load_text(text)


# -- config -----------------------------------------------------------------------------------


def test_config_parses_plans_and_assignments() -> None:
    t = cfg_with().tenants
    assert t is not None and t.time_zone == "Europe/Berlin" and t.default_plan is None
    free = t.plan("free")
    assert (free.rate, free.capacity, free.quotas) == (1.0, 3.0, (("day", 5),))
    assert t.plan("enterprise").unlimited
    assert t.plan("monthly").quotas == (("day", 4), ("month", 6))
    assert dict(t.assignments) == {"acme": "enterprise", "m": "monthly"}


def test_config_errors_name_their_keys() -> None:
    text = BASE.replace('redis: {url: "redis://127.0.0.1:1/0"}\n', "") + """
tenants:
  key: cookie
  store: redis
  time_zone: "Mars/Olympus"
  default_plan: gold
  plans:
    free: {rate: "1/fortnight", burst: -1, quotas: {day: 0, year: 5}}
    "bad plan": {}
  assignments: {acme: platinum}
  colour: blue
"""
    with pytest.raises(ConfigError) as exc:
        load_text(text)
    errors = exc.value.errors
    expect = [
        "tenants.colour: unknown key",
        ("tenants.key: must be one of ip_address, user_id, client_id, api_key, client_cert or "
         "header:<Name>, got 'cookie'"),
        "tenants.time_zone: unknown time zone 'Mars/Olympus'",
        "tenants.plans.free.rate: unknown period 'fortnight'",
        "tenants.plans.free.burst: must be >= 0, got -1",
        "tenants.plans.free.quotas.year: unknown key",
        "tenants.plans.free.quotas.day: must be >= 1, got 0",
        "tenants.plans.bad plan: plan names may contain only",
        "tenants.default_plan: names unknown plan 'gold'",
        "tenants.assignments.acme: names unknown plan 'platinum'",
        "tenants.store: is redis but no redis: section is configured",
    ]
    for e in expect:
        assert any(line.startswith(e) for line in errors), (e, errors)
    with pytest.raises(ConfigError) as exc:
        load_text(BASE + "routes: [{name: r, upstream: up, tenants: 1}]\n")
    assert "routes[0].tenants: must be true or false, got 1" in exc.value.errors


# -- the check, on both stores ----------------------------------------------------------------


@pytest.fixture(params=["memory", "shared", "redis"])
async def make(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    stores: list[RedisStore] = []

    def build(clock: FakeClock, extra: str = "", table: TenantTable | None = None) -> Tenancy:
        if request.param == "memory":
            return Tenancy(cfg_with(extra).tenants, clock=clock, table=table)
        if request.param == "shared":   # the table workers share, as a fresh file per test
            return Tenancy(cfg_with(extra).tenants, clock=clock, table=table,
                           shared_dir=str(tmp_path))
        server = request.getfixturevalue("redis_server")
        server.flush()
        store = RedisStore(RedisConfig(url=server.url, timeout_ms=1000))
        stores.append(store)
        return Tenancy(cfg_with(extra, store="redis").tenants, clock=clock, table=table,
                       redis=store, redis_fake_time=True)

    yield build
    for s in stores:
        await s.close()


async def test_bucket_then_daily_quota_then_midnight_in_berlin(make: Any) -> None:
    # 2026-03-28 22:00 UTC = 23:00 in Berlin; midnight (the 23-hour day begins) at 23:00 UTC.
    clock = FakeClock(wall=_utc(2026, 3, 28, 22))
    ten = make(clock, "  default_plan: free\n")
    statuses = [(await ten.check(tenant("t1"))).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]            # capacity 3, no time passed
    out = await ten.check(tenant("t1"))
    doc = orjson.loads(out.body)
    assert doc["window"] == "rate" and doc["tenant"] == "t1"
    assert dict(out.headers)["Retry-After"] == "1"
    clock.advance(2)
    assert (await ten.check(tenant("t1"))).status == 200
    assert (await ten.check(tenant("t1"))).status == 200   # 5 admitted today: the quota
    clock.advance(5)
    out = await ten.check(tenant("t1"))
    assert out.status == 429
    doc = orjson.loads(out.body)
    assert doc["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert (doc["tenant"], doc["window"], doc["limit"], doc["current_usage"]) == \
        ("t1", "day", 5, 5)
    assert doc["quota_reset"] == "2026-03-29T00:00:00+01:00"
    headers = dict(out.headers)
    assert headers["Retry-After"] == str(3600 - 7)
    assert headers["RateLimit-Policy"] == '"free";q=1;w=1, "free-day";q=5;w=86400'
    assert headers["RateLimit"] == f'"free-day";r=0;t={3600 - 7}'
    # another tenant on the same plan has its own bucket and quota
    assert (await ten.check(tenant("t2"))).status == 200
    clock.advance(3600 - 7)                                # midnight in Berlin
    out = await ten.check(tenant("t1"))
    assert out.status == 200
    # the new day is 23 hours long, and RateLimit-Policy says so
    assert dict(out.headers)["RateLimit-Policy"] == '"free";q=1;w=1, "free-day";q=5;w=82800'


async def test_all_or_nothing_across_day_and_month(make: Any) -> None:
    clock = FakeClock(wall=_utc(2028, 2, 28, 12))
    ten = make(clock)
    assert [(await ten.check(tenant("m"))).status for _ in range(5)] == [200] * 4 + [429]
    doc = orjson.loads((await ten.check(tenant("m"))).body)
    assert (doc["window"], doc["current_usage"], doc["limit"]) == ("day", 4, 4)
    clock.advance(86400)                       # leap day: a new day, same month
    assert [(await ten.check(tenant("m"))).status for _ in range(3)] == [200, 200, 429]
    doc = orjson.loads((await ten.check(tenant("m"))).body)
    # the day still has room (2 of 4): the month refused, and the day counted nothing for it
    assert (doc["window"], doc["current_usage"], doc["limit"]) == ("month", 6, 6)
    assert doc["quota_reset"] == "2028-03-01T00:00:00+01:00"
    clock.advance(86400)                       # 1 March: both windows new
    assert (await ten.check(tenant("m"))).status == 200


async def test_unlimited_plan_and_unknown_tenants(make: Any) -> None:
    clock = FakeClock(wall=_utc(2026, 12, 4, 12))
    ten = make(clock)
    for _ in range(200):
        out = await ten.check(tenant("acme"))
        assert out.allowed and out.headers == ()
    out = await ten.check(tenant("stranger"))
    assert out.status == 403
    assert orjson.loads(out.body)["detail"] == "unknown tenant 'stranger'"
    out = await ten.check(FakeRequest())
    assert out.status == 403 and "names no tenant" in orjson.loads(out.body)["detail"]
    out = await ten.check(FakeRequest([("X-Tenant-Id", "acme"), ("x-tenant-id", "free")]))
    assert out.status == 400 and "more than one X-Tenant-Id" in orjson.loads(out.body)["detail"]


async def test_table_override_and_its_expiry(make: Any) -> None:
    clock = FakeClock(wall=_utc(2026, 12, 4, 12))
    table = TenantTable(clock)
    ten = make(clock, table=table)
    assert (await ten.check(tenant("newco"))).status == 403
    table.update({"tenants": {"newco": {"plan": "monthly", "override": None}}})
    assert [(await ten.check(tenant("newco"))).status for _ in range(5)] == [200] * 4 + [429]
    # doubled for an incident: the day quota rises, the month's stays
    table.update({"tenants": {"newco": {"plan": "monthly", "override": {
        "daily_quota": 8, "expires_at": clock.time() + 60}}}})
    assert [(await ten.check(tenant("newco"))).status for _ in range(3)] == [200, 200, 429]
    doc = orjson.loads((await ten.check(tenant("newco"))).body)
    assert doc["window"] == "month"
    clock.advance(60)                          # expired: the plan's day quota (4) again
    doc = orjson.loads((await ten.check(tenant("newco"))).body)
    assert (doc["window"], doc["limit"]) in {("day", 4), ("month", 6)}
    # a response without a tenants key keeps the table; an empty table clears it
    table.update({"reject_services": {}})
    assert (await ten.check(tenant("newco"))).status == 429
    table.update({"tenants": {}})
    assert (await ten.check(tenant("newco"))).status == 403


async def test_usage_is_shipped_per_tenant_and_window_and_bounded(make: Any) -> None:
    clock = FakeClock(wall=_utc(2026, 12, 4, 12))
    ten = make(clock, "  default_plan: monthly\n")
    for _ in range(5):
        await ten.check(tenant("m"))
    for i in range(120):
        await ten.check(tenant(f"anon-{i}"))
    rows = ten.usage()
    by = {r["tenant"]: r for r in rows}
    assert by["m"]["admitted"] == 4 and by["m"]["rejected"] == 1
    assert by["m"]["windows"] == [{"window": "day", "id": "2026-12-04", "limit": 4},
                                  {"window": "month", "id": "2026-12", "limit": 6}]
    assert len(rows) == 1 + 100 and ten.usage_dropped == 20
    assert ten.usage() == []


async def test_redis_counters_expire_after_their_window(redis_server: Any) -> None:
    import redis.asyncio as aioredis
    redis_server.flush()
    store = RedisStore(RedisConfig(url=redis_server.url, timeout_ms=1000))
    clock = FakeClock(wall=__import__("time").time())
    ten = Tenancy(cfg_with(store="redis").tenants, clock=clock, redis=store)
    try:
        assert (await ten.check(tenant("m"))).status == 200
        w_day, w_month = ten.windows(ten.plan_for("m"), clock.time())  # type: ignore[arg-type]
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            day_ttl = await r.ttl("gw:tq:{m}:day:" + w_day.id)
            month_ttl = await r.ttl("gw:tq:{m}:month:" + w_month.id)
            assert await r.get("gw:tq:{m}:day:" + w_day.id) == b"1"
        finally:
            await r.aclose()
        now = clock.time()
        assert abs(day_ttl - (w_day.end + 3600 - now)) <= 2
        assert abs(month_ttl - (w_month.end + 3600 - now)) <= 2
    finally:
        await store.close()


def test_gateway_check_names_tenant_keys(tmp_path: Any) -> None:
    import subprocess
    import sys
    bad = tmp_path / "bad.yaml"
    bad.write_text('upstreams: [{name: u, endpoints: ["http://127.0.0.1:1"]}]\n'
                   "routes: [{name: r, upstream: u}]\n"
                   "limits: [{name: l, key: global, rate: 1/second, delay_max_ms: -5}]\n"
                   "tenants:\n  time_zone: Mars/Base\n  default_plan: gold\n"
                   "  plans: {free: {quotas: {year: 3}}}\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    lines = out.stdout.splitlines() + out.stderr.splitlines()
    for expected in ("limits[0].delay_max_ms: must be >= 0, got -5",
                     "tenants.time_zone: unknown time zone 'Mars/Base'",
                     "tenants.plans.free.quotas.year: unknown key",
                     "tenants.default_plan: names unknown plan 'gold' (known: free)"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)


@pytest.mark.parametrize("mode", ["allow", "deny", "local"])
async def test_redis_failures_follow_on_store_error(mode: str) -> None:
    from tests.conftest import free_port
    store = RedisStore(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200))
    clock = FakeClock(wall=_utc(2026, 12, 4, 12))
    cfg = cfg_with(f"  on_store_error: {mode}\n", store="redis").tenants
    ten = Tenancy(cfg, clock=clock, redis=store)
    events: list[tuple[str, str]] = []
    ten.add_listener(lambda p, d: events.append((p, d)))
    try:
        outs = [await ten.check(tenant("m")) for _ in range(5)]
    finally:
        await store.close()
    if mode == "allow":
        assert [o.status for o in outs] == [200] * 5
    elif mode == "deny":
        assert [o.status for o in outs] == [503] * 5
        assert dict(outs[0].headers)["Retry-After"] == "1"
    else:                                   # the memory store counts meanwhile: day quota 4
        assert [o.status for o in outs] == [200] * 4 + [429]
    assert events[0] == ("plan:monthly", "store_error")


async def test_workers_share_one_table(tmp_path: Any) -> None:
    """Two Tenancy objects on one file, as two workers would be: one quota, one bucket."""
    clock = FakeClock(wall=_utc(2026, 12, 4, 12))
    a = Tenancy(cfg_with().tenants, clock=clock, shared_dir=str(tmp_path))
    b = Tenancy(cfg_with().tenants, clock=clock, shared_dir=str(tmp_path))
    statuses = [(await (a if i % 2 else b).check(tenant("m"))).status for i in range(6)]
    assert statuses == [200] * 4 + [429] * 2                # day quota 4, not 8
    cfg = cfg_with("  default_plan: free\n").tenants
    a, b = (Tenancy(cfg, clock=clock, shared_dir=str(tmp_path)) for _ in range(2))
    statuses = [(await (a if i % 2 else b).check(tenant("f"))).status for i in range(4)]
    assert statuses == [200, 200, 200, 429]                 # bucket capacity 3, shared
    assert a.memory.evictions == 0  # type: ignore[union-attr]
