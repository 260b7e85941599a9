"""Token-bucket maths, the stores (memory, shared, Redis) and the Limiter, against hand-computed
cases on a FakeClock. Store-involving tests run on every backend; the Redis one runs the real Lua
script on a real redis-server with the fake time passed in (production uses Redis TIME, covered
with tolerances in test_ratelimit_redis.py)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from gateway.clock import Clock
from gateway.config import Config, LimitConfig, RedisConfig, RouteConfig
from gateway.errors import QUOTA_EXCEEDED
from gateway.ratelimit import (
    ANONYMOUS,
    EPSILON,
    Limiter,
    LimitOutcome,
    MemoryStore,
    SharedStore,
    admits,
    client_address,
    full_in_s,
    hash_api_key,
    make_bucket,
    refill,
    reset_s,
    retry_after,
    take_all,
    wait_s,
    whole_tokens,
)
from tests.fakes import FakeClock

# ---------------------------------------------------------------------------------------------
# Helpers shared with the other test_ratelimit_* modules


class FakeRequest:
    """What Limiter.check reads of a downstream Request: header lookups and the peer's IP."""

    def __init__(self, headers: dict[str, str] | list[tuple[str, str]] | None = None,
                 peer: str | None = "192.0.2.1") -> None:
        self.headers = CIMultiDict(headers or {})
        self.peer_ip = peer or ""

    def get(self, name: str) -> str | None:
        return self.headers.get(name)

    def getall(self, name: str) -> list[str]:
        return self.headers.getall(name, [])


def limit(name: str, rate: str, burst: int = 0, key: str = "user_id", **kw: Any) -> LimitConfig:
    count, _, period = rate.partition("/")
    seconds = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}.get(period)
    if seconds is None:
        seconds = float(period.rstrip("s"))
    return LimitConfig(name=name, key=key, rate_count=int(count), period_s=seconds, burst=burst,
                       rate_text=rate, **kw)


def route(*limits: str, name: str = "r") -> RouteConfig:
    return RouteConfig(name=name, upstream="u", service="s", limits=tuple(limits))


def config(limits: list[LimitConfig], routes: list[RouteConfig] | None = None,
           redis_url: str | None = None, timeout_ms: float = 1000.0,
           trusted: tuple[Any, ...] = ()) -> Config:
    if routes is None:
        routes = [route(*(lim.name for lim in limits))]
    return Config(limits=tuple(limits), routes=tuple(routes), trusted_proxies=trusted,
                  redis=RedisConfig(url=redis_url, timeout_ms=timeout_ms) if redis_url else None)


def parse_items(value: str) -> dict[str, dict[str, int]]:
    """Parse a Structured Fields list of `"name";k=int;...` items (RateLimit, RateLimit-Policy)."""
    out: dict[str, dict[str, int]] = {}
    for item in value.split(","):
        parts = item.strip().split(";")
        name = parts[0]
        assert name.startswith('"') and name.endswith('"'), value
        params = {}
        for p in parts[1:]:
            k, _, v = p.partition("=")
            assert v.isdigit(), value  # integers only, no decimals
            params[k] = int(v)
        out[name[1:-1]] = params
    return out


def header(outcome: LimitOutcome, name: str) -> str | None:
    values = [v for k, v in outcome.headers if k.lower() == name.lower()]
    assert len(values) <= 1, outcome.headers
    return values[0] if values else None


@dataclass
class Backend:
    kind: str                 # memory | shared | redis
    tmp: Path
    redis_url: str | None = None

    def limiter(self, limits: list[LimitConfig], routes: list[RouteConfig] | None = None, *,
                clock: Clock, previous: Limiter | None = None, **kw: Any) -> Limiter:
        store = "redis" if self.kind == "redis" else "local"
        limits = [replace(lim, store=store) for lim in limits]
        cfg = config(limits, routes, self.redis_url, **kw)
        return Limiter(cfg, clock=clock, previous=previous,
                       shared_dir=str(self.tmp) if self.kind == "shared" else None,
                       redis_fake_time=True)


