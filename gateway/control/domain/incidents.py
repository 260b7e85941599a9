"""Incidents: declaration, lifecycle, escalation, timeline, post-mortems.

* Ids `INC-YYYY-NNN` (UTC year of declaration, per-year sequence).
* Status: investigating -> acknowledged -> mitigated -> resolved (forward only; `resolve` from
  any open status; needs `resolution_notes` and `root_cause`).
* Severity SEV-1..SEV-4 (the words critical/major/minor/info are accepted as aliases).
* Escalation: while nobody has acknowledged it, the escalation level rises by one each time the
  response time of its severity passes (SEV-1 15 min, SEV-2 1 h, SEV-3 4 h, SEV-4 1 business
  day = the same time on the next weekday, UTC); `escalate` raises it by hand.
* Timeline: declaration, status changes, escalations, linked alerts, breaker openings of the
  service's upstreams, notes.
* Post-mortem: required for SEV-1 and SEV-2, due 48 h after resolution; recorded with
  `POST /v1/incidents/{id}/postmortem` (or inside the resolve request).
* Page alerts open an incident (one open incident per service and cause) or join the open one.

Functions take the Store (database thread) and audit every change.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gateway import validation as valid
from gateway.control.domain.alerts import MAX_TEXT, Event, fingerprint

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store

SEVERITIES = ("SEV-1", "SEV-2", "SEV-3", "SEV-4")
ALIASES = {"critical": "SEV-1", "major": "SEV-2", "minor": "SEV-3", "info": "SEV-4"}
STATUSES = ("investigating", "acknowledged", "mitigated", "resolved")
RESPONSE_S = {"SEV-1": 15 * 60, "SEV-2": 3_600, "SEV-3": 4 * 3_600}   # SEV-4: 1 business day
POSTMORTEM_REQUIRED = ("SEV-1", "SEV-2")
POSTMORTEM_DUE_S = 48 * 3_600
MAX_ESCALATION = 10
MAX_ASSIGNEE = 200                # characters of the name an incident is assigned to
BREAKER_LOOKBACK_S = 900          # breaker openings this long before declaration join too


class IncidentError(Exception):
    """A request the lifecycle refuses: `status` 400/404/409 and a `field: message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def response_deadline(severity: str, start: float) -> float:
    """When the response time of `severity`, counted from `start`, passes."""
    if severity in RESPONSE_S:
        return start + RESPONSE_S[severity]
    t = datetime.fromtimestamp(start, UTC) + timedelta(days=1)
    while t.weekday() >= 5:                      # Saturday, Sunday
        t += timedelta(days=1)
    return t.timestamp()


def auto_level(severity: str, created_at: float, now: float) -> tuple[int, float]:
    """(escalation level reached by `now`, when the next escalation is due)."""
    level, deadline = 0, response_deadline(severity, created_at)
    while deadline <= now and level < MAX_ESCALATION:
        level += 1
        deadline = response_deadline(severity, deadline)
    return level, deadline


def severity_of(value: Any) -> str | None:
    if isinstance(value, str):
        v = value.strip()
        if v.upper() in SEVERITIES:
            return v.upper()
        return ALIASES.get(v.lower())
    return None


def parse_severity(value: Any, path: str, errs: valid.Errors) -> str | None:
    """An incident severity (SEV-1..SEV-4 or an alias), canonical; None and an error if not."""
    sev = severity_of(value)
    if sev is None:
        errs.add(path, f"must be one of {', '.join(SEVERITIES)} (or {', '.join(ALIASES)}), "
                       f"got {value!r}")
    return sev


def doc(store: Store, inc: dict[str, Any], now: float, *, timeline: bool = False
        ) -> dict[str, Any]:
    """The API shape of an incident."""
    out = {k: inc[k] for k in ("id", "title", "description", "severity", "affected_service",
                               "cause", "context", "status", "escalation_level", "created_at",
                               "created_by", "acknowledged_at", "mitigated_at", "resolved_at",
                               "resolution_notes", "root_cause", "postmortem", "updated_at",
                               "assigned_to")}
    out["response_due_at"] = (auto_level(inc["severity"], inc["created_at"], now)[1]
                              if inc["status"] == "investigating" else None)
    out["postmortem_required"] = inc["severity"] in POSTMORTEM_REQUIRED
    out["alert_ids"] = store.alerts.alert_ids_of_incident(inc["id"])
    if timeline:
        out["timeline"] = store.incidents.timeline(inc["id"])
    return out


def summary(inc: dict[str, Any]) -> dict[str, Any]:
    """The short form listed by the health overview."""
    return {k: inc[k] for k in ("id", "title", "severity", "status", "affected_service",
                                "escalation_level", "created_at")}


def _get(store: Store, incident_id: str) -> dict[str, Any]:
    inc = store.incidents.incident(incident_id)
    if inc is None:
        raise IncidentError(404, f"no incident {incident_id!r}")
    return inc


def declare(store: Store, *, title: str, description: str, severity: str,
            affected_service: str, context: dict[str, Any], actor: str, reason: str,
            now: float, cause: str = "manual") -> dict[str, Any]:
    year = datetime.fromtimestamp(now, UTC).year
    with store.transaction():
        incident_id = store.incidents.insert_incident(year, {
            "title": title, "description": description, "severity": severity,
            "affected_service": affected_service, "cause": cause, "context": context,
            "status": "investigating", "escalation_level": 0, "created_at": now,
            "created_by": actor, "postmortem": None, "breaker_cursor": 0, "updated_at": now})
        store.incidents.add_timeline(incident_id, now, "status", actor,
                           f"declared {severity}: {title}", {"status": "investigating"})
        store.audit.record(actor, "create", f"incident/{incident_id}", reason,
                    {"severity": severity, "affected_service": affected_service,
                     "cause": cause}, at=now)
    return _get(store, incident_id)


def _transition(store: Store, incident_id: str, to: str, allowed_from: tuple[str, ...],
                actor: str, reason: str, now: float, extra: dict[str, Any] | None = None,
                action: str | None = None) -> dict[str, Any]:
    with store.transaction():
        inc = _get(store, incident_id)
        if inc["status"] not in allowed_from:
            raise IncidentError(409, f"status: incident {incident_id} is {inc['status']}; "
                                     f"cannot go to {to}")
        fields = {"status": to, f"{to}_at": now, "updated_at": now, **(extra or {})}
        store.incidents.update_incident(incident_id, fields)
        note = f"{inc['status']} -> {to}" + (f": {reason}" if reason else "")
        store.incidents.add_timeline(incident_id, now, "status", actor, note, {"status": to})
        store.audit.record(actor, action or to.removesuffix("d").removesuffix("e"),
                    f"incident/{incident_id}", reason, {"from": inc["status"], "to": to}, at=now)
    return _get(store, incident_id)


def acknowledge(store: Store, incident_id: str, actor: str, reason: str, now: float
                ) -> dict[str, Any]:
    return _transition(store, incident_id, "acknowledged", ("investigating",), actor, reason,
                       now, action="acknowledge")


def mitigate(store: Store, incident_id: str, actor: str, reason: str, now: float
             ) -> dict[str, Any]:
    return _transition(store, incident_id, "mitigated", ("investigating", "acknowledged"),
                       actor, reason, now, action="mitigate")


def parse_postmortem(value: Any, errs: valid.Errors) -> dict[str, Any] | None:
    """A post-mortem {summary, lessons, action_items}; None and errors at `postmortem.*`."""
    m = valid.mapping(value, "postmortem", errs, None, {"summary"})
    if m is None:
        return None
    n = len(errs.lines)
    out = {"summary": valid.string(m["summary"], "postmortem.summary", errs, maximum=MAX_TEXT)
           if "summary" in m else None,
           "lessons": valid.string(m.get("lessons", ""), "postmortem.lessons", errs,
                                   nonempty=False, maximum=MAX_TEXT),
           "action_items": valid.string_list(m.get("action_items", []),
                                             "postmortem.action_items", errs)}
    return out if len(errs.lines) == n else None


def _required_text(value: Any, path: str, errs: valid.Errors) -> str | None:
    if value is None:
        errs.add(path, "is required")
        return None
    return valid.string(value, path, errs, maximum=MAX_TEXT)


def resolve(store: Store, incident_id: str, *, resolution_notes: Any, root_cause: Any,
            postmortem: Any, actor: str, reason: str, now: float) -> dict[str, Any]:
    """Resolve the incident; valid.Invalid with every problem of the fields first."""
    errs = valid.Errors()
    _required_text(resolution_notes, "resolution_notes", errs)
    _required_text(root_cause, "root_cause", errs)
    pm = parse_postmortem(postmortem, errs) if postmortem is not None else None
    errs.check()
    inc = _get(store, incident_id)
    required = inc["severity"] in POSTMORTEM_REQUIRED
    record: dict[str, Any] | None = None
    if pm is not None:
        record = {"required": required, "status": "completed", "due_at": now + POSTMORTEM_DUE_S
                  if required else None, "completed_at": now, "completed_by": actor, **pm}
    elif required:
        record = {"required": True, "status": "pending", "due_at": now + POSTMORTEM_DUE_S}
    return _transition(store, incident_id, "resolved",
                       ("investigating", "acknowledged", "mitigated"), actor, reason, now,
                       {"resolution_notes": resolution_notes, "root_cause": root_cause,
                        "postmortem": record}, action="resolve")


def record_postmortem(store: Store, incident_id: str, body: Any, actor: str, reason: str,
                      now: float) -> dict[str, Any]:
    errs = valid.Errors()
    pm = parse_postmortem(body, errs)
    errs.check()
    assert pm is not None
    with store.transaction():
        inc = _get(store, incident_id)
        old = inc["postmortem"] or {}
        required = inc["severity"] in POSTMORTEM_REQUIRED
        record = {"required": required, "status": "completed", "due_at": old.get("due_at"),
                  "completed_at": now, "completed_by": actor, **pm}
        store.incidents.update_incident(incident_id, {"postmortem": record, "updated_at": now})
        store.incidents.add_timeline(incident_id, now, "postmortem", actor, "post-mortem recorded",
                           {"summary": pm["summary"]})
        store.audit.record(actor, "postmortem", f"incident/{incident_id}", reason, {}, at=now)
    return _get(store, incident_id)


def escalate(store: Store, incident_id: str, actor: str, reason: str, now: float,
             severity: str | None = None) -> dict[str, Any]:
    with store.transaction():
        inc = _get(store, incident_id)
        if inc["status"] == "resolved":
            raise IncidentError(409, f"status: incident {incident_id} is resolved")
        level = inc["escalation_level"] + 1
        fields: dict[str, Any] = {"escalation_level": level, "updated_at": now}
        text = f"escalated to level {level}"
        if severity is not None and severity != inc["severity"]:
            fields["severity"] = severity
            text += f", severity {inc['severity']} -> {severity}"
        store.incidents.update_incident(incident_id, fields)
        store.incidents.add_timeline(incident_id, now, "escalation", actor,
                           text + (f": {reason}" if reason else ""),
                           {"escalation_level": level, "severity": fields.get("severity",
                                                                              inc["severity"])})
        store.audit.record(actor, "escalate", f"incident/{incident_id}", reason,
                    {"escalation_level": level, "severity": fields.get("severity",
                                                                       inc["severity"])}, at=now)
    return _get(store, incident_id)


def raise_severity(store: Store, incident_id: str, severity: str, why: str, now: float,
                   actor: str = "evaluator") -> bool:
    """Make an open incident more severe (never less) as its page alert keeps firing."""
    with store.transaction():
        inc = store.incidents.incident(incident_id)
        if inc is None or inc["status"] == "resolved" or \
                SEVERITIES.index(severity) >= SEVERITIES.index(inc["severity"]):
            return False
        store.incidents.update_incident(incident_id, {"severity": severity, "updated_at": now})
        store.incidents.add_timeline(incident_id, now, "severity", actor,
                           f"severity {inc['severity']} -> {severity}: {why}",
                           {"severity": severity})
        store.audit.record(actor, "update", f"incident/{incident_id}", why,
                    {"severity": [inc["severity"], severity]}, at=now)
    return True


def add_note(store: Store, incident_id: str, text: Any, actor: str, now: float
             ) -> dict[str, Any]:
    errs = valid.Errors()
    _required_text(text, "text", errs)
    errs.check()
    with store.transaction():
        _get(store, incident_id)
        store.incidents.add_timeline(incident_id, now, "note", actor, text)
        store.incidents.update_incident(incident_id, {"updated_at": now})
        store.audit.record(actor, "note", f"incident/{incident_id}", "", {"text": text[:200]}, at=now)
    return _get(store, incident_id)


def on_page_alert(store: Store, alert: dict[str, Any], *, cause: str, severity: str,
                  context: dict[str, Any], now: float, actor: str = "evaluator"
                  ) -> dict[str, Any]:
    """Open an incident for a page alert, or join the open one of the same service and cause;
    link the alert. Returns the incident."""
    with store.transaction():
        inc = store.incidents.open_incident_for(alert["service"], cause)
        if inc is None:
            inc = declare(store, title=alert["title"], description=alert["description"],
                          severity=severity, affected_service=alert["service"],
                          context={**context, "alert_id": alert["id"]}, actor=actor,
                          reason=f"page alert {alert['id']}", now=now, cause=cause)
        store.alerts.update_slo_alert(alert["id"], {"incident_id": inc["id"]})
        store.incidents.add_timeline(inc["id"], now, "alert", actor,
                           f"alert {alert['id']} ({alert['severity']}) firing: {alert['title']}",
                           {"alert_id": alert["id"], "severity": alert["severity"]})
    return inc


def opened_by(inc: dict[str, Any], alert: dict[str, Any]) -> bool:
    """True when `on_page_alert` opened `inc` for this alert (it did not join an open one)."""
    return inc["context"].get("alert_id") == alert["id"]


def tick(store: Store, now: float) -> list[str]:
    """Periodic work on open incidents: escalation when the response time passed without an
    acknowledgement, breaker openings of the service's upstreams onto the timeline. Returns the
    incidents escalated."""
    escalated = []
    upstreams_of: dict[str, list[str]] = {}
    for service, upstream in store.fleet.service_upstreams():
        upstreams_of.setdefault(service, []).append(upstream)
    for inc in store.incidents.query(active=True, limit=1000):
        with store.transaction():
            if inc["status"] == "investigating":
                level, _next = auto_level(inc["severity"], inc["created_at"], now)
                if level > inc["escalation_level"]:
                    store.incidents.update_incident(inc["id"], {"escalation_level": level,
                                                      "updated_at": now})
                    store.incidents.add_timeline(
                        inc["id"], now, "escalation", "evaluator",
                        f"escalated to level {level}: not acknowledged within the "
                        f"{inc['severity']} response time", {"escalation_level": level})
                    store.audit.record("evaluator", "escalate", f"incident/{inc['id']}",
                                "response time passed", {"escalation_level": level}, at=now)
                    escalated.append(inc["id"])
            openings = [o for o in store.fleet.breaker_openings_after(
                inc["breaker_cursor"], upstreams_of.get(inc["affected_service"], []))
                if o["at"] >= inc["created_at"] - BREAKER_LOOKBACK_S]
            for o in openings:
                store.incidents.add_timeline(inc["id"], o["at"], "breaker", o["gateway_id"],
                                   f"circuit breaker of {o['upstream']} opened "
                                   f"({o['from_state']} -> open): {o['reason']}",
                                   {"upstream": o["upstream"], "gateway_id": o["gateway_id"]})
            cursor = store.fleet.last_transition_id()
            if cursor != inc["breaker_cursor"]:
                store.incidents.update_incident(inc["id"], {"breaker_cursor": cursor})
    return escalated


# Events for the notifier: an incident travels in the shape of an alert (`source: "incident"`),
# so every notification format can carry it; `kind` is opened | escalated | acknowledged |
# resolved.
EVENT_KINDS = ("opened", "escalated", "acknowledged", "resolved")


def event(kind: str, inc: dict[str, Any]) -> Event:
    """The notifier's Event of one incident transition."""
    labels = {"alertname": "Incident", "incident_id": inc["id"], "severity": inc["severity"],
              "service": inc["affected_service"], "cause": inc["cause"]}
    level = inc["escalation_level"]
    text = {"opened": "opened", "escalated": f"escalated to level {level}",
            "acknowledged": "acknowledged", "resolved": "resolved"}[kind]
    description = inc["description"] or inc["title"]
    if kind == "resolved" and inc.get("resolution_notes"):
        description += f"\nResolution: {inc['resolution_notes']}"
    alert = {"id": inc["id"], "dedup_key": f"incident:{inc['id']}", "source": "incident",
             "slo_id": None, "service": inc["affected_service"], "severity": inc["severity"],
             "status": inc["status"], "title": f"{inc['id']} {text} ({inc['severity']}): "
                                               f"{inc['title']}",
             "description": description, "labels": labels,
             "details": {"escalation_level": level, "event": kind,
                         "assigned_to": inc.get("assigned_to")},
             # stable across severity changes: one incident, one fingerprint
             "fingerprint": fingerprint({"alertname": "Incident", "incident_id": inc["id"]}),
             "started_at": inc["created_at"],
             "updated_at": inc["updated_at"], "acknowledged_at": inc["acknowledged_at"],
             "acknowledged_by": None, "resolved_at": inc["resolved_at"],
             "incident_id": inc["id"]}
    return Event(kind, alert, inc)


def assign(store: Store, incident_id: str, assigned_to: Any, actor: str, reason: str,
           now: float) -> dict[str, Any]:
    """Set (a name) or clear (None) who owns the incident; audited and on the timeline."""
    who = None
    if assigned_to is not None:
        errs = valid.Errors()
        who = valid.string(assigned_to, "assigned_to", errs, maximum=MAX_ASSIGNEE)
        errs.check()
        assert who is not None
        who = who.strip()
    with store.transaction():
        inc = _get(store, incident_id)
        before = inc.get("assigned_to")
        if before == who:
            return inc
        store.incidents.update_incident(incident_id, {"assigned_to": who, "updated_at": now})
        text = f"assigned to {who}" if who else "unassigned"
        store.incidents.add_timeline(incident_id, now, "assignment", actor,
                           text + (f": {reason}" if reason else ""),
                           {"assigned_to": who, "before": before})
        store.audit.record(actor, "assign", f"incident/{incident_id}", reason,
                    {"assigned_to": [before, who]}, at=now)
    return _get(store, incident_id)
