"""SLO definitions and error-budget maths: validation, burn rates, alert rules. Pure (no I/O).

An SLO (`slos:` in control.yaml, or `/v1/slos`; both go through `parse_slo`):

    name: checkout-availability     # also its id
    service: payment_service
    route: payments-api             # optional; default the service total
    objective: 99.9                 # percent of good events
    sli: availability               # availability | latency
    threshold_ms: 300               # latency only: good = faster than this
    count_429: false                # availability only: 429s are bad events too (default no)
    window: 30d                     # rolling 1h|1d|7d|28d|30d, or calendar week|month
    timezone: UTC                   # where calendar weeks/months start (zoneinfo name)
    min_events: 100                 # a burn-rate rule needs this many events in its long window
    cooldown_s: 600                 # after an alert resolves, the same alert is not raised again
                                    # for this long
    deploy_gate: {allow_above: 0.5, low_traffic_above: 0.2, critical_above: 0.05}
    budget_alerts: [50, 90]         # alert once per period at these percentages of the error
                                    # budget consumed (90 and above page, below ticket; [] none)

Definitions used throughout (Google SRE Workbook, "Alerting on SLOs"):

* events: availability counts every request (`request_count`) and, as bad, the 5xx (gateway-made
  502/503/504 included) plus the 429s when `count_429`; latency counts every recorded latency and,
  as bad, those not certainly faster than the threshold: a histogram bucket is good when its
  highest equivalent value is below the threshold (HDR, 2 significant digits: values within ~1 %
  of the threshold count as slow).
* error ratio = bad / total; burn rate = error ratio / (1 - objective); a burn rate of 1 spends
  exactly the budget over the SLO window.
* budget (events based): allowed_bad = (1 - objective) * total events in the SLO window (rolling:
  the last `window`; calendar: since the start of the current week/month in `timezone`);
  remaining_fraction = 1 - bad / allowed_bad (negative once overspent; 1 with no traffic).
* time to exhaustion = remaining_fraction * window_seconds / burn_rate(1h) (None when not burning).
* alert rules: (tier, long window, short window, budget fraction); threshold =
  budget_fraction * window_seconds / long_window_seconds (14.4, 6, 3, 1 for 30 days). A rule
  fires when both windows burn faster than the threshold and the long window holds at least
  `min_events`; rules whose long window is longer than the SLO window are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway import validation as valid

SLIS = ("availability", "latency")
ROLLING: dict[str, int] = {"1h": 3_600, "1d": 86_400, "7d": 7 * 86_400, "28d": 28 * 86_400,
                           "30d": 30 * 86_400}
CALENDAR: dict[str, int] = {"week": 7 * 86_400, "month": 30 * 86_400}  # nominal lengths
BURN_WINDOWS: dict[str, int] = {"5m": 300, "30m": 1_800, "1h": 3_600, "2h": 7_200,
                                "6h": 21_600, "1d": 86_400, "3d": 3 * 86_400}
TIERS = ("page", "ticket")
SEVERITY_RANK = {"info": 0, "ticket": 1, "page": 2}
DEFAULT_MIN_EVENTS = 100
DEFAULT_COOLDOWN_S = 600.0

KEYS = {"name", "service", "route", "objective", "sli", "threshold_ms", "count_429", "window",
        "timezone", "min_events", "cooldown_s", "deploy_gate", "description", "budget_alerts"}
GATE_KEYS = {"allow_above", "low_traffic_above", "critical_above"}


@dataclass(frozen=True, slots=True)
class Rule:
    """One multiwindow burn-rate rule of the SRE Workbook."""

    tier: str
    long: str
    short: str
    budget_fraction: float

    def threshold(self, window_s: int) -> float:
        return self.budget_fraction * window_s / BURN_WINDOWS[self.long]


RULES: tuple[Rule, ...] = (
    Rule("page", "1h", "5m", 0.02),
    Rule("page", "6h", "30m", 0.05),
    Rule("ticket", "1d", "2h", 0.10),
    Rule("ticket", "3d", "6h", 0.10),
)


@dataclass(frozen=True, slots=True)
class GateTiers:
    """Deploy-gate tiers on the remaining budget fraction (the error-budget policy)."""

    allow_above: float = 0.5          # > 50 %: deploy any time
    low_traffic_above: float = 0.2    # 20-50 %: low-traffic hours only
    critical_above: float = 0.05      # 5-20 %: critical fixes only; below: blocked


@dataclass(frozen=True, slots=True)
class SLO:
    name: str
    service: str
    objective: float                  # percent, 0 < objective < 100
    sli: str = "availability"
    route: str | None = None
    threshold_ms: float | None = None
    count_429: bool = False
    window: str = "30d"
    timezone: str = "UTC"
    min_events: int = DEFAULT_MIN_EVENTS
    cooldown_s: float = DEFAULT_COOLDOWN_S
    deploy_gate: GateTiers = field(default_factory=GateTiers)
    description: str = ""
    budget_alerts: tuple[float, ...] = (50.0, 90.0)   # percent of the budget consumed

    @property
    def id(self) -> str:
        return self.name

    @property
    def target(self) -> float:
        return self.objective / 100.0

    @property
    def budget_fraction(self) -> float:
        return budget_fraction(self.objective)

    @property
    def calendar(self) -> bool:
        return self.window in CALENDAR

    @property
    def window_s(self) -> int:
        """The window's (nominal, for calendar windows) length: scales the alert thresholds."""
        return CALENDAR.get(self.window) or ROLLING[self.window]

    def rules(self) -> list[tuple[Rule, float]]:
        """The burn-rate rules that apply to this SLO's window, with their thresholds."""
        return [(r, r.threshold(self.window_s)) for r in RULES
                if BURN_WINDOWS[r.long] <= self.window_s]

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id, "name": self.name, "service": self.service, "route": self.route,
            "objective": self.objective, "sli": self.sli, "window": self.window,
            "window_type": "calendar" if self.calendar else "rolling",
            "timezone": self.timezone, "min_events": self.min_events,
            "cooldown_s": self.cooldown_s, "description": self.description,
            "deploy_gate": {"allow_above": self.deploy_gate.allow_above,
                            "low_traffic_above": self.deploy_gate.low_traffic_above,
                            "critical_above": self.deploy_gate.critical_above},
        }
        doc["budget_alerts"] = list(self.budget_alerts)
        if self.sli == "latency":
            doc["threshold_ms"] = self.threshold_ms
        else:
            doc["count_429"] = self.count_429
        return doc