@pytest.fixture(params=["memory", "shared", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return Backend(request.param, tmp_path, url)


@pytest.fixture
async def limiters() -> AsyncIterator[list[Limiter]]:
    """Limiters a test builds; closed at the end."""
    made: list[Limiter] = []
    yield made
    for lim in reversed(made):
        await lim.close()


@pytest.fixture
def make(backend: Backend, limiters: list[Limiter]) -> Callable[..., Limiter]:
    def build(limits: list[LimitConfig], routes: list[RouteConfig] | None = None, *,
              clock: Clock, **kw: Any) -> Limiter:
        lim = backend.limiter(limits, routes, clock=clock, **kw)
        limiters.append(lim)
        return lim
    return build


async def expect_state(lim: Limiter, clock: FakeClock, name: str, key: str, tokens: float,
                       rate: float, capacity: float) -> None:
    """The bucket (looked at with test(), which consumes nothing) holds `tokens`."""
    got = await lim.test(name, key)
    assert got["remaining"] == whole_tokens(tokens)
    assert got["allowed"] == admits(tokens)
    assert got["retry_after_s"] == (0 if admits(tokens) else retry_after(wait_s(tokens, 1, rate)))
    assert got["reset_time"] == math.ceil(clock.time() + full_in_s(tokens, rate, capacity))


def check_admitted_headers(o: LimitOutcome, policy: str, r: int, t: int) -> None:
    assert o.allowed and o.status == 200 and o.body == b""
    rl = parse_items(header(o, "RateLimit") or "")
    assert rl == {policy: {"r": r, "t": t}}


def check_limited(o: LimitOutcome, *, retry: int, policy: str, r: int, t: int,
                  violated: list[str]) -> None:
    assert not o.allowed and o.status == 429 and o.decision == "limited"
    assert header(o, "Content-Type") == "application/problem+json"
    assert header(o, "Retry-After") == str(retry)
    assert parse_items(header(o, "RateLimit") or "") == {policy: {"r": r, "t": t}}
    doc = orjson.loads(o.body)
    assert doc["type"] == QUOTA_EXCEEDED
    assert doc["status"] == 429 and doc["title"] and doc["detail"]
    assert doc["violated-policies"] == violated


# ---------------------------------------------------------------------------------------------
# Pure maths


def test_refill_is_continuous_capped_and_never_backwards() -> None:
    assert refill(0.0, 10.0, 10.5, 2.0, 5.0) == pytest.approx(1.0)
    assert refill(0.25, 10.0, 10.1, 1.0, 5.0) == pytest.approx(0.35)   # fractional
    assert refill(4.0, 10.0, 100.0, 2.0, 5.0) == 5.0                  # capped at capacity
    assert refill(1.5, 10.0, 9.0, 2.0, 5.0) == 1.5                    # clock behind the stamp


def test_wait_full_and_header_values() -> None:
    assert wait_s(0.0, 1, 0.5) == pytest.approx(2.0)
    assert wait_s(0.75, 1, 0.5) == pytest.approx(0.5)
    assert wait_s(1.0, 1, 0.5) == 0.0
    assert full_in_s(2.0, 0.5, 5.0) == pytest.approx(6.0)
    assert full_in_s(5.0, 0.5, 5.0) == 0.0
    assert retry_after(0.0) == 1 and retry_after(0.01) == 1 and retry_after(1.0) == 1
    assert retry_after(1.0 + 1e-12) == 1          # float noise does not add a second
    assert retry_after(1.2) == 2 and retry_after(3.6) == 4
    assert whole_tokens(2.9999999999) == 3 and whole_tokens(2.5) == 2 and whole_tokens(0.0) == 0
    assert reset_s(0.0, 1 / 6, 3.0) == 18 and reset_s(3.0, 1.0, 3.0) == 0
    assert reset_s(0.5, 2.0, 1.0) == 1


def test_admits_tolerates_float_noise_only() -> None:
    rate = 1000 / 3600
    tokens = refill(0.0, 0.0, 3.6, rate, 1.0)
    assert admits(tokens)                       # 3.6 s at 1000/hour is one whole token
    assert not admits(1 - 1e-6)
    assert admits(1 - EPSILON / 2)


def test_take_all_needs_every_enforced_bucket() -> None:
    assert take_all([1.0, 2.0], [True, True])
    assert not take_all([1.0, 0.5], [True, True])
    assert take_all([1.0, 0.5], [True, False])   # a shadow bucket does not block
    assert not take_all([3.0], [True], cost=4)


# ---------------------------------------------------------------------------------------------
# Store level (every backend)


@pytest.fixture
async def store_of(backend: Backend, limiters: list[Limiter]) -> Callable[..., Any]:
    def build(clock: Clock) -> Any:
        lim = backend.limiter([limit("x", "1/second")], clock=clock)
        limiters.append(lim)
        return lim.redis if backend.kind == "redis" else lim._local
    return build


async def test_store_all_or_nothing_and_consume_flag(store_of: Callable[..., Any]) -> None:
    clock = FakeClock()
    store = store_of(clock)
    a = make_bucket(limit("a", "1/second", burst=1))       # capacity 2
    b = make_bucket(limit("b", "1/minute", burst=0))       # capacity 1
    ok, tokens = await store.take([a, b], ["k", "k"], 1, True)
    assert ok and tokens == [2.0, 1.0]
    ok, tokens = await store.take([a, b], ["k", "k"], 1, True)
    assert not ok and tokens == [1.0, 0.0]                 # b is empty: nothing taken from a
    ok, tokens = await store.take([a], ["k"], 1, False)
    assert ok and tokens == [1.0]                          # a still holds 1; looking is free
    ok, tokens = await store.take([a], ["k"], 1, False)
    assert ok and tokens == [1.0]
    ok, tokens = await store.take([a], ["other"], 2, True)  # other keys start full
    assert ok and tokens == [2.0]
    ok, tokens = await store.take([a], ["k"], 2, True)      # cost 2 with 1 token: rejected
    assert not ok and tokens == [1.0]


async def test_store_shadow_bucket_neither_blocks_nor_goes_negative(
        store_of: Callable[..., Any]) -> None:
    clock = FakeClock()
    store = store_of(clock)
    enforced = make_bucket(limit("e", "1/second", burst=9))
    shadow = make_bucket(limit("s", "1/minute", burst=0, mode="shadow"))
    results = [await store.take([enforced, shadow], ["k", "k"], 1, True) for _ in range(3)]
    assert [ok for ok, _ in results] == [True, True, True]
    assert [t for _, t in results] == [[10.0, 1.0], [9.0, 0.0], [8.0, 0.0]]


async def test_store_fractional_refill(store_of: Callable[..., Any]) -> None:
    clock = FakeClock()
    store = store_of(clock)
    b = make_bucket(limit("f", "4/second", burst=1))       # capacity 2, 0.25 s per token
    assert (await store.take([b], ["k"], 1, True))[0]
    assert (await store.take([b], ["k"], 1, True))[0]
    clock.advance(0.1)
    ok, tokens = await store.take([b], ["k"], 1, True)
    assert not ok and tokens[0] == pytest.approx(0.4)
    clock.advance(0.15)
    ok, tokens = await store.take([b], ["k"], 1, True)
    assert ok and tokens[0] == pytest.approx(1.0)
    clock.advance(0.2)
    ok, tokens = await store.take([b], ["k"], 1, False)
    assert not ok and tokens[0] == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------
# Limiter: hand-computed sequences with headers checked against the bucket state


async def test_steady_rate(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("steady", "2/second", burst=0)], clock=clock)   # capacity 1, 0.5 s/token
    r, req = route("steady"), FakeRequest({"X-User-Id": "alice"})
    admitted = 0
    for _ in range(20):                     # 10 s at 4 requests/s: every other one admitted
        o = await lim.check(r, req)
        if o.allowed:
            admitted += 1
            check_admitted_headers(o, "steady", r=0, t=1)
        else:
            check_limited(o, retry=1, policy="steady", r=0, t=1, violated=["steady"])
        clock.advance(0.25)
    assert admitted == 10


async def test_burst_after_idle(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("b", "1/second", burst=4)], clock=clock)        # capacity 5
    r, req = route("b"), FakeRequest({"X-User-Id": "alice"})
    for _ in range(2):
        outcomes = [await lim.check(r, req) for _ in range(6)]
        assert [o.allowed for o in outcomes] == [True] * 5 + [False]
        for i, o in enumerate(outcomes[:5]):
            check_admitted_headers(o, "b", r=4 - i, t=i + 1)
            assert parse_items(header(o, "RateLimit-Policy") or "") == {"b": {"q": 1, "w": 1}}
        check_limited(outcomes[5], retry=1, policy="b", r=0, t=5, violated=["b"])
        await expect_state(lim, clock, "b", "alice", 0.0, 1.0, 5.0)
        clock.advance(100)                   # idle: the bucket refills to capacity, not beyond


