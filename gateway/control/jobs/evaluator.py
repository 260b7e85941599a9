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

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.control.domain import alerts, history, incidents, rollup
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.alerts import Event
from gateway.control.domain.slo import SLO, Counts
from gateway.control.domain.sloreport import Counter, load_slos
from gateway.control.jobs import followups
from gateway.control.store import Database, Store

log = logging.getLogger("gateway.control.evaluator")

ACTOR = "evaluator"


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
            inc = self.store.incidents.incident(incident_id)
            if inc is not None:
                events.append(incidents.event("escalated", inc))
        self.passes += 1
        self.last_pass_at = now
        return events

    def _follow_up_slo(self, s: SLO, now: float) -> list[Event]:
        """The SLO's closed periods into its history; error-budget consumption alerts of the
        current period."""
        counter = Counter(self.store, s, now)
        row = self.store.slos.slo_doc(s.id)
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
            current = self.store.alerts.open_slo_alert(key)
            if current is not None:
                details = dict(current["details"])
                details["rules"] = tier_rules
                details["fired_rules"] = sorted(set(details.get("fired_rules", [])) |
                                                {_rule_name(r) for r in firing})
                details["max_burn"] = max([details.get("max_burn", 0.0)] +
                                          [r["short_burn"] for r in firing])
                if not firing and all(r["short_clear"] for r in tier_rules):
                    self.store.alerts.update_slo_alert(current["id"], {"details": details})
                    events.append(alerts.resolve(self.store, current, ACTOR,
                                                 "burn rate back under the threshold", now))
                else:
                    self.store.alerts.update_slo_alert(current["id"], {"details": details,
                                                                "updated_at": now})
                    if firing and current["incident_id"]:
                        incidents.raise_severity(
                            self.store, current["incident_id"],
                            slo_mod.incident_severity(windows["5m"].error_ratio),
                            f"5-minute error ratio {windows['5m'].error_ratio:.1%}", now)
                continue
            if not firing:
                continue
            if tier == "ticket" and self.store.alerts.open_slo_alert(f"{s.id}:page") is not None:
                continue
            last = self.store.alerts.last_resolved_at(key)
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
            self.store.audit.record(ACTOR, "create", f"alert/{alert['id']}", "burn-rate rule fired",
                             {"dedup_key": alert["dedup_key"],
                              "rules": details["fired_rules"]}, at=now)
            incident = None
            if tier == "page":
                incident = incidents.on_page_alert(
                    self.store, alert, cause=f"slo-{s.sli}",
                    severity=slo_mod.incident_severity(error_rate_5m),
                    context={"slo": s.id, "error_rate_5m": error_rate_5m,
                             "burn_rates": details["burn_rates"]}, now=now)
        alert = self.store.alerts.slo_alert(alert["id"]) or alert
        out = [Event("firing", alert, incident)]
        if incident is not None and incidents.opened_by(incident, alert):
            out.append(incidents.event("opened", incident))
        return out


def _rule_name(rule: dict[str, Any]) -> str:
    return f"{rule['long_window']}/{rule['short_window']}"


async def evaluation_loop(db: Database, interval_s: float,
                          run: Callable[[], Awaitable[Any]]) -> None:
    """`run` (one evaluation pass, then notifications) every `interval_s` on the replica that
    leads "evaluation"."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await db.leads("evaluation"):      # one replica evaluates (and pages)
                await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("SLO evaluation pass failed")
