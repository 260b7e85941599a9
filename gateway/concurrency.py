"""Adaptive concurrency: a gradient limit on an upstream's requests in flight.

The idea of Netflix's concurrency-limits (Gradient2) and Envoy's adaptive concurrency filter: an
upstream that is not overloaded answers about as fast as it ever does; once requests start to
queue inside it, latency grows while throughput does not. So the limit compares the latency of
recent requests with the minimum latency seen, and

* at the end of each sample window (`window_s`, and at least `min_samples` completions) computes
  `gradient = clamp(tolerance * max(min_rtt, rtt_floor_s) / sample_rtt, 0.5, 1)` where
  `sample_rtt` is the window's mean latency;
* latency holds (gradient 1) and the limit was actually used (in flight reached half of it):
  `limit += sqrt(limit)` (the queue allowance), smoothed: the limit moves `smoothing` of the way;
* latency grew (gradient < 1): `limit *= gradient` at once, no smoothing (overload is urgent).

Two refinements keep the probing from hurting. A window only counts requests admitted under the
current limit (each admission carries the limit's generation): the slow requests let in by the
old limit would otherwise cut it again and again for one episode. And like TCP's slow-start
threshold, the limit at which latency last broke down is a `ceiling`: growth stops at 90 % of it,
until it expires after `probe_interval_s`; then the limit probes above it once more. One overload
episode thus costs the requests in flight at that moment, once per probe interval, not once per
window.

`rtt_floor_s` (10 ms): the minimum is never taken below it, so an average under twice the floor is
never read as overload. On a busy host the scheduling of the gateway's own event loop moves a
loopback upstream's latency from 0.3 ms to several ms; measured on a shared 2-core machine, a
5 ms floor and 0.1 s windows still cut the limit of an idle-fast upstream now and then.

`min_rtt` is a windowed minimum: the lower of the current and the previous `min_rtt_window_s`
periods, so an upstream that got slower for good (a new deploy) is re-measured within two periods.

The limit is an int between `min` and `max`; it starts at `max` (the gateway starts open, like a
closed breaker) and falls within a few round trips once latency shows overload.

Pure state, no I/O: the proxy calls `acquire()` before forwarding and `release()` after.
"""

from __future__ import annotations

import math

from gateway.clock import Clock

REFUSED = -1
"""What `acquire()` answers when the limit is reached."""

_MIN_GRADIENT = 0.5
_CEILING_SHARE = 0.9


class GradientLimit:
    """The adaptive concurrency limit of one upstream."""

    __slots__ = (
        "_ceiling",
        "_ceiling_until",
        "_clock",
        "_count",
        "_gen",
        "_max",
        "_min",
        "_min_rtt",
        "_min_rtt_window_s",
        "_min_samples",
        "_next_min_rtt",
        "_next_min_until",
        "_peak",
        "_probe_interval_s",
        "_rtt_floor_s",
        "_smoothing",
        "_sum",
        "_tolerance",
        "_window_end",
        "_window_s",
        "inflight",
        "limit",
        "value",
    )

    def __init__(self, min_limit: int, max_limit: int, clock: Clock, *,
                 window_s: float = 0.25, min_samples: int = 10, tolerance: float = 2.0,
                 smoothing: float = 0.5, rtt_floor_s: float = 0.01,
                 probe_interval_s: float = 10.0, min_rtt_window_s: float = 30.0) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min <= max, got min {min_limit}, max {max_limit}")
        self._min = min_limit
        self._max = max_limit
        self._clock = clock
        self._window_s = window_s
        self._min_samples = min_samples
        self._tolerance = tolerance
        self._smoothing = smoothing
        self._rtt_floor_s = rtt_floor_s
        self._probe_interval_s = probe_interval_s
        self._min_rtt_window_s = min_rtt_window_s
        self.value = float(max_limit)      # the exact limit; `limit` is its integer part
        self.limit = max_limit
        self.inflight = 0
        self._gen = 0
        self._sum = 0.0
        self._count = 0
        self._peak = 0
        now = clock.monotonic()
        self._window_end = now + window_s
        self._min_rtt = math.inf
        self._next_min_rtt = math.inf
        self._next_min_until = now + min_rtt_window_s
        self._ceiling = math.inf
        self._ceiling_until = 0.0

    @property
    def saturated(self) -> bool:
        """Every slot is taken."""
        return self.inflight >= self.limit

    @property
    def min_rtt_s(self) -> float:
        return self._min_rtt

    def admits(self, share: float = 1.0) -> bool:
        """Whether a request that may fill `share` of the limit would be let through now."""
        n = self.inflight
        return n < self.limit and (share >= 1.0 or n < self.limit * share)

    def acquire(self, share: float = 1.0) -> int:
        """A ticket (>= 0) to forward one request, or REFUSED when the `share` of the limit
        this request may fill is taken."""
        n = self.inflight
        if n >= self.limit or (share < 1.0 and n >= self.limit * share):
            return REFUSED
        self.inflight = n = n + 1
        self._peak = max(self._peak, n)
        return self._gen

    def release(self, ticket: int, rtt_s: float | None) -> None:
        """Give the slot back; `rtt_s` the upstream latency, or None when the exchange says
        nothing about it (the client went away, the connection failed)."""
        self.inflight -= 1
        if rtt_s is None or ticket != self._gen:
            return
        if rtt_s < self._next_min_rtt:
            self._next_min_rtt = rtt_s
            self._min_rtt = min(self._min_rtt, rtt_s)
        self._sum += rtt_s
        n = self._count = self._count + 1
        if n >= self._min_samples and not n % self._min_samples:   # the clock: now and then
            now = self._clock.monotonic()
            if now >= self._window_end:
                self._update(now)

    def _update(self, now: float) -> None:
        sample = self._sum / self._count
        peak = self._peak
        self._sum = 0.0
        self._count = 0
        self._peak = self.inflight
        self._window_end = now + self._window_s
        if now >= self._next_min_until:     # roll the windowed minimum
            self._min_rtt = self._next_min_rtt
            self._next_min_rtt = math.inf
            self._next_min_until = now + self._min_rtt_window_s
        if now >= self._ceiling_until:
            self._ceiling = math.inf
        old = self.value
        base = max(self._min_rtt, self._rtt_floor_s)
        gradient = min(1.0, max(_MIN_GRADIENT, self._tolerance * base / sample))
        if gradient < 1.0:
            self._ceiling = old
            self._ceiling_until = now + self._probe_interval_s
            new = old * gradient
        elif peak * 2 >= old:
            target = min(old + math.sqrt(old), self._ceiling * _CEILING_SHARE)
            new = old + self._smoothing * (target - old) if target > old else old
        else:
            return                          # too little traffic to say the limit is right
        new = min(float(self._max), max(float(self._min), new))
        self.value = new
        limit = int(new)
        if limit != self.limit:
            self.limit = limit
            self._gen += 1
