"""SLO history: the attainment of every closed period, kept in the store (`slo_history`).

Two kinds of rows per SLO, written by the evaluator once their period has closed:

* `day`: a snapshot at the end of each UTC day of the SLO window ending there (rolling: the
  last `window`; calendar: the week or month to date): events, bad events, attainment (good /
  total; None without traffic), the error budget left, and whether the objective was met (a day
  without traffic counts as met). The dashboard's burn-down is drawn from these, and the
  reports' "time in SLO" is the share of days met.
* `period`: for calendar SLOs, each closed week or month as a whole.

A pass writes every period closed since the last row (at most BACKFILL_S back, and not before
the SLO was created), so missed passes are caught up and restarts write nothing twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.control.domain import slo as slo_mod
from gateway.control.domain.slo import SLO, Counts

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store

DAY_S = 86_400
BACKFILL_S = 35 * DAY_S
KINDS = ("day", "period")

CountFn = Callable[[float, float], Counts]


def row(s: SLO, kind: str, start: float, end: float, counts: Counts, now: float
        ) -> dict[str, Any]:
    attainment = 1.0 - counts.bad / counts.total if counts.total else None
    b = slo_mod.budget(counts, s.objective)
    remaining = b.remaining_fraction if math.isfinite(b.remaining_fraction) else None
    met = attainment is None or attainment * 100.0 >= s.objective - 1e-9
    return {"slo_id": s.id, "kind": kind, "period_start": start, "period_end": end,
            "service": s.service, "sli": s.sli, "objective": s.objective,
            "total": counts.total, "bad": counts.bad, "attainment": attainment,
            "budget_remaining": remaining, "met": int(met), "closed_at": now}


def window_start(s: SLO, end: float) -> float:
    """Where the SLO window that ends at `end` starts."""
    if s.calendar:
        return slo_mod.period(s, end - 1e-3)[0]
    return end - s.window_s


def close_periods(store: Store, s: SLO, created_at: float, now: float, counts: CountFn
                  ) -> int:
    """Record every period of `s` closed by `now` and not yet recorded; return how many."""
    floor = max(created_at, now - BACKFILL_S)
    written = 0
    last = store.slos.last_slo_history(s.id, "day")
    day_end = (last + DAY_S) if last is not None else (math.floor(floor / DAY_S) + 1) * DAY_S
    while day_end <= now:
        start = window_start(s, day_end)
        written += store.slos.add_slo_history(row(s, "day", start, day_end,
                                             counts(start, day_end), now))
        day_end += DAY_S
    if s.calendar:
        last = store.slos.last_slo_history(s.id, "period")
        start, end = slo_mod.period(s, last if last is not None else floor)
        if last is None and start < floor:        # the first period: only a whole one
            start, end = slo_mod.period(s, end)
        while end <= now:
            written += store.slos.add_slo_history(row(s, "period", start, end, counts(start, end),
                                                 now))
            start, end = slo_mod.period(s, end)
    return written