async def test_exact_retry_after_and_headers(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("slow", "10/minute", burst=2)], clock=clock)    # capacity 3, 6 s/token
    r, req = route("slow"), FakeRequest({"X-User-Id": "bob"})
    for i in range(3):
        check_admitted_headers(await lim.check(r, req), "slow", r=2 - i, t=6 * (i + 1))
    check_limited(await lim.check(r, req), retry=6, policy="slow", r=0, t=18,
                  violated=["slow"])
    clock.advance(2.5)                       # 0.41667 tokens: 3.5 s to go, 15.5 s to full
    check_limited(await lim.check(r, req), retry=4, policy="slow", r=0, t=16,
                  violated=["slow"])
    await expect_state(lim, clock, "slow", "bob", 2.5 / 6, 1 / 6, 3.0)
    clock.advance(3.5)                       # exactly one token
    check_admitted_headers(await lim.check(r, req), "slow", r=0, t=18)
    clock.advance(5.999)
    check_limited(await lim.check(r, req), retry=1, policy="slow", r=0, t=13,
                  violated=["slow"])


async def test_fractional_rates(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("h", "1000/hour", burst=0)], clock=clock)       # 3.6 s per token
    r, req = route("h"), FakeRequest({"X-User-Id": "carol"})
    assert (await lim.check(r, req)).allowed
    check_limited(await lim.check(r, req), retry=4, policy="h", r=0, t=4, violated=["h"])
    clock.advance(3.0)                       # 0.8333 tokens
    check_limited(await lim.check(r, req), retry=1, policy="h", r=0, t=1, violated=["h"])
    assert (await lim.test("h", "carol"))["remaining"] == 0
    clock.advance(0.6)
    o = await lim.check(r, req)
    assert o.allowed
    assert parse_items(header(o, "RateLimit-Policy") or "") == {"h": {"q": 1000, "w": 3600}}