# ---------------------------------------------------------------------------------------------
# Validation (config and API alike)


def parse_slo(value: Any, path: str, errs: valid.Errors) -> SLO | None:
    """Validate one SLO definition; add `path.key: message` lines to errs; None if invalid."""
    n0 = len(errs.lines)
    m = valid.mapping(value, path, errs, KEYS, {"name", "service", "objective"})
    if m is None:
        return None
    p = f"{path}." if path else ""
    kw: dict[str, Any] = {}
    for key in ("name", "service"):
        if key in m:
            kw[key] = valid.name(m[key], f"{p}{key}", errs)
    if m.get("route") is not None:
        kw["route"] = valid.name(m["route"], f"{p}route", errs)
    if "objective" in m:
        obj = valid.number(m["objective"], f"{p}objective", errs)
        if obj is not None:
            if not 0 < obj < 100:
                errs.add(f"{p}objective", f"must be a percentage above 0 and below 100 "
                                          f"(e.g. 99.9), got {m['objective']!r}")
            elif obj <= 1:
                errs.add(f"{p}objective", f"is a percentage (e.g. 99.9), got {m['objective']!r}"
                                          f" (did you mean {obj * 100:g}?)")
            else:
                kw["objective"] = obj
    sli = m.get("sli", "availability")
    if sli not in SLIS:
        errs.add(f"{p}sli", f"must be one of {', '.join(SLIS)}, got {sli!r}")
    else:
        kw["sli"] = sli
    if sli == "latency":
        if "threshold_ms" not in m:
            errs.add(f"{p}threshold_ms", "is required for a latency SLI")
        else:
            kw["threshold_ms"] = valid.number(m["threshold_ms"], f"{p}threshold_ms", errs, minimum=0,
                                      exclusive_min=True, maximum=60_000)
        if "count_429" in m:
            errs.add(f"{p}count_429", "applies to availability SLIs only")
    else:
        if "threshold_ms" in m:
            errs.add(f"{p}threshold_ms", "applies to latency SLIs only")
        if "count_429" in m:
            kw["count_429"] = valid.boolean(m["count_429"], f"{p}count_429", errs)
    if "window" in m:
        w = m["window"]
        if not isinstance(w, str) or (w not in ROLLING and w not in CALENDAR):
            errs.add(f"{p}window", f"must be one of {', '.join([*ROLLING, *CALENDAR])} "
                                   f"(rolling or calendar), got {w!r}")
        else:
            kw["window"] = w
    if "timezone" in m:
        tz = valid.string(m["timezone"], f"{p}timezone", errs)
        if tz is not None:
            try:
                ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError):
                errs.add(f"{p}timezone", f"unknown time zone {tz!r} (e.g. UTC, Europe/Berlin)")
            else:
                kw["timezone"] = tz
    if "min_events" in m:
        kw["min_events"] = valid.integer(m["min_events"], f"{p}min_events", errs, minimum=0)
    if "cooldown_s" in m:
        kw["cooldown_s"] = valid.number(m["cooldown_s"], f"{p}cooldown_s", errs, minimum=0)
    if "description" in m:
        kw["description"] = valid.string(m["description"], f"{p}description", errs, nonempty=False)
    if "deploy_gate" in m:
        kw["deploy_gate"] = _parse_gate(m["deploy_gate"], f"{p}deploy_gate", errs)
    if "budget_alerts" in m:
        kw["budget_alerts"] = _parse_budget_alerts(m["budget_alerts"], f"{p}budget_alerts",
                                                   errs)
    if len(errs.lines) != n0 or any(v is None for k, v in kw.items() if k != "route"):
        return None
    return SLO(**kw)


