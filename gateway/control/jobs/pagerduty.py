"""PagerDuty Events API v2 bodies for alerts and incidents.

    notifications:
      - name: pager
        format: pagerduty
        routing_key: "${PD_ROUTING_KEY}"     # the integration key of a PagerDuty service
        url: https://events.pagerduty.com/v2/enqueue   # the default
        min_severity: page

Actions: an alert firing, an incident opened or escalated -> `trigger`; acknowledged ->
`acknowledge`; resolved -> `resolve`. The `dedup_key` is stable per alert (`gateway/alert/<id>`)
and per incident (`gateway/incident/<id>`), so PagerDuty folds every event of one alert or
incident into one PagerDuty incident. `payload` (summary, source = the service, severity,
timestamp, component, group, class, custom_details) is sent with `trigger` only: the API
ignores it on the other actions.

Severity: page -> critical, ticket -> warning, info -> info; SEV-1 critical, SEV-2 error,
SEV-3 warning, SEV-4 info.
"""

from __future__ import annotations

from typing import Any

DEFAULT_URL = "https://events.pagerduty.com/v2/enqueue"
SEVERITY = {"page": "critical", "ticket": "warning", "info": "info",
            "SEV-1": "critical", "SEV-2": "error", "SEV-3": "warning", "SEV-4": "info"}
ACTION = {"firing": "trigger", "opened": "trigger", "escalated": "trigger",
          "acknowledged": "acknowledge", "resolved": "resolve"}
SUMMARY_MAX = 1024            # the API's limit on payload.summary


def dedup_key(alert: dict[str, Any]) -> str:
    """Stable per alert or incident (`alert` is the alert doc, or an incident's alert form)."""
    if alert.get("source") == "incident":
        return f"gateway/incident/{alert['id']}"
    return f"gateway/alert/{alert['id']}"


def body(routing_key: str, kind: str, alert: dict[str, Any], timestamp: str) -> dict[str, Any]:
    """The Events API v2 body of one event (`kind` as in alerts.Event)."""
    action = ACTION[kind]
    out: dict[str, Any] = {"routing_key": routing_key, "event_action": action,
                           "dedup_key": dedup_key(alert)}
    if action != "trigger":
        return out
    details = {"description": alert["description"], "status": alert["status"],
               "labels": alert["labels"], "event": kind}
    if alert.get("incident_id"):
        details["incident_id"] = alert["incident_id"]
    burns = alert.get("details", {}).get("burn_rates")
    if burns:
        details["burn_rates"] = burns
    out["payload"] = {
        "summary": alert["title"][:SUMMARY_MAX],
        "source": alert["service"],
        "severity": SEVERITY.get(alert["severity"], "warning"),
        "timestamp": timestamp,
        "component": alert["service"],
        "group": alert["labels"].get("slo") or alert["labels"].get("cause") or alert["service"],
        "class": alert["labels"].get("alertname", "alert"),
        "custom_details": details,
    }
    out["client"] = "gateway control plane"
    return out
