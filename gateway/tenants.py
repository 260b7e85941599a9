"""Tenants: who a request is for, the plan that applies, and its bucket and calendar quotas.

A request names its tenant by the `tenants.key` field (limit-key syntax; a second copy of that
field is refused with 400, like a limit's key). Its plan is, in order: the control plane's table
(plan and an active override, `TenantTable`), the static `assignments`, the `default_plan`; a
tenant with none of these is answered 403.

A plan is a token bucket (`rate`, `burst`) and quotas per calendar window (`day`, `week`, `month`
in `time_zone`, see `gateway.quotawindows`). A request is admitted only if the bucket holds a
token and every window has room; then it takes from all of them, otherwise from none.

Stores:

* `local`: `MemoryQuotas`, a dict in the process (bounded: GATEWAY_TENANT_SLOTS, default 65536
  tenants; past that the least recently inserted tenant is forgotten and restarts with fresh
  counts). With `workers > 1`, `gateway.quotatable.SharedQuotas`: one table in a file every
  worker maps, decided under a `flock`, so the quota holds for the whole gateway, as the local
  limits do. Across replicas, only `redis` is exact.
* `redis`: one Lua script (`tenants.lua`) per request, through the limiter's Redis connection and
  its batching pump: the bucket and every window checked and taken atomically on the server, so
  the windows never count more than the quota across any number of gateways. Counters expire an
  hour after their window ends. While Redis fails, `tenants.on_store_error` applies: `allow`
  admits, `deny` answers 503, `local` uses the memory store.

Window ids come from the gateway's wall clock; gateways whose clocks disagree by a few seconds
at midnight briefly count in different windows.

The tenant usage each gateway ships (`usage()`): admitted and rejected requests per tenant and
window since the last shipment. Tenants are a known set but a default plan lets anyone name one:
the configured and table tenants are always shipped, plus at most `USAGE_TOP_N` others (the
busiest); the rest are counted in `usage_dropped`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import PlanConfig, TenantsConfig
from gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    QUOTA_EXCEEDED,
    REDUCED_CAPACITY,
    StoreError,
    problem_body,
)
from gateway.quotatable import SharedQuotas
from gateway.quotawindows import Window, rfc3339, window_at, zone
from gateway.ratelimit import (
    ANONYMOUS,
    EPSILON,
    LimitOutcome,
    _bounded,
    client_address,
    hash_api_key,
    refill,
)

if TYPE_CHECKING:
    from gateway.downstream import Request
    from gateway.ratelimit_redis import RedisStore

log = logging.getLogger("gateway.tenants")

SCRIPT = Path(__file__).with_name("tenants.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

EXPIRY_MARGIN_S = 3600      # counters outlive their window by this (skewed clocks, late readers)
USAGE_TOP_N = 100
USAGE_MAX_TENANTS = 65536   # tenants counted per plan and window between two shipments
_KEY_HEADERS = {"user_id": "X-User-Id", "client_id": "X-Client-Id", "api_key": "X-Api-Key"}


@dataclass(frozen=True, slots=True)
class Override:
    """A runtime change from the control plane: any field None keeps the plan's value."""

    qps: float | None = None
    burst: int | None = None
    daily_quota: int | None = None
    monthly_quota: int | None = None
    expires_at: float | None = None     # unix seconds; the gateway drops it then by itself


@dataclass(frozen=True, slots=True)
class EffectivePlan:
    """What applies to one tenant now: the plan with any override folded in."""

    name: str                            # the plan's name (label of metrics and headers)
    rate: float                          # tokens per second; 0: no bucket
    capacity: float
    quotas: tuple[tuple[str, int], ...]  # (window kind, limit)
    policy_item: str                     # '"free";q=1;w=1' ("" without a bucket)
    overridden: bool = False

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0 and not self.quotas


def effective(plan: PlanConfig, override: Override | None = None) -> EffectivePlan:
    rate_count, period, burst = plan.rate_count, plan.period_s, plan.burst
    quotas = dict(plan.quotas)
    if override is not None:
        if override.qps is not None:
            rate_count, period = override.qps, 1.0    # type: ignore[assignment]
        if override.burst is not None:
            burst = override.burst
        if override.daily_quota is not None:
            quotas["day"] = override.daily_quota
        if override.monthly_quota is not None:
            quotas["month"] = override.monthly_quota
    rate = rate_count / period if rate_count else 0.0
    w = int(period) if float(period).is_integer() else math.ceil(period)
    q = f"{rate_count:g}" if isinstance(rate_count, float) else str(rate_count)
    return EffectivePlan(
        name=plan.name, rate=rate, capacity=float(burst + 1),
        quotas=tuple((k, quotas[k]) for k in ("day", "week", "month") if k in quotas),
        policy_item=f'"{plan.name}";q={q};w={w}' if rate else "",
        overridden=override is not None)