async def test_many_policies_on_one_route(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lims = [limit("per_ip", "1/second", burst=1, key="ip_address"),         # cap 2
            limit("per_user", "10/minute", burst=0, key="user_id"),          # cap 1, 6 s/token
            limit("global", "100/hour", burst=9, key="client_id")]           # cap 10, 36 s/token
    lim = make(lims, clock=clock)
    r = route("per_ip", "per_user", "global")
    alice = FakeRequest({"X-User-Id": "alice"}, peer="198.51.100.1")

    o = await lim.check(r, alice)
    # per_ip 1 (t=1), per_user 0 (t=6), global 9 (t=36): per_user is closest to rejecting
    check_admitted_headers(o, "per_user", r=0, t=6)
    assert parse_items(header(o, "RateLimit-Policy") or "") == {
        "per_ip": {"q": 1, "w": 1}, "per_user": {"q": 10, "w": 60}, "global": {"q": 100, "w": 3600}}

    check_limited(await lim.check(r, alice), retry=6, policy="per_user", r=0, t=6,
                  violated=["per_user"])
    # all-or-nothing: the rejected request took nothing from per_ip or global
    await expect_state(lim, clock, "per_ip", "198.51.100.1", 1.0, 1.0, 2.0)
    await expect_state(lim, clock, "global", ANONYMOUS, 9.0, 1 / 36, 10.0)

    bob = FakeRequest({"X-User-Id": "bob"}, peer="198.51.100.1")  # same IP, other user
    # per_ip 0 (t=2) and per_user 0 (t=6) tie on r: the longer wait is reported
    check_admitted_headers(await lim.check(r, bob), "per_user", r=0, t=6)
    # now both per_ip and per_user reject for alice; Retry-After is the longer wait
    o = await lim.check(r, alice)
    check_limited(o, retry=6, policy="per_user", r=0, t=6, violated=["per_ip", "per_user"])
    await expect_state(lim, clock, "global", ANONYMOUS, 8.0, 1 / 36, 10.0)

    clock.advance(1.0)  # per_ip 1 token; per_user alice 1/6; global 8 + 1/36
    check_limited(await lim.check(r, alice), retry=5, policy="per_user", r=0, t=5,
                  violated=["per_user"])
    clock.advance(5.0)
    o = await lim.check(r, alice)
    assert o.allowed  # per_ip: 2 -> 1 (t=1); per_user 0 (t=6); global 8+6/36 -> 7.1667 (t=102)
    check_admitted_headers(o, "per_user", r=0, t=6)
    await expect_state(lim, clock, "global", ANONYMOUS, 8 + 6 / 36 - 1, 1 / 36, 10.0)


async def test_headers_false_and_shadow_policies_stay_out_of_headers(
        make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("quiet", "5/second", burst=0, headers=False),
                limit("loud", "5/second", burst=2),
                limit("watch", "1/minute", mode="shadow")], clock=clock)
    both = route("quiet", "loud", "watch")
    o = await lim.check(both, FakeRequest({"X-User-Id": "u"}))
    assert parse_items(header(o, "RateLimit-Policy") or "") == {"loud": {"q": 5, "w": 1}}
    check_admitted_headers(o, "loud", r=2, t=1)
    only_quiet = make([limit("quiet", "5/second", burst=0, headers=False)], clock=clock)
    assert (await only_quiet.check(route("quiet"), FakeRequest())).headers == ()
    o = await only_quiet.check(route("quiet"), FakeRequest())
    assert not o.allowed   # on a 429 the headers are always sent
    assert parse_items(header(o, "RateLimit-Policy") or "") == {"quiet": {"q": 5, "w": 1}}
    assert parse_items(header(o, "RateLimit") or "") == {"quiet": {"r": 0, "t": 1}}


async def test_keys_do_not_interfere(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("a", "1/minute", key="user_id"), limit("b", "1/minute", key="user_id")],
               [route("a", name="ra"), route("b", name="rb")], clock=clock)
    ra, rb = route("a", name="ra"), route("b", name="rb")
    for user in ("u1", "u2", "u3"):
        req = FakeRequest({"X-User-Id": user})
        assert (await lim.check(ra, req)).allowed
        assert not (await lim.check(ra, req)).allowed
        assert (await lim.check(rb, req)).allowed        # other policy, own bucket
        assert not (await lim.check(rb, req)).allowed
    anon = FakeRequest()
    assert (await lim.check(ra, anon)).allowed
    assert not (await lim.check(ra, FakeRequest({"X-User-Id": ""}))).allowed  # empty = anonymous


async def test_identifier_kinds(make: Callable[..., Limiter], backend: Backend) -> None:
    clock = FakeClock()
    lims = [limit("ip", "1/minute", key="ip_address"), limit("cid", "1/minute", key="client_id"),
            limit("key", "1/minute", key="api_key"), limit("tenant", "1/minute",
                                                            key="header:X-Tenant")]
    lim = make(lims, [route(n.name, name=n.name) for n in lims], clock=clock)

    async def pair(name: str, first: FakeRequest, same: FakeRequest, other: FakeRequest) -> None:
        r = route(name, name=name)
        assert (await lim.check(r, first)).allowed
        assert not (await lim.check(r, same)).allowed
        assert (await lim.check(r, other)).allowed

    await pair("ip", FakeRequest(peer="192.0.2.7"), FakeRequest(peer="192.0.2.7"),
               FakeRequest(peer="192.0.2.8"))
    await pair("cid", FakeRequest({"X-Client-Id": "c1"}), FakeRequest({"x-client-id": "c1"}),
               FakeRequest({"X-Client-Id": "c2"}))
    secret = "sk_live_very_secret_value"
    await pair("key", FakeRequest({"X-Api-Key": secret}), FakeRequest({"X-Api-Key": secret}),
               FakeRequest({"X-Api-Key": "another"}))
    await pair("tenant", FakeRequest({"X-Tenant": "t1"}), FakeRequest({"X-Tenant": "t1"}),
               FakeRequest({"X-Tenant": "t2"}))
    # no peer (unix socket) is anonymous
    assert (await lim.check(route("ip", name="ip"), FakeRequest(peer=None))).allowed
    assert (await lim.test("ip", ANONYMOUS))["remaining"] == 0
    # the API key is bucketed by its hash, and test() accepts either form
    assert (await lim.test("key", secret))["remaining"] == 0
    assert (await lim.test("key", hash_api_key(secret)))["remaining"] == 0
    if backend.kind == "redis":
        import redis
        r = redis.Redis.from_url(backend.redis_url or "")
        try:
            keys = [k.decode() for k in r.keys("*")]
        finally:
            r.close()
        assert keys and not any(secret in k for k in keys)
        assert any(hash_api_key(secret) in k for k in keys)
    elif backend.kind == "memory":
        stored = repr(lim._local._tables)  # type: ignore[union-attr]
        assert secret not in stored and hash_api_key(secret) in stored