def _parse_budget_alerts(value: Any, path: str, errs: valid.Errors) -> tuple[float, ...] | None:
    if not isinstance(value, list):
        errs.add(path, "must be a list of percentages of the error budget consumed, e.g. "
                       "[50, 90]")
        return None
    out = []
    for i, v in enumerate(value):
        pct = valid.number(v, f"{path}[{i}]", errs, minimum=0, exclusive_min=True, maximum=100)
        if pct is None:
            return None
        out.append(pct)
    if out != sorted(set(out)):
        errs.add(path, "must be ascending without repeats")
        return None
    return tuple(out)


def _parse_gate(value: Any, path: str, errs: valid.Errors) -> GateTiers | None:
    m = valid.mapping(value, path, errs, GATE_KEYS)
    if m is None:
        return None
    d = GateTiers()
    vals = {k: getattr(d, k) for k in GATE_KEYS}
    for key in GATE_KEYS & set(m):
        v = valid.number(m[key], f"{path}.{key}", errs, minimum=0, maximum=1)
        if v is None:
            return None
        vals[key] = v
    if not vals["allow_above"] >= vals["low_traffic_above"] >= vals["critical_above"]:
        errs.add(path, "must have allow_above >= low_traffic_above >= critical_above")
        return None
    return GateTiers(**vals)


