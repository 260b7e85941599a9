"""SLO reports from the rollups: the stored SLOs, their event counts per window (`Counter`) and
the error budget report (`budget_report`), shared by the evaluator, the API and /metrics."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gateway.control.domain import histogram, rollup
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.slo import SLO, Counts

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store

log = logging.getLogger("gateway.control.evaluator")


def load_slos(store: Store) -> list[SLO]:
    out = []
    for row in store.slos.slo_docs():
        try:
            out.append(slo_mod.slo_from_doc(row["doc"]))
        except ValueError:
            log.exception("stored SLO is invalid", extra={"slo": row["id"]})
    return out


class Counter:
    """Event counts of one SLO from the rollups, caching per-bucket latency counts for a pass."""

    def __init__(self, store: Store, slo: SLO, now: float) -> None:
        self.store = store
        self.slo = slo
        self.now = now
        self.route = slo.route or rollup.TOTAL
        self._hist_cache: dict[tuple[int, int], tuple[int, int]] = {}

    def counts(self, since: float, until: float) -> Counts:
        total = Counts()
        for win_s, first, end in slo_mod.plan(since, until, self.now):
            total = total + self._piece(win_s, first, end)
        return total

    def window(self, seconds: int) -> Counts:
        """Events of the burn-rate window of `seconds` (complete minutes: slo.burn_window)."""
        return self.counts(*slo_mod.burn_window(self.now, seconds))

    def _piece(self, win_s: int, first: int, end: float) -> Counts:
        s = self.slo
        if s.sli == "availability":
            requests, e5xx, limited = self.store.rollups.sli_sums(win_s, s.service, self.route, first,
                                                          end)
            return Counts(requests, e5xx + (limited if s.count_429 else 0))
        assert s.threshold_ms is not None
        threshold_us = s.threshold_ms * 1000.0
        total = bad = 0
        for bucket_start, blob in self.store.rollups.sli_hists(win_s, s.service, self.route, first, end):
            key = (win_s, bucket_start)
            cached = self._hist_cache.get(key)
            if cached is None:
                h = histogram.decode_trusted(blob)
                n = int(h.total_count)
                cached = (n, n - slo_mod.good_below(h, threshold_us))
                self._hist_cache[key] = cached
            total += cached[0]
            bad += cached[1]
        return Counts(total, bad)


def budget_report(store: Store, slo: SLO, now: float, counter: Counter | None = None
                  ) -> dict[str, Any]:
    """`GET /v1/error-budgets` for one SLO: budget over its window, burn rates, exhaustion."""
    c = counter or Counter(store, slo, now)
    start, end = slo_mod.period(slo, now)
    counts = c.counts(start, now)
    b = slo_mod.budget(counts, slo.objective)
    windows = {name: c.window(sec) for name, sec in slo_mod.BURN_WINDOWS.items()}
    burns = {name: slo_mod.burn_rate(w, slo.objective) for name, w in windows.items()}
    window_s = (end - start) if slo.calendar else slo.window_s
    return {
        "slo_id": slo.id, "name": slo.name, "service": slo.service, "route": slo.route,
        "sli": slo.sli, "objective": slo.objective,
        "window": {"name": slo.window, "type": "calendar" if slo.calendar else "rolling",
                   "timezone": slo.timezone, "since": start,
                   "until": end if slo.calendar else now, "seconds": window_s},
        "events": {"total": b.total, "bad": b.bad, "good": b.total - b.bad},
        "allowed_bad": b.allowed_bad,
        "consumed": b.bad,
        "consumed_fraction": b.consumed_fraction if b.consumed_fraction != float("inf") else None,
        "remaining_fraction": b.remaining_fraction if b.remaining_fraction != float("-inf")
        else None,
        "remaining_events": b.remaining_events,
        "burn_rates": burns,
        "events_by_window": {name: {"total": w.total, "bad": w.bad,
                                    **_span(slo_mod.burn_window(now, slo_mod.BURN_WINDOWS[name]))}
                             for name, w in windows.items()},
        "time_to_exhaustion_s": slo_mod.time_to_exhaustion(
            b.remaining_fraction, window_s, burns["1h"]),
        "burn_rate_basis": "1h",
    }


def _span(window: tuple[int, int]) -> dict[str, int]:
    return {"since": window[0], "until": window[1], "seconds": window[1] - window[0]}
