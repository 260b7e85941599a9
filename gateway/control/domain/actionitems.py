"""Post-mortem action items: what to do after an incident, by whom, by when.

    POST /v1/incidents/{id}/action-items  {description, owner, due, priority, reason}
    due: a date (YYYY-MM-DD: due at the end of that day, UTC), an ISO-8601 time or Unix seconds
    priority: high | medium | low (default medium)

An item is `open` until completed (`done`); once open past its due date it is overdue, and the
evaluator raises one `ActionItemOverdue` alert for it (followups.py), which completing the item
resolves. Every change is audited and written to the incident's timeline.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gateway import validation as valid
from gateway.control.domain import alerts
from gateway.control.domain.alerts import Event
from gateway.control.domain.incidents import IncidentError

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store

PRIORITIES = ("high", "medium", "low")
STATUSES = ("open", "done")
FIELDS = {"description", "owner", "due", "priority"}
MAX_DESCRIPTION = 2000
MAX_OWNER = 200


def parse_due(value: Any, path: str, errs: valid.Errors) -> float | None:
    """A due date: YYYY-MM-DD (due at the end of that day, UTC), an ISO-8601 time or unix
    seconds."""
    if isinstance(value, str) and len(value.strip()) == 10:
        try:
            day = datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            pass
        else:
            return (day + timedelta(days=1)).timestamp()
    scratch = valid.Errors()        # the kit's own message would not mention dates
    t = valid.instant(value, path, scratch)
    if t is None:
        errs.add(path, f"must be a date (YYYY-MM-DD), an ISO-8601 time or Unix seconds, "
                       f"got {value!r}")
    return t


def _text(body: dict[str, Any], key: str, limit: int, errs: valid.Errors) -> str | None:
    if key not in body:
        errs.add(key, "is required")
        return None
    v = valid.string(body[key], key, errs, maximum=limit)
    return None if v is None else v.strip()


def parse(body: dict[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """The fields of a new item (or, `partial`, of an update) from a request body;
    valid.Invalid with every problem found."""
    errs = valid.Errors()
    valid.mapping(body, "", errs, FIELDS | {"reason"})
    out: dict[str, Any] = {}
    if not partial or "description" in body:
        out["description"] = _text(body, "description", MAX_DESCRIPTION, errs)
    if not partial or "owner" in body:
        out["owner"] = _text(body, "owner", MAX_OWNER, errs)
    if not partial or "due" in body:
        if "due" in body:
            out["due_at"] = parse_due(body["due"], "due", errs)
        else:
            errs.add("due", "is required (a date, YYYY-MM-DD, an ISO-8601 time or Unix seconds)")
    if not partial or "priority" in body:
        out["priority"] = valid.choice(body.get("priority", "medium"), "priority", errs,
                                       PRIORITIES)
    errs.check()
    return out


def doc(item: dict[str, Any], now: float) -> dict[str, Any]:
    return {**item, "overdue": item["status"] == "open" and item["due_at"] < now}


def create(store: Store, incident_id: str, body: dict[str, Any], actor: str, reason: str,
           now: float) -> dict[str, Any]:
    fields = parse(body)
    with store.transaction():
        if store.incidents.incident(incident_id) is None:
            raise IncidentError(404, f"no incident {incident_id!r}")
        item_id = store.incidents.insert_action_item({**fields, "incident_id": incident_id,
                                            "status": "open", "created_at": now,
                                            "created_by": actor, "updated_at": now})
        store.incidents.add_timeline(incident_id, now, "action_item", actor,
                           f"action item {item_id} for {fields['owner']}: "
                           f"{fields['description']}", {"action_item_id": item_id})
        store.audit.record(actor, "create", f"action_item/{item_id}", reason,
                    {"incident_id": incident_id, **fields}, at=now)
    item = store.incidents.action_item(item_id)
    assert item is not None
    return item


def _get(store: Store, item_id: int) -> dict[str, Any]:
    item = store.incidents.action_item(item_id)
    if item is None:
        raise IncidentError(404, f"no action item {item_id}")
    return item


def update(store: Store, item_id: int, body: dict[str, Any], actor: str, reason: str,
           now: float) -> tuple[dict[str, Any], list[Event]]:
    """Change fields; a new due date in the future clears the overdue alert."""
    fields = parse(body, partial=True)
    events: list[Event] = []
    with store.transaction():
        item = _get(store, item_id)
        changes = {k: v for k, v in fields.items() if item[k] != v}
        if changes:
            if "due_at" in changes and changes["due_at"] > now:
                events += _resolve_overdue(store, item, actor, "due date moved", now)
                changes["overdue_alert_id"] = None
            store.incidents.update_action_item(item_id, {**changes, "updated_at": now})
            store.audit.record(actor, "update", f"action_item/{item_id}", reason,
                        {k: [item[k], v] for k, v in changes.items()}, at=now)
    return _get(store, item_id), events


def complete(store: Store, item_id: int, actor: str, reason: str, now: float
             ) -> tuple[dict[str, Any], list[Event]]:
    with store.transaction():
        item = _get(store, item_id)
        if item["status"] == "done":
            raise IncidentError(409, f"status: action item {item_id} is done already")
        store.incidents.update_action_item(item_id, {"status": "done", "completed_at": now,
                                           "updated_at": now})
        store.incidents.add_timeline(item["incident_id"], now, "action_item", actor,
                           f"action item {item_id} done: {item['description']}",
                           {"action_item_id": item_id})
        store.audit.record(actor, "complete", f"action_item/{item_id}", reason, {}, at=now)
        events = _resolve_overdue(store, item, actor, "action item done", now)
    return _get(store, item_id), events


def _resolve_overdue(store: Store, item: dict[str, Any], actor: str, why: str, now: float
                     ) -> list[Event]:
    if item["overdue_alert_id"] is None:
        return []
    alert = store.alerts.slo_alert(item["overdue_alert_id"])
    if alert is None or alert["status"] == "resolved":
        return []
    return [alerts.resolve(store, alert, actor, why, now)]
