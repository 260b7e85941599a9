"""The SLO evaluator: error budgets and burn rates from the rollups, alerts, incident upkeep.

`Evaluator(store).evaluate(now)` is one synchronous pass (tests call it directly with simulated
times; the app runs it on the database thread every `evaluation_interval_s`):

1. fold queued latency histograms into the rollups (rollup.compact), so the counts are complete;
2. per SLO: events over each burn-rate window (5m ... 3d: exactly that long, of complete minutes,
   see slo.burn_window) and the SLO window, from the rollup buckets (slo.plan: coarse buckets in
   the middle, 1m at the edges);
3. per SLO and tier (page, ticket): raise an alert when a rule fires and none is open for
   `<slo>:<tier>` (and the last one resolved more than `cooldown_s` ago); update the open one
   while it fires; resolve it once every rule's short window is back under its threshold.
   A ticket is not raised while a page of the same SLO is open (the page covers it);
4. a new page alert opens an incident (or joins the open one of its service and cause,
   `slo-<sli>`), with the severity from the SLI's 5-minute error ratio;
5. incidents.tick: escalations and breaker openings onto incident timelines.

It returns the alert events (firing/resolved) for the notifier; it never waits on the network.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.control import alerts, followups, histogram, history, incidents, rollup
from gateway.control import slo as slo_mod
from gateway.control.alerts import Event
from gateway.control.slo import SLO, Counts
from gateway.control.store import Store

log = logging.getLogger("gateway.control.evaluator")

ACTOR = "evaluator"


def load_slos(store: Store) -> list[SLO]:
    out = []
    for row in store.slo_docs():
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
            requests, e5xx, limited = self.store.sli_sums(win_s, s.service, self.route, first,
                                                          end)
            return Counts(requests, e5xx + (limited if s.count_429 else 0))
        assert s.threshold_ms is not None
        threshold_us = s.threshold_ms * 1000.0
        total = bad = 0
        for bucket_start, blob in self.store.sli_hists(win_s, s.service, self.route, first, end):
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


class Evaluator:
    """One evaluation pass at a time, on the store's thread. See the module docstring."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.passes = 0
        self.last_pass_at: float | None = None

    def evaluate(self, now: float) -> list[Event]:
        rollup.compact(self.store)
        events: list[Event] = []
        for s in load_slos(self.store):
            try:
                events.extend(self._evaluate_slo(s, now))
            except Exception:
                log.exception("SLO evaluation failed", extra={"slo": s.id})
            try:
                events.extend(self._follow_up_slo(s, now))
            except Exception:
                log.exception("SLO follow-up failed", extra={"slo": s.id})
        for check in (followups.silent_gateways, followups.overdue_action_items):
            try:
                events.extend(check(self.store, now))
            except Exception:
                log.exception("follow-up check failed", extra={"check": check.__name__})
        for incident_id in incidents.tick(self.store, now):
            inc = self.store.incident(incident_id)
            if inc is not None:
                events.append(incidents.event("escalated", inc))
        self.passes += 1
        self.last_pass_at = now
        return events

    def _follow_up_slo(self, s: SLO, now: float) -> list[Event]:
        """The SLO's closed periods into its history; error-budget consumption alerts of the
        current period."""
        counter = Counter(self.store, s, now)
        row = self.store.slo_doc(s.id)
        history.close_periods(self.store, s, row["created_at"] if row else now, now,
                              counter.counts)
        start, end = followups.consumption_period(s, now)
        return followups.budget_consumption(self.store, s, counter.counts(start, now), start,
                                            end, now)

    def _evaluate_slo(self, s: SLO, now: float) -> list[Event]:
        counter = Counter(self.store, s, now)
        windows = {name: counter.window(sec) for name, sec in slo_mod.BURN_WINDOWS.items()}
        rules = slo_mod.firing_rules(s, windows)
        events: list[Event] = []
        for tier in slo_mod.TIERS:
            tier_rules = [r for r in rules if r["tier"] == tier]
            if not tier_rules:
                continue
            key = f"{s.id}:{tier}"
            firing = [r for r in tier_rules if r["firing"]]
            current = self.store.open_slo_alert(key)
            if current is not None:
                details = dict(current["details"])
                details["rules"] = tier_rules
                details["fired_rules"] = sorted(set(details.get("fired_rules", [])) |
                                                {_rule_name(r) for r in firing})
                details["max_burn"] = max([details.get("max_burn", 0.0)] +
                                          [r["short_burn"] for r in firing])
                if not firing and all(r["short_clear"] for r in tier_rules):
                    self.store.update_slo_alert(current["id"], {"details": details})
                    events.append(alerts.resolve(self.store, current, ACTOR,
                                                 "burn rate back under the threshold", now))
                else:
                    self.store.update_slo_alert(current["id"], {"details": details,
                                                                "updated_at": now})
                    if firing and current["incident_id"]:
                        incidents.raise_severity(
                            self.store, current["incident_id"],
                            slo_mod.incident_severity(windows["5m"].error_ratio),
                            f"5-minute error ratio {windows['5m'].error_ratio:.1%}", now)
                continue
            if not firing:
                continue
            if tier == "ticket" and self.store.open_slo_alert(f"{s.id}:page") is not None:
                continue
            last = self.store.last_resolved_at(key)
            if last is not None and now - last < s.cooldown_s:
                continue
            events.extend(self._raise(s, tier, tier_rules, firing, windows, now))
        return events

    def _raise(self, s: SLO, tier: str, tier_rules: list[dict[str, Any]],
               firing: list[dict[str, Any]], windows: dict[str, Counts], now: float
               ) -> list[Event]:
        top = max(firing, key=lambda r: r["long_burn"])
        what = "error budget" if s.sli == "availability" else "latency budget"
        title = (f"{s.name}: {what} burning {top['long_burn']:.1f}x "
                 f"({top['long_window']}/{top['short_window']} > {top['threshold']:.3g}x)")
        description = (f"SLO {s.name} ({s.objective:g}% {s.sli} of {s.service}"
                       f"{'/' + s.route if s.route else ''} over {s.window}): burn rate "
                       f"{top['long_burn']:.2f} over {top['long_window']} and "
                       f"{top['short_burn']:.2f} over {top['short_window']}; at this rate the "
                       f"budget of the window lasts {s.window_s / top['long_burn'] / 3600:.1f} h.")
        error_rate_5m = windows["5m"].error_ratio
        details = {"rules": tier_rules, "fired_rules": sorted({_rule_name(r) for r in firing}),
                   "max_burn": max(r["short_burn"] for r in firing),
                   "error_rate_5m": error_rate_5m,
                   "burn_rates": {n: slo_mod.burn_rate(c, s.objective)
                                  for n, c in windows.items()}}
        labels = {"alertname": "SLOBurnRate", "slo": s.id, "sli": s.sli, "tier": tier}
        if s.route:
            labels["route"] = s.route
        with self.store.transaction():
            alert = alerts.raise_alert(self.store, dedup_key=f"{s.id}:{tier}", source="slo",
                                       service=s.service, severity=tier, title=title,
                                       description=description, labels=labels, details=details,
                                       now=now, slo_id=s.id)
            self.store.audit(ACTOR, "create", f"alert/{alert['id']}", "burn-rate rule fired",
                             {"dedup_key": alert["dedup_key"],
                              "rules": details["fired_rules"]}, at=now)
            incident = None
            if tier == "page":
                incident = incidents.on_page_alert(
                    self.store, alert, cause=f"slo-{s.sli}",
                    severity=slo_mod.incident_severity(error_rate_5m),
                    context={"slo": s.id, "error_rate_5m": error_rate_5m,
                             "burn_rates": details["burn_rates"]}, now=now)
        alert = self.store.slo_alert(alert["id"]) or alert
        out = [Event("firing", alert, incident)]
        if incident is not None and incidents.opened_by(incident, alert):
            out.append(incidents.event("opened", incident))
        return out


def _span(window: tuple[int, int]) -> dict[str, int]:
    return {"since": window[0], "until": window[1], "seconds": window[1] - window[0]}


def _rule_name(rule: dict[str, Any]) -> str:
    return f"{rule['long_window']}/{rule['short_window']}"
