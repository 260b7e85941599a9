"""Alert notifications: webhook targets (`notifications:` in control.yaml), payloads, delivery.

    notifications:
      - name: oncall                  # unique; shown in the delivery log
        url: "https://alertmanager.example/hook"
        format: alertmanager          # alertmanager (webhook payload version 4) | slack
        min_severity: page            # info < ticket < page (default info: everything)
        send_resolved: true
        timeout_s: 5                  # per attempt
        max_attempts: 4               # retries with exponential backoff: backoff_s, 2x, 4x ...
        backoff_s: 1                  # ... capped at 60 s
        headers: {Authorization: "Bearer ${HOOK_TOKEN}"}

A mapping `{targets: [...]}` is accepted too, and `{}`/`[]` mean none.

Two more formats: `pagerduty` (Events API v2; keys `routing_key` and optionally `url`, see
pagerduty.py) and `email` (keys `smtp: {host, port, starttls, username, password, from}` and
`to: [...]`, no `url`; see mail.py).

Incidents are notified like alerts (`source: "incident"` in their alert form, see
incidents.event): opened, escalated, acknowledged, resolved. `min_severity` takes the alert
levels and the incident levels on one scale: info = SEV-4 < ticket = SEV-3 < page = SEV-2 <
SEV-1. So `page` lets SEV-1 and SEV-2 incidents through, `SEV-1` only SEV-1 incidents.
Acknowledgements are sent to `pagerduty` targets (to stop the paging) and, for incidents, to
every target; `send_resolved: false` holds back every resolution.

Delivery never blocks evaluation: `Notifier.publish` only puts the event on each target's bounded
queue (a full queue drops the event, logged); one task per target posts them in order, retrying
with backoff, and writes one row per event to the delivery log (delivered / failed / dropped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from functools import partial
from typing import Any

import aiohttp
import orjson

from gateway import validation as valid
from gateway.control.domain.alerts import Event
from gateway.control.jobs import mail, pagerduty
from gateway.eventloop import background

log = logging.getLogger("gateway.control.notify")

FORMATS = ("alertmanager", "slack", "pagerduty", "email")
KEYS = {"name", "url", "format", "min_severity", "send_resolved", "timeout_s", "max_attempts",
        "backoff_s", "headers", "routing_key", "smtp", "to"}
# Alert severities and incident severities on one scale (see the module docstring).
SEVERITY_RANK = {"info": 0, "SEV-4": 0, "ticket": 1, "SEV-3": 1, "page": 2, "SEV-2": 2,
                 "SEV-1": 3}
MIN_SEVERITIES = ("info", "ticket", "page", "SEV-1", "SEV-2", "SEV-3", "SEV-4")
MAX_BACKOFF_S = 60.0
QUEUE_SIZE = 1_000
ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str = ""
    format: str = "alertmanager"
    min_severity: str = "info"
    send_resolved: bool = True
    timeout_s: float = 5.0
    max_attempts: int = 4
    backoff_s: float = 1.0
    headers: tuple[tuple[str, str], ...] = field(default=())
    routing_key: str = ""                  # pagerduty
    smtp: mail.SmtpConfig | None = None    # email
    to: tuple[str, ...] = ()               # email

    def __repr__(self) -> str:   # URLs, headers, keys may hold secrets (Slack hook URLs do)
        return f"Target(name={self.name!r}, format={self.format!r})"

    def wants(self, event: Event) -> bool:
        if SEVERITY_RANK.get(event.alert["severity"], 0) < SEVERITY_RANK[self.min_severity]:
            return False
        if event.kind == "resolved":
            return self.send_resolved
        if event.kind == "acknowledged":
            return self.format == "pagerduty" or event.alert.get("source") == "incident"
        return True


def parse_notifications(value: Any, path: str, errs: valid.Errors) -> tuple[Target, ...] | None:
    if value is None or value == {} or value == []:
        return ()
    if isinstance(value, dict):
        m = valid.mapping(value, path, errs, {"targets"})
        if m is None or "targets" not in m:
            return () if m is not None else None
        value, path = m["targets"], f"{path}.targets"
    if not isinstance(value, list):
        errs.add(path, f"must be a list of targets, got {valid.kind(value)}")
        return None
    out: list[Target] = []
    names: dict[str, int] = {}
    for i, item in enumerate(value):
        t = parse_target(item, f"{path}[{i}]", errs)
        if t is None:
            continue
        if t.name in names:
            errs.add(f"{path}[{i}].name", f"duplicate name {t.name!r} (also {path}[{names[t.name]}])")
            continue
        names[t.name] = i
        out.append(t)
    return tuple(out)


def parse_target(value: Any, path: str, errs: valid.Errors) -> Target | None:
    n0 = len(errs.lines)
    m = valid.mapping(value, path, errs, KEYS, {"name"})
    if m is None:
        return None
    kw: dict[str, Any] = {}
    fmt = m.get("format", "alertmanager")
    if "name" in m:
        kw["name"] = valid.name(m["name"], f"{path}.name", errs)
    if "format" in m:
        if m["format"] not in FORMATS:
            errs.add(f"{path}.format", f"must be one of {', '.join(FORMATS)}, got {m['format']!r}")
        kw["format"] = m["format"]
    if "url" in m:
        if fmt == "email":
            errs.add(f"{path}.url", "does not apply to format email (see smtp)")
        url = valid.string(m["url"], f"{path}.url", errs)
        if url is not None and not url.startswith(("http://", "https://")):
            errs.add(f"{path}.url", "must be an http:// or https:// URL")
        kw["url"] = url
    elif fmt == "pagerduty":
        kw["url"] = pagerduty.DEFAULT_URL
    elif fmt != "email":
        errs.add(f"{path}.url", "is required")
    if fmt == "pagerduty":
        if "routing_key" not in m:
            errs.add(f"{path}.routing_key", "is required for format pagerduty")
        else:
            kw["routing_key"] = valid.string(m["routing_key"], f"{path}.routing_key", errs)
    elif "routing_key" in m:
        errs.add(f"{path}.routing_key", "applies to format pagerduty only")
    if fmt == "email":
        for key in ("smtp", "to"):
            if key not in m:
                errs.add(f"{path}.{key}", "is required for format email")
        if "smtp" in m:
            kw["smtp"] = mail.parse_smtp(m["smtp"], f"{path}.smtp", errs)
        if "to" in m:
            kw["to"] = mail.parse_recipients(m["to"], f"{path}.to", errs)
        if "headers" in m:
            errs.add(f"{path}.headers", "does not apply to format email")
    else:
        for key in ("smtp", "to"):
            if key in m:
                errs.add(f"{path}.{key}", "applies to format email only")
    if "min_severity" in m:
        if m["min_severity"] not in MIN_SEVERITIES:
            errs.add(f"{path}.min_severity",
                     f"must be one of {', '.join(MIN_SEVERITIES)}, got {m['min_severity']!r}")
        kw["min_severity"] = m["min_severity"]
    if "send_resolved" in m:
        kw["send_resolved"] = valid.boolean(m["send_resolved"], f"{path}.send_resolved", errs)
    if "timeout_s" in m:
        kw["timeout_s"] = valid.number(m["timeout_s"], f"{path}.timeout_s", errs, minimum=0,
                               exclusive_min=True, maximum=300)
    if "max_attempts" in m:
        kw["max_attempts"] = valid.integer(m["max_attempts"], f"{path}.max_attempts", errs, minimum=1,
                                  maximum=20)
    if "backoff_s" in m:
        kw["backoff_s"] = valid.number(m["backoff_s"], f"{path}.backoff_s", errs, minimum=0,
                               maximum=MAX_BACKOFF_S)
    if "headers" in m and fmt != "email":
        h = m["headers"]
        if not isinstance(h, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in h.items()):
            errs.add(f"{path}.headers", "must be a mapping of header names to strings")
        else:
            kw["headers"] = tuple(sorted(h.items()))
    if len(errs.lines) != n0:
        return None
    return Target(**kw)


# ---------------------------------------------------------------------------------------------
# Payloads


def iso(t: float | None) -> str:
    if t is None:
        return ZERO_TIME
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def alertmanager_payload(target: Target, event: Event) -> dict[str, Any]:
    """The Alertmanager webhook payload (version 4) for one alert."""
    a = event.alert
    status = "resolved" if event.kind == "resolved" else "firing"
    labels = dict(a["labels"])
    annotations = {"summary": a["title"], "description": a["description"]}
    if a.get("incident_id"):
        annotations["incident_id"] = a["incident_id"]
    if a.get("source") == "incident":
        annotations["incident_event"] = event.kind
    if a.get("details", {}).get("burn_rates"):
        annotations["burn_rates"] = ", ".join(
            f"{k}={v:.2f}" for k, v in a["details"]["burn_rates"].items())
    group = {"alertname": labels.get("alertname", "alert")}
    return {
        "version": "4",
        "groupKey": "{}:{" + ",".join(f'{k}="{v}"' for k, v in sorted(group.items())) + "}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": target.name,
        "groupLabels": group,
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "",
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": iso(a["started_at"]),
            "endsAt": iso(a["resolved_at"]) if status == "resolved" else ZERO_TIME,
            "generatorURL": "",
            "fingerprint": a["fingerprint"],
        }],
    }


def slack_payload(target: Target, event: Event) -> dict[str, Any]:
    a = event.alert
    if a.get("source") == "incident":
        icon = {"opened": ":rotating_light:", "escalated": ":arrow_double_up:",
                "acknowledged": ":eyes:", "resolved": ":white_check_mark:"}.get(event.kind, "")
        head = f"{icon} [INCIDENT {event.kind.upper()}] {a['title']}"
    elif event.kind == "resolved":
        head = f":white_check_mark: [RESOLVED] {a['title']}"
    else:
        icon = ":rotating_light:" if a["severity"] == "page" else ":warning:"
        head = f"{icon} [FIRING:{a['severity']}] {a['title']}"
    lines = [head, a["description"], f"service: {a['service']}"]
    if a.get("incident_id") and a.get("source") != "incident":
        lines.append(f"incident: {a['incident_id']}")
    return {"text": "\n".join(lines)}


def pagerduty_payload(target: Target, event: Event) -> dict[str, Any]:
    return pagerduty.body(target.routing_key, event.kind, event.alert,
                          iso(event.alert["updated_at"]))


PAYLOADS: dict[str, Callable[[Target, Event], dict[str, Any]]] = {
    "alertmanager": alertmanager_payload, "slack": slack_payload,
    "pagerduty": pagerduty_payload}


def email_message(target: Target, event: Event) -> EmailMessage:
    """One message for one event (subject, plain text and HTML)."""
    assert target.smtp is not None
    a = event.alert
    if a.get("source") == "incident":
        subject = f"[INCIDENT {event.kind.upper()}] {a['title']}"
    elif event.kind == "resolved":
        subject = f"[RESOLVED] {a['title']}"
    else:
        subject = f"[{event.kind.upper()}:{a['severity']}] {a['title']}"
    lines = [("service", a["service"]), ("severity", a["severity"]), ("status", a["status"]),
             ("started", iso(a["started_at"]))]
    if a.get("resolved_at"):
        lines.append(("resolved", iso(a["resolved_at"])))
    if a.get("incident_id"):
        lines.append(("incident", a["incident_id"]))
    lines += [(k, v) for k, v in sorted(a["labels"].items())
              if k not in ("service", "severity", "incident_id")]
    return mail.message(target.smtp, target.to, subject, lines, a["description"])
# ---------------------------------------------------------------------------------------------
# Delivery

Record = Callable[[dict[str, Any]], Awaitable[None]]


class Notifier:
    """Per-target queues and delivery tasks. `publish` never blocks; `start`/`stop` own tasks."""

    def __init__(self, targets: tuple[Target, ...], record: Record,
                 now: Callable[[], float]) -> None:
        self.targets = targets
        self._record = record
        self._now = now
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed = 0

    async def start(self) -> None:
        if not self.targets:
            return
        self._session = aiohttp.ClientSession()
        for t in self.targets:
            q: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
            self._queues[t.name] = q
            self._tasks.append(asyncio.create_task(self._worker(t, q),
                                                   name=f"notify-{t.name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def publish(self, event: Event) -> None:
        for t in self.targets:
            if not t.wants(event):
                continue
            q = self._queues.get(t.name)
            if q is None:
                continue
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("notification queue full; event dropped",
                            extra={"target": t.name, "alert_id": event.alert["id"]})
                background(self._log(t, event, "dropped", 0, None, "queue full"))

    async def idle(self) -> None:
        """Wait until every queued event was handled (tests)."""
        await asyncio.gather(*(q.join() for q in self._queues.values()))

    async def _worker(self, target: Target, q: asyncio.Queue[Event]) -> None:
        while True:
            event = await q.get()
            try:
                await self._deliver(target, event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notification delivery crashed", extra={"target": target.name})
            finally:
                q.task_done()

    async def _deliver(self, target: Target, event: Event) -> None:
        # Built once: every attempt sends the same bytes (and the same mail Message-ID).
        if target.format == "email":
            msg = email_message(target, event)
            attempt_once = partial(self._send_mail, target, msg)
        else:
            body = orjson.dumps(PAYLOADS[target.format](target, event))
            attempt_once = partial(self._post, target, body)
        error, status = "", None
        for attempt in range(1, target.max_attempts + 1):
            ok, status, error, permanent = await attempt_once()
            if ok:
                self.delivered += 1
                await self._log(target, event, "delivered", attempt, status, error)
                return
            if permanent:
                break            # the receiver refuses this payload: retrying cannot help
            if attempt < target.max_attempts:
                await asyncio.sleep(min(target.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        self.failed += 1
        log.warning("notification failed", extra={"target": target.name, "error": error,
                                                  "alert_id": event.alert["id"]})
        await self._log(target, event, "failed", attempt, status, error)

    async def _post(self, target: Target, body: bytes) -> tuple[bool, int | None, str, bool]:
        """One HTTP attempt: (delivered, HTTP status, error, permanent failure)."""
        assert self._session is not None
        headers = {"Content-Type": "application/json", **dict(target.headers)}
        try:
            async with self._session.post(
                    target.url, data=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=target.timeout_s)) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True, resp.status, "", False
                return False, resp.status, f"HTTP {resp.status}", \
                    400 <= resp.status < 500 and resp.status not in (408, 429)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, None, f"{type(exc).__name__}: {exc}"[:500], False

    async def _send_mail(self, target: Target, msg: EmailMessage
                         ) -> tuple[bool, int | None, str, bool]:
        """One SMTP attempt, on a worker thread (smtplib blocks)."""
        assert target.smtp is not None
        try:
            note = await asyncio.to_thread(mail.send, target.smtp, msg, target.timeout_s)
        except mail.MailError as exc:
            return False, None, str(exc), exc.permanent
        return True, None, note, False

    async def _log(self, target: Target, event: Event, status: str, attempts: int,
                   http_status: int | None, error: str) -> None:
        incident = event.alert.get("source") == "incident"
        try:
            await self._record({"at": self._now(), "target": target.name,
                                "alert_id": None if incident else event.alert["id"],
                                "incident_id": event.alert["id"] if incident else None,
                                "event": event.kind, "status": status, "attempts": attempts,
                                "http_status": http_status, "error": error})
        except Exception:
            log.exception("cannot write the delivery log")
