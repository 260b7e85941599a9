"""CircuitBreaker, EndpointSelector and BreakerSet on a FakeClock, plus one real-socket test of
the half-open probe cap under concurrency."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    STATE_VALUE,
    BreakerSet,
    CircuitBreaker,
    EndpointSelector,
)
from gateway.config import BreakerConfig, Endpoint, ErrorRateConfig, UpstreamConfig
from tests.fakes import FakeClock

RESET = 30.0


def config(**kw: Any) -> BreakerConfig:
    base: dict[str, Any] = {"failure_threshold": 3, "reset_timeout_s": RESET,
                            "half_open_successes": 2, "half_open_max_inflight": 1}
    base.update(kw)
    return BreakerConfig(**base)


def breaker(clock: FakeClock, **kw: Any) -> CircuitBreaker:
    return CircuitBreaker("payments", config(**kw), clock)


def call(b: CircuitBreaker, outcome: str | int | None) -> None:
    assert b.acquire(), f"breaker refused a call in state {b.state}"
    b.on_result(outcome)


def trip(b: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(b.cfg.failure_threshold):
        call(b, "connect_error")
    assert b.state == OPEN


def half_open(b: CircuitBreaker, clock: FakeClock) -> None:
    trip(b, clock)
    clock.advance(b.cfg.reset_timeout_s)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, str]] = []

    def __call__(self, upstream: str, old: str, new: str, reason: str) -> None:
        self.seen.append((upstream, old, new, reason))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------------------------------------
# closed -> open: consecutive failures


def test_starts_closed_and_lets_calls_through(clock: FakeClock) -> None:
    b = breaker(clock)
    assert b.state == CLOSED
    assert all(b.acquire() for _ in range(100))
    assert STATE_VALUE == {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


def test_opens_at_exactly_failure_threshold(clock: FakeClock) -> None:
    b = breaker(clock, failure_threshold=3)
    call(b, "connect_error")
    call(b, "connect_error")
    assert b.state == CLOSED
    assert b.failure_count == 2
    call(b, "connect_error")
    assert b.state == OPEN
    assert not b.acquire()


def test_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    b = breaker(clock, failure_threshold=3)
    for _ in range(5):
        call(b, 503)
        call(b, 503)
        call(b, 200)
        assert b.failure_count == 0
    call(b, "timeout")
    call(b, "timeout")
    call(b, None)              # a success without a status resets too
    assert b.state == CLOSED
    for _ in range(3):
        call(b, 504)
    assert b.state == OPEN


@pytest.mark.parametrize("outcome", ["connect_error", "timeout", 502, 503, 504])
def test_every_default_failure_kind_trips(clock: FakeClock, outcome: str | int) -> None:
    b = CircuitBreaker("payments", BreakerConfig(failure_threshold=2), clock)
    call(b, outcome)
    call(b, outcome)
    assert b.state == OPEN


@pytest.mark.parametrize("status", [400, 401, 404, 409, 429, 499])
def test_4xx_never_counts(clock: FakeClock, status: int) -> None:
    b = breaker(clock, failure_on=frozenset({"connect_error", "timeout", 500, 502, 503, 504}))
    for _ in range(50):
        call(b, status)
    assert b.state == CLOSED
    assert b.failure_count == 0
    # and it is an answer from the upstream: it breaks a streak of failures
    call(b, 502)
    call(b, 502)
    call(b, status)
    call(b, 502)
    call(b, 502)
    assert b.state == CLOSED
    assert not b.is_failure(status)
    # not even when a config built in code lists it
    listed = breaker(clock, failure_threshold=1, failure_on=frozenset({status, 502}))
    for _ in range(5):
        call(listed, status)
    assert listed.state == CLOSED


def test_statuses_not_in_failure_on_do_not_count(clock: FakeClock) -> None:
    b = breaker(clock, failure_on=frozenset({"connect_error", 500}))
    for status in (502, 503, 504, 501, 200, 302):
        for _ in range(5):
            call(b, status)
    assert b.state == CLOSED
    # the default list has no 500 either
    d = CircuitBreaker("x", BreakerConfig(failure_threshold=1), clock)
    call(d, 500)
    assert d.state == CLOSED
    # a listed status does count
    for _ in range(3):
        call(b, 500)
    assert b.state == OPEN


def test_failure_kind_not_in_failure_on_is_no_verdict(clock: FakeClock) -> None:
    b = breaker(clock, failure_on=frozenset({"connect_error", 503}))
    call(b, 503)
    call(b, 503)
    for _ in range(10):
        call(b, "timeout")     # not counted, and not a success that would end the streak
    assert b.state == CLOSED
    assert b.failure_count == 2
    call(b, 503)
    assert b.state == OPEN


def test_release_counts_nothing(clock: FakeClock) -> None:
    b = breaker(clock, failure_threshold=3)
    call(b, "connect_error")
    call(b, "connect_error")
    for _ in range(10):
        assert b.acquire()
        b.release()
    assert b.failure_count == 2      # not reset by a release...
    call(b, "connect_error")
    assert b.state == OPEN           # ...and the streak goes on


# ---------------------------------------------------------------------------------------------
# closed -> open: error rate


def rate_breaker(clock: FakeClock) -> CircuitBreaker:
    return breaker(clock, failure_threshold=1000,
                   error_rate=ErrorRateConfig(threshold=0.5, min_requests=10, window_s=10.0))


def test_error_rate_trips_only_with_min_requests(clock: FakeClock) -> None:
    b = rate_breaker(clock)
    events = Events()
    b.add_listener(events)
    for i in range(9):                     # f s f s f s f s f: 5/9 failed, but only 9 requests
        call(b, "timeout" if i % 2 == 0 else 200)
    assert b.state == CLOSED
    call(b, 200)                           # 5/10: a success never trips
    assert b.state == CLOSED
    call(b, 503)                           # 6/11 >= 0.5 with 11 >= 10 requests
    assert b.state == OPEN
    assert events.seen == [("payments", CLOSED, OPEN,
                            "error rate 0.55 >= 0.5 over 11 requests in 10s")]


def test_error_rate_below_threshold_stays_closed(clock: FakeClock) -> None:
    b = rate_breaker(clock)
    for i in range(200):                   # 1 in 3 failed
        call(b, 502 if i % 3 == 0 else 200)
        clock.advance(0.05)
    assert b.state == CLOSED


def test_error_rate_window_slides(clock: FakeClock) -> None:
    # Still inside the window: the old requests count.
    b = rate_breaker(clock)
    for _ in range(5):
        call(b, 200)
    for _ in range(4):
        call(b, 502)
    clock.advance(9.0)
    call(b, 502)                           # 5 of 10 within 10 s
    assert b.state == OPEN

    # A whole window later they have expired.
    clock2 = FakeClock()
    b2 = rate_breaker(clock2)
    for _ in range(5):
        call(b2, 200)
    for _ in range(4):
        call(b2, 502)
    clock2.advance(10.0)
    call(b2, 502)                          # 1 of 1, below min_requests
    assert b2.state == CLOSED
    for _ in range(8):
        call(b2, 200)
    call(b2, 502)                          # 2 of 10
    assert b2.state == CLOSED


def test_error_rate_buckets_match_a_naive_sliding_window() -> None:
    from gateway.breaker import _ErrorRate

    rng = random.Random(4)
    rate = _ErrorRate(threshold=0.5, min_requests=1, window_s=10.0)
    now = 1000.0
    log: list[tuple[int, bool]] = []       # (bucket number, failed) of every record
    for _ in range(2000):
        now += rng.choice([0.0, 0.01, 0.3, 0.7, 1.0, 2.5, 9.0, 30.0])
        failed = rng.random() < 0.3
        if now >= rate.end:
            rate.advance(now)
        rate.cur_req += 1
        rate.cur_fail += failed
        idx = int(now * 1.0)               # 1 s buckets
        log.append((idx, failed))
        live = [f for i, f in log if i > idx - 10]
        assert (rate.requests, rate.failures) == (len(live), sum(live))


def test_error_rate_window_is_cleared_when_the_circuit_closes(clock: FakeClock) -> None:
    b = rate_breaker(clock)
    for _ in range(10):
        call(b, 502)
    assert b.state == OPEN
    clock.advance(RESET)
    call(b, 200)
    call(b, 200)
    assert b.state == CLOSED
    call(b, 502)                           # 1 of 1: the pre-open failures are gone
    assert b.state == CLOSED


# ---------------------------------------------------------------------------------------------
# open -> half_open -> closed | open


def test_open_half_opens_after_exactly_reset_timeout(clock: FakeClock) -> None:
    b = breaker(clock)
    trip(b, clock)
    clock.advance(RESET - 0.5)
    assert not b.acquire()
    assert b.state == OPEN
    clock.advance(0.5)
    assert b.state == OPEN                 # reading the state never transitions
    assert b.acquire()
    assert b.state == HALF_OPEN


def test_half_open_caps_probes_in_flight(clock: FakeClock) -> None:
    b = breaker(clock, half_open_max_inflight=2, half_open_successes=5)
    half_open(b, clock)
    assert b.acquire()
    assert b.acquire()
    assert not b.acquire()
    assert b.retry_after_s() == 1
    b.on_result(200)                       # a verdict frees its slot
    assert b.acquire()
    assert not b.acquire()
    b.release()                            # so does a release
    assert b.acquire()
    assert not b.acquire()
    assert b.state == HALF_OPEN


def test_half_open_successes_close_it(clock: FakeClock) -> None:
    b = breaker(clock, half_open_successes=3)
    half_open(b, clock)
    call(b, 200)
    call(b, None)
    assert b.state == HALF_OPEN
    call(b, 404)                           # an answer: a success
    assert b.state == CLOSED
    assert b.failure_count == 0
    assert all(b.acquire() for _ in range(10))


def test_release_in_half_open_is_not_a_success(clock: FakeClock) -> None:
    b = breaker(clock, half_open_successes=1)
    half_open(b, clock)
    for _ in range(5):
        assert b.acquire()
        b.release()
    assert b.state == HALF_OPEN
    call(b, 200)
    assert b.state == CLOSED


@pytest.mark.parametrize("outcome", ["connect_error", "timeout", 503])
def test_any_half_open_failure_reopens_with_a_fresh_timer(clock: FakeClock,
                                                          outcome: str | int) -> None:
    b = breaker(clock, half_open_successes=3, half_open_max_inflight=3)
    half_open(b, clock)
    opened_first = b.snapshot()["opened_at"]
    call(b, 200)
    call(b, 200)
    clock.advance(7)
    call(b, outcome)
    assert b.state == OPEN
    assert b.retry_after_s() == 30
    assert b.snapshot()["opened_at"] != opened_first
    clock.advance(RESET - 1)
    assert not b.acquire()
    clock.advance(1)
    assert b.acquire()
    assert b.state == HALF_OPEN


def test_late_results_while_open_are_ignored(clock: FakeClock) -> None:
    b = breaker(clock, failure_threshold=3)
    for _ in range(6):
        assert b.acquire()                 # six calls in flight while closed
    for _ in range(3):
        b.on_result("timeout")
    assert b.state == OPEN
    b.on_result(200)                       # late answers of calls let through before it opened
    b.on_result("timeout")
    b.release()
    assert b.state == OPEN
    assert b.failure_count == 3
    assert b.retry_after_s() == 30


def test_leaked_probe_slots_are_reclaimed_after_reset_timeout(clock: FakeClock) -> None:
    b = breaker(clock)
    half_open(b, clock)
    assert b.acquire()                     # a probe that never reports back
    clock.advance(RESET - 1)
    assert not b.acquire()
    clock.advance(1)
    assert b.acquire()
    b.on_result(200)
    call(b, 200)
    assert b.state == CLOSED


# ---------------------------------------------------------------------------------------------
# Retry-After, snapshot, listeners, logs, reset


def test_retry_after_is_a_ceiling_and_at_least_one(clock: FakeClock) -> None:
    b = breaker(clock)
    assert b.retry_after_s() == 1          # closed
    trip(b, clock)
    assert b.retry_after_s() == 30
    clock.advance(0.25)
    assert b.retry_after_s() == 30         # 29.75 -> 30
    clock.advance(0.75)
    assert b.retry_after_s() == 29         # exactly 29
    clock.advance(28.5)
    assert b.retry_after_s() == 1          # 0.5 -> 1
    clock.advance(0.5)
    assert b.retry_after_s() == 1          # 0, not yet half-opened by an acquire
    clock.advance(100)
    assert b.retry_after_s() == 1

    short = breaker(clock, reset_timeout_s=0.2)
    trip(short, clock)
    assert short.retry_after_s() == 1


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_snapshot_fields(clock: FakeClock) -> None:
    b = breaker(clock)
    assert b.snapshot() == {"upstream": "payments", "state": "closed", "failure_count": 0,
                            "opened_at": None, "retry_at": None}
    call(b, 502)
    assert b.snapshot()["failure_count"] == 1
    clock.advance(5)
    t_open = clock.time() + 0.0
    call(b, 502)
    call(b, 502)
    assert b.snapshot() == {"upstream": "payments", "state": "open", "failure_count": 3,
                            "opened_at": iso(t_open), "retry_at": iso(t_open + RESET)}
    assert b.snapshot()["opened_at"] == "2023-11-14T22:13:25.000Z"
    clock.advance(RESET)
    assert b.acquire()
    snap = b.snapshot()
    assert snap["state"] == "half_open"
    assert snap["opened_at"] == iso(t_open)
    assert snap["retry_at"] is None
    b.on_result(200)
    call(b, 200)
    assert b.snapshot() == {"upstream": "payments", "state": "closed", "failure_count": 0,
                            "opened_at": None, "retry_at": None}


def test_listeners_see_every_transition_with_its_reason(clock: FakeClock) -> None:
    b = breaker(clock)
    events = Events()
    b.add_listener(events)
    b.add_listener(events)                 # the same listener twice is called once
    trip(b, clock)
    clock.advance(RESET)
    call(b, "timeout")
    clock.advance(RESET)
    call(b, 200)
    call(b, 200)
    call(b, 503)
    call(b, 503)
    call(b, 503)
    b.reset()
    b.reset()                              # already closed: no event
    assert [e[1:] for e in events.seen] == [
        (CLOSED, OPEN, "3 consecutive failures (last: connect_error)"),
        (OPEN, HALF_OPEN, "reset_timeout_s elapsed"),
        (HALF_OPEN, OPEN, "half-open probe failed: timeout"),
        (OPEN, HALF_OPEN, "reset_timeout_s elapsed"),
        (HALF_OPEN, CLOSED, "2 half-open successes"),
        (CLOSED, OPEN, "3 consecutive failures (last: 503)"),
        (OPEN, CLOSED, "admin reset"),
    ]
    assert {e[0] for e in events.seen} == {"payments"}


def test_a_failing_listener_does_not_break_the_caller(clock: FakeClock,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    b = breaker(clock)
    events = Events()

    def boom(*_: str) -> None:
        raise RuntimeError("observer bug")

    b.add_listener(boom)
    b.add_listener(events)
    with caplog.at_level(logging.WARNING, logger="gateway.breaker"):
        trip(b, clock)
    assert b.state == OPEN
    assert len(events.seen) == 1
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)


def test_transitions_are_logged_with_structured_fields(clock: FakeClock,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    b = breaker(clock)
    with caplog.at_level(logging.DEBUG, logger="gateway.breaker"):
        for _ in range(100):
            call(b, 200)                   # nothing logged on the hot path
        assert caplog.records == []
        trip(b, clock)
    [rec] = caplog.records
    assert rec.name == "gateway.breaker"
    assert rec.levelno == logging.WARNING
    fields = rec.__dict__
    assert (fields["upstream"], fields["from"], fields["to"], fields["reason"]) == (
        "payments", CLOSED, OPEN, "3 consecutive failures (last: connect_error)")


def test_reset_closes_and_clears_counters(clock: FakeClock) -> None:
    b = breaker(clock)
    trip(b, clock)
    b.reset("manual test")
    assert b.state == CLOSED
    assert b.snapshot()["failure_count"] == 0
    assert b.acquire()
    b.release()
    # counters cleared even when already closed
    call(b, 502)
    call(b, 502)
    b.reset()
    call(b, 502)
    call(b, 502)
    assert b.state == CLOSED
    # a reset from half_open
    b.reset()
    half_open(b, clock)
    assert b.acquire()
    b.reset()
    assert b.state == CLOSED
    b.on_result(200)                       # the probe's late answer changes nothing
    assert b.state == CLOSED


# ---------------------------------------------------------------------------------------------
# half_open under real concurrency


async def test_half_open_lets_exactly_max_inflight_probes_reach_the_upstream() -> None:
    clock = FakeClock()
    max_inflight = 3
    b = CircuitBreaker("payments", config(half_open_max_inflight=max_inflight,
                                          half_open_successes=max_inflight), clock)
    half_open(b, clock)

    hits = 0
    decided = 0
    all_decided = asyncio.Event()
    n = 50

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        await reader.readuntil(b"\r\n\r\n")
        hits += 1
        await all_decided.wait()          # hold every probe until all 50 callers have decided
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def fake_upstream() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return int(data.split(b" ", 2)[1])

    async def client() -> bool:
        nonlocal decided
        ok = b.acquire()
        decided += 1
        if decided == n:
            all_decided.set()
        if ok:
            status = await fake_upstream()
            b.on_result(status)
        return ok

    async with server:
        results = await asyncio.wait_for(asyncio.gather(*(client() for _ in range(n))), 10)

    assert sum(results) == max_inflight
    assert hits == max_inflight
    assert b.state == CLOSED               # the three probes succeeded


# ---------------------------------------------------------------------------------------------
# EndpointSelector


def picks(sel: EndpointSelector, k: int) -> list[int]:
    return [sel.pick() for _ in range(k)]


def test_selector_round_robin(clock: FakeClock) -> None:
    sel = EndpointSelector(3, config(), clock)
    assert picks(sel, 7) == [0, 1, 2, 0, 1, 2, 0]
    one = EndpointSelector(1, config(), clock)
    assert picks(one, 3) == [0, 0, 0]


def test_selector_ejects_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    sel = EndpointSelector(4, config(failure_threshold=3), clock)
    sel.on_result(1, True)
    sel.on_result(1, True)
    sel.on_result(1, False)                # a success clears the endpoint's count
    sel.on_result(1, True)
    sel.on_result(1, True)
    assert sel.ejected() == []
    assert picks(sel, 4) == [0, 1, 2, 3]
    sel.on_result(1, True)
    assert sel.ejected() == [1]
    assert picks(sel, 6) == [0, 2, 3, 0, 2, 3]


def test_selector_ejects_at_most_half(clock: FakeClock) -> None:
    sel = EndpointSelector(5, config(failure_threshold=1), clock)
    for i in range(5):
        sel.on_result(i, True)
    assert sel.ejected() == [0, 1]          # floor(5/2)
    assert picks(sel, 6) == [2, 3, 4, 2, 3, 4]

    single = EndpointSelector(1, config(failure_threshold=1), clock)
    for _ in range(10):
        single.on_result(0, True)
    assert single.ejected() == []
    assert single.pick() == 0

    pair = EndpointSelector(2, config(failure_threshold=1), clock)
    pair.on_result(1, True)
    pair.on_result(0, True)
    assert pair.ejected() == [1]


def test_selector_returns_endpoint_after_reset_timeout(clock: FakeClock) -> None:
    sel = EndpointSelector(3, config(failure_threshold=2), clock)
    sel.on_result(2, True)
    sel.on_result(2, True)
    assert picks(sel, 4) == [0, 1, 0, 1]
    clock.advance(RESET - 1)
    assert sel.ejected() == [2]
    clock.advance(1)
    assert picks(sel, 3) == [2, 0, 1]
    assert sel.ejected() == []
    # on probation: the first failure after its return ejects it again
    sel.on_result(2, True)
    assert sel.ejected() == [2]
    clock.advance(RESET)
    assert sel.ejected() == []
    # a success ends the probation: it takes failure_threshold failures again
    sel.on_result(2, False)
    sel.on_result(2, True)
    assert sel.ejected() == []
    sel.on_result(2, True)
    assert sel.ejected() == [2]


def test_selector_expired_ejection_frees_the_cap(clock: FakeClock) -> None:
    sel = EndpointSelector(2, config(failure_threshold=1), clock)
    sel.on_result(0, True)
    assert sel.ejected() == [0]
    clock.advance(RESET)
    sel.on_result(1, True)                 # endpoint 0 has served its time: 1 may go
    assert sel.ejected() == [1]
    assert picks(sel, 3) == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# BreakerSet across reloads


def upstream(name: str, ports: tuple[int, ...] = (9001, 9002), **breaker_kw: Any) -> UpstreamConfig:
    eps = tuple(Endpoint(url=f"http://127.0.0.1:{p}", scheme="http", host="127.0.0.1", port=p)
                for p in ports)
    return UpstreamConfig(name=name, endpoints=eps, breaker=config(**breaker_kw))


def test_breaker_set_builds_one_breaker_and_selector_per_upstream(clock: FakeClock) -> None:
    s = BreakerSet([upstream("a"), upstream("b", ports=(1, 2, 3))], clock)
    assert s.breaker("a").upstream == "a"
    assert s.breaker("a") is s.breaker("a")
    assert s.breaker("a") is not s.breaker("b")
    assert picks(s.selector("b"), 4) == [0, 1, 2, 0]
    assert [snap["upstream"] for snap in s.snapshot()] == ["a", "b"]
    assert "a" in s and "zzz" not in s
    with pytest.raises(KeyError):
        s.breaker("zzz")


def test_breaker_set_keeps_state_of_unchanged_upstreams(clock: FakeClock) -> None:
    old = BreakerSet([upstream("a"), upstream("b"), upstream("c"), upstream("gone")], clock)
    for name in ("a", "b", "c"):
        trip(old.breaker(name), clock)
    for _ in range(3):
        old.selector("a").on_result(1, True)
    assert old.selector("a").ejected() == [1]

    # a "reload": equal but freshly parsed configs; b's breaker config and c's endpoints changed
    new = BreakerSet([upstream("a"), upstream("b", failure_threshold=4),
                      upstream("c", ports=(9001, 9003)), upstream("new")], clock, previous=old)
    assert new.breaker("a") is old.breaker("a")
    assert new.breaker("a").state == OPEN
    assert new.selector("a") is old.selector("a")
    assert new.selector("a").ejected() == [1]
    assert new.breaker("b").state == CLOSED
    assert new.breaker("b").cfg.failure_threshold == 4
    assert new.breaker("c").state == CLOSED
    assert new.selector("c").ejected() == []
    assert new.breaker("new").state == CLOSED
    assert "gone" not in new
    assert [s["state"] for s in new.snapshot()] == [OPEN, CLOSED, CLOSED, CLOSED]


def test_breaker_set_listeners_across_reloads(clock: FakeClock) -> None:
    events = Events()
    old = BreakerSet([upstream("a"), upstream("b")], clock)
    old.add_listener(events)
    new = BreakerSet([upstream("a"), upstream("b", failure_threshold=4), upstream("c")], clock,
                     previous=old)
    new.add_listener(events)               # re-adding the same listener does not double it
    trip(new.breaker("a"), clock)          # carried over
    trip(new.breaker("b"), clock)          # replaced
    trip(new.breaker("c"), clock)          # added: inherits the set's listeners
    trip(old.breaker("b"), clock)          # retired: detached, must not move the live metrics
    assert [(e[0], e[2]) for e in events.seen] == [("a", OPEN), ("b", OPEN), ("c", OPEN)]

    later = Events()
    new.add_listener(later)
    new.breaker("a").reset()
    assert [e[:3] for e in later.seen] == [("a", OPEN, CLOSED)]
    assert len(events.seen) == 4