def parse_slos(value: Any, path: str, errs: valid.Errors) -> tuple[SLO, ...] | None:
    """The `slos:` list: every item valid and names unique."""
    if value is None:
        return ()
    if not isinstance(value, list):
        errs.add(path, f"must be a list, got {valid.kind(value)}")
        return None
    out: list[SLO] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        slo = parse_slo(item, f"{path}[{i}]", errs)
        if slo is None:
            continue
        if slo.name in seen:
            errs.add(f"{path}[{i}].name", f"duplicate name {slo.name!r} (also {path}[{seen[slo.name]}])")
            continue
        seen[slo.name] = i
        out.append(slo)
    return tuple(out)


def slo_from_doc(doc: dict[str, Any]) -> SLO:
    """An SLO back from its stored `to_doc()` form (trusted)."""
    errs = valid.Errors()
    clean = {k: v for k, v in doc.items() if k in KEYS and v is not None}
    slo = parse_slo(clean, "", errs)
    if slo is None:
        raise ValueError("; ".join(errs.lines))
    return slo


# ---------------------------------------------------------------------------------------------
# Maths


@dataclass(frozen=True, slots=True)
class Counts:
    total: int = 0
    bad: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.total + other.total, self.bad + other.bad)

    @property
    def error_ratio(self) -> float:
        return self.bad / self.total if self.total else 0.0


def budget_fraction(objective: float) -> float:
    """1 - objective, without binary noise (99.9 -> 0.001 exactly as far as floats go)."""
    return round(1.0 - objective / 100.0, 12)


def burn_rate(counts: Counts, objective: float) -> float:
    """Error ratio over the budget fraction: 1.0 spends the budget exactly over the window."""
    return counts.error_ratio / budget_fraction(objective)


@dataclass(frozen=True, slots=True)
class Budget:
    total: int
    bad: int
    allowed_bad: float
    consumed_fraction: float
    remaining_fraction: float
    remaining_events: float


def budget(counts: Counts, objective: float) -> Budget:
    allowed = budget_fraction(objective) * counts.total
    if allowed > 0:
        consumed = round(counts.bad / allowed, 12)   # boundaries (e.g. 20 % left) stay exact
    else:
        consumed = 0.0 if counts.bad == 0 else math.inf
    return Budget(counts.total, counts.bad, allowed, consumed, round(1.0 - consumed, 12),
                  allowed - counts.bad)


def time_to_exhaustion(remaining_fraction: float, window_s: float, burn: float) -> float | None:
    """Seconds until the budget is gone at burn rate `burn` (None: not burning; 0: gone)."""
    if remaining_fraction <= 0:
        return 0.0
    if burn <= 0:
        return None
    return remaining_fraction * window_s / burn


def firing_rules(slo: SLO, windows: dict[str, Counts]) -> list[dict[str, Any]]:
    """Evaluate every rule of the SLO on per-window counts (keys of BURN_WINDOWS)."""
    out = []
    for rule, threshold in slo.rules():
        long_c, short_c = windows[rule.long], windows[rule.short]
        long_burn, short_burn = burn_rate(long_c, slo.objective), burn_rate(short_c, slo.objective)
        enough = long_c.total >= slo.min_events and long_c.total > 0
        out.append({"tier": rule.tier, "long_window": rule.long, "short_window": rule.short,
                    "threshold": threshold, "long_burn": long_burn, "short_burn": short_burn,
                    "long_events": long_c.total, "enough_events": enough,
                    "firing": enough and long_burn > threshold and short_burn > threshold,
                    "short_clear": short_burn <= threshold})
    return out


def incident_severity(error_rate: float) -> str:
    """Severity from the 5-minute error rate: > 50 % SEV-1, 25-50 % SEV-2,
    5-25 % SEV-3, otherwise SEV-4 (a page below 1 % is still an incident, the lowest)."""
    if error_rate > 0.50:
        return "SEV-1"
    if error_rate >= 0.25:
        return "SEV-2"
    if error_rate >= 0.05:
        return "SEV-3"
    return "SEV-4"


