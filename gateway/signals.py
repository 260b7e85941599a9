"""Golden signals of the data plane, recorded once per request.

Every request ends in one `Signals.record()` call: a counter, bytes, and an HDR histogram bucket
per (route, upstream, service, method, code) series, plus the upstream's own latency histogram.
Two readers share that one recording:

* the shipper calls `swap()` every interval and gets the interval's `Aggregates` (frozen), while
  recording carries on into fresh dicts. The event loop is single-threaded and `record()` never
  awaits, so replacing the dict references *is* the atomic hand-over: no locks on the hot path.
* `/metrics` calls `totals()` at scrape time: cumulative-since-start totals (every swapped interval
  folded in) plus the live interval, so Prometheus counters never go backwards across swaps.

Requests the gateway answered itself (a limit's 429, an open breaker's 503, a budget's 429, no
route, a client gone before forwarding, a request refused before it was whole) are recorded by
`record_local()` into series of their own, flagged with the reason. They count in every Prometheus
series exactly like the others, but ship with `local: <reason>` so that the control plane keeps
health, error rates and latency SLOs over the admitted requests (forwarded, or tried to be) and
bills none of them. `record()` itself, the path of every admitted request, is unchanged.

Saturation (in-flight requests, event-loop lag, CPU, RSS, upstream pool use) is sampled, not
recorded per request: `LoopLagMonitor` ticks every 0.5 s and samples the pools too.

All methods must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from gateway.clock import SYSTEM_CLOCK, Clock

WIRE_SCHEMA = 1
NO_UPSTREAM = "-"
"""Route/upstream/service label of gateway-generated responses that matched no route."""

HDR_LOWEST_US = 1
HDR_HIGHEST_US = 60_000_000
HDR_SIGNIFICANT_FIGURES = 2
"""The wire histogram: HdrHistogram(1, 60_000_000, 2) in microseconds. Two significant figures
(<= 1/128 relative error) keep a series' counts array at 2,560 slots; three would make it 17,408
for no gain in recording cost and a 7x larger swap, scrape and memory bill."""

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
OTHER_METHOD = "OTHER"
_METHOD_LABEL = {m: m for m in METHODS}

LOCAL_REASONS = ("limit", "budget", "breaker", "no_route", "client_gone", "bad_request",
                 "shed", "concurrency")
"""Why the gateway answered a request itself (the `local` of a shipped series)."""

LIMIT_DECISIONS = ("allowed", "limited", "shadow_limited", "store_error", "delayed")
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
RELOAD_RESULTS = ("success", "failure")
SHIPPER_RESULTS = ("success", "failure", "spooled", "dropped")

# The layout of HdrHistogram(1, 60_000_000, 2), inlined as literals in record() because a global
# or attribute load per use costs more than the whole index computation. Checked against hdrh
# at import time below, so a different hdrh layout fails loudly instead of mis-bucketing.
_PROTO = HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_SIGNIFICANT_FIGURES)
COUNTS_LEN: int = _PROTO.counts_len
MAX_TRACKABLE_US: int = _PROTO.get_highest_equivalent_value(
    _PROTO.get_value_from_index(COUNTS_LEN - 1))


def counts_index(us: int) -> int:
    """Index of the HDR counts slot holding `us` microseconds (0 <= us <= MAX_TRACKABLE_US)."""
    b = (us | 255).bit_length() - 8
    return ((b + 1) << 7) + (us >> b) - 128


if (_PROTO.sub_bucket_mask, _PROTO.sub_bucket_half_count_magnitude, _PROTO.unit_magnitude,
        COUNTS_LEN, MAX_TRACKABLE_US) != (255, 7, 0, 2560, 67_108_863) or any(
        counts_index(v) != _PROTO._counts_index_for(v)
        for v in (0, 1, 127, 128, 255, 256, 257, 1000, 65_535, 1_000_000, MAX_TRACKABLE_US)):
    raise RuntimeError("hdrh's counts layout changed; update gateway.signals.record()")


def _clamp_us(us: int) -> int:
    return 0 if us < 0 else MAX_TRACKABLE_US


def _new_counts() -> list[int]:
    return [0] * COUNTS_LEN


def hdr_from_counts(counts: Sequence[int]) -> HdrHistogram:
    """An hdrh HdrHistogram(1, 60_000_000, 2) holding these counts (microseconds)."""
    h = HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_SIGNIFICANT_FIGURES)
    nonzero = _nonzero(counts)
    if nonzero:
        hc = h.counts    # a fresh, zeroed ctypes array: set only the few used slots
        total = 0
        for i in nonzero:
            c = counts[i]
            hc[i] = c
            total += c
        h.set_internal_tacking_values(nonzero[0], nonzero[-1], total)
    return h


def _nonzero(counts: Sequence[int]) -> list[int]:
    """Indexes of the non-zero slots, skipping empty 64-slot runs at C speed."""
    out: list[int] = []
    for start in range(0, len(counts), 64):
        chunk = counts[start:start + 64]
        if chunk.count(0) != len(chunk):
            out.extend(start + i for i, c in enumerate(chunk) if c)
    return out


def encode_counts(counts: Sequence[int]) -> str:
    """The wire form: hdrh's V2 compressed payload, base64, as ASCII text."""
    return str(hdr_from_counts(counts).encode().decode("ascii"))


LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4,
    0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Default cumulative latency buckets (seconds), exposed as the Prometheus histograms' `le`
(`metrics.latency_buckets` replaces them): sub-millisecond loopback hops up to the 60 s ceiling.
0.5 and 2.0 are the p95 warning/critical thresholds of the alert rules, so histogram_quantile() is exact at
the alert boundaries; between 0.1 and 1 s, where web p99s live, bounds at most 1.5x apart keep
its linear interpolation within ~25 % of the truth (a 0.25-0.5 s bucket put a true 288 ms p99 at
433 ms). For exact values there are the quantile gauges of the last interval (QUANTILES)."""

QUANTILES: tuple[float, ...] = (0.5, 0.95, 0.99)
"""The quantiles of gateway_request_duration_quantile_seconds, exact HDR percentiles of each
(route, upstream)'s requests in the last completed interval (between the last two swaps)."""


def bucket_ends(bounds_us: Sequence[int]) -> tuple[int, ...]:
    """For each bound, one past the last HDR slot holding values <= it."""
    return tuple(counts_index(min(max(b, 0), MAX_TRACKABLE_US)) + 1 for b in bounds_us)


def count_le(counts: Sequence[int], bounds_us: Sequence[int]) -> list[int]:
    """Cumulative count of recorded values <= each bound (microseconds, ascending).

    Exact for values outside the HDR slot containing a bound; a value up to one slot width
    (< 1/128 of the bound) above it counts as <= the bound, i.e. within the histogram's precision.
    """
    return _count_le(counts, bucket_ends(bounds_us))


def _count_le(counts: Sequence[int], ends: Sequence[int]) -> list[int]:
    out: list[int] = []
    total = 0
    start = 0
    for end in ends:
        if end > start:
            chunk = counts[start:end]
            # most buckets are empty: count(0) compares pointers, far cheaper than sum()
            if chunk.count(0) != end - start:
                total += sum(chunk)
            start = end
        out.append(total)
    return out


class _Dist:
    """A latency distribution of the live interval: HDR counts in microseconds, count and
    exact sum of seconds."""

    __slots__ = ("count", "counts", "sum_s")

    def __init__(self) -> None:
        self.counts = _new_counts()
        self.count = 0
        self.sum_s = 0.0


class _Cum:
    """A cumulative latency histogram, kept as counts <= each bucket bound: folding an interval
    in costs a few slice sums instead of a pass over 2,560 HDR slots."""

    __slots__ = ("count", "le", "sum_s")

    def __init__(self, n: int) -> None:
        self.le = [0] * n
        self.count = 0
        self.sum_s = 0.0

    def add(self, le: list[int], count: int, sum_s: float) -> None:
        self.le = [a + b for a, b in zip(self.le, le, strict=True)]
        self.count += count
        self.sum_s += sum_s


class _Series:
    """One (route, upstream, service, method, code) of the live interval (or, for answers of the
    gateway itself, one (route, upstream, service, method, code, reason), whose `up` is
    _NO_DIST: nothing is ever timed upstream for them)."""

    __slots__ = ("bytes_in", "bytes_out", "count", "counts", "sum_s", "up")

    def __init__(self, up: _Dist) -> None:
        self.counts = _new_counts()
        self.count = 0
        self.sum_s = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.up = up


_NO_DIST = _Dist()
"""The `up` of the series of the gateway's own answers: never recorded into."""


