"""Calendar windows (gateway/quotawindows.py): a FakeClock stepped across DST changes, month
ends, leap days and week starts."""

from __future__ import annotations

from datetime import datetime

import pytest

from gateway.quotawindows import rfc3339, window_at, zone
from tests.fakes import FakeClock

BERLIN = zone("Europe/Berlin")
UTC = zone("UTC")


def _utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_berlin_spring_forward_day_has_23_hours():
    # 2026-03-29: 02:00 CET -> 03:00 CEST. Midnight is 23:00 UTC the day before.
    clock = FakeClock(wall=_utc(2026, 3, 28, 22, 59, 59))
    w = window_at("day", clock.time(), BERLIN)
    assert w.id == "2026-03-28"
    clock.advance(1)
    w = window_at("day", clock.time(), BERLIN)
    assert w.id == "2026-03-29" and w.start == _utc(2026, 3, 28, 23)
    assert w.end == _utc(2026, 3, 29, 22) and w.length_s == 23 * 3600
    assert rfc3339(w.end, BERLIN) == "2026-03-30T00:00:00+02:00"
    clock.advance(23 * 3600 - 1)
    assert window_at("day", clock.time(), BERLIN).id == "2026-03-29"
    clock.advance(1)
    assert window_at("day", clock.time(), BERLIN).id == "2026-03-30"


def test_berlin_fall_back_day_has_25_hours():
    # 2026-10-25: 03:00 CEST -> 02:00 CET.
    clock = FakeClock(wall=_utc(2026, 10, 24, 22))
    w = window_at("day", clock.time(), BERLIN)
    assert w.id == "2026-10-25" and w.length_s == 25 * 3600
    assert w.end == _utc(2026, 10, 25, 23)
    clock.advance(25 * 3600 - 1)
    assert window_at("day", clock.time(), BERLIN).id == "2026-10-25"
    clock.advance(1)
    w = window_at("day", clock.time(), BERLIN)
    assert w.id == "2026-10-26" and w.length_s == 24 * 3600
    assert rfc3339(w.start, BERLIN) == "2026-10-26T00:00:00+01:00"


def test_month_ends_and_leap_day():
    w = window_at("month", _utc(2028, 2, 29, 12), UTC)
    assert (w.id, w.start, w.end) == ("2028-02", _utc(2028, 2, 1), _utc(2028, 3, 1))
    assert w.length_s == 29 * 86400
    assert window_at("month", _utc(2027, 2, 28, 23, 59, 59), UTC).length_s == 28 * 86400
    leap = window_at("day", _utc(2028, 2, 29, 0), UTC)
    assert leap.id == "2028-02-29" and leap.end == _utc(2028, 3, 1)
    dec = window_at("month", _utc(2026, 12, 31, 23, 59, 59), UTC)
    assert dec.id == "2026-12" and dec.end == _utc(2027, 1, 1)
    assert window_at("month", _utc(2027, 1, 1), UTC).id == "2027-01"
    # A Berlin month that contains the fall-back day is one hour longer than its days * 24 h.
    oct_ = window_at("month", _utc(2026, 10, 15), BERLIN)
    assert oct_.length_s == 31 * 86400 + 3600
    assert rfc3339(oct_.end, BERLIN) == "2026-11-01T00:00:00+01:00"


def test_weeks_start_on_monday():
    # 2026-12-04 is a Friday; its week began Monday 2026-11-30.
    w = window_at("week", _utc(2026, 12, 4, 12), UTC)
    assert w.id == "2026-W49" and w.start == _utc(2026, 11, 30) and w.end == _utc(2026, 12, 7)
    assert window_at("week", _utc(2026, 12, 6, 23, 59, 59), UTC).id == "2026-W49"
    assert window_at("week", _utc(2026, 12, 7), UTC).id == "2026-W50"
    # A week that straddles a year: ISO week 53 of 2026 runs Mon 28 Dec .. Sun 3 Jan.
    y = window_at("week", _utc(2027, 1, 2), UTC)
    assert y.id == "2026-W53" and y.start == _utc(2026, 12, 28)
    # The Berlin week holding the spring change is 167 hours long.
    assert window_at("week", _utc(2026, 3, 27), BERLIN).length_s == 167 * 3600


def test_zone_names_are_validated():
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")
    with pytest.raises(ValueError):
        zone("../etc/passwd")
    assert rfc3339(_utc(2026, 1, 1), UTC) == "2026-01-01T00:00:00Z"