# ---------------------------------------------------------------------------------------------
# Windows and bucket plans


def period(slo: SLO, now: float) -> tuple[float, float]:
    """[start, end) of the SLO window containing `now` (rolling: [now - window, now])."""
    if not slo.calendar:
        return now - slo.window_s, now
    tz = ZoneInfo(slo.timezone)
    local = datetime.fromtimestamp(now, tz)
    if slo.window == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (start.replace(year=start.year + 1, month=1) if start.month == 12
               else start.replace(month=start.month + 1))
    else:
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        start = (day - timedelta(days=day.weekday()))
        start = start.replace(tzinfo=None).replace(tzinfo=tz)   # midnight local, right offset
        nxt = (start.replace(tzinfo=None) + timedelta(days=7)).replace(tzinfo=tz)
    # wall-clock arithmetic: re-attach the zone so DST changes give the right offsets
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    nxt = nxt.replace(tzinfo=None).replace(tzinfo=tz)
    return start.astimezone(UTC).timestamp(), nxt.astimezone(UTC).timestamp()


LEVELS = (86_400, 3_600, 300, 60)
RETENTION_S = {60: 86_400, 300: 7 * 86_400, 3_600: 30 * 86_400, 86_400: 365 * 86_400}


def burn_window(now: float, seconds: int) -> tuple[int, int]:
    """[since, until) of a burn-rate (or any "last N minutes") window at `now`: exactly `seconds`
    of complete buckets. Starting at the next whole minute and ending at `now` instead covered
    only 240-300 s of a "5m" window, and a burn rate then moved with the second hand when the
    traffic changed.

    The end is the start of the current, unfinished minute; for windows whose start lies past the
    1m rollups' retention (1d, 3d), the start of the current 5-minute bucket, so that the start
    falls on a bucket boundary `plan` can cover exactly instead of rounding it."""
    step = next((w for w in sorted(LEVELS) if seconds + w <= RETENTION_S[w]), LEVELS[0])
    until = int(now // step) * step
    return until - seconds, until


def plan(since: float, until: float, now: float,
         retention: dict[int, int] | None = None) -> list[tuple[int, int, float]]:
    """Cover [since, until) with rollup buckets, coarse in the middle and fine at the edges:
    (win_s, first bucket_start, end) pieces meaning `first <= bucket_start < end` at win_s.

    Minute resolution: the start is rounded up to a whole minute, the end is exclusive (the
    current, partly elapsed minute is included when `until` is now). Where a finer rollup is
    past its retention, the edge is rounded to the nearest whole coarser bucket instead."""
    keep = RETENTION_S if retention is None else retention
    a0 = math.ceil(since / 60.0) * 60
    out: list[tuple[int, int, float]] = []

    def cover(a: int, b: float, level: int) -> None:
        if a >= b:
            return
        w = LEVELS[level]
        if level == len(LEVELS) - 1:
            out.append((w, a, b))
            return
        first = -(-a // w) * w
        last = int(b // w) * w
        if first >= last:
            cover(a, b, level + 1)
            return
        finer = LEVELS[level + 1]
        left = a
        if a < first and a < now - keep[finer]:
            if first - a > w / 2:        # mostly inside: take the whole coarse bucket
                first -= w
            left = first
        out.append((w, first, last))
        cover(left, first, level + 1)
        cover(last, b, level + 1)

    cover(a0, until, 0)
    return sorted(out, key=lambda piece: piece[1])


def good_below(hist: Any, threshold_us: float) -> int:
    """Recorded values certainly faster than threshold_us: those in HDR buckets whose highest
    equivalent value is below it (the bucket holding the threshold counts as slow)."""
    if hist.total_count <= 0:
        return 0
    j = hist._counts_index_for(math.ceil(threshold_us))
    counts = memoryview(hist.counts).cast("B").cast("Q")
    return int(sum(counts[:max(0, min(j, len(counts)))]))
