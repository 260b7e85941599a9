"""`POST /v1/ingest`: bounded body reading (gzip-bomb safe) and validation of the wire format.

The wire document (schema 1) is produced by `gateway/signals.py` and completed by the shipper:

    {batch_id, gateway_id, seq, schema: 1, interval_start, interval_end,
     series: [{route, upstream, service, method, code, count, bytes_in, bytes_out, latency_us_hdr,
               local?}],
     upstreams: [{upstream, latency_us_hdr | null, breaker_state, pool_in_use_max, pool_max,
                  retries?: {retried|budget_exhausted|succeeded|failed: n},
                  concurrency_limit?: n, concurrency_saturated?: bool}],
     limits: [{policy, decision, count}],
     breaker_transitions: [{upstream, from, to, at, reason}],
     saturation: {inflight_max, loop_lag_max_s, cpu_percent, rss_bytes}}

`series` is required (may be empty); the other sections default to empty. A series' optional
`local` names why the gateway answered those requests itself (`limit`, `budget`, `breaker`,
`no_route`, `client_gone`, `bad_request`, or a later reason): they were never admitted, so they
are counted apart from health, error rates and latency SLIs, and never billed. An upstream's
optional `retries` are the interval's retries by result, `concurrency_limit` its adaptive limit at
the end of the interval and `concurrency_saturated` whether that limit refused requests in it
(absent from older gateways' batches and for upstreams without them). Unknown keys are ignored
so that a newer gateway can add fields without its batches being dropped. Strings are data: they
are stored verbatim through parameterised queries and never interpreted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.control.domain import histogram

MAX_BODY_BYTES = 8 * 1024 * 1024       # decompressed, and raw
MAX_SERIES = 20_000
MAX_ITEMS = 10_000
MAX_NAME = 256
MAX_TEXT = 2048
MAX_INT = (1 << 53) - 1                  # exact in JSON doubles and far below SQLite's int64 sums
LATE_LIMIT_S = 86_400.0                  # batches whose interval started up to 1 day ago
FUTURE_SKEW_S = 300.0                    # tolerated clock skew of a gateway
MAX_INTERVAL_S = 3_600.0
BREAKER_STATES = ("closed", "half_open", "open")
DECISIONS = ("allowed", "limited", "shadow_limited", "store_error", "delayed")
RETRY_RESULTS = ("retried", "budget_exhausted", "succeeded", "failed")
MAX_CONCURRENCY_LIMIT = 1_000_000


class IngestError(Exception):
    """The request cannot be ingested; `status` 400/413/415 and every `field: message` line."""

    def __init__(self, status: int, errors: list[str]) -> None:
        super().__init__(errors[0] if errors else "invalid batch")
        self.status = status
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Series:
    route: str
    upstream: str
    service: str
    method: str
    code: int
    count: int
    bytes_in: int
    bytes_out: int
    latency: bytes          # the validated histogram's inflated V2 payload (what the store keeps)
    hist_total: int         # latencies recorded in it
    local: str = ""         # why the gateway answered them itself; "" for admitted requests


@dataclass(frozen=True, slots=True)
class UpstreamReport:
    upstream: str
    breaker_state: str
    pool_in_use_max: int
    pool_max: int
    retries: tuple[tuple[str, int], ...] = ()     # (result, count), counts > 0
    concurrency_limit: int | None = None         # None: no adaptive limit reported
    concurrency_saturated: bool = False


@dataclass(frozen=True, slots=True)
class LimitCount:
    policy: str
    decision: str
    count: int


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    upstream: str
    from_state: str
    to_state: str
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Saturation:
    inflight_max: int = 0
    loop_lag_max_s: float = 0.0
    cpu_percent: float = 0.0
    rss_bytes: int = 0


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """A tenant's admitted and rejected requests in the interval, and the quota windows (kind,
    id, limit) they counted in (the gateway computes windows in its configured time zone)."""

    tenant: str
    plan: str
    admitted: int
    rejected: int
    windows: tuple[tuple[str, str, int], ...]


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    gateway_id: str
    seq: int
    interval_start: float
    interval_end: float
    series: tuple[Series, ...]
    upstreams: tuple[UpstreamReport, ...]
    limits: tuple[LimitCount, ...]
    breaker_transitions: tuple[BreakerTransition, ...]
    saturation: Saturation
    tenants: tuple[TenantUsage, ...] = ()


# ---------------------------------------------------------------------------------------------
# Validation


class _V:
    """Collects `field: message` errors; each check returns the value or None."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def obj(self, doc: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(doc, dict):
            self.err(path, "must be an object")
            return None
        return doc

    def req(self, doc: dict[str, Any], key: str, path: str) -> Any:
        if key not in doc:
            self.err(f"{path}{key}", "is required")
            return _MISSING
        return doc[key]

    def string(self, value: Any, path: str, *, max_len: int = MAX_NAME,
               empty: bool = False) -> str | None:
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            self.err(path, "must be a string")
            return None
        if not empty and not value:
            self.err(path, "must not be empty")
            return None
        if len(value) > max_len:
            self.err(path, f"must be at most {max_len} characters")
            return None
        if "\x00" in value:
            self.err(path, "must not contain NUL characters")
            return None
        return value

    def count(self, value: Any, path: str, *, maximum: int = MAX_INT) -> int | None:
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > maximum:
            self.err(path, "must be a non-negative integer"
                     + (f" <= {maximum}" if isinstance(value, int) and value > maximum else ""))
            return None
        return value

    def number(self, value: Any, path: str, *, minimum: float = 0.0,
               maximum: float = 1e15) -> float | None:
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not minimum <= value <= maximum:
            self.err(path, f"must be a number between {minimum:g} and {maximum:g}")
            return None
        return float(value)

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str | None:
        if value is _MISSING:
            return None
        if value not in choices:
            self.err(path, f"must be one of {', '.join(choices)}")
            return None
        return value  # type: ignore[no-any-return]

    def items(self, doc: dict[str, Any], key: str, *, required: bool,
              limit: int = MAX_ITEMS) -> list[Any]:
        if key not in doc:
            if required:
                self.err(key, "is required")
            return []
        value = doc[key]
        if not isinstance(value, list):
            self.err(key, "must be a list")
            return []
        if len(value) > limit:
            self.err(key, f"must have at most {limit} items")
            return []
        return value