def test_client_address_walks_forwarded_for_from_the_right() -> None:
    import ipaddress
    trusted = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    # untrusted peer: X-Forwarded-For is ignored (anyone can send it)
    assert client_address("203.0.113.9", ["1.2.3.4"], trusted) == "203.0.113.9"
    # trusted peer: the right-most address that is not a trusted proxy
    assert client_address("127.0.0.1", ["203.0.113.7"], trusted) == "203.0.113.7"
    assert client_address("127.0.0.1", ["198.51.100.1, 203.0.113.7, 10.1.2.3"],
                          trusted) == "203.0.113.7"
    # a client spoofing X-Forwarded-For only adds entries to the left
    assert client_address("127.0.0.1", ["6.6.6.6, 203.0.113.7"], trusted) == "203.0.113.7"
    # several header lines are one list, in order
    assert client_address("127.0.0.1", ["6.6.6.6", "203.0.113.7, 10.0.0.1"],
                          trusted) == "203.0.113.7"
    # every hop trusted: the left-most; no header: the peer
    assert client_address("127.0.0.1", ["10.0.0.2, 10.0.0.1"], trusted) == "10.0.0.2"
    assert client_address("127.0.0.1", [], trusted) == "127.0.0.1"
    # IPv4-mapped peers and ports
    assert client_address("::ffff:127.0.0.1", ["203.0.113.7:5555"], trusted) == "203.0.113.7"
    assert client_address("127.0.0.1", ["[2001:db8::1]:443"], trusted) == "2001:db8::1"
    assert client_address(None, [], trusted) == ANONYMOUS
    assert client_address("127.0.0.1", ["not-an-ip"], trusted) == "not-an-ip"


async def test_trusted_proxy_clients_get_their_own_buckets(backend: Backend,
                                                           limiters: list[Limiter]) -> None:
    import ipaddress
    clock = FakeClock()
    lim = backend.limiter([limit("ip", "1/minute", key="ip_address")], clock=clock,
                          trusted=(ipaddress.ip_network("127.0.0.1/32"),))
    limiters.append(lim)
    r = route("ip")
    via_proxy = [FakeRequest([("X-Forwarded-For", f"6.6.6.6, 203.0.113.{i}")], peer="127.0.0.1")
                 for i in (1, 2)]
    assert (await lim.check(r, via_proxy[0])).allowed
    assert (await lim.check(r, via_proxy[1])).allowed
    assert not (await lim.check(r, via_proxy[0])).allowed
    # the spoofed 6.6.6.6 was never a key; 203.0.113.1 is
    assert (await lim.test("ip", "6.6.6.6"))["remaining"] == 1
    assert (await lim.test("ip", "203.0.113.1"))["remaining"] == 0
    # an untrusted peer's X-Forwarded-For is ignored
    direct = FakeRequest([("X-Forwarded-For", "203.0.113.2")], peer="192.0.2.50")
    assert (await lim.check(r, direct)).allowed
    assert not (await lim.check(r, direct)).allowed


async def test_shadow_mode_admits_counts_and_logs_rate_limited(
        make: Callable[..., Limiter], caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    lim = make([limit("watch", "1/second", burst=1, mode="shadow")], clock=clock)
    events: list[tuple[str, str]] = []
    lim.add_listener(lambda name, decision: events.append((name, decision)))
    r, req = route("watch"), FakeRequest({"X-User-Id": "u"})
    caplog.set_level(logging.WARNING, logger="gateway.ratelimit")
    outcomes = [await lim.check(r, req) for _ in range(50)]
    assert all(o.allowed and o.status == 200 and o.body == b"" for o in outcomes)
    assert all(o.headers == () for o in outcomes)          # shadow policies are invisible
    assert [o.decision for o in outcomes] == ["allowed"] * 2 + ["shadow_limited"] * 48
    assert events == [("watch", "allowed")] * 2 + [("watch", "shadow_limited")] * 48
    shadow_logs = [rec for rec in caplog.records if rec.name == "gateway.ratelimit"]
    assert len(shadow_logs) == 1 and "watch" in shadow_logs[0].getMessage()
    clock.advance(0.5)                                      # half a token: still short
    await lim.check(r, req)
    clock.advance(10.0)                                     # refilled: admitted, no log
    assert (await lim.check(r, req)).decision == "allowed"
    assert (await lim.check(r, req)).decision == "allowed"
    assert (await lim.check(r, req)).decision == "shadow_limited"
    shadow_logs = [rec for rec in caplog.records if rec.name == "gateway.ratelimit"]
    assert len(shadow_logs) == 2 and "48 more" in shadow_logs[1].getMessage()


async def test_shadow_policy_beside_an_enforced_one(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("enf", "1/second", burst=2), limit("watch", "1/minute", mode="shadow")],
               clock=clock)
    events: list[tuple[str, str]] = []
    lim.add_listener(lambda name, decision: events.append((name, decision)))
    r, req = route("enf", "watch"), FakeRequest({"X-User-Id": "u"})
    decisions = [(await lim.check(r, req)).decision for _ in range(4)]
    assert decisions == ["allowed", "shadow_limited", "shadow_limited", "limited"]
    assert events[:6] == [("enf", "allowed"), ("watch", "allowed"),
                          ("enf", "allowed"), ("watch", "shadow_limited"),
                          ("enf", "allowed"), ("watch", "shadow_limited")]
    assert events[6:] == [("enf", "limited"), ("watch", "shadow_limited")]


