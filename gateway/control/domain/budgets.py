"""Cost budgets, pure maths: money, calendar periods, thresholds, forecasts, usage status.

No IO and no clock of its own: every function takes `now` (unix seconds) where time matters.

Money is integers only. Internally micro-dollars (1 USD = 1_000_000 micros); budgets are set in
cents (1 cent = 10_000 micros); reports show cents (rounded half-even) and dollars (an exact decimal
string with 6 places). Prices and thresholds are parsed as `Decimal` from their text (a YAML float
such as 0.000001 is read back through its shortest repr, `'1e-06'`), and products are taken as
`Fraction`s, so no binary-float drift ever reaches a sum.

Periods are calendar periods in the budget's time zone (IANA name, default UTC): daily from local
midnight, weekly from Monday 00:00 local, monthly from the 1st 00:00 local. DST changes make a
local day 23 or 25 hours long; that is what `period_bounds` returns.

Thresholds are fractions of the effective amount (the amount, or an active emergency override if it
is higher). A threshold t is crossed when spend >= amount * t (exact integer comparison). Severity:
t < 0.9 info, 0.9 <= t < 1.0 warning, t >= 1.0 critical.
Usage status (for a weekly budget review): >= 100 % OVER_BUDGET, >= 90 % HIGH_USAGE,
>= 75 % MODERATE_USAGE, else LOW_USAGE.

Forecast: linear extrapolation of the period's spend so far, forecast = actual * period_length /
elapsed (integer floor), offered once at least `FORECAST_MIN_ELAPSED` (10 %) of the period has
passed (before that, one expensive minute would forecast a month of it); None otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway import validation as valid

MICROS_PER_DOLLAR = 1_000_000
MICROS_PER_CENT = 10_000
PERIODS = ("daily", "weekly", "monthly")
MODES = ("enforce", "shadow")
DEFAULT_THRESHOLDS: tuple[Decimal, ...] = (Decimal("0.8"), Decimal("0.9"), Decimal("1.0"))
MAX_THRESHOLD = Decimal(10)
MAX_AMOUNT_CENTS = 10 ** 13          # 100 billion dollars; keeps micros far inside int64
FORECAST_MIN_ELAPSED = Fraction(1, 10)
ALL_SERVICES = "*"


class MoneyError(ValueError):
    """A price or amount cannot be read exactly."""


# ---------------------------------------------------------------------------------------------
# Money


def decimal_of(value: Any) -> Decimal:
    """An exact Decimal from a YAML/JSON number or a decimal string. Floats go through their
    shortest repr (0.000001 -> Decimal('0.000001')), never through their binary expansion."""
    if isinstance(value, bool):
        raise MoneyError(f"must be a number or a decimal string, got {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MoneyError(f"must be finite, got {value!r}")
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise MoneyError(f"must be a decimal number, got {value!r}") from None
        if not d.is_finite():
            raise MoneyError(f"must be finite, got {value!r}")
        return d
    raise MoneyError(f"must be a number or a decimal string, got {value!r}")


def round_half_even(x: Fraction) -> int:
    """The nearest integer; ties to even (banker's rounding: no bias across many rows)."""
    return round(x)


def micros_of_dollars(value: Any) -> int:
    """USD (number or decimal string) -> micro-dollars; must be exact to the micro-dollar."""
    d = decimal_of(value) * MICROS_PER_DOLLAR
    if d != d.to_integral_value():
        raise MoneyError(f"has more than 6 decimal places (micro-dollars), got {value!r}")
    return int(d)


def cents_of_micros(micros: int) -> int:
    return round_half_even(Fraction(micros, MICROS_PER_CENT))


def dollars_of_micros(micros: int) -> str:
    """An exact decimal string, e.g. 1_000_000 -> '1.000000'."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_DOLLAR)
    return f"{sign}{whole}.{frac:06d}"


def money(micros: int) -> dict[str, Any]:
    """The three views of an amount that reports carry."""
    return {"micros": micros, "cents": cents_of_micros(micros),
            "dollars": dollars_of_micros(micros)}


def percent(numerator_micros: int, denominator_micros: int) -> float:
    """numerator / denominator * 100, rounded half-even to 2 places (exact until the rounding)."""
    if denominator_micros <= 0:
        return 0.0
    q = Decimal(numerator_micros * 100) / Decimal(denominator_micros)
    return float(q.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


# ---------------------------------------------------------------------------------------------
# Periods


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin')") \
            from None


def _period_start_date(d: date, period: str) -> date:
    if period == "daily":
        return d
    if period == "weekly":
        return d - timedelta(days=d.weekday())     # Monday
    return d.replace(day=1)


def _next_start_date(start: date, period: str) -> date:
    if period == "daily":
        return start + timedelta(days=1)
    if period == "weekly":
        return start + timedelta(days=7)
    return date(start.year + (start.month == 12), start.month % 12 + 1, 1)


def _midnight(d: date, tz: ZoneInfo) -> int:
    # fold=0: in the (theoretical) case of a repeated local midnight, the first one
    return int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp())


def period_bounds(period: str, now: float, tz: str | ZoneInfo = "UTC") -> tuple[int, int]:
    """[start, end) in unix seconds of the calendar period containing `now`."""
    z = zone(tz) if isinstance(tz, str) else tz
    local = datetime.fromtimestamp(now, z).date()
    start = _period_start_date(local, period)
    s, e = _midnight(start, z), _midnight(_next_start_date(start, period), z)
    if now < s:  # a local midnight that does not exist (skipped by DST): roll back a period
        prev = _period_start_date(start - timedelta(days=1), period)
        s, e = _midnight(prev, z), s
    return s, e


def day_boundaries(since: int, until: int, tz: str | ZoneInfo = "UTC") -> list[int]:
    """Local midnights m with since < m < until, ascending (the cuts of a group_by=day report)."""
    z = zone(tz) if isinstance(tz, str) else tz
    out: list[int] = []
    d = datetime.fromtimestamp(since, z).date() + timedelta(days=1)
    while True:
        m = _midnight(d, z)
        if m >= until:
            return out
        if m > since:
            out.append(m)
        d += timedelta(days=1)


def day_label(t: int, tz: str | ZoneInfo = "UTC") -> str:
    z = zone(tz) if isinstance(tz, str) else tz
    return datetime.fromtimestamp(t, z).date().isoformat()


# ---------------------------------------------------------------------------------------------
# Linear allocation of a cost over a time span (fixed monthly fees, imported charges)


def allocated(total: int, start: int, end: int, t: int) -> int:
    """The part of `total` accrued by time t when it accrues linearly over [start, end).
    floor() of a monotone function: the parts of adjacent intervals telescope, so however a window
    is cut (by day, by route, not at all) the parts add up to the same integer."""
    if end <= start:                        # an instant charge: all of it at `start`
        return total if t > start else 0
    if t <= start:
        return 0
    if t >= end:
        return total
    return (total * (t - start)) // (end - start)


def share(total: int, start: int, end: int, a: int, b: int) -> int:
    """The part of `total` accrued in [a, b)."""
    return allocated(total, start, end, b) - allocated(total, start, end, a)


# ---------------------------------------------------------------------------------------------
# Thresholds, status, forecast


def severity(threshold: Decimal) -> str:
    if threshold >= 1:
        return "critical"
    if threshold >= Decimal("0.9"):
        return "warning"
    return "info"


def reached(spend_micros: int, amount_micros: int, threshold: Decimal) -> bool:
    """spend >= amount * threshold, exactly."""
    f = Fraction(threshold)
    return spend_micros * f.denominator >= amount_micros * f.numerator


def usage_status(spend_micros: int, amount_micros: int) -> str:
    if spend_micros >= amount_micros:
        return "OVER_BUDGET"
    if spend_micros * 10 >= amount_micros * 9:
        return "HIGH_USAGE"
    if spend_micros * 4 >= amount_micros * 3:
        return "MODERATE_USAGE"
    return "LOW_USAGE"


def forecast(actual_micros: int, start: int, end: int, now: float) -> int | None:
    """Linear end-of-period spend: actual * (end - start) / elapsed, floored; None while less
    than FORECAST_MIN_ELAPSED of the period has passed."""
    length = end - start
    elapsed = Fraction(min(max(now, start), end)) - start
    if length <= 0 or elapsed < FORECAST_MIN_ELAPSED * length:
        return None
    return math.floor(actual_micros * Fraction(length) / elapsed)


# ---------------------------------------------------------------------------------------------
# Budget definitions (control.yaml `budgets:` and the API bodies share this parser)


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    name: str
    service: str                              # "*" = all services
    period: str                               # daily | weekly | monthly
    amount_cents: int
    thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS
    forecast_thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS
    timezone: str = "UTC"
    enforce: bool = False
    mode: str = "enforce"                     # enforce | shadow (only logs)

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "service": self.service, "period": self.period,
                "amount_cents": self.amount_cents,
                "thresholds": [float(t) for t in self.thresholds],
                "forecast_thresholds": [float(t) for t in self.forecast_thresholds],
                "timezone": self.timezone, "enforce": self.enforce, "mode": self.mode}


BUDGET_KEYS = {"name", "service", "period", "amount_cents", "thresholds", "forecast_thresholds",
               "timezone", "enforce", "mode"}
MAX_NAME = 200
MAX_SERVICE = 256


def _thresholds(value: Any, path: str, errs: valid.Errors) -> tuple[Decimal, ...] | None:
    if not isinstance(value, list):
        errs.add(path, "must be a list of fractions such as [0.8, 0.9, 1.0]")
        return None
    out: list[Decimal] = []
    for i, v in enumerate(value):
        try:
            d = decimal_of(v)
        except MoneyError as exc:
            errs.add(f"{path}[{i}]", str(exc))
            continue
        if not 0 < d <= MAX_THRESHOLD:
            errs.add(f"{path}[{i}]", f"must be > 0 and <= {MAX_THRESHOLD}, got {v!r}")
            continue
        out.append(d.normalize())
    if len(out) > 20:
        errs.add(path, "at most 20 thresholds")
        return None
    return tuple(sorted(set(out)))


def parse_budget(doc: Any, path: str = "", *, base: BudgetSpec | None = None
                 ) -> tuple[BudgetSpec | None, list[str]]:
    """Validate a budget mapping; (spec, []) or (None, every `path.key: message`).
    With `base`, missing keys keep base's values (a PUT may send only what changes)."""
    def p(k: str) -> str:
        return f"{path}.{k}" if path else k
    errs = valid.Errors()
    cur: dict[str, Any] = {} if base is None else {
        "name": base.name, "service": base.service, "period": base.period,
        "amount_cents": base.amount_cents, "thresholds": base.thresholds,
        "forecast_thresholds": base.forecast_thresholds, "timezone": base.timezone,
        "enforce": base.enforce, "mode": base.mode}
    if not isinstance(doc, dict):     # a request body has no path of its own
        errs.add(path or "body", f"must be a mapping, got {valid.kind(doc)}")
        return None, errs.lines
    valid.mapping(doc, path, errs, BUDGET_KEYS)
    for key in ("name", "period", "amount_cents"):
        if key not in doc and key not in cur:
            errs.add(p(key), "is required")
    parsed: dict[str, Any] = {}
    if "name" in doc:
        parsed["name"] = valid.string(doc["name"], p("name"), errs, maximum=MAX_NAME)
    if "service" in doc:
        parsed["service"] = ALL_SERVICES if doc["service"] is None else \
            valid.string(doc["service"], p("service"), errs, maximum=MAX_SERVICE)
    if "period" in doc:
        parsed["period"] = valid.choice(doc["period"], p("period"), errs, PERIODS)
    if "amount_cents" in doc:
        parsed["amount_cents"] = valid.integer(doc["amount_cents"], p("amount_cents"), errs,
                                               minimum=1, maximum=MAX_AMOUNT_CENTS)
    thresholds_given = "thresholds" in doc
    if thresholds_given:
        parsed["thresholds"] = _thresholds(doc["thresholds"], p("thresholds"), errs)
    if "forecast_thresholds" in doc:
        parsed["forecast_thresholds"] = _thresholds(doc["forecast_thresholds"],
                                                    p("forecast_thresholds"), errs)
    elif thresholds_given and parsed["thresholds"] is not None and base is None:
        parsed["forecast_thresholds"] = parsed["thresholds"]     # by default, the same list
    if "timezone" in doc:
        tz = valid.string(doc["timezone"], p("timezone"), errs)
        if tz is not None:
            try:
                zone(tz)
                parsed["timezone"] = tz
            except ValueError as exc:
                errs.add(p("timezone"), str(exc))
    if "enforce" in doc:
        parsed["enforce"] = valid.boolean(doc["enforce"], p("enforce"), errs)
    if "mode" in doc:
        parsed["mode"] = valid.choice(doc["mode"], p("mode"), errs, MODES)
    if errs.lines:
        return None, errs.lines
    cur.update(parsed)
    cur.setdefault("service", ALL_SERVICES)
    return BudgetSpec(**cur), []