_MISSING = object()


def parse_batch(body: bytes, *, now: float) -> Batch:
    """Parse and validate one wire document; raise IngestError(400, [every error]) if invalid."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, [f"body: invalid JSON ({exc})"]) from None
    v = _V()
    if v.obj(doc, "body") is None:
        raise IngestError(400, v.errors)

    batch_id = v.string(v.req(doc, "batch_id", ""), "batch_id")
    gateway_id = v.string(v.req(doc, "gateway_id", ""), "gateway_id")
    seq = v.count(v.req(doc, "seq", ""), "seq")
    schema = v.req(doc, "schema", "")
    if schema is not _MISSING and (schema != 1 or isinstance(schema, bool)):
        v.err("schema", "must be 1")
    start = v.number(v.req(doc, "interval_start", ""), "interval_start", maximum=1e11)
    end = v.number(v.req(doc, "interval_end", ""), "interval_end", maximum=1e11)
    if start is not None and end is not None:
        if end < start:
            v.err("interval_end", "must not be before interval_start")
        elif end - start > MAX_INTERVAL_S:
            v.err("interval_end", f"interval longer than {MAX_INTERVAL_S:g} s")
        if start < now - LATE_LIMIT_S:
            v.err("interval_start", "older than 1 day (late batches are accepted up to 1 day)")
        if end > now + FUTURE_SKEW_S:
            v.err("interval_end", f"more than {FUTURE_SKEW_S:g} s in the future")

    series: list[Series] = []
    for i, item in enumerate(v.items(doc, "series", required=True, limit=MAX_SERIES)):
        p = f"series[{i}]"
        if v.obj(item, p) is None:
            continue
        n0 = len(v.errors)
        route = v.string(v.req(item, "route", p + "."), f"{p}.route")
        if route == "*":  # the rollups' service-total row
            v.err(f"{p}.route", "'*' is reserved")
            route = None
        upstream = v.string(v.req(item, "upstream", p + "."), f"{p}.upstream")
        service = v.string(v.req(item, "service", p + "."), f"{p}.service")
        method = v.string(v.req(item, "method", p + "."), f"{p}.method", max_len=32)
        code = v.req(item, "code", p + ".")
        if code is not _MISSING and (isinstance(code, bool) or not isinstance(code, int)
                                     or not 100 <= code <= 599):
            v.err(f"{p}.code", "must be an HTTP status code (100-599)")
        count = v.count(v.req(item, "count", p + "."), f"{p}.count")
        bytes_in = v.count(v.req(item, "bytes_in", p + "."), f"{p}.bytes_in")
        bytes_out = v.count(v.req(item, "bytes_out", p + "."), f"{p}.bytes_out")
        hdr = v.req(item, "latency_us_hdr", p + ".")
        hist_total, latency = 0, b""
        if hdr is not _MISSING:
            try:
                hist_total, latency = histogram.validate(hdr)
            except histogram.HistogramError as exc:
                v.err(f"{p}.latency_us_hdr", str(exc))
        local = ""
        if item.get("local") is not None:
            local = v.string(item["local"], f"{p}.local", max_len=32) or ""
        if len(v.errors) == n0:
            series.append(Series(route, upstream, service, method, code, count,  # type: ignore[arg-type]
                                 bytes_in, bytes_out, latency, hist_total, local))  # type: ignore[arg-type]

    upstreams: list[UpstreamReport] = []
    for i, item in enumerate(v.items(doc, "upstreams", required=False)):
        p = f"upstreams[{i}]"
        if v.obj(item, p) is None:
            continue
        n0 = len(v.errors)
        name = v.string(v.req(item, "upstream", p + "."), f"{p}.upstream")
        hdr = item.get("latency_us_hdr")
        if hdr is not None:
            try:
                histogram.check(hdr)
            except histogram.HistogramError as exc:
                v.err(f"{p}.latency_us_hdr", str(exc))
        state = v.choice(v.req(item, "breaker_state", p + "."), f"{p}.breaker_state",
                         BREAKER_STATES)
        in_use = v.count(v.req(item, "pool_in_use_max", p + "."), f"{p}.pool_in_use_max")
        pool_max = v.count(v.req(item, "pool_max", p + "."), f"{p}.pool_max")
        retries: list[tuple[str, int]] = []
        if item.get("retries") is not None:
            rm = v.obj(item["retries"], f"{p}.retries")
            for result, n in (rm or {}).items():
                if v.choice(result, f"{p}.retries", RETRY_RESULTS) is not None:
                    c = v.count(n, f"{p}.retries.{result}")
                    if c:
                        retries.append((result, c))
        climit = None
        if item.get("concurrency_limit") is not None:
            climit = v.count(item["concurrency_limit"], f"{p}.concurrency_limit",
                             maximum=MAX_CONCURRENCY_LIMIT)
        saturated = item.get("concurrency_saturated", False)
        if not isinstance(saturated, bool):
            v.err(f"{p}.concurrency_saturated", "must be true or false")
        if len(v.errors) == n0:
            upstreams.append(UpstreamReport(name, state, in_use, pool_max,  # type: ignore[arg-type]
                                            tuple(retries), climit, saturated))

    limits: list[LimitCount] = []
    for i, item in enumerate(v.items(doc, "limits", required=False)):
        p = f"limits[{i}]"
        if v.obj(item, p) is None:
            continue
        n0 = len(v.errors)
        policy = v.string(v.req(item, "policy", p + "."), f"{p}.policy")
        decision = v.choice(v.req(item, "decision", p + "."), f"{p}.decision", DECISIONS)
        count = v.count(v.req(item, "count", p + "."), f"{p}.count")
        if len(v.errors) == n0:
            limits.append(LimitCount(policy, decision, count))  # type: ignore[arg-type]

    transitions: list[BreakerTransition] = []
    for i, item in enumerate(v.items(doc, "breaker_transitions", required=False)):
        p = f"breaker_transitions[{i}]"
        if v.obj(item, p) is None:
            continue
        n0 = len(v.errors)
        name = v.string(v.req(item, "upstream", p + "."), f"{p}.upstream")
        frm = v.choice(v.req(item, "from", p + "."), f"{p}.from", BREAKER_STATES)
        to = v.choice(v.req(item, "to", p + "."), f"{p}.to", BREAKER_STATES)
        at = v.number(v.req(item, "at", p + "."), f"{p}.at", maximum=1e11)
        reason = v.string(v.req(item, "reason", p + "."), f"{p}.reason", max_len=MAX_TEXT,
                          empty=True)
        if len(v.errors) == n0:
            transitions.append(BreakerTransition(name, frm, to, at, reason))  # type: ignore[arg-type]

    sat = Saturation()
    if "saturation" in doc:
        sm = v.obj(doc["saturation"], "saturation")
        if sm is not None:
            n0 = len(v.errors)
            inflight = v.count(sm.get("inflight_max", 0), "saturation.inflight_max")
            lag = v.number(sm.get("loop_lag_max_s", 0.0), "saturation.loop_lag_max_s",
                           maximum=86_400.0)
            cpu = v.number(sm.get("cpu_percent", 0.0), "saturation.cpu_percent",
                           maximum=100_000.0)
            rss = v.count(sm.get("rss_bytes", 0), "saturation.rss_bytes")
            if len(v.errors) == n0:
                sat = Saturation(inflight, lag, cpu, rss)  # type: ignore[arg-type]

    tenants: list[TenantUsage] = []
    for i, item in enumerate(v.items(doc, "tenants", required=False)):
        p = f"tenants[{i}]"
        if v.obj(item, p) is None:
            continue
        n0 = len(v.errors)
        tenant = v.string(v.req(item, "tenant", p + "."), f"{p}.tenant")
        plan = v.string(v.req(item, "plan", p + "."), f"{p}.plan")
        admitted = v.count(v.req(item, "admitted", p + "."), f"{p}.admitted")
        rejected = v.count(v.req(item, "rejected", p + "."), f"{p}.rejected")
        windows = []
        for j, w in enumerate(v.items(item, "windows", required=False, limit=3)):
            wp = f"{p}.windows[{j}]"
            if v.obj(w, wp) is None:
                continue
            kind = v.choice(v.req(w, "window", wp + "."), f"{wp}.window",
                            ("day", "week", "month"))
            wid = v.string(v.req(w, "id", wp + "."), f"{wp}.id", max_len=16)
            lim = v.count(v.req(w, "limit", wp + "."), f"{wp}.limit")
            windows.append((kind, wid, lim))
        if len(v.errors) == n0:
            tenants.append(TenantUsage(tenant, plan, admitted, rejected,  # type: ignore[arg-type]
                                       tuple(windows)))  # type: ignore[arg-type]

    if v.errors:
        raise IngestError(400, v.errors)
    return Batch(batch_id, gateway_id, seq, start, end,  # type: ignore[arg-type]
                 tuple(series), tuple(upstreams), tuple(limits), tuple(transitions), sat,
                 tuple(tenants))
