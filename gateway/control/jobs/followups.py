"""Alerts besides burn rates, checked by every evaluation pass (database thread).

* Error-budget consumption: when an SLO has consumed one of its `budget_alerts`
  percentages (default 50 and 90; 90 and above page, below ticket) of the error budget of its
  current period, one alert per threshold and period (dedup key `<slo>:budget<pct>:<period
  start>`); a higher threshold's alert supersedes (resolves) the lower one's. A consumption
  page waits while a burn-rate page of the same SLO is open (one outage, one page). Periods: the
  calendar week or month of a calendar SLO; for a rolling window, consecutive windows of its
  length counted from the Unix epoch (a rolling window has no period of its own, and this keeps
  "once per period" to at most one alert per window length). A period with fewer than the SLO's
  `min_events` events raises nothing. Alerts of a past period resolve themselves.
  These never open incidents: spending budget is a planning matter, a burn is the emergency.
* A gateway that stops reporting: no batch for 3 ship intervals (its interval is that of its
  last batch) raises `gateway-silent:<gateway id>` (ticket), once per silence; its next batch
  resolves it, and so may an operator (a gateway taken out of service).
* An overdue post-mortem action item (open past its due date) raises
  `action-item:<id>:overdue` (ticket); completing the item resolves it (actionitems.py).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from gateway.control.domain import alerts
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.alerts import Event
from gateway.control.domain.slo import SLO, Counts
from gateway.control.store import Store

ACTOR = "evaluator"
PAGE_AT_PCT = 90.0        # consumption alerts at or above this percentage page
SILENT_INTERVALS = 3
SILENT_PREFIX = "gateway-silent:"
SILENT_SERVICE = "gateways"


def consumption_period(s: SLO, now: float) -> tuple[float, float]:
    """The period whose budget the consumption alerts watch."""
    if s.calendar:
        return slo_mod.period(s, now)
    start = math.floor(now / s.window_s) * s.window_s
    return float(start), float(start + s.window_s)


def _key(s: SLO, pct: float, start: float) -> str:
    return f"{s.id}:budget{pct:g}:{int(start)}"


def budget_consumption(store: Store, s: SLO, counts: Counts, start: float, end: float,
                       now: float) -> list[Event]:
    """Raise the consumption alerts of `s` due for its period [start, end) holding `counts`;
    resolve those of earlier periods or superseded."""
    events: list[Event] = []
    current = {_key(s, pct, start) for pct in s.budget_alerts}
    for old in store.alerts.open_alerts_with_prefix(f"{s.id}:budget"):
        if old["dedup_key"] not in current:
            events.append(alerts.resolve(store, old, ACTOR, "SLO period ended", now))
    if not s.budget_alerts or counts.total < max(1, s.min_events):
        return events
    b = slo_mod.budget(counts, s.objective)
    reached = [pct for pct in s.budget_alerts if b.consumed_fraction * 100 >= pct - 1e-9]
    if not reached:
        return events
    pct = reached[-1]                      # the highest reached: lower ones are implied
    if any(store.alerts.any_alert(_key(s, p, start)) for p in s.budget_alerts if p >= pct):
        return events                      # raised already in this period
    if pct >= PAGE_AT_PCT and store.alerts.open_slo_alert(f"{s.id}:page") is not None:
        return events                      # the burn-rate page covers it; raised once it clears
    key = _key(s, pct, start)
    with store.transaction():
        alert = alerts.raise_alert(
            store, dedup_key=key, source="budget", service=s.service,
            severity="page" if pct >= PAGE_AT_PCT else "ticket",
            title=f"{s.name}: {pct:g} % of the error budget consumed",
            description=(f"SLO {s.name} ({s.objective:g}% {s.sli} of {s.service}) has "
                         f"consumed {b.consumed_fraction:.1%} of the error budget of the "
                         f"period that ends {alerts_time(end)} ({b.bad} bad of {b.total} "
                         f"events)."),
            labels={"alertname": "SLOErrorBudgetConsumed", "slo": s.id,
                    "threshold": f"{pct:g}%"},
            details={"consumed_fraction": b.consumed_fraction, "period_start": start,
                     "period_end": end, "threshold_pct": pct},
            now=now, slo_id=s.id)
        store.audit.record(ACTOR, "create", f"alert/{alert['id']}",
                    f"{pct:g} % of the error budget consumed", {"dedup_key": key}, at=now)
        for lower in s.budget_alerts:
            prev = store.alerts.open_slo_alert(_key(s, lower, start)) if lower < pct else None
            if prev is not None:
                events.append(alerts.resolve(store, prev, ACTOR,
                                             f"superseded by the {pct:g} % alert", now))
    events.append(Event("firing", alert))
    return events


def alerts_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def silent_gateways(store: Store, now: float) -> list[Event]:
    """Alert on gateways silent for SILENT_INTERVALS ship intervals; resolve on their return."""
    events: list[Event] = []
    seen: set[str] = set()
    # every open silence alert in one query (a fleet has hundreds of gateways: one query per
    # gateway kept the database thread, and ingest behind it, busy for a fifth of a second)
    open_alerts = {a["dedup_key"]: a for a in
                   store.alerts.open_alerts_with_prefix(SILENT_PREFIX)}   # the newest per key
    for gateway_id, last_seen, interval_s in store.fleet.gateway_intervals():
        seen.add(gateway_id)
        if not interval_s or interval_s <= 0:
            continue
        key = f"{SILENT_PREFIX}{gateway_id}"
        open_alert = open_alerts.get(key)
        silent_s = now - last_seen
        if silent_s > SILENT_INTERVALS * interval_s:
            started = store.alerts.last_started_at(key)
            if open_alert is None and (started is None or started <= last_seen):
                # (once per silence: one resolved by hand, e.g. for a gateway taken out of
                # service, is not raised again until the gateway has reported in between)
                with store.transaction():
                    alert = alerts.raise_alert(
                        store, dedup_key=key, source="gateway", service=SILENT_SERVICE,
                        severity="ticket",
                        title=f"gateway {gateway_id} stopped reporting",
                        description=(f"No batch from gateway {gateway_id} for {silent_s:.0f} s "
                                     f"({SILENT_INTERVALS} ship intervals of {interval_s:g} s); "
                                     f"its traffic is missing from signals and SLOs."),
                        labels={"alertname": "GatewaySilent", "gateway_id": gateway_id},
                        details={"last_seen": last_seen, "interval_s": interval_s},
                        now=now)
                    store.audit.record(ACTOR, "create", f"alert/{alert['id']}",
                                "gateway stopped reporting", {"dedup_key": key}, at=now)
                events.append(Event("firing", alert))
        elif open_alert is not None:
            events.append(alerts.resolve(store, open_alert, ACTOR, "gateway reporting again",
                                         now))
    for old in open_alerts.values():
        if old["dedup_key"].removeprefix(SILENT_PREFIX) not in seen:
            events.append(alerts.resolve(store, old, ACTOR, "gateway forgotten (retention)",
                                         now))
    return events


def overdue_action_items(store: Store, now: float) -> list[Event]:
    """One alert per action item that is open past its due date."""
    events: list[Event] = []
    for item in store.incidents.action_items(status="open", due_before=now):
        if item["overdue_alert_id"] is not None:
            continue
        inc = store.incidents.incident(item["incident_id"])
        service = inc["affected_service"] if inc else SILENT_SERVICE
        key = f"action-item:{item['id']}:overdue"
        with store.transaction():
            alert = alerts.raise_alert(
                store, dedup_key=key, source="action_item", service=service,
                severity="ticket",
                title=f"action item {item['id']} of {item['incident_id']} is overdue "
                      f"({item['owner']})",
                description=(f"{item['description']} (owner {item['owner']}, priority "
                             f"{item['priority']}, due {alerts_time(item['due_at'])})"),
                labels={"alertname": "ActionItemOverdue", "incident_id": item["incident_id"],
                        "owner": item["owner"], "priority": item["priority"]},
                details={"action_item_id": item["id"], "due_at": item["due_at"]}, now=now)
            store.incidents.update_action_item(item["id"], {"overdue_alert_id": alert["id"]})
            store.incidents.add_timeline(item["incident_id"], now, "action_item", ACTOR,
                               f"action item {item['id']} overdue: {item['description']}",
                               {"action_item_id": item["id"], "alert_id": alert["id"]})
            store.audit.record(ACTOR, "create", f"alert/{alert['id']}", "action item overdue",
                        {"dedup_key": key}, at=now)
        events.append(Event("firing", alert))
    return events
