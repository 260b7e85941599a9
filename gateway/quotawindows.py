"""Calendar windows for tenant quotas: days, weeks (starting Monday) and months in a time zone.

A quota window is a calendar period, not a fixed number of seconds: a day in `Europe/Berlin` runs
from local midnight to the next local midnight, which is 23 hours on the day clocks spring forward
and 25 on the day they fall back; a month runs from the 1st to the 1st. Every function here is
pure (time in, bounds out): the unix instant comes from the caller's Clock, so tests step a
FakeClock across DST changes, month ends and leap days.

Local midnight is looked up with `zoneinfo`; a midnight that does not exist or exists twice (zones
that change their clocks at midnight) resolves to the first instant of the local date (fold 0 of
the datetime that follows the gap: `ZoneInfo` normalises it forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WINDOWS = ("day", "week", "month")


@dataclass(frozen=True, slots=True)
class Window:
    """One calendar window: [start, end) as unix seconds, and a stable id for keys and storage."""

    kind: str        # day | week | month
    id: str          # "2026-03-29", "2026-W13" (ISO week), "2026-03"
    start: float
    end: float

    @property
    def length_s(self) -> int:
        """The window's real length in seconds (a Berlin day: 82800, 86400 or 90000)."""
        return round(self.end - self.start)


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The ZoneInfo for an IANA name. ValueError naming it when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'UTC' or "
                         f"'Europe/Berlin')") from exc


def _midnight(d: date, tz: ZoneInfo) -> float:
    """Unix time of the first instant of local date `d`."""
    local = datetime(d.year, d.month, d.day, tzinfo=tz)
    # A midnight inside a gap: round-trip through UTC moves it to the first real instant.
    utc = local.astimezone(UTC)
    back = utc.astimezone(tz)
    if back.date() < d:  # fold ambiguity resolved to the earlier date: step into d
        utc += timedelta(hours=1)
    return utc.timestamp()


def _start_date(kind: str, d: date) -> date:
    if kind == "day":
        return d
    if kind == "week":
        return d - timedelta(days=d.weekday())          # Monday
    if kind == "month":
        return d.replace(day=1)
    raise ValueError(f"unknown window {kind!r} (one of {', '.join(WINDOWS)})")


def _next_date(kind: str, start: date) -> date:
    if kind == "day":
        return start + timedelta(days=1)
    if kind == "week":
        return start + timedelta(days=7)
    if start.month == 12:
        return date(start.year + 1, 1, 1)
    return date(start.year, start.month + 1, 1)


def _window_id(kind: str, start: date) -> str:
    if kind == "day":
        return start.isoformat()
    if kind == "week":
        y, w, _ = start.isocalendar()
        return f"{y}-W{w:02d}"
    return f"{start.year}-{start.month:02d}"


def window_at(kind: str, now: float, tz: ZoneInfo) -> Window:
    """The `kind` window containing unix time `now` in zone `tz`."""
    d = datetime.fromtimestamp(now, tz).date()
    start = _start_date(kind, d)
    s = _midnight(start, tz)
    if s > now:  # only where midnight is skipped and `now` is before the first real instant
        start = _start_date(kind, d - timedelta(days=1))
        s = _midnight(start, tz)
    nxt = _next_date(kind, start)
    return Window(kind=kind, id=_window_id(kind, start), start=s, end=_midnight(nxt, tz))


def rfc3339(ts: float, tz: ZoneInfo) -> str:
    """`ts` as an RFC 3339 timestamp with the zone's offset at that instant."""
    dt = datetime.fromtimestamp(round(ts), tz)
    text = dt.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