async def test_admin_test_consumes_nothing(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("t", "1/second", burst=2)], clock=clock)          # capacity 3
    for _ in range(10):
        got = await lim.test("t", "k", requests=3)
        assert got == {"allowed": True, "remaining": 3, "retry_after_s": 0,
                       "reset_time": math.ceil(clock.time())}
    assert (await lim.test("t", "k", requests=4))["retry_after_s"] is None   # > capacity
    r, req = route("t"), FakeRequest({"X-User-Id": "k"})
    assert (await lim.check(r, req)).allowed
    got = await lim.test("t", "k", requests=3)
    assert got == {"allowed": False, "remaining": 2, "retry_after_s": 1,
                   "reset_time": math.ceil(clock.time() + 1)}
    with pytest.raises(KeyError):
        await lim.test("nope", "k")
    with pytest.raises(ValueError):
        await lim.test("t", "k", requests=0)


async def test_listeners_see_every_policy_decision(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("a", "1/minute"), limit("b", "1/minute", key="client_id")], clock=clock)
    seen: list[tuple[str, str]] = []
    lim.add_listener(lambda p, d: seen.append((p, d)))
    r = route("a", "b")
    await lim.check(r, FakeRequest({"X-User-Id": "1", "X-Client-Id": "c"}))
    await lim.check(r, FakeRequest({"X-User-Id": "2", "X-Client-Id": "c"}))
    assert seen == [("a", "allowed"), ("b", "allowed"), ("a", "allowed"), ("b", "limited")]


async def test_routes_without_limits(make: Callable[..., Limiter]) -> None:
    clock = FakeClock()
    lim = make([limit("a", "1/minute")], [route("a"), route(name="free")], clock=clock)
    assert lim.has_limits(route("a")) and not lim.has_limits(route(name="free"))
    o = await lim.check(route(name="free"), FakeRequest())
    assert o.allowed and o.headers == () and o.decision == "allowed"


async def test_reload_keeps_unchanged_policies(backend: Backend) -> None:
    clock = FakeClock()
    old = backend.limiter([limit("same", "1/minute"), limit("changed", "1/minute"),
                           limit("gone", "1/minute")], clock=clock)
    await old.start()
    req = FakeRequest({"X-User-Id": "u"})
    for name in ("same", "changed", "gone"):
        assert (await old.check(route(name), req)).allowed
        assert not (await old.check(route(name), req)).allowed
    new = backend.limiter([limit("same", "1/minute"), limit("changed", "2/minute")],
                          clock=clock, previous=old)
    await new.start()
    assert not (await new.check(route("same"), req)).allowed      # state kept
    assert (await new.check(route("changed"), req)).allowed       # new rate: a fresh bucket
    await old.close()                                             # after the swap
    assert not (await new.check(route("same"), req)).allowed      # still working, still kept
    if backend.kind == "redis":
        assert new.redis is old.redis and new.redis is not None and new.redis.available
    else:
        assert new._local is old._local
    if backend.kind == "memory":
        ids = set(new._local._tables)  # type: ignore[union-attr]
        assert not any(i.startswith("gone|") for i in ids)
    await new.close()


async def test_reload_with_changed_redis_section_gets_a_new_client(redis_url: str) -> None:
    clock = FakeClock()
    lims = [limit("a", "1/minute", store="redis")]
    old = Limiter(config(lims, redis_url=redis_url), clock=clock, redis_fake_time=True)
    new = Limiter(config(lims, redis_url=redis_url, timeout_ms=77), clock=clock, previous=old,
                  redis_fake_time=True)
    assert new.redis is not old.redis
    req = FakeRequest({"X-User-Id": "u"})
    assert (await old.check(route("a"), req)).allowed
    await old.close()
    assert not (await new.check(route("a"), req)).allowed         # same Redis keys
    await new.close()


# ---------------------------------------------------------------------------------------------
# Local store internals


def test_memory_store_sweeps_full_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MemoryStore, "SWEEP_MIN", 16)
    clock = FakeClock()
    store = MemoryStore(clock)
    b = make_bucket(limit("m", "10/second", burst=0))
    for i in range(1000):
        store.take_now([b], [f"c{i}"], 1, True)
        clock.advance(0.01)                     # each bucket is full again 0.1 s later
    assert store.size(b.id) <= 64
    assert not store.take_now([b], ["c999"], 1, True)[0]   # a recent one is still tracked


