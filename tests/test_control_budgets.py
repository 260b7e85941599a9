"""Budget maths (gateway/control/budgets.py): exact money, calendar periods, thresholds, forecasts."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import pytest

from gateway.control.domain import budgets as bm


def ts(*args: int, tz: str = "UTC") -> int:
    return int(datetime(*args, tzinfo=bm.zone(tz)).timestamp())


# ---------------------------------------------------------------------------------------------
# Money


def test_yaml_floats_are_read_through_their_decimal_text():
    assert bm.decimal_of(0.000001) == Decimal("0.000001")
    assert bm.decimal_of(0.1) + bm.decimal_of(0.2) == Decimal("0.3")   # not 0.30000000000000004
    assert bm.decimal_of("0.0000004") == Decimal("0.0000004")
    assert bm.micros_of_dollars("1") == 1_000_000
    assert bm.micros_of_dollars(0.000001) == 1
    assert bm.micros_of_dollars("-12.34") == -12_340_000
    with pytest.raises(bm.MoneyError):
        bm.micros_of_dollars("0.0000001")       # finer than a micro-dollar
    for bad in (True, "abc", float("nan"), None, "inf"):
        with pytest.raises(bm.MoneyError):
            bm.decimal_of(bad)


def test_a_million_micro_dollars_is_exactly_one_dollar():
    price = Fraction(bm.decimal_of(0.000001)) * bm.MICROS_PER_DOLLAR
    assert bm.round_half_even(1_000_000 * price) == 1_000_000
    assert bm.dollars_of_micros(1_000_000) == "1.000000"
    assert bm.cents_of_micros(1_000_000) == 100
    # the float way drifts: sum(0.000001 for a million) != 1.0
    assert sum(0.000001 for _ in range(1_000_000)) != 1.0


def test_money_views_and_rounding():
    assert bm.money(1_234_567) == {"micros": 1_234_567, "cents": 123, "dollars": "1.234567"}
    assert bm.dollars_of_micros(-5) == "-0.000005"
    assert bm.cents_of_micros(5_000) == 0 and bm.cents_of_micros(15_000) == 2   # half-even
    assert bm.percent(32_000, 50_000) == 64.0
    assert bm.percent(1, 3) == 33.33
    assert bm.percent(5, 0) == 0.0


# ---------------------------------------------------------------------------------------------
# Periods


def test_month_end_and_year_end():
    assert bm.period_bounds("monthly", ts(2024, 1, 31, 23, 59, 59)) == (ts(2024, 1, 1),
                                                                        ts(2024, 2, 1))
    assert bm.period_bounds("monthly", ts(2024, 2, 1)) == (ts(2024, 2, 1), ts(2024, 3, 1))
    assert bm.period_bounds("monthly", ts(2023, 12, 31, 12)) == (ts(2023, 12, 1), ts(2024, 1, 1))
    assert bm.period_bounds("daily", ts(2024, 4, 30, 23, 59, 59)) == (ts(2024, 4, 30),
                                                                      ts(2024, 5, 1))


def test_leap_day():
    feb29 = ts(2024, 2, 29, 12)
    assert bm.period_bounds("daily", feb29) == (ts(2024, 2, 29), ts(2024, 3, 1))
    s, e = bm.period_bounds("monthly", feb29)
    assert (s, e) == (ts(2024, 2, 1), ts(2024, 3, 1)) and e - s == 29 * 86_400
    s, e = bm.period_bounds("monthly", ts(2023, 2, 14))
    assert e - s == 28 * 86_400
    # Thursday 2024-02-29: the week runs Monday 26 Feb .. Monday 4 Mar
    assert bm.period_bounds("weekly", feb29) == (ts(2024, 2, 26), ts(2024, 3, 4))


def test_week_starts_on_monday_00_00():
    monday = ts(2024, 1, 8)
    assert bm.period_bounds("weekly", monday) == (monday, ts(2024, 1, 15))
    assert bm.period_bounds("weekly", monday - 1) == (ts(2024, 1, 1), monday)   # Sunday night
    assert bm.period_bounds("weekly", ts(2024, 1, 14, 23, 59)) == (monday, ts(2024, 1, 15))
    # a week across the year end
    assert bm.period_bounds("weekly", ts(2025, 1, 1)) == (ts(2024, 12, 30), ts(2025, 1, 6))


def test_time_zones():
    ny = "America/New_York"
    # 03:00 UTC on 1 March is still 29 February in New York: February's budget
    s, e = bm.period_bounds("monthly", ts(2024, 3, 1, 3), ny)
    assert (s, e) == (ts(2024, 2, 1, 5), ts(2024, 3, 1, 5))        # EST = UTC-5
    assert bm.period_bounds("monthly", ts(2024, 3, 1, 3)) == (ts(2024, 3, 1), ts(2024, 4, 1))
    # Kolkata (+05:30): the local day starts at 18:30 UTC the day before
    assert bm.period_bounds("daily", ts(2024, 5, 1, 12), "Asia/Kolkata") == (
        ts(2024, 4, 30, 18, 30), ts(2024, 5, 1, 18, 30))
    # DST: New York's 10 March 2024 has 23 hours, 3 November 2024 has 25
    s, e = bm.period_bounds("daily", ts(2024, 3, 10, 12, tz=ny), ny)
    assert e - s == 23 * 3_600 and s == ts(2024, 3, 10, 5)
    s, e = bm.period_bounds("daily", ts(2024, 11, 3, 12, tz=ny), ny)
    assert e - s == 25 * 3_600
    # the week containing the spring-forward Sunday is 167 hours long
    s, e = bm.period_bounds("weekly", ts(2024, 3, 10, 12, tz=ny), ny)
    assert e - s == 7 * 86_400 - 3_600 and s == ts(2024, 3, 4, tz=ny)
    with pytest.raises(ValueError):
        bm.zone("Mars/Olympus_Mons")


def test_day_boundaries_in_a_zone():
    tz = "Asia/Kolkata"
    cuts = bm.day_boundaries(ts(2024, 5, 1), ts(2024, 5, 3), tz)
    assert cuts == [ts(2024, 5, 1, 18, 30), ts(2024, 5, 2, 18, 30)]
    assert bm.day_label(ts(2024, 5, 1, 18, 30), tz) == "2024-05-02"


# ---------------------------------------------------------------------------------------------
# Allocation of spans


def test_linear_allocation_telescopes():
    total, start, end = 1_000_003, 0, 7 * 86_400 + 13
    cuts = [0, 1, 999, 86_400, 100_000, 3 * 86_400 + 7, end]
    parts = [bm.share(total, start, end, a, b) for a, b in itertools.pairwise(cuts)]
    assert sum(parts) == total
    assert bm.share(total, start, end, -100, end + 100) == total
    assert bm.share(500, 10, 10, 0, 11) == 500 and bm.share(500, 10, 10, 11, 20) == 0
    assert sum(bm.share(-700, 0, 3, t, t + 1) for t in range(3)) == -700   # credits too


# ---------------------------------------------------------------------------------------------
# Thresholds, status, forecast


def test_severity_bands():
    assert bm.severity(Decimal("0.8")) == "info"
    assert bm.severity(Decimal("0.89")) == "info"
    assert bm.severity(Decimal("0.9")) == "warning"
    assert bm.severity(Decimal("0.99")) == "warning"
    assert bm.severity(Decimal(1)) == "critical"
    assert bm.severity(Decimal("1.5")) == "critical"


def test_reached_is_exact():
    amount = 10_000          # 1 cent
    assert not bm.reached(7_999, amount, Decimal("0.8"))
    assert bm.reached(8_000, amount, Decimal("0.8"))
    assert bm.reached(amount, amount, Decimal("1.0"))
    assert not bm.reached(333, 1_000, Decimal("0.3333333"))
    assert bm.reached(333_334, 1_000_000, Decimal("0.333333"))


def test_usage_status_as_in_the_weekly_review():
    amount = 100_000
    assert bm.usage_status(0, amount) == "LOW_USAGE"
    assert bm.usage_status(74_999, amount) == "LOW_USAGE"
    assert bm.usage_status(75_000, amount) == "MODERATE_USAGE"
    assert bm.usage_status(89_999, amount) == "MODERATE_USAGE"
    assert bm.usage_status(90_000, amount) == "HIGH_USAGE"
    assert bm.usage_status(99_999, amount) == "HIGH_USAGE"
    assert bm.usage_status(100_000, amount) == "OVER_BUDGET"


def test_forecasts_against_hand_computed_values():
    start, end = bm.period_bounds("monthly", ts(2024, 4, 10))        # April: 30 days
    assert end - start == 30 * 86_400
    # 9 days in, $9 spent: $30 by the end of the month
    assert bm.forecast(9_000_000, start, end, ts(2024, 4, 10)) == 30_000_000
    # 7 days in, $1 spent: 30/7 = 4.285714285... -> floor
    assert bm.forecast(1_000_000, start, end, ts(2024, 4, 8)) == 4_285_714
    # half way through a day, 12 cents: 24 cents
    s, e = bm.period_bounds("daily", ts(2024, 4, 8, 12))
    assert bm.forecast(120_000, s, e, ts(2024, 4, 8, 12)) == 240_000
    # too early (under 10 % of the period): no forecast
    assert bm.forecast(1_000_000, start, end, ts(2024, 4, 3)) is None
    assert bm.forecast(1_000_000, start, end, start + 3 * 86_400) == 10_000_000   # exactly 10 %
    # after the end: the actual
    assert bm.forecast(5, start, end, end + 10) == 5


# ---------------------------------------------------------------------------------------------
# Definitions


def test_parse_budget_defaults_and_errors():
    spec, errors = bm.parse_budget({"name": "api", "period": "monthly", "amount_cents": 500000})
    assert errors == [] and spec is not None
    assert spec.service == "*" and spec.timezone == "UTC" and not spec.enforce
    assert spec.thresholds == (Decimal("0.8"), Decimal("0.9"), Decimal(1))
    assert spec.forecast_thresholds == spec.thresholds and spec.mode == "enforce"

    spec, errors = bm.parse_budget({"name": "x", "service": "svc", "period": "weekly",
                                    "amount_cents": 1, "thresholds": [1.0, 0.75, 0.9],
                                    "timezone": "Europe/Berlin", "enforce": True,
                                    "mode": "shadow"})
    assert errors == [] and spec is not None
    assert spec.thresholds == (Decimal("0.75"), Decimal("0.9"), Decimal(1))
    assert spec.forecast_thresholds == spec.thresholds

    _, errors = bm.parse_budget({"period": "yearly", "amount_cents": 1.5, "thresholds": [0, 2],
                                 "timezone": "Nowhere/City", "enforce": "yes", "mode": "x",
                                 "colour": "red"}, "budgets[3]")
    assert set(errors) == {
        "budgets[3].colour: unknown key",
        "budgets[3].name: is required",
        "budgets[3].period: must be one of daily, weekly, monthly, got 'yearly'",
        "budgets[3].amount_cents: must be an integer, got 1.5",
        "budgets[3].thresholds[0]: must be > 0 and <= 10, got 0",
        "budgets[3].timezone: unknown time zone 'Nowhere/City' (an IANA name such as "
        "'Europe/Berlin')",
        "budgets[3].enforce: must be true or false, got 'yes'",
        "budgets[3].mode: must be one of enforce, shadow, got 'x'",
    }


def test_parse_budget_partial_update_keeps_the_rest():
    base, _ = bm.parse_budget({"name": "a", "service": "s", "period": "daily",
                               "amount_cents": 100, "enforce": True,
                               "forecast_thresholds": [1.0]})
    assert base is not None
    new, errors = bm.parse_budget({"amount_cents": 250}, base=base)
    assert errors == [] and new is not None
    assert new.amount_cents == 250 and new.name == "a" and new.enforce
    assert new.forecast_thresholds == (Decimal(1),)


def test_period_boundaries_now_is_utc_aware():
    # sanity: the helper's timestamps are the UTC epoch
    assert ts(1970, 1, 1) == 0 and datetime.fromtimestamp(ts(2024, 2, 29), UTC).day == 29