# ---------------------------------------------------------------------------------------------
# The interval's aggregates, handed to the shipper by swap()


@dataclass(frozen=True, slots=True)
class SeriesAggregate:
    route: str
    upstream: str
    service: str
    method: str
    code: int
    count: int
    bytes_in: int
    bytes_out: int
    sum_s: float
    counts: Sequence[int]   # HDR counts (microseconds); see hdr_from_counts()
    local: str = ""         # why the gateway answered itself (LOCAL_REASONS); "" when admitted

    def histogram(self) -> HdrHistogram:
        return hdr_from_counts(self.counts)


@dataclass(frozen=True, slots=True)
class UpstreamAggregate:
    upstream: str
    count: int                      # requests that reached the upstream and got an answer timed
    sum_s: float
    counts: Sequence[int] | None    # None when nothing was timed upstream this interval
    breaker_state: str
    pool_in_use_max: int
    pool_max: int
    retries: tuple[tuple[str, int], ...] = ()   # (result, count) in the interval, counts > 0
    concurrency_limit: int | None = None        # the adaptive limit at the swap; None: none
    concurrency_saturated: bool = False         # the limit refused requests in the interval

    def histogram(self) -> HdrHistogram | None:
        return None if self.counts is None else hdr_from_counts(self.counts)


@dataclass(frozen=True, slots=True)
class LimitAggregate:
    policy: str
    decision: str
    count: int


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    upstream: str
    from_state: str
    to_state: str
    at: float       # unix seconds
    reason: str


@dataclass(frozen=True, slots=True)
class Saturation:
    inflight_max: int
    loop_lag_max_s: float
    cpu_percent: float      # of one core, averaged over the interval
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class Aggregates:
    """One interval's signals. Immutable once swap() returns it (nothing else references its
    lists any more)."""

    interval_start: float
    interval_end: float
    series: tuple[SeriesAggregate, ...]
    upstreams: tuple[UpstreamAggregate, ...]
    limits: tuple[LimitAggregate, ...]
    breaker_transitions: tuple[BreakerTransition, ...]
    saturation: Saturation

    @property
    def request_count(self) -> int:
        return sum(s.count for s in self.series)

    @property
    def is_empty(self) -> bool:
        """No requests, limit decisions or transitions (saturation alone is not worth a batch)."""
        return not (self.series or self.limits or self.breaker_transitions)

    def to_wire(self) -> dict[str, Any]:
        """The ingest document without batch_id/gateway_id/seq (the shipper adds those)."""
        return {
            "schema": WIRE_SCHEMA,
            "interval_start": self.interval_start,
            "interval_end": self.interval_end,
            "series": [
                {"route": s.route, "upstream": s.upstream, "service": s.service,
                 "method": s.method, "code": s.code, "count": s.count,
                 "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                 "latency_us_hdr": encode_counts(s.counts),
                 **({"local": s.local} if s.local else {})}
                for s in self.series],
            "upstreams": [
                {"upstream": u.upstream,
                 "latency_us_hdr": None if u.counts is None else encode_counts(u.counts),
                 "breaker_state": u.breaker_state,
                 "pool_in_use_max": u.pool_in_use_max, "pool_max": u.pool_max,
                 **({"retries": dict(u.retries)} if u.retries else {}),
                 **({"concurrency_limit": u.concurrency_limit,
                     "concurrency_saturated": u.concurrency_saturated}
                    if u.concurrency_limit is not None else {})}
                for u in self.upstreams],
            "limits": [{"policy": lim.policy, "decision": lim.decision, "count": lim.count}
                       for lim in self.limits],
            "breaker_transitions": [
                {"upstream": t.upstream, "from": t.from_state, "to": t.to_state, "at": t.at,
                 "reason": t.reason}
                for t in self.breaker_transitions],
            "saturation": {"inflight_max": self.saturation.inflight_max,
                           "loop_lag_max_s": self.saturation.loop_lag_max_s,
                           "cpu_percent": self.saturation.cpu_percent,
                           "rss_bytes": self.saturation.rss_bytes},
        }


# ---------------------------------------------------------------------------------------------
# Cumulative totals, read by /metrics at scrape time


@dataclass(frozen=True, slots=True)
class HistogramTotal:
    count: int
    sum_s: float
    le_counts: tuple[int, ...]      # cumulative count <= each of Totals.buckets_s