class TenantTable:
    """The control plane's tenant table, applied without a reload and kept across reloads.

    Fed with each ingest answer's `directives["tenants"]`:
    `{"<tenant>": {"plan": "<name>" | null, "override": {"qps", "burst", "daily_quota",
    "monthly_quota", "expires_at"} | null}}` — the complete current table (overrides whose
    `effective_date` has come; the control plane holds back the future ones). A response without
    the key leaves the table as it is; while the control plane is unreachable the last table
    stands, and an override still lapses at its `expires_at`."""

    __slots__ = ("_clock", "entries", "version")

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self.entries: dict[str, tuple[str | None, Override | None]] = {}
        self.version = 0                  # bumped on every change: plan caches compare it

    def update(self, directives: dict[str, Any]) -> None:
        raw = directives.get("tenants") if isinstance(directives, dict) else None
        if not isinstance(raw, dict):
            return
        entries: dict[str, tuple[str | None, Override | None]] = {}
        for tenant, d in raw.items():
            if not isinstance(tenant, str) or not isinstance(d, dict):
                continue
            plan = d.get("plan")
            ov = _override(d.get("override"))
            entries[tenant] = (plan if isinstance(plan, str) else None, ov)
        if entries != self.entries:
            self.entries = entries
            self.version += 1
            log.info("tenant table from the control plane: %d tenants", len(entries))

    def lookup(self, tenant: str) -> tuple[str | None, Override | None] | None:
        e = self.entries.get(tenant)
        if e is None:
            return None
        ov = e[1]
        if ov is not None and ov.expires_at is not None and self._clock.time() >= ov.expires_at:
            return (e[0], None)
        return e


def _num_or_none(v: Any, integer: bool) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return int(v) if integer else float(v)


def _override(d: Any) -> Override | None:
    if not isinstance(d, dict):
        return None
    return Override(qps=_num_or_none(d.get("qps"), False),
                    burst=_num_or_none(d.get("burst"), True),
                    daily_quota=_num_or_none(d.get("daily_quota"), True),
                    monthly_quota=_num_or_none(d.get("monthly_quota"), True),
                    expires_at=_num_or_none(d.get("expires_at"), False))


class _Shape:
    """What requests of one plan share while its windows stay the same: computed once per
    window, not per request (Redis arguments, the RateLimit-Policy value, usage counters)."""

    __slots__ = ("args", "counts", "plan", "policy_header", "start", "suffixes", "until",
                 "usage_windows", "windows")

    def __init__(self, plan: EffectivePlan, windows: tuple[Window, ...], fake_time: bool) -> None:
        self.plan = plan
        self.windows = windows
        self.start = max((w.start for w in windows), default=-math.inf)
        self.until = min((w.end for w in windows), default=math.inf)
        self.suffixes = tuple(f"{w.kind}:{w.id}" for w in windows)
        args = [repr(plan.rate), repr(plan.capacity), "1"]
        for (_, limit), w in zip(plan.quotas, windows):
            args.append(str(limit))
            # with a fake clock (tests) the server's real clock would expire them at once
            args.append(str(int(w.end) + EXPIRY_MARGIN_S) if not fake_time
                        else str(int(time.time()) + 86400))
        self.args = args
        items = [plan.policy_item] if plan.policy_item else []
        for (kind, limit), w in zip(plan.quotas, windows):
            items.append(f'"{plan.name}-{kind}";q={limit};w={w.length_s}')
        self.policy_header = ", ".join(items)
        self.usage_windows = tuple((w.kind, w.id, limit)
                                   for (_, limit), w in zip(plan.quotas, windows))
        self.counts: dict[str, list[int]] = {}     # tenant -> [admitted, rejected]


