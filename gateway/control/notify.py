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
from typing import Any

import aiohttp
import orjson

from gateway.config import _bool, _Errors, _int, _kind, _mapping, _name, _num, _str
from gateway.control.alerts import SEVERITIES, Event
from gateway.eventloop import background

log = logging.getLogger("gateway.control.notify")

FORMATS = ("alertmanager", "slack")
KEYS = {"name", "url", "format", "min_severity", "send_resolved", "timeout_s", "max_attempts",
        "backoff_s", "headers"}
MAX_BACKOFF_S = 60.0
QUEUE_SIZE = 1_000
ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    format: str = "alertmanager"
    min_severity: str = "info"
    send_resolved: bool = True
    timeout_s: float = 5.0
    max_attempts: int = 4
    backoff_s: float = 1.0
    headers: tuple[tuple[str, str], ...] = field(default=())

    def __repr__(self) -> str:   # URLs and headers may hold secrets (Slack hook URLs do)
        return f"Target(name={self.name!r}, format={self.format!r})"

    def wants(self, event: Event) -> bool:
        sev = SEVERITIES.index(event.alert["severity"]) if event.alert["severity"] in \
            SEVERITIES else 0
        if sev < SEVERITIES.index(self.min_severity):
            return False
        return event.kind == "firing" or self.send_resolved


def parse_notifications(value: Any, path: str, errs: _Errors) -> tuple[Target, ...] | None:
    if value is None or value == {} or value == []:
        return ()
    if isinstance(value, dict):
        m = _mapping(value, path, errs, {"targets"})
        if m is None or "targets" not in m:
            return () if m is not None else None
        value, path = m["targets"], f"{path}.targets"
    if not isinstance(value, list):
        errs.add(path, f"must be a list of targets, got {_kind(value)}")
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


def parse_target(value: Any, path: str, errs: _Errors) -> Target | None:
    n0 = len(errs.lines)
    m = _mapping(value, path, errs, KEYS, {"name", "url"})
    if m is None:
        return None
    kw: dict[str, Any] = {}
    if "name" in m:
        kw["name"] = _name(m["name"], f"{path}.name", errs)
    if "url" in m:
        url = _str(m["url"], f"{path}.url", errs)
        if url is not None and not url.startswith(("http://", "https://")):
            errs.add(f"{path}.url", "must be an http:// or https:// URL")
        kw["url"] = url
    if "format" in m:
        if m["format"] not in FORMATS:
            errs.add(f"{path}.format", f"must be one of {', '.join(FORMATS)}, got {m['format']!r}")
        kw["format"] = m["format"]
    if "min_severity" in m:
        if m["min_severity"] not in SEVERITIES:
            errs.add(f"{path}.min_severity",
                     f"must be one of {', '.join(SEVERITIES)}, got {m['min_severity']!r}")
        kw["min_severity"] = m["min_severity"]
    if "send_resolved" in m:
        kw["send_resolved"] = _bool(m["send_resolved"], f"{path}.send_resolved", errs)
    if "timeout_s" in m:
        kw["timeout_s"] = _num(m["timeout_s"], f"{path}.timeout_s", errs, minimum=0,
                               exclusive_min=True, maximum=300)
    if "max_attempts" in m:
        kw["max_attempts"] = _int(m["max_attempts"], f"{path}.max_attempts", errs, minimum=1,
                                  maximum=20)
    if "backoff_s" in m:
        kw["backoff_s"] = _num(m["backoff_s"], f"{path}.backoff_s", errs, minimum=0,
                               maximum=MAX_BACKOFF_S)
    if "headers" in m:
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
    if event.kind == "resolved":
        head = f":white_check_mark: [RESOLVED] {a['title']}"
    else:
        icon = ":rotating_light:" if a["severity"] == "page" else ":warning:"
        head = f"{icon} [FIRING:{a['severity']}] {a['title']}"
    lines = [head, a["description"], f"service: {a['service']}"]
    if a.get("incident_id"):
        lines.append(f"incident: {a['incident_id']}")
    return {"text": "\n".join(lines)}


PAYLOADS: dict[str, Callable[[Target, Event], dict[str, Any]]] = {
    "alertmanager": alertmanager_payload, "slack": slack_payload}


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
        assert self._session is not None
        body = orjson.dumps(PAYLOADS[target.format](target, event))
        headers = {"Content-Type": "application/json", **dict(target.headers)}
        error, status = "", None
        for attempt in range(1, target.max_attempts + 1):
            try:
                async with self._session.post(
                        target.url, data=body, headers=headers,
                        timeout=aiohttp.ClientTimeout(total=target.timeout_s)) as resp:
                    status = resp.status
                    await resp.read()
                    if 200 <= resp.status < 300:
                        self.delivered += 1
                        await self._log(target, event, "delivered", attempt, status, "")
                        return
                    error = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        break        # the receiver refuses this payload: retrying cannot help
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"[:500]
            if attempt < target.max_attempts:
                await asyncio.sleep(min(target.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        self.failed += 1
        log.warning("notification failed", extra={"target": target.name, "error": error,
                                                  "alert_id": event.alert["id"]})
        await self._log(target, event, "failed", attempt, status, error)

    async def _log(self, target: Target, event: Event, status: str, attempts: int,
                   http_status: int | None, error: str) -> None:
        try:
            await self._record({"at": self._now(), "target": target.name,
                                "alert_id": event.alert["id"], "event": event.kind,
                                "status": status, "attempts": attempts,
                                "http_status": http_status, "error": error})
        except Exception:
            log.exception("cannot write the delivery log")