def test_memory_store_is_bounded_and_evicts_the_buckets_closest_to_full() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, max_buckets=64)
    slow = make_bucket(limit("s", "1/hour", burst=2))        # capacity 3
    # a limited client: its bucket is empty, the farthest from full of all
    for _ in range(3):
        assert store.take_now([slow], ["victim"], 1, True)[0]
    assert not store.take_now([slow], ["victim"], 1, True)[0]
    for i in range(10_000):                                   # a flood of new keys
        assert store.take_now([slow], [f"k{i}"], 1, True)[0]
        clock.advance(0.01)
        assert store.total <= 64
    assert store.evictions >= 10_000 - 64
    assert not store.take_now([slow], ["victim"], 1, True)[0]   # still tracked, still empty
    # the evicted were the closest to full: the oldest flood keys; the newest are tracked
    assert store.take_now([slow], ["k0"], 1, False)[1] == [3.0]
    assert store.take_now([slow], ["k9999"], 1, False)[1][0] == pytest.approx(2.0, abs=1e-3)


def test_memory_store_bound_holds_across_policies_and_frees_full_buckets_first() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, max_buckets=32)
    fast = make_bucket(limit("f", "100/minute"))       # full again 0.6 s after a request
    slow = make_bucket(limit("s", "1/hour"))
    for i in range(4):
        assert store.take_now([slow], [f"b{i}"], 1, True)[0]
    for i in range(200):                     # the fast policy's flood evicts its own buckets
        store.take_now([fast], [f"a{i}"], 1, True)
        clock.advance(0.001)
        assert store.total <= 32
    assert store.evictions > 0
    for i in range(4):                       # ... never the limited clients of the slow one
        assert not store.take_now([slow], [f"b{i}"], 1, True)[0]
    before = store.evictions
    clock.advance(1.0)                       # every fast bucket is full again: free space
    for i in range(24):
        assert store.take_now([slow], [f"c{i}"], 1, True)[0]
    assert store.size(fast.id) == 0 and store.size(slow.id) == 28
    assert store.evictions == before


def test_memory_store_size_comes_from_the_shared_tables_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_RATELIMIT_SLOTS", "1000")
    assert MemoryStore().max_buckets == 1000
    monkeypatch.delenv("GATEWAY_RATELIMIT_SLOTS")
    assert MemoryStore().max_buckets == 131072


