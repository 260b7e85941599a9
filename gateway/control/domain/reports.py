"""Reliability KPIs of one service over a calendar period (UTC): `GET /v1/reports/{service}`.

* incidents: those declared in the period, by severity and by status;
* MTTA: mean time from declaration to acknowledgement, over those acknowledged;
* MTTR: mean time from declaration to resolution, over those resolved;
* time in SLO: per SLO of the service, the share of the period's closed days whose SLO window
  met the objective (from the SLO history's daily snapshots), with the attainment of the period
  itself when the SLO's own calendar period matches and has closed;
* action items of those incidents: open, overdue, done.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gateway.control.domain import incidents as incidents_mod

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store

PERIODS = ("day", "week", "month")
MAX_INCIDENTS = 100_000


def period_bounds(period: str, at: float) -> tuple[float, float]:
    """[start, end) of the UTC calendar day / week (Monday) / month containing `at`."""
    d = datetime.fromtimestamp(at, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = d, d + timedelta(days=1)
    elif period == "week":
        start = d - timedelta(days=d.weekday())
        end = start + timedelta(days=7)
    else:
        start = d.replace(day=1)
        end = (start.replace(year=start.year + 1, month=1) if start.month == 12
               else start.replace(month=start.month + 1))
    return start.timestamp(), end.timestamp()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def report(store: Store, service: str, period: str, at: float, now: float) -> dict[str, Any]:
    since, until = period_bounds(period, at)
    incs = [i for i in store.incidents.query(service=service, limit=MAX_INCIDENTS)
            if since <= i["created_at"] < until]
    by_sev = {sev: 0 for sev in incidents_mod.SEVERITIES}
    by_status = {st: 0 for st in incidents_mod.STATUSES}
    for i in incs:
        by_sev[i["severity"]] = by_sev.get(i["severity"], 0) + 1
        by_status[i["status"]] = by_status.get(i["status"], 0) + 1
    tta = [i["acknowledged_at"] - i["created_at"] for i in incs if i["acknowledged_at"]]
    ttr = [i["resolved_at"] - i["created_at"] for i in incs if i["resolved_at"]]
    items = [a for i in incs for a in store.incidents.action_items(incident_id=i["id"])]
    slos = []
    for row in store.slos.slo_docs():
        if row["service"] != service:
            continue
        days = store.slos.slo_history(slo_id=row["id"], kind="day", since=since, until=until)
        met = sum(1 for d in days if d["met"])
        whole = [p for p in store.slos.slo_history(slo_id=row["id"], kind="period", since=since,
                                              until=until)
                 if p["period_start"] == since and p["period_end"] == until]
        slos.append({
            "slo_id": row["id"], "objective": row["doc"]["objective"], "sli": row["doc"]["sli"],
            "days": len(days), "days_in_slo": met,
            "time_in_slo": met / len(days) if days else None,
            "period_attainment": whole[0]["attainment"] if whole else None,
            "period_met": whole[0]["met"] if whole else None,
        })
    return {
        "service": service, "generated_at": now,
        "period": {"name": period, "since": since, "until": until,
                   "complete": until <= now},
        "incidents": {"total": len(incs), "by_severity": by_sev, "by_status": by_status,
                      "ids": [i["id"] for i in sorted(incs, key=lambda i: i["created_at"])]},
        "mtta_s": _mean(tta), "acknowledged": len(tta),
        "mttr_s": _mean(ttr), "resolved": len(ttr),
        "slos": slos,
        "action_items": {"total": len(items),
                         "open": sum(a["status"] == "open" for a in items),
                         "overdue": sum(a["status"] == "open" and a["due_at"] < now
                                        for a in items),
                         "done": sum(a["status"] == "done" for a in items)},
    }
