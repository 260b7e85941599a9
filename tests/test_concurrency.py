"""The gradient concurrency limit's maths, on a FakeClock."""

from __future__ import annotations

import pytest

from gateway.concurrency import REFUSED, GradientLimit
from tests.fakes import FakeClock


def window(lim: GradientLimit, clock: FakeClock, rtt_s: float, n: int = 20,
           concurrent: int | None = None) -> None:
    """One sample window: `concurrent` requests in flight at once (default: the limit), `n`
    completions at `rtt_s`, then the window's end."""
    c = min(concurrent if concurrent is not None else lim.limit, lim.limit, n)
    done = 0
    while done < n:
        tickets = [lim.acquire() for _ in range(c)]
        assert REFUSED not in tickets
        for i, t in enumerate(tickets):
            if done == n - 1:
                clock.advance(0.25)         # the last completion closes the window
            lim.release(t, rtt_s)
            done += 1
            if done >= n:
                for t2 in tickets[i + 1:]:
                    lim.release(t2, None)
                break


def test_starts_at_max_and_refuses_over_the_limit() -> None:
    lim = GradientLimit(2, 3, FakeClock())
    tickets = [lim.acquire() for _ in range(3)]
    assert REFUSED not in tickets and lim.saturated
    assert lim.acquire() == REFUSED
    lim.release(tickets[0], None)
    assert lim.acquire() != REFUSED


def test_share_keeps_headroom_for_higher_priorities() -> None:
    lim = GradientLimit(1, 10, FakeClock())
    held = [lim.acquire(0.5) for _ in range(5)]
    assert REFUSED not in held
    assert lim.acquire(0.5) == REFUSED          # low may fill half
    assert not lim.admits(0.5) and lim.admits(0.9)
    assert lim.acquire(1.0) != REFUSED           # the rest is there for the others


def test_latency_growth_cuts_the_limit_and_holding_latency_raises_it() -> None:
    clock = FakeClock()
    lim = GradientLimit(4, 100, clock)
    window(lim, clock, 0.010)                   # min rtt 10 ms
    assert lim.limit == 100                     # at max already
    window(lim, clock, 0.100)                   # 10x slower: gradient clamps at 0.5
    assert lim.limit == 50
    window(lim, clock, 0.100)
    assert lim.limit == 25
    for _ in range(10):
        window(lim, clock, 0.100)
    assert lim.limit == 4                       # never below min
    # Latency back to normal: the limit grows by sqrt(limit), smoothed, up to 90 % of where
    # latency last broke down (the ceiling, here 4 -> no room) until the probe interval ends.
    window(lim, clock, 0.010)
    assert lim.limit == 4
    clock.advance(10.0)
    grown = []
    for _ in range(8):
        window(lim, clock, 0.010)
        grown.append(lim.limit)
    assert grown == sorted(grown) and grown[-1] > 10


def test_latency_within_tolerance_is_not_overload() -> None:
    clock = FakeClock()
    lim = GradientLimit(4, 100, clock)
    window(lim, clock, 0.010)
    window(lim, clock, 0.019)                   # under 2x the minimum
    assert lim.limit == 100


def test_sub_floor_latencies_are_never_overload() -> None:
    clock = FakeClock()
    lim = GradientLimit(4, 100, clock)
    window(lim, clock, 0.0002)
    window(lim, clock, 0.009)                   # 45x the minimum but under 2 x 10 ms
    assert lim.limit == 100


def test_samples_from_before_a_change_do_not_cut_again() -> None:
    clock = FakeClock()
    lim = GradientLimit(4, 100, clock)
    window(lim, clock, 0.010)
    old = [lim.acquire() for _ in range(30)]    # admitted under limit 100
    window(lim, clock, 0.200, concurrent=20)     # cut to 50
    assert lim.limit == 50
    for t in old:                               # the slow stragglers of the old limit
        lim.release(t, 0.500)
    clock.advance(0.2)
    lim.release(lim.acquire(), 0.500)
    assert lim.limit == 50


def test_growth_needs_the_limit_to_be_used() -> None:
    clock = FakeClock()
    lim = GradientLimit(4, 100, clock)
    window(lim, clock, 0.010)
    window(lim, clock, 0.100)
    assert lim.limit == 50
    clock.advance(10.0)
    window(lim, clock, 0.010, concurrent=5)      # 5 in flight of 50: no evidence for more
    assert lim.limit == 50
    window(lim, clock, 0.010, n=30, concurrent=30)
    assert lim.limit > 50


def test_min_rtt_is_re_measured() -> None:
    clock = FakeClock()
    lim = GradientLimit(4, 100, clock, min_rtt_window_s=30.0)
    window(lim, clock, 0.010)
    assert lim.min_rtt_s == pytest.approx(0.010)
    # The upstream got slower for good: within two periods the minimum follows it and the
    # new latency is no longer read as overload.
    for _ in range(700):
        window(lim, clock, 0.040, n=10, concurrent=10)
    assert lim.min_rtt_s == pytest.approx(0.040)


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        GradientLimit(5, 4, FakeClock())
