"""Circuit breakers and endpoint health, one of each per upstream.

`CircuitBreaker` is the closed / open / half_open state machine:

* closed -> open after `failure_threshold` consecutive failures, or when the optional error-rate
  rule sees `failures / requests >= threshold` over the sliding `window_s` with at least
  `min_requests` requests in it. The window is 10 time buckets of `window_s / 10`, so recording is
  O(1) and the window slides in steps of a tenth of its length.
* open -> half_open lazily, on the first `acquire()` at or after `reset_timeout_s` (no timers).
* half_open lets `half_open_max_inflight` probes through at once; `half_open_successes`
  successes close it, any failure re-opens it with a fresh `reset_timeout_s`.

What a failure is: an outcome in `failure_on` ("connect_error", "timeout" or a 5xx status). Any
other HTTP status, 4xx included, is a success: the upstream answered. A "connect_error" or
"timeout" that is not in `failure_on` counts nothing either way. A call without a verdict (the
client went away) is `release()`d: it frees its probe slot and counts nothing.

Results of calls that were let through in an earlier state (a request acquired while closed that
completes after the circuit opened) are ignored while open, and count as probe verdicts while
half_open: the API carries no per-call token, and a late answer from the upstream is still
evidence about it. A probe whose caller never reports back (a bug, or a cancelled task) would hold
its slot forever; slots are therefore reclaimed when half_open has seen neither a verdict nor a new
probe for `reset_timeout_s`.

`EndpointSelector` is round robin over an upstream's endpoints that ejects an endpoint after
`failure_threshold` consecutive failures for `reset_timeout_s` (at most floor(n/2) at once).

`BreakerSet` holds both for every upstream of one config and carries them over a reload when the
upstream's breaker config and endpoints are unchanged.

Transitions are reported to listeners `fn(upstream, old, new, reason)` (metrics subscribe) and
logged once at WARNING on the `gateway.breaker` logger with `upstream`, `from`, `to`, `reason`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from gateway.clock import Clock
from gateway.config import BreakerConfig, UpstreamConfig

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}   # gateway_circuit_breaker_state

Outcome = str | int | None
Listener = Callable[[str, str, str, str], None]

log = logging.getLogger("gateway.breaker")

_BUCKETS = 10                 # sub-buckets per error-rate window
_NOT_EJECTED = float("-inf")  # EndpointSelector._until for an endpoint in rotation


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class _ErrorRate:
    """Requests and failures over a sliding window of `_BUCKETS` time buckets.

    The current bucket is two plain counters (`cur_req`, `cur_fail`), so recording a request is
    a comparison and an increment; the `_BUCKETS - 1` completed buckets of the window sit in a
    ring with running sums, updated once per bucket boundary.
    """

    __slots__ = ("_idx", "_inv_width", "_old_fail", "_old_req", "_pos", "_ring_fail",
                 "_ring_req", "cur_fail", "cur_req", "end", "min_requests", "threshold",
                 "window_s")

    def __init__(self, threshold: float, min_requests: int, window_s: float) -> None:
        self.threshold = threshold
        self.min_requests = min_requests
        self.window_s = window_s
        self._inv_width = _BUCKETS / window_s
        self._ring_req = [0] * (_BUCKETS - 1)
        self._ring_fail = [0] * (_BUCKETS - 1)
        self._pos = 0
        self._old_req = self._old_fail = 0      # sums over the ring
        self.cur_req = self.cur_fail = 0        # the current bucket
        self._idx = -(1 << 62)                  # the current bucket's number: far past, empty
        self.end = float("-inf")                # monotonic time the current bucket ends

    @property
    def requests(self) -> int:
        return self._old_req + self.cur_req

    @property
    def failures(self) -> int:
        return self._old_fail + self.cur_fail

    def advance(self, now: float) -> None:
        """Move the current bucket to the one holding `now` (called when `now >= end`)."""
        # float rounding may put `now` at the boundary yet in the old bucket: step at least once
        idx = max(int(now * self._inv_width), self._idx + 1)
        steps = idx - self._idx
        if steps >= _BUCKETS:
            self.clear()
        else:
            ring_req, ring_fail, n = self._ring_req, self._ring_fail, _BUCKETS - 1
            req, fail = self.cur_req, self.cur_fail
            for _ in range(steps):              # at most _BUCKETS - 1 steps
                pos = self._pos = (self._pos + 1) % n
                self._old_req += req - ring_req[pos]
                self._old_fail += fail - ring_fail[pos]
                ring_req[pos], ring_fail[pos] = req, fail
                req = fail = 0
            self.cur_req = self.cur_fail = 0
        self._idx = idx
        self.end = (idx + 1) / self._inv_width

    def tripped(self) -> bool:
        requests = self._old_req + self.cur_req
        return (requests >= self.min_requests
                and self._old_fail + self.cur_fail >= self.threshold * requests)

    def clear(self) -> None:
        for s in range(_BUCKETS - 1):
            self._ring_req[s] = self._ring_fail[s] = 0
        self._old_req = self._old_fail = self.cur_req = self.cur_fail = 0


class CircuitBreaker:
    """The breaker of one upstream. Not thread-safe: one per process, used from its event loop.

    Every `acquire()` that returns True must be followed by exactly one `on_result()` or
    `release()`.
    """

    __slots__ = (
        "_clock",
        "_failure_on",
        "_failures",
        "_listeners",
        "_opened_wall",
        "_probe_progress",
        "_probes",
        "_rate",
        "_reset_timeout",
        "_retry_at",
        "_state",
        "_successes",
        "_threshold",
        "cfg",
        "upstream",
    )

    def __init__(self, upstream: str, cfg: BreakerConfig, clock: Clock) -> None:
        self.upstream = upstream
        self.cfg = cfg
        self._clock = clock
        self._state = CLOSED
        # The loader rejects 4xx in failure_on; a config built in code must not count them either.
        self._failure_on = frozenset(o for o in cfg.failure_on
                                     if not (isinstance(o, int) and 400 <= o <= 499))
        self._threshold = cfg.failure_threshold
        self._reset_timeout = cfg.reset_timeout_s
        self._failures = 0            # consecutive failures (closed); kept while open for display
        self._successes = 0           # successes in this half_open period
        self._probes = 0              # probes in flight in this half_open period
        self._probe_progress = 0.0    # monotonic time of the last probe admitted or answered
        self._retry_at = 0.0          # monotonic time at which an open circuit half-opens
        self._opened_wall: float | None = None
        er = cfg.error_rate
        self._rate = (_ErrorRate(er.threshold, er.min_requests, er.window_s)
                      if er is not None else None)
        self._listeners: list[Listener] = []

    # -- the hot path -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The current state. Reading it never transitions (an open circuit past its reset
        timeout stays "open" until the next `acquire()`)."""
        return self._state

    def acquire(self) -> bool:
        """May this request go upstream? True takes a probe slot while half_open; False means
        answer 503 with `Retry-After: retry_after_s()`."""
        if self._state is CLOSED:
            return True
        return self._acquire_slow()

    def on_result(self, outcome: Outcome) -> None:
        """Report an acquired call: None (success without a status), an HTTP status, or the
        failure kind "connect_error" / "timeout"."""
        if outcome in self._failure_on:
            self._on_failure(outcome)
        elif outcome.__class__ is str:
            # a failure kind the config does not count: no verdict
            if self._state is HALF_OPEN:
                self.release()
        elif self._state is CLOSED:
            self._failures = 0
            rate = self._rate
            if rate is not None:
                now = self._clock.monotonic()
                if now >= rate.end:
                    rate.advance(now)
                rate.cur_req += 1
        else:
            self._on_success_slow()

    def release(self) -> None:
        """Report an acquired call that has no verdict (the client went away): frees its probe
        slot, counts nothing."""
        if self._state is HALF_OPEN and self._probes:
            self._probes -= 1
            self._probe_progress = self._clock.monotonic()

    # -- the rest -----------------------------------------------------------------------------

    def retry_after_s(self) -> int:
        """Whole seconds until an open circuit half-opens (ceiling), at least 1. While half_open
        with every probe slot taken, or closed, 1."""
        if self._state is not OPEN:
            return 1
        remaining = self._retry_at - self._clock.monotonic()
        # the epsilon keeps float noise (299.0000000001) from adding a second
        return max(1, math.ceil(remaining - 1e-9))

    def is_failure(self, outcome: Outcome) -> bool:
        """Whether `outcome` is a failure under this breaker's `failure_on` (for callers that
        feed the same verdict elsewhere, e.g. `EndpointSelector.on_result`)."""
        return outcome in self._failure_on

    @property
    def failure_count(self) -> int:
        return self._failures

    def reset(self, reason: str = "admin reset") -> None:
        """Close the circuit and clear every counter."""
        self._transition(CLOSED, reason)

    def snapshot(self) -> dict[str, Any]:
        """The breaker as `GET /admin/breakers` shows it. `opened_at` is when the circuit last
        opened (kept while half_open); `retry_at` is when an open circuit half-opens."""
        opened = self._opened_wall if self._state is not CLOSED else None
        retry_at = None
        if self._state is OPEN and self._opened_wall is not None:
            retry_at = self._opened_wall + self._reset_timeout
        return {
            "upstream": self.upstream,
            "state": self._state,
            "failure_count": self._failures,
            "opened_at": _iso(opened),
            "retry_at": _iso(retry_at),
        }

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(upstream, old_state, new_state, reason)` on every transition. A listener
        added twice is called once."""
        if fn not in self._listeners:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.upstream} {self._state} failures={self._failures}>"

    # -- transitions --------------------------------------------------------------------------

    def _acquire_slow(self) -> bool:
        now = self._clock.monotonic()
        if self._state is OPEN:
            if now < self._retry_at:
                return False
            self._transition(HALF_OPEN, "reset_timeout_s elapsed", now)
        if self._probes < self.cfg.half_open_max_inflight:
            self._probes += 1
            self._probe_progress = now
            return True
        if now - self._probe_progress >= self._reset_timeout:
            # Nobody reported back for a whole reset timeout: the slots leaked. Take them back
            # rather than stay half_open (answering 503) forever.
            log.warning("circuit breaker %s: reclaiming %d half-open probe slot(s) with no "
                        "verdict for %gs", self.upstream, self._probes, self._reset_timeout,
                        extra={"upstream": self.upstream})
            self._probes = 1
            self._probe_progress = now
            return True
        return False

    def _on_failure(self, outcome: str | int) -> None:
        state = self._state
        if state is CLOSED:
            self._failures += 1
            rate = self._rate
            if rate is not None:
                now = self._clock.monotonic()
                if now >= rate.end:
                    rate.advance(now)
                rate.cur_req += 1
                rate.cur_fail += 1
            if self._failures >= self._threshold:
                self._transition(OPEN, f"{self._failures} consecutive failures (last: {outcome})")
            elif rate is not None and rate.tripped():
                self._transition(
                    OPEN, f"error rate {rate.failures / rate.requests:.2f} >= {rate.threshold:g}"
                          f" over {rate.requests} requests in {rate.window_s:g}s")
        elif state is HALF_OPEN:
            self._failures += 1
            self._transition(OPEN, f"half-open probe failed: {outcome}")
        # open: a late answer to a call let through before the circuit opened; ignored

    def _on_success_slow(self) -> None:
        if self._state is not HALF_OPEN:
            return                  # open: a late answer, ignored
        if self._probes:
            self._probes -= 1
        self._probe_progress = self._clock.monotonic()
        self._successes += 1
        if self._successes >= self.cfg.half_open_successes:
            self._transition(CLOSED, f"{self._successes} half-open successes")

    def _transition(self, new: str, reason: str, now: float | None = None) -> None:
        old = self._state
        if now is None:
            now = self._clock.monotonic()
        self._state = new
        self._probes = 0
        self._successes = 0
        if new is OPEN:
            self._retry_at = now + self._reset_timeout
            self._opened_wall = self._clock.time()
        elif new is CLOSED:
            self._failures = 0
            self._opened_wall = None
            if self._rate is not None:
                self._rate.clear()
        else:
            self._probe_progress = now
        if old is new:
            return                  # reset() of a closed breaker: counters cleared, no event
        log.warning("circuit breaker %s: %s -> %s: %s", self.upstream, old, new, reason,
                    extra={"upstream": self.upstream, "from": old, "to": new, "reason": reason})
        for fn in tuple(self._listeners):
            try:
                fn(self.upstream, old, new, reason)
            except Exception:
                # An observer must not break the request that happened to cause the transition.
                log.exception("circuit breaker listener %r failed", fn)


class EndpointSelector:
    """Round robin over an upstream's endpoints, skipping ejected ones.

    An endpoint with `failure_threshold` consecutive failures is ejected for `reset_timeout_s`,
    unless floor(n/2) endpoints are ejected already (so a single endpoint is never ejected).
    It comes back on probation: its first failure after returning ejects it again at once,
    its first success clears the slate. A dead endpoint thus costs one request per
    `reset_timeout_s` instead of `failure_threshold`.
    """

    __slots__ = (
        "_clock",
        "_fails",
        "_max_ejected",
        "_n",
        "_n_ejected",
        "_next",
        "_reset_timeout",
        "_threshold",
        "_until",
        "name",
    )

    def __init__(self, n: int, cfg: BreakerConfig, clock: Clock, *, name: str = "") -> None:
        if n < 1:
            raise ValueError(f"an upstream needs at least one endpoint, got {n}")
        self.name = name
        self._n = n
        self._clock = clock
        self._threshold = cfg.failure_threshold
        self._reset_timeout = cfg.reset_timeout_s
        self._max_ejected = n // 2
        self._next = 0
        self._fails = [0] * n
        self._until = [_NOT_EJECTED] * n   # monotonic time an ejected endpoint returns
        self._n_ejected = 0

    def pick(self) -> int:
        """The index of the next endpoint in rotation."""
        i = self._next
        if not self._n_ejected:
            self._next = i + 1 if i + 1 < self._n else 0
            return i
        return self._pick_slow(i)

    def on_result(self, index: int, failed: bool) -> None:
        """Report a call to endpoint `index`; `failed` as the breaker judges it."""
        if not failed:
            self._fails[index] = 0
            return
        f = self._fails[index] = self._fails[index] + 1
        if f >= self._threshold and self._until[index] == _NOT_EJECTED:
            now = self._clock.monotonic()
            self._return_expired(now)
            if self._n_ejected < self._max_ejected:
                self._until[index] = now + self._reset_timeout
                self._n_ejected += 1
                log.warning("upstream %s: endpoint %d ejected for %gs after %d consecutive "
                            "failures", self.name, index, self._reset_timeout, f,
                            extra={"upstream": self.name, "endpoint": index})

    def ejected(self) -> list[int]:
        """Indices of the endpoints out of rotation now."""
        self._return_expired(self._clock.monotonic())
        return [i for i, u in enumerate(self._until) if u != _NOT_EJECTED]

    def _pick_slow(self, i: int) -> int:
        now = self._clock.monotonic()
        n, until = self._n, self._until
        # At most n//2 are ejected, so this finds one within n steps.
        for _ in range(n):
            nxt = i + 1 if i + 1 < n else 0
            if until[i] <= now:
                if until[i] != _NOT_EJECTED:
                    self._return(i)
                self._next = nxt
                return i
            i = nxt
        raise AssertionError("every endpoint is ejected")  # pragma: no cover

    def _return_expired(self, now: float) -> None:
        if self._n_ejected:
            for i, u in enumerate(self._until):
                if u != _NOT_EJECTED and u <= now:
                    self._return(i)

    def _return(self, i: int) -> None:
        self._until[i] = _NOT_EJECTED
        self._n_ejected -= 1
        self._fails[i] = self._threshold - 1   # probation: one more failure ejects it again
        log.warning("upstream %s: endpoint %d back in rotation", self.name, i,
                    extra={"upstream": self.name, "endpoint": i})


class BreakerSet:
    """All breakers and selectors of one config; carries unchanged state across reloads.

    An upstream keeps its breaker and selector objects (state, counters, listeners) when the
    previous set had it with an equal `BreakerConfig` and equal endpoints; otherwise it starts
    closed with every endpoint in rotation. Listeners of the previous set are inherited by the
    new one; breakers that are not carried over are detached from them, so a late result of a
    retired config cannot move the metrics of the live one.
    """

    def __init__(self, upstreams: Iterable[UpstreamConfig], clock: Clock,
                 previous: BreakerSet | None = None) -> None:
        self._listeners: list[Listener] = list(previous._listeners) if previous else []
        self._entries: dict[str, tuple[tuple[Any, ...], CircuitBreaker, EndpointSelector]] = {}
        old = previous._entries if previous is not None else {}
        for u in upstreams:
            key = (u.breaker, u.endpoints)
            prev = old.get(u.name)
            if prev is not None and prev[0] == key:
                breaker, selector = prev[1], prev[2]
            else:
                breaker = CircuitBreaker(u.name, u.breaker, clock)
                selector = EndpointSelector(len(u.endpoints), u.breaker, clock, name=u.name)
            for fn in self._listeners:
                breaker.add_listener(fn)
            self._entries[u.name] = (key, breaker, selector)
        if previous is not None:
            for name, (_, b, _sel) in old.items():
                entry = self._entries.get(name)
                if entry is None or entry[1] is not b:
                    for fn in previous._listeners:
                        b.remove_listener(fn)

    def breaker(self, upstream: str) -> CircuitBreaker:
        """The breaker of `upstream`; KeyError if the config has no such upstream."""
        return self._entries[upstream][1]

    def selector(self, upstream: str) -> EndpointSelector:
        """The endpoint selector of `upstream`; KeyError if the config has no such upstream."""
        return self._entries[upstream][2]

    def __contains__(self, upstream: object) -> bool:
        return upstream in self._entries

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return (b for _, b, _s in self._entries.values())

    def snapshot(self) -> list[dict[str, Any]]:
        """Every breaker's snapshot, in config order."""
        return [b.snapshot() for _, b, _s in self._entries.values()]

    def add_listener(self, fn: Listener) -> None:
        """Attach `fn` to every breaker, now and in the sets that succeed this one."""
        if fn not in self._listeners:
            self._listeners.append(fn)
        for _, b, _s in self._entries.values():
            b.add_listener(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)
        for _, b, _s in self._entries.values():
            b.remove_listener(fn)