class MemoryQuotas:
    """Buckets and window counters in this process."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, max_tenants: int | None = None) -> None:
        self._clock = clock
        if max_tenants is None:
            try:
                max_tenants = int(os.environ.get("GATEWAY_TENANT_SLOTS", "") or 65536)
            except ValueError:
                max_tenants = 65536
        self.max_tenants = max(8, max_tenants)
        # tenant -> [tokens, stamp, {kind: [window id, count]}]
        self._state: dict[str, list[Any]] = {}

    def take_now(self, tenant: str, plan: EffectivePlan, windows: tuple[Window, ...],
                 consume: bool = True) -> tuple[bool, float, list[int]]:
        now = self._clock.monotonic()
        st = self._state.get(tenant)
        if st is None:
            st = [plan.capacity, now, {}]
            if consume:
                if len(self._state) >= self.max_tenants:
                    del self._state[next(iter(self._state))]
                self._state[tenant] = st
        ok = True
        tokens = -1.0
        if plan.rate > 0:
            tokens = refill(min(st[0], plan.capacity), st[1], now, plan.rate, plan.capacity)
            ok = tokens >= 1 - EPSILON
        counters = st[2]
        counts = []
        for (kind, limit), w in zip(plan.quotas, windows):
            c = counters.get(kind)
            n = c[1] if c is not None and c[0] == w.id else 0
            counts.append(n)
            if n + 1 > limit:
                ok = False
        if ok and consume:
            if plan.rate > 0:
                st[0] = max(0.0, tokens - 1)
                st[1] = max(st[1], now)
            for (kind, _), w, n in zip(plan.quotas, windows, counts):
                counters[kind] = [w.id, n + 1]
        return ok, tokens, counts


class Tenancy:
    """The tenant check of one config version (`check` is on the hot path)."""

    def __init__(self, cfg: TenantsConfig, *, trusted: Any = (), clock: Clock = SYSTEM_CLOCK,
                 table: TenantTable | None = None, redis: RedisStore | None = None,
                 previous: Tenancy | None = None, redis_fake_time: bool = False,
                 shared_dir: str | None = None, collect_usage: bool = True) -> None:
        """`shared_dir`: count in a SharedQuotas table there (default: GATEWAY_SHARED_DIR when
        GATEWAY_WORKERS > 1, as the supervisor sets for its workers)."""
        self.cfg = cfg
        self._clock = clock
        self._tz = zone(cfg.time_zone)
        self._trusted = tuple(trusted)
        self.table = table if table is not None else TenantTable(clock)
        self._redis = redis if cfg.store == "redis" else None
        self._fake_time = redis_fake_time
        if shared_dir is None and _workers() > 1:
            shared_dir = os.environ.get("GATEWAY_SHARED_DIR") or None
        path = os.path.join(shared_dir, "tenants.table") if shared_dir else None
        prev = previous.memory if previous is not None else None
        self.memory: MemoryQuotas | SharedQuotas
        if prev is not None and ((path is None and isinstance(prev, MemoryQuotas)) or (
                isinstance(prev, SharedQuotas) and prev.path == path)):
            self.memory = prev
        elif path is not None:
            self.memory = SharedQuotas(path, clock=clock)
        else:
            self.memory = MemoryQuotas(clock)
        key = cfg.key
        self._kind = "header" if key.startswith("header:") else key
        self._header = key[7:] if key.startswith("header:") else _KEY_HEADERS.get(key, "")
        self._plans = {p.name: p for p in cfg.plans}
        self._assigned = dict(cfg.assignments)
        self._base = {name: effective(p) for name, p in self._plans.items()}
        self._cache: dict[str, tuple[EffectivePlan | None, float]] = {}  # (plan, valid until)
        self._cache_version = -1
        self._windows: dict[str, Window] = {}
        self._listeners: list[Callable[[str, str], None]] = []
        self._shapes: dict[int, _Shape] = {}       # id(plan) -> its current shape
        # shapes holding counts since the last shipment (kept across reloads)
        self._counted: list[_Shape] = previous._counted if previous is not None else []
        self.usage_dropped = 0
        self.collect_usage = collect_usage    # False without a control plane to ship to

    def add_listener(self, fn: Callable[[str, str], None]) -> None:
        """`fn(policy, decision)`: policy is `plan:<name>`."""
        self._listeners.append(fn)

    # -- who and which plan ---------------------------------------------------------------------

    def identify(self, request: Request) -> str | None:
        """The tenant id, or None when the client sent the identifying field twice."""
        if self._kind == "ip_address":
            peer = request.peer_ip
            return client_address(peer, request.getall("X-Forwarded-For"), self._trusted) \
                if peer else ANONYMOUS
        if self._kind == "client_cert":
            return _bounded(request.client_cert) if request.client_cert else ANONYMOUS
        values = request.getall(self._header)
        if not values:
            return ANONYMOUS
        if len(values) > 1:
            return None
        value = values[0]
        if not value:
            return ANONYMOUS
        return hash_api_key(value) if self._kind == "api_key" else _bounded(value)

    def plan_for(self, tenant: str) -> EffectivePlan | None:
        """The plan in force for `tenant` (None: unknown). Cached per tenant until the table
        changes or the tenant's override expires, so a request costs one dict lookup."""
        table = self.table
        if table.version != self._cache_version:
            self._cache.clear()
            self._cache_version = table.version
        cache = self._cache
        hit = cache.get(tenant)
        if hit is not None and (hit[1] == math.inf or self._clock.time() < hit[1]):
            return hit[0]
        entry = table.lookup(tenant)
        name: str | None = None
        ov: Override | None = None
        if entry is not None:
            name, ov = entry
        if name is None or name not in self._plans:
            name = self._assigned.get(tenant, self.cfg.default_plan)
        if name is None:
            eff = None
        elif ov is None:
            eff = self._base[name]
        else:
            eff = effective(self._plans[name], ov)
        if len(cache) > 65536:
            cache.clear()
        until = ov.expires_at if ov is not None and ov.expires_at is not None else math.inf
        cache[tenant] = (eff, until)
        return eff

    def _shape(self, plan: EffectivePlan, now: float) -> _Shape:
        shape = self._shapes.get(id(plan))
        if shape is None or shape.plan is not plan or not shape.start <= now < shape.until:
            if len(self._shapes) > 4096:
                self._shapes.clear()
            shape = self._shapes[id(plan)] = _Shape(plan, self.windows(plan, now),
                                                    self._fake_time)
        return shape

    def windows(self, plan: EffectivePlan, now: float) -> tuple[Window, ...]:
        out = []
        ws = self._windows
        for kind, _ in plan.quotas:
            w = ws.get(kind)
            if w is None or not (w.start <= now < w.end):
                w = ws[kind] = window_at(kind, now, self._tz)
            out.append(w)
        return tuple(out)

    # -- the hot path ---------------------------------------------------------------------------

    async def check(self, request: Request) -> LimitOutcome:
        tenant = self.identify(request)
        if tenant is None:
            return _duplicate(self._header)
        plan = self.plan_for(tenant)
        if plan is None:
            return self._unknown(tenant)
        if plan.unlimited:
            self._emit(plan, "allowed")
            return _UNLIMITED
        now = self._clock.time()
        shape = self._shape(plan, now)
        windows = shape.windows
        decision = "allowed"
        if self._redis is None:
            ok, tokens, counts = self.memory.take_now(tenant, plan, windows)
        else:
            try:
                ok, tokens, counts = await self._redis_take(tenant, shape)
            except StoreError:
                decision = "store_error"
                mode = self.cfg.on_store_error
                if mode == "allow":
                    self._emit(plan, decision)
                    return LimitOutcome(True, 200, (), b"", decision)
                if mode == "deny":
                    self._emit(plan, decision)
                    return _DENIED
                ok, tokens, counts = self.memory.take_now(tenant, plan, windows)
        if self.collect_usage:
            c = shape.counts.get(tenant)
            if c is None:
                if not shape.counts:
                    self._counted.append(shape)
                if len(shape.counts) >= USAGE_MAX_TENANTS:
                    self.usage_dropped += 1         # bounded between two shipments
                    c = [0, 0]
                else:
                    c = shape.counts[tenant] = [0, 0]
            c[0 if ok else 1] += 1
        if not ok:
            self._emit(plan, "limited")
            return self._rejected(tenant, shape, tokens, counts, now)
        self._emit(plan, decision)
        return LimitOutcome(True, 200, self._headers(shape, tokens, counts, now, True),
                            b"", decision)

    async def _redis_take(self, tenant: str,
                          shape: _Shape) -> tuple[bool, float, list[int]]:
        assert self._redis is not None
        prefix = "gw:tq:{" + tenant + "}:"
        keys = [prefix + "b"]
        for suffix in shape.suffixes:
            keys.append(prefix + suffix)
        args = shape.args
        args = [("" if not self._fake_time else str(round(self._clock.time() * 1e6))), *args]
        res = await self._redis.run_script(SCRIPT, SCRIPT_SHA, keys, args)
        return res[0] == 1, float(res[1]), [int(c) for c in res[2:]]

    def _emit(self, plan: EffectivePlan, decision: str) -> None:
        for fn in self._listeners:
            fn("plan:" + plan.name, decision)

    def usage(self) -> list[dict[str, Any]]:
        """Take the counts since the last call (the shipper's tenant section)."""
        counted, self._counted = self._counted, []
        known = set(self._assigned) | set(self.table.entries)
        rows = []
        for shape in counted:
            counts, shape.counts = shape.counts, {}
            name = shape.plan.name
            windows = [{"window": k, "id": i, "limit": lim} for k, i, lim in shape.usage_windows]
            for tenant, (admitted, rejected) in counts.items():
                rows.append((admitted + rejected, tenant, name, admitted, rejected, windows))
        rows.sort(key=lambda r: -r[0])
        out = []
        others = 0
        for _, tenant, plan, admitted, rejected, windows in rows:
            if tenant not in known:
                if others >= USAGE_TOP_N:
                    self.usage_dropped += 1
                    continue
                others += 1
            out.append({"tenant": tenant, "plan": plan, "admitted": admitted,
                        "rejected": rejected, "windows": windows})
        return out

    # -- answers --------------------------------------------------------------------------------

    def _headers(self, shape: _Shape, tokens: float, counts: list[int], now: float,
                 admitted: bool) -> tuple[tuple[str, str], ...]:
        """RateLimit-Policy with every policy of the plan, RateLimit for the one nearest."""
        plan, windows = shape.plan, shape.windows
        taken = 1 if admitted else 0
        best: tuple[int, int, str] | None = None
        if plan.rate > 0:
            left = max(0.0, tokens - taken)
            r = max(0, math.floor(left + EPSILON))
            short = plan.capacity - left
            t = math.ceil(short / plan.rate - EPSILON) if short > EPSILON else 0
            best = (r, t, f'"{plan.name}"')
        for (kind, limit), w, n in zip(plan.quotas, windows, counts):
            r = max(0, limit - n - taken)
            t = max(0, math.ceil(w.end - now))
            if best is None or r < best[0] or (r == best[0] and t > best[1]):
                best = (r, t, f'"{plan.name}-{kind}"')
        headers = [("RateLimit-Policy", shape.policy_header)]
        if best is not None:
            headers.append(("RateLimit", f"{best[2]};r={best[0]};t={best[1]}"))
        return tuple(headers)

    def _rejected(self, tenant: str, shape: _Shape, tokens: float, counts: list[int],
                  now: float) -> LimitOutcome:
        plan, windows = shape.plan, shape.windows
        spent = [(kind, limit, w, n) for (kind, limit), w, n in zip(plan.quotas, windows, counts)
                 if n + 1 > limit]
        headers = self._headers(shape, tokens, counts, now, False)
        if spent:
            # the window that resets last decides when the request can pass
            kind, limit, w, n = max(spent, key=lambda s: s[2].end)
            retry = max(1, math.ceil(w.end - now - EPSILON))
            body = problem_body(
                429, f"tenant {tenant!r} has used its {_ADJ[kind]} quota of {limit} requests; it "
                     f"resets at {rfc3339(w.end, self._tz)}", QUOTA_EXCEEDED,
                tenant=tenant, window=kind, limit=limit, current_usage=n,
                quota_reset=rfc3339(w.end, self._tz), plan=plan.name,
                **_violated([f"{plan.name}-{s[0]}" for s in spent]))
        else:
            wait = (1 - tokens) / plan.rate if plan.rate > 0 else 1.0
            retry = max(1, math.ceil(wait - EPSILON))
            body = problem_body(
                429, f"tenant {tenant!r} exceeds the rate of plan {plan.name!r}; retry in "
                     f"{retry} s", QUOTA_EXCEEDED, tenant=tenant, window="rate", plan=plan.name,
                **_violated([plan.name]))
        return LimitOutcome(False, 429, (("Content-Type", PROBLEM_CONTENT_TYPE),
                                         ("Retry-After", str(retry)), *headers), body, "limited")

    def _unknown(self, tenant: str) -> LimitOutcome:
        if tenant == ANONYMOUS:
            detail = f"the request names no tenant (field {self._header or self._kind})"
        else:
            detail = f"unknown tenant {tenant!r}"
        return LimitOutcome(False, 403, (("Content-Type", PROBLEM_CONTENT_TYPE),),
                            problem_body(403, detail), "unknown_tenant")


def _violated(names: list[str]) -> dict[str, Any]:
    return {"violated-policies": names}


def _workers() -> int:
    try:
        return int(os.environ.get("GATEWAY_WORKERS", "") or 1)
    except ValueError:
        return 1


_ADJ = {"day": "daily", "week": "weekly", "month": "monthly"}

_UNLIMITED = LimitOutcome(True, 200, (), b"", "allowed")

_DENIED = LimitOutcome(
    False, 503, (("Content-Type", PROBLEM_CONTENT_TYPE), ("Retry-After", "1")),
    problem_body(503, "the tenant quota store is unavailable", REDUCED_CAPACITY), "store_error")


def _duplicate(field: str) -> LimitOutcome:
    return LimitOutcome(
        False, 400, (("Content-Type", PROBLEM_CONTENT_TYPE),),
        problem_body(400, f"more than one {field} field: it names the tenant, so it must "
                          f"appear at most once"), "refused")
