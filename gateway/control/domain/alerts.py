"""Alerts: burn-rate alerts raised by the evaluator and alerts made by hand; ack and resolve.

An alert is open while `firing` or `acknowledged`, then `resolved`. Its dedup key is
`<slo id>:<tier>` for burn-rate alerts (at most one open alert per key: it is updated, never
raised twice) and `manual:<service>:<title>` (or the key given) for hand-made ones. Burn-rate
alerts resolve themselves (see evaluator.py); hand-made ones are resolved by hand.

Functions here take the Store and run on the database thread; they return `Event`s that the app
hands to the notifier (notify.py) after the store work is done.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store


SEVERITIES = ("info", "ticket", "page")
STATUSES = ("firing", "acknowledged", "resolved")
MAX_TITLE = 300         # characters of an alert's or an incident's title
MAX_TEXT = 10_000       # characters of a description or a note


@dataclass(frozen=True, slots=True)
class Event:
    """Something a notifier may tell the world: `firing` or `resolved`, with the alert doc."""

    kind: str
    alert: dict[str, Any]
    incident: dict[str, Any] | None = field(default=None)


class AlertError(Exception):
    """A request the alert lifecycle refuses: `status` 404/409 and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex digits identifying the label set (stable across restarts, like Alertmanager's)."""
    text = "\x00".join(f"{k}\x01{v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def doc(alert: dict[str, Any]) -> dict[str, Any]:
    """The API shape of a stored alert."""
    return {k: alert[k] for k in ("id", "dedup_key", "source", "slo_id", "service", "severity",
                                  "status", "title", "description", "labels", "details",
                                  "fingerprint", "started_at", "updated_at", "acknowledged_at",
                                  "acknowledged_by", "resolved_at", "incident_id")}


def raise_alert(store: Store, *, dedup_key: str, source: str, service: str, severity: str,
                title: str, description: str, labels: dict[str, str], details: dict[str, Any],
                now: float, slo_id: str | None = None) -> dict[str, Any]:
    """Insert a new firing alert and return it (the caller checked dedup and cooldown)."""
    labels = {**labels, "severity": severity, "service": service}
    alert_id = store.alerts.insert_slo_alert({
        "dedup_key": dedup_key, "source": source, "slo_id": slo_id, "service": service,
        "severity": severity, "status": "firing", "title": title, "description": description,
        "labels": labels, "details": details, "fingerprint": fingerprint(labels),
        "started_at": now, "updated_at": now})
    alert = store.alerts.slo_alert(alert_id)
    assert alert is not None
    return alert


def acknowledge(store: Store, alert_id: int, actor: str, reason: str, now: float
                ) -> dict[str, Any]:
    with store.transaction():
        alert = store.alerts.slo_alert(alert_id)
        if alert is None:
            raise AlertError(404, f"no alert {alert_id}")
        if alert["status"] != "firing":
            raise AlertError(409, f"alert {alert_id} is {alert['status']}, not firing")
        store.alerts.update_slo_alert(alert_id, {"status": "acknowledged", "acknowledged_at": now,
                                          "acknowledged_by": actor, "updated_at": now})
        store.audit.record(actor, "ack", f"alert/{alert_id}", reason, {"dedup_key": alert["dedup_key"]},
                    at=now)
        if alert["incident_id"]:
            store.incidents.add_timeline(alert["incident_id"], now, "alert", actor,
                               f"alert {alert_id} acknowledged: {alert['title']}",
                               {"alert_id": alert_id})
    out = store.alerts.slo_alert(alert_id)
    assert out is not None
    return out


def resolve(store: Store, alert: dict[str, Any], actor: str, reason: str, now: float
            ) -> Event:
    """Resolve an open alert (by the evaluator or by hand); audited; timeline of its incident."""
    with store.transaction():
        store.alerts.update_slo_alert(alert["id"], {"status": "resolved", "resolved_at": now,
                                             "updated_at": now})
        store.audit.record(actor, "resolve", f"alert/{alert['id']}", reason,
                    {"dedup_key": alert["dedup_key"]}, at=now)
        if alert["incident_id"]:
            store.incidents.add_timeline(alert["incident_id"], now, "alert", actor,
                               f"alert {alert['id']} resolved: {alert['title']}",
                               {"alert_id": alert["id"]})
    out = store.alerts.slo_alert(alert["id"])
    assert out is not None
    return Event("resolved", out)