@dataclass(frozen=True, slots=True)
class Totals:
    """Everything since process start (all swapped intervals plus the live one)."""

    buckets_s: tuple[float, ...]                            # the histograms' bucket bounds
    requests: dict[tuple[str, str, str, int], int]          # (route, upstream, method, code)
    bytes_in: dict[tuple[str, str], int]                    # (route, upstream)
    bytes_out: dict[tuple[str, str], int]
    durations: dict[tuple[str, str], HistogramTotal]        # (route, upstream)
    upstream_durations: dict[str, HistogramTotal]
    limits: dict[tuple[str, str], int]                      # (policy, decision)
    breaker_transitions: dict[tuple[str, str, str], int]    # (upstream, from, to)
    breaker_states: dict[str, str]
    reloads: dict[str, int]
    shipper: dict[str, int]
    spooled: int
    inflight: int
    inflight_max: int           # since the last swap
    loop_lag_s: float           # last sample
    loop_lag_max_s: float       # since the last swap
    pools: dict[str, tuple[int, int]]   # upstream -> (in_use, max) now
    cpu_percent: float          # of one core, since the previous scrape
    cpu_seconds: float
    rss_bytes: int
    ratelimit_evictions: int = 0        # local rate-limit buckets evicted before full
    # (route, upstream) -> exact seconds at QUANTILES, of the last completed interval
    quantiles: dict[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------


class Signals:
    """The process's golden signals. See the module docstring for the design."""

    __slots__ = (
        "_breaker_states",
        "_cum_bytes_in",
        "_cum_bytes_out",
        "_cum_durations",
        "_cum_limits",
        "_cum_requests",
        "_cum_transitions",
        "_cum_upstream",
        "_ends",
        "_evictions_source",
        "_inflight",
        "_inflight_max",
        "_interval_start",
        "_limits",
        "_local",
        "_pool_in_use_max",
        "_pool_max",
        "_pool_sources",
        "_proc_interval",
        "_proc_scrape",
        "_quantiles",
        "_reloads",
        "_retries_swapped",
        "_series",
        "_shipper",
        "_spooled",
        "_transitions",
        "_upstreams",
        "buckets_s",
        "clock",
        "concurrency_sources",
        "loop_lag_max_s",
        "loop_lag_s",
        "quantile_interval",
        "retries",
        "shed",
    )

    def __init__(self, clock: Clock = SYSTEM_CLOCK, *,
                 buckets_s: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        if list(buckets_s) != sorted(set(buckets_s)) or not buckets_s or buckets_s[0] <= 0:
            raise ValueError(f"buckets_s must be positive and ascending, got {buckets_s!r}")
        self.clock = clock
        self.buckets_s = tuple(float(b) for b in buckets_s)
        self._ends = bucket_ends([round(b * 1_000_000) for b in self.buckets_s])
        self._inflight = 0
        self._inflight_max = 0
        self.loop_lag_s = 0.0
        self.loop_lag_max_s = 0.0
        self._series: dict[tuple[str, str, str, str, int], _Series] = {}
        self._local: dict[tuple[str, str, str, str, int, str], _Series] = {}
        self._upstreams: dict[str, _Dist] = {}
        self._limits: dict[tuple[str, str], int] = {}
        self._transitions: list[BreakerTransition] = []
        self._interval_start = clock.time()
        self._cum_requests: dict[tuple[str, str, str, int], int] = {}
        self._cum_bytes_in: dict[tuple[str, str], int] = {}
        self._cum_bytes_out: dict[tuple[str, str], int] = {}
        self._cum_durations: dict[tuple[str, str], _Cum] = {}
        self._cum_upstream: dict[str, _Cum] = {}
        self._cum_limits: dict[tuple[str, str], int] = {}
        self._cum_transitions: dict[tuple[str, str, str], int] = {}
        self._breaker_states: dict[str, str] = {}
        self._quantiles: dict[tuple[str, str], tuple[float, ...]] = {}
        self.quantile_interval: tuple[float, float] | None = None
        self._reloads: dict[str, int] = {}
        self._shipper: dict[str, int] = {}
        self._spooled = 0
        self._pool_sources: dict[str, Callable[[], tuple[int, int]]] = {}
        self._evictions_source: Callable[[], int] | None = None
        self._pool_in_use_max: dict[str, int] = {}
        self._pool_max: dict[str, int] = {}
        # Two Process handles: cpu_percent() measures since the *same handle's* previous call,
        # so the shipper's interval and the scraper's interval must not steal from each other.
        self._proc_interval = psutil.Process()
        self._proc_scrape = psutil.Process()
        # Overload protection, cumulative, read at scrape: (upstream, result) -> n,
        # (route, reason) -> n, upstream -> fn() giving its adaptive concurrency limit now.
        self.retries: dict[tuple[str, str], int] = {}
        self._retries_swapped: dict[tuple[str, str], int] = {}     # self.retries at the last swap
        self.shed: dict[tuple[str, str], int] = {}
        self.concurrency_sources: dict[str, Callable[[], int]] = {}
        self._proc_interval.cpu_percent(None)
        self._proc_scrape.cpu_percent(None)

    # -- in-flight ------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Requests in flight. The proxy does `signals.inflight += 1` / `-= 1`; the setter keeps
        the interval's maximum."""
        return self._inflight

    @inflight.setter
    def inflight(self, n: int) -> None:
        self._inflight = n
        self._inflight_max = max(self._inflight_max, n)

    @property
    def inflight_max(self) -> int:
        return self._inflight_max

    # -- the hot path ---------------------------------------------------------------------------

    def record(self, route: str, upstream: str, service: str, method: str, code: int,
               duration_s: float, upstream_s: float | None, bytes_in: int, bytes_out: int) -> None:
        """Record one finished request (proxied or gateway-generated; `upstream_s` None when no
        upstream answer was timed). Methods outside the standard set are recorded as OTHER."""
        key = (route, upstream, service, _METHOD_LABEL.get(method, "OTHER"), code)
        s = self._series.get(key)
        if s is None:
            s = self._add_series(key)
        us = int(duration_s * 1_000_000.0)
        if not 0 <= us <= 67_108_863:
            us = _clamp_us(us)
        b = (us | 255).bit_length() - 8
        s.counts[((b + 1) << 7) + (us >> b) - 128] += 1
        s.count += 1
        s.sum_s += duration_s
        s.bytes_in += bytes_in
        s.bytes_out += bytes_out
        if upstream_s is not None:
            u = s.up
            us = int(upstream_s * 1_000_000.0)
            if not 0 <= us <= 67_108_863:
                us = _clamp_us(us)
            b = (us | 255).bit_length() - 8
            u.counts[((b + 1) << 7) + (us >> b) - 128] += 1
            u.count += 1
            u.sum_s += upstream_s

    def record_local(self, route: str, upstream: str, service: str, method: str, code: int,
                     duration_s: float, bytes_out: int, reason: str) -> None:
        """Record one request the gateway answered itself (`reason` one of LOCAL_REASONS):
        counted like any response in /metrics, shipped apart from the admitted ones."""
        key = (route, upstream, service, _METHOD_LABEL.get(method, "OTHER"), code, reason)
        s = self._local.get(key)
        if s is None:
            if reason not in LOCAL_REASONS:
                raise ValueError(f"local reason {reason!r} is not one of {LOCAL_REASONS}")
            s = self._local[key] = _Series(_NO_DIST)
        us = int(duration_s * 1_000_000.0)
        if not 0 <= us <= MAX_TRACKABLE_US:
            us = _clamp_us(us)
        s.counts[counts_index(us)] += 1
        s.count += 1
        s.sum_s += duration_s
        s.bytes_out += bytes_out

    def _add_series(self, key: tuple[str, str, str, str, int]) -> _Series:
        up = self._upstreams.get(key[1])
        if up is None:
            up = self._upstreams[key[1]] = _Dist()
        s = self._series[key] = _Series(up)
        return s

    def record_limit(self, policy: str, decision: str) -> None:
        """One rate-limit decision: allowed | limited | shadow_limited | store_error."""
        key = (policy, decision)
        n = self._limits.get(key)
        if n is None:
            if decision not in LIMIT_DECISIONS:
                raise ValueError(f"limit decision {decision!r} is not one of {LIMIT_DECISIONS}")
            n = 0
        self._limits[key] = n + 1

    # -- rare events ----------------------------------------------------------------------------

    def record_breaker_transition(self, upstream: str, old: str, new: str, reason: str) -> None:
        """A breaker changed state; also sets the upstream's current state to `new`."""
        _check_state(old)
        _check_state(new)
        self._transitions.append(BreakerTransition(upstream, old, new, self.clock.time(), reason))
        key = (upstream, old, new)
        self._cum_transitions[key] = self._cum_transitions.get(key, 0) + 1
        self._breaker_states[upstream] = new

    def set_breaker_state(self, upstream: str, state: str) -> None:
        """The current state ("closed" | "half_open" | "open"), e.g. at startup or reload."""
        _check_state(state)
        self._breaker_states[upstream] = state

    def add_pool_source(self, upstream: str, fn: Callable[[], tuple[int, int]]) -> None:
        """`fn()` -> (connections in use, max connections), summed over the upstream's
        endpoints. Sampled by the loop-lag tick, at swap and at scrape."""
        self._pool_sources[upstream] = fn

    def set_evictions_source(self, fn: Callable[[], int]) -> None:
        """`fn()` -> local rate-limit buckets evicted so far (a counter), read at scrape."""
        self._evictions_source = fn

    def clear_pool_sources(self) -> None:
        self._pool_sources.clear()

    def sample_pools(self) -> dict[str, tuple[int, int]]:
        """Read every pool source now, keeping the interval's maximum in use."""
        now: dict[str, tuple[int, int]] = {}
        for upstream, fn in list(self._pool_sources.items()):
            try:
                in_use, mx = fn()
            except Exception:  # noqa: BLE001, S112 - a broken source must not break a scrape
                continue
            now[upstream] = (in_use, mx)
            if in_use > self._pool_in_use_max.get(upstream, -1):
                self._pool_in_use_max[upstream] = in_use
            self._pool_max[upstream] = mx
        return now

    def observe_loop_lag(self, lag_s: float) -> None:
        self.loop_lag_s = lag_s
        self.loop_lag_max_s = max(self.loop_lag_max_s, lag_s)

    def record_reload(self, result: str) -> None:
        """A config reload: "success" | "failure"."""
        if result not in RELOAD_RESULTS:
            raise ValueError(f"reload result {result!r} is not one of {RELOAD_RESULTS}")
        self._reloads[result] = self._reloads.get(result, 0) + 1

    def record_shipper(self, result: str) -> None:
        """A shipped batch: "success" | "failure" | "spooled" | "dropped"."""
        if result not in SHIPPER_RESULTS:
            raise ValueError(f"shipper result {result!r} is not one of {SHIPPER_RESULTS}")
        self._shipper[result] = self._shipper.get(result, 0) + 1

    def set_spooled(self, n: int) -> None:
        """Batches waiting in the spool directory."""
        self._spooled = n

    # -- readers --------------------------------------------------------------------------------

    def swap(self) -> Aggregates:
        """Hand over the interval's aggregates and start a fresh interval.

        Replacing the dict references is atomic with respect to record() (same thread, no
        awaits), so nothing is lost or counted twice. The interval is also folded into the
        cumulative totals that /metrics reads.
        """
        series, self._series = self._series, {}
        local, self._local = self._local, {}
        upstreams, self._upstreams = self._upstreams, {}
        limits, self._limits = self._limits, {}
        transitions, self._transitions = self._transitions, []
        start = self._interval_start
        end = self._interval_start = self.clock.time()
        self.sample_pools()
        pool_in_use_max, self._pool_in_use_max = self._pool_in_use_max, {}
        inflight_max, self._inflight_max = self._inflight_max, self._inflight
        lag_max, self.loop_lag_max_s = self.loop_lag_max_s, 0.0
        saturation = Saturation(inflight_max=inflight_max, loop_lag_max_s=lag_max,
                                cpu_percent=_cpu_percent(self._proc_interval),
                                rss_bytes=_rss(self._proc_interval))

        self._fold(series, upstreams, limits)
        self._fold(local, {}, {})
        self._quantiles = _interval_quantiles([*series.items(), *local.items()])
        self.quantile_interval = (start, end)

        names = {k[1] for k in series if k[1] != NO_UPSTREAM}
        names.update(upstreams.keys() - {NO_UPSTREAM}, self._breaker_states, pool_in_use_max)
        # Overload protection, read off what the data plane keeps anyway: the interval's share
        # of the cumulative retry counters, the limits now, and the upstreams whose limit
        # refused a request (local series with reason "concurrency").
        retries: dict[str, list[tuple[str, int]]] = {}
        for key, n in self.retries.items():
            delta = n - self._retries_swapped.get(key, 0)
            if delta > 0:
                retries.setdefault(key[0], []).append((key[1], delta))
        self._retries_swapped = dict(self.retries)
        refused = {k[1] for k in local if k[5] == "concurrency"}
        conc_limits: dict[str, int] = {}
        for name, fn in list(self.concurrency_sources.items()):
            with contextlib.suppress(Exception):    # a broken source must not lose the batch
                conc_limits[name] = int(fn())
        names.update(retries, conc_limits)
        ups = []
        for name in sorted(names):
            d = upstreams.get(name)
            if d is not None and d.count == 0:
                d = None    # routed there but never answered (breaker open, connect error)
            ups.append(UpstreamAggregate(
                upstream=name, count=0 if d is None else d.count,
                sum_s=0.0 if d is None else d.sum_s, counts=None if d is None else d.counts,
                breaker_state=self._breaker_states.get(name, "closed"),
                pool_in_use_max=max(pool_in_use_max.get(name, 0), 0),
                pool_max=self._pool_max.get(name, 0),
                retries=tuple(sorted(retries.get(name, ()))),
                concurrency_limit=conc_limits.get(name),
                concurrency_saturated=name in refused))
        return Aggregates(
            interval_start=start, interval_end=end,
            series=tuple(SeriesAggregate(k[0], k[1], k[2], k[3], k[4], s.count, s.bytes_in,
                                         s.bytes_out, s.sum_s, s.counts)
                         for k, s in series.items())
            + tuple(SeriesAggregate(k[0], k[1], k[2], k[3], k[4], s.count, s.bytes_in,
                                    s.bytes_out, s.sum_s, s.counts, k[5])
                    for k, s in local.items()),
            upstreams=tuple(ups),
            limits=tuple(LimitAggregate(p, d, n) for (p, d), n in limits.items()),
            breaker_transitions=tuple(transitions),
            saturation=saturation)

    def _fold(self, series: dict[Any, _Series], upstreams: dict[str, _Dist],
              limits: dict[tuple[str, str], int]) -> None:
        # keys: (route, upstream, service, method, code[, local reason])
        for key, s in series.items():
            route, upstream, method, code = key[0], key[1], key[3], key[4]
            rk = (route, upstream, method, code)
            self._cum_requests[rk] = self._cum_requests.get(rk, 0) + s.count
            dk = (route, upstream)
            self._cum_bytes_in[dk] = self._cum_bytes_in.get(dk, 0) + s.bytes_in
            self._cum_bytes_out[dk] = self._cum_bytes_out.get(dk, 0) + s.bytes_out
            c = self._cum_durations.get(dk)
            if c is None:
                c = self._cum_durations[dk] = _Cum(len(self._ends))
            c.add(_count_le(s.counts, self._ends), s.count, s.sum_s)
        for name, u in upstreams.items():
            if u.count:
                c = self._cum_upstream.get(name)
                if c is None:
                    c = self._cum_upstream[name] = _Cum(len(self._ends))
                c.add(_count_le(u.counts, self._ends), u.count, u.sum_s)
        for key, n in limits.items():
            self._cum_limits[key] = self._cum_limits.get(key, 0) + n

    def totals(self) -> Totals:
        """Cumulative totals since start plus the live interval, latency histograms counted at
        `buckets_s`. Does not disturb the interval."""
        ends = self._ends
        requests = dict(self._cum_requests)
        bytes_in = dict(self._cum_bytes_in)
        bytes_out = dict(self._cum_bytes_out)
        # per label set: [count, sum, le counts...], starting from the cumulative part
        dur: dict[tuple[str, str], list[Any]] = {
            k: [c.count, c.sum_s, c.le] for k, c in self._cum_durations.items()}
        live: list[tuple[Any, _Series]] = [*self._series.items(), *self._local.items()]
        for key, s in live:
            route, upstream, method, code = key[0], key[1], key[3], key[4]
            rk = (route, upstream, method, code)
            requests[rk] = requests.get(rk, 0) + s.count
            dk = (route, upstream)
            bytes_in[dk] = bytes_in.get(dk, 0) + s.bytes_in
            bytes_out[dk] = bytes_out.get(dk, 0) + s.bytes_out
            _accumulate(dur, dk, s.count, s.sum_s, _count_le(s.counts, ends))
        up: dict[str, list[Any]] = {
            k: [c.count, c.sum_s, c.le] for k, c in self._cum_upstream.items()}
        for name, u in self._upstreams.items():
            if u.count:
                _accumulate(up, name, u.count, u.sum_s, _count_le(u.counts, ends))
        limits = dict(self._cum_limits)
        for key, n in self._limits.items():
            limits[key] = limits.get(key, 0) + n
        pools = self.sample_pools()
        return Totals(
            buckets_s=self.buckets_s, requests=requests, bytes_in=bytes_in, bytes_out=bytes_out,
            durations={k: HistogramTotal(v[0], v[1], tuple(v[2])) for k, v in dur.items()},
            upstream_durations={k: HistogramTotal(v[0], v[1], tuple(v[2])) for k, v in up.items()},
            limits=limits, breaker_transitions=dict(self._cum_transitions),
            breaker_states=dict(self._breaker_states), reloads=dict(self._reloads),
            shipper=dict(self._shipper), spooled=self._spooled, inflight=self._inflight,
            inflight_max=self._inflight_max, loop_lag_s=self.loop_lag_s,
            loop_lag_max_s=self.loop_lag_max_s, pools=pools,
            cpu_percent=_cpu_percent(self._proc_scrape), cpu_seconds=_cpu_seconds(self._proc_scrape),
            rss_bytes=_rss(self._proc_scrape), quantiles=dict(self._quantiles),
            ratelimit_evictions=self._evictions_source() if self._evictions_source else 0)


def _interval_quantiles(series: list[tuple[Any, _Series]]
                        ) -> dict[tuple[str, str], tuple[float, ...]]:
    """Per (route, upstream): the exact HDR percentiles (seconds) at QUANTILES of an interval's
    series (keys start with route, upstream), the same maths as the control plane's."""
    merged: dict[tuple[str, str], list[int]] = {}
    for key, s in series:
        if not s.count:
            continue
        k = (key[0], key[1])
        acc = merged.get(k)
        merged[k] = (list(s.counts) if acc is None
                     else [a + b for a, b in zip(acc, s.counts, strict=True)])
    out: dict[tuple[str, str], tuple[float, ...]] = {}
    for k, counts in merged.items():
        h = hdr_from_counts(counts)
        out[k] = tuple(h.get_value_at_percentile(q * 100.0) / 1_000_000.0 for q in QUANTILES)
    return out


def _accumulate(into: dict[Any, list[Any]], key: Any, count: int, sum_s: float,
                le: list[int]) -> None:
    cur = into.get(key)
    if cur is None:
        into[key] = [count, sum_s, le]
    else:
        cur[0] += count
        cur[1] += sum_s
        cur[2] = [a + b for a, b in zip(cur[2], le, strict=True)]


def _check_state(state: str) -> None:
    if state not in BREAKER_STATES:
        raise ValueError(f"breaker state {state!r} is not one of {tuple(BREAKER_STATES)}")


def _cpu_percent(proc: psutil.Process) -> float:
    try:
        return float(proc.cpu_percent(None))
    except psutil.Error:
        return 0.0


def _cpu_seconds(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def percentile_s(counts: Iterable[int], q: float) -> float:
    """The q-th percentile (0..100) of HDR counts, in seconds (hdrh's highest equivalent value)."""
    h = hdr_from_counts(list(counts))
    if not h.get_total_count():
        return math.nan
    return float(h.get_value_at_percentile(q)) / 1_000_000.0


class LoopLagMonitor:
    """Samples event-loop lag on a timer: how late a sleep of `interval_s` wakes up.

    Each tick also samples the upstream pools, so their interval maximum sees more than the
    moments of swap and scrape.
    """

    def __init__(self, signals: Signals, interval_s: float = 0.5) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self._signals = signals
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    @property
    def last_lag_s(self) -> float:
        return self._signals.loop_lag_s

    @property
    def max_lag_s(self) -> float:
        """The largest lag since the last swap."""
        return self._signals.loop_lag_max_s

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        signals = self._signals
        mono = signals.clock.monotonic
        interval = self._interval_s
        while True:
            t0 = mono()
            await asyncio.sleep(interval)
            lag = mono() - t0 - interval
            signals.observe_loop_lag(max(0.0, lag))
            signals.sample_pools()