def test_shared_store_counts_evictions_but_not_reuse_of_full_slots(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SharedStore(str(tmp_path / "t"), clock=clock, slots=4, probe=4)
    slow = make_bucket(limit("s", "1/second", burst=0))
    for k in "abcd":
        store.take_now([slow], [k], 1, True)
    assert store.evictions == 0
    store.take_now([slow], ["e"], 1, True)
    assert store.evictions == 1
    store.take_now([slow], ["f"], 1, False)             # consumes nothing: evicts nothing
    assert store.evictions == 1
    clock.advance(2.0)
    store.take_now([slow], ["g"], 1, True)              # a full slot is free
    assert store.evictions == 1


async def test_duplicate_identifying_fields_are_refused_naming_the_field(
        make: Callable[..., Limiter]) -> None:
    lim = make([limit("u", "10/second", key="user_id"),
                limit("h", "10/second", key="header:X-Tenant"),
                limit("k", "10/second", key="api_key")], clock=FakeClock())
    events: list[tuple[str, str]] = []
    lim.add_listener(lambda p, d: events.append((p, d)))
    for field in ("X-User-Id", "X-Tenant", "X-Api-Key"):
        out = await lim.check(route("u", "h", "k"),
                              FakeRequest([(field, "v-one"), ("X-Other", "x"),
                                           (field.lower(), "v-two")]))
        assert (out.allowed, out.status, out.decision) == (False, 400, "refused")
        doc = orjson.loads(out.body)
        assert doc["status"] == 400 and f"more than one {field} field" in doc["detail"]
        assert "v-one" not in doc["detail"] and "v-two" not in doc["detail"]   # no values
    assert events == []                                              # nothing evaluated
    # a duplicate of a field no policy of the route keys on passes
    out = await lim.check(route("u"), FakeRequest([("X-User-Id", "a"), ("X-Tenant", "1"),
                                                   ("X-Tenant", "2"), ("X-Api-Key", "k"),
                                                   ("X-Api-Key", "l")]))
    assert out.allowed


async def test_trusts_unwraps_ipv4_mapped_peers_and_is_per_limiter(
        limiters: list[Limiter]) -> None:
    import ipaddress
    lim = Limiter(config([limit("a", "1/second")], trusted=(ipaddress.ip_network("10.0.0.0/8"),)))
    limiters.append(lim)
    assert lim.trusts("10.0.0.1") and lim.trusts("::ffff:10.0.0.1")
    assert not lim.trusts("11.0.0.1") and not lim.trusts("unknown") and not lim.trusts("")
    other = Limiter(config([limit("a", "1/second")]), previous=lim)   # a reload: no proxies
    limiters.append(other)
    assert not other.trusts("10.0.0.1") and lim.trusts("10.0.0.1")


def test_shared_store_reuses_full_slots_and_evicts_closest_to_full(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SharedStore(str(tmp_path / "t"), clock=clock, slots=4, probe=4)
    slow = make_bucket(limit("s", "1/second", burst=0))
    for k in "abcd":
        assert store.take_now([slow], [k], 1, True)[0]
        clock.advance(0.1)
    for k in "abcd":                         # all four slots are taken and tracked
        assert not store.take_now([slow], [k], 1, True)[0]
    assert store.take_now([slow], ["e"], 1, True)[0]   # evicts "a", the closest to full
    assert store.take_now([slow], ["a"], 1, True)[0]   # ... which restarts full
    assert not store.take_now([slow], ["d"], 1, True)[0]
    clock.advance(2.0)                       # everything is full again: slots are free
    for k in "vwxyz":
        assert store.take_now([slow], [k], 1, True)[0]
    assert not store.take_now([slow], ["z"], 1, True)[0]


def test_shared_store_is_shared_between_instances(tmp_path: Path) -> None:
    clock = FakeClock()
    one = SharedStore(str(tmp_path / "t"), clock=clock)
    two = SharedStore(str(tmp_path / "t"), clock=clock, slots=999)   # the file's size wins
    b = make_bucket(limit("x", "1/second", burst=1))
    assert one.take_now([b], ["k"], 1, True) == (True, [2.0])
    assert two.take_now([b], ["k"], 1, True) == (True, [1.0])
    assert one.take_now([b], ["k"], 1, True) == (False, [0.0])
    clock.advance(0.5)
    ok, tokens = two.take_now([b], ["k"], 1, True)
    assert not ok and tokens[0] == pytest.approx(0.5)
    two.refund([b], ["k"], 1)
    assert one.take_now([b], ["k"], 1, False)[1][0] == pytest.approx(1.5)


async def test_workers_env_selects_the_shared_store(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_WORKERS", "3")
    monkeypatch.setenv("GATEWAY_WORKER_INDEX", "1")
    monkeypatch.setenv("GATEWAY_SHARED_DIR", str(tmp_path))
    lim = Limiter(config([limit("a", "1/second")]))
    assert isinstance(lim._local, SharedStore)
    assert (tmp_path / "ratelimit.table").exists()
    await lim.close()
    monkeypatch.setenv("GATEWAY_WORKERS", "1")
    single = Limiter(config([limit("a", "1/second")]))
    assert isinstance(single._local, MemoryStore)
    await single.close()


async def test_over_http_with_a_real_peer() -> None:
    """Through the real downstream server: the peer address comes from the connection, and the
    outcome's status, headers and body reach the client as they are."""
    import aiohttp

    from gateway.downstream import DownstreamServer, Request

    clock = FakeClock()
    lim = Limiter(config([limit("ip", "1/minute", burst=1, key="ip_address")]), clock=clock)
    r = route("ip")

    async def handler(request: Request) -> None:
        o = await lim.check(r, request)
        if not o.allowed:
            request.respond(o.status, o.headers, o.body)
        else:
            request.respond(200, o.headers, b"ok")

    server = DownstreamServer(handler)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                statuses.append(resp.status)
                last = resp
                body = await resp.read()
    listener.close()
    await server.shutdown(1.0)
    assert statuses == [200, 200, 429]
    assert last.headers["Retry-After"] == "60"
    assert parse_items(last.headers["RateLimit-Policy"]) == {"ip": {"q": 1, "w": 60}}
    assert parse_items(last.headers["RateLimit"]) == {"ip": {"r": 0, "t": 120}}
    assert last.headers["Content-Type"] == "application/problem+json"
    assert orjson.loads(body)["violated-policies"] == ["ip"]
    assert (await lim.test("ip", "127.0.0.1"))["remaining"] == 0
    await lim.close()


async def test_throttling_reserves_future_tokens_exactly(make: Callable[..., Limiter]) -> None:
    """delay_max_ms: a bucket may go down to -rate * delay; each held request learns exactly how
    long until its own token, and one that would wait longer is a 429. `key: global` is one
    bucket for every client."""
    clock = FakeClock()
    lim = make([limit("p", "10/second", burst=0, key="global", delay_max_ms=250)], clock=clock)
    events: list[tuple[str, str]] = []
    lim.add_listener(lambda p, d: events.append((p, d)))
    r = route("p")
    outs = [await lim.check(r, FakeRequest({"X-User-Id": f"u{i}"})) for i in range(4)]
    assert [o.decision for o in outs] == ["allowed", "delayed", "delayed", "limited"]
    assert [round(o.delay_s, 6) for o in outs] == [0.0, 0.1, 0.2, 0.0]
    assert [o.allowed for o in outs] == [True, True, True, False]
    assert header(outs[3], "Retry-After") == "1"
    assert events == [("p", "allowed"), ("p", "delayed"), ("p", "delayed"), ("p", "limited")]
    clock.advance(0.3)                      # the reserved tokens have arrived: one left
    o = await lim.check(r, FakeRequest())
    assert o.allowed and o.decision == "allowed" and o.delay_s == 0.0
    o = await lim.check(r, FakeRequest())
    assert o.decision == "delayed" and abs(o.delay_s - 0.1) < 1e-6


async def test_a_throttled_local_reservation_is_given_back_when_redis_rejects(
        redis_server: Any) -> None:
    redis_server.flush()
    clock = FakeClock()
    lim = Limiter(config([limit("provider", "10/second", key="global", delay_max_ms=1000),
                          limit("per_user", "1/minute", store="redis")],
                         redis_url=redis_server.url), clock=clock, redis_fake_time=True)
    try:
        r = route("provider", "per_user")
        x, y = FakeRequest({"X-User-Id": "x"}), FakeRequest({"X-User-Id": "y"})
        assert (await lim.check(r, x)).decision == "allowed"
        o = await lim.check(r, x)                 # provider would hold it; per_user refuses
        assert o.status == 429
        o = await lim.check(r, y)                 # the refused one's reservation came back
        assert o.decision == "delayed" and abs(o.delay_s - 0.1) < 1e-6
    finally:
        await lim.close()
