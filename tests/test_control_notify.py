"""Webhook notifications to a real receiver: Alertmanager (v4) and Slack payloads, minimum
severity, retries with backoff, the delivery log; evaluation goes on while the receiver is down."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from gateway.control.api.admin import run_evaluation
from gateway.control.config import load_text
from gateway.control.jobs.notify import Target, parse_notifications
from gateway.control.web import NOTIFIER
from gateway.errors import ConfigError
from gateway.validation import Errors
from tests.conftest import free_port
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, DAY0, MIN, add_slo, call, feed, make_slo, slo_plane
from tests.test_control_support import running, store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql


class Receiver:
    """An aiohttp webhook receiver on 127.0.0.1:0; `fail` answers 503 that many times first."""

    def __init__(self, fail: int = 0) -> None:
        self.got: dict[str, list[dict]] = {}
        self.headers: list[dict] = []
        self.fail = fail
        self.app = web.Application()
        self.app.router.add_post("/{name}", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=503)
        self.got.setdefault(request.match_info["name"], []).append(await request.json())
        self.headers.append(dict(request.headers))
        return web.Response(status=200)


async def idle(app: web.Application) -> None:
    await asyncio.wait_for(app[NOTIFIER].idle(), 10)


def outage(store, t0: float) -> None:
    add_slo(store, make_slo())
    feed(store, t0 - DAY, 24 * 60, 100, 0)
    feed(store, t0, 5, 100, 100)
    feed(store, t0 + 5 * MIN, 120, 100, 0)


async def test_payloads_min_severity_and_resolution(tmp_path):
    rx = Receiver()
    t0 = DAY0 + DAY
    clock = FakeClock(wall=t0)
    async with running(rx.app) as hook:
        targets = (
            Target("am", f"{hook}/am", headers=(("Authorization", "Bearer hook-secret"),)),
            Target("chat", f"{hook}/chat", format="slack", min_severity="page",
                   send_resolved=False),
        )
        async with slo_plane(tmp_path, clock, notifications=targets) as (url, s, app):
            outage(store_of(app), t0)
            clock.advance(2 * MIN)
            await run_evaluation(app)
            await idle(app)
            # the page alert and the incident it opened (SEV-1: a 100 % error ratio)
            am, inc_am = rx.got["am"]
            assert inc_am["groupLabels"] == {"alertname": "Incident"}
            assert inc_am["commonAnnotations"]["incident_event"] == "opened"
            assert am["version"] == "4" and am["status"] == "firing" and am["receiver"] == "am"
            (alert,) = am["alerts"]
            assert alert["status"] == "firing"
            assert alert["labels"] == {"alertname": "SLOBurnRate", "slo": "api-availability",
                                       "sli": "availability", "tier": "page", "severity": "page",
                                       "service": "svc"}
            assert alert["annotations"]["summary"].startswith("api-availability: error budget")
            assert alert["annotations"]["incident_id"].startswith("INC-")
            assert alert["startsAt"] == "2023-11-16T00:02:00.000Z"
            assert alert["endsAt"] == "0001-01-01T00:00:00Z"
            assert len(alert["fingerprint"]) == 16
            assert am["commonLabels"] == alert["labels"] and am["groupLabels"] == {
                "alertname": "SLOBurnRate"}
            assert rx.headers[0]["Authorization"] == "Bearer hook-secret"
            chat, inc_chat = rx.got["chat"]
            assert chat["text"].startswith(":rotating_light: [FIRING:page] api-availability")
            assert inc_chat["text"].startswith(":rotating_light: [INCIDENT OPENED] INC-")
            assert "incident: INC-" in chat["text"]
            # a ticket reaches the Alertmanager target only (slack wants pages)
            status, _ = await call(s, url, "POST", "/v1/alerts",
                                   json={"title": "cert expires in 10 days", "service": "svc"})
            assert status == 201
            await idle(app)
            assert len(rx.got["am"]) == 3 and len(rx.got["chat"]) == 2
            assert rx.got["am"][2]["alerts"][0]["labels"]["severity"] == "ticket"
            for _ in range(60):                          # the outage is over: resolved
                clock.advance(MIN)
                await run_evaluation(app)
            await idle(app)
            resolved = [p for p in rx.got["am"] if p["status"] == "resolved"]
            assert resolved and resolved[0]["alerts"][0]["fingerprint"] == alert["fingerprint"]
            assert resolved[0]["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
            # send_resolved: false; the unacknowledged SEV-1 incident escalated every 15 min
            assert len(rx.got["chat"]) == 6
            assert all("[INCIDENT ESCALATED]" in p["text"] for p in rx.got["chat"][2:])
            status, doc = await call(s, url, "GET", "/v1/notifications/deliveries",
                                     role="monitor")
            assert status == 200
            assert {(d["target"], d["status"]) for d in doc["deliveries"]} == {
                ("am", "delivered"), ("chat", "delivered")}
            assert all(d["attempts"] == 1 for d in doc["deliveries"])


async def test_retries_with_backoff_then_delivered(tmp_path):
    rx = Receiver(fail=2)
    t0 = DAY0 + DAY
    clock = FakeClock(wall=t0)
    async with running(rx.app) as hook:
        targets = (Target("am", f"{hook}/am", backoff_s=0.05, max_attempts=4),)
        async with slo_plane(tmp_path, clock, notifications=targets) as (url, s, app):
            outage(store_of(app), t0)
            clock.advance(2 * MIN)
            started = time.monotonic()
            await run_evaluation(app)
            await idle(app)
            assert time.monotonic() - started >= 0.05 + 0.1     # backoff 0.05 s, then 0.1 s
            assert len(rx.got["am"]) == 2        # the alert, then the incident it opened
            _, doc = await call(s, url, "GET", "/v1/notifications/deliveries")
            d, = [d for d in doc["deliveries"] if d["alert_id"] is not None]
            assert (d["status"], d["attempts"], d["http_status"]) == ("delivered", 3, 200)


async def test_evaluation_goes_on_while_the_receiver_is_down(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/hook"        # nothing listens there
    t0 = DAY0 + DAY
    clock = FakeClock(wall=t0)
    targets = (Target("down", dead, backoff_s=1.0, max_attempts=3, timeout_s=1),)
    async with slo_plane(tmp_path, clock, notifications=targets) as (url, s, app):
        outage(store_of(app), t0)
        durations = []
        for _ in range(15):
            clock.advance(MIN)
            started = time.monotonic()
            await run_evaluation(app)
            durations.append(time.monotonic() - started)
        # every pass returned without waiting on the webhook (its retries take 1 + 2 s)
        assert max(durations) < 1.0 and sum(durations) < 3.0, durations
        _, doc = await call(s, url, "GET", "/v1/alerts")
        assert "page" in {a["severity"] for a in doc["alerts"]}
        await idle(app)
        _, doc = await call(s, url, "GET", "/v1/notifications/deliveries")
        assert doc["deliveries"] and all(
            (d["status"], d["attempts"], d["http_status"]) == ("failed", 3, None)
            for d in doc["deliveries"])
        assert "Connect" in doc["deliveries"][0]["error"]


def test_notification_config_errors():
    errs = Errors()
    assert parse_notifications({"targets": [{"name": "a", "url": "http://x"}]}, "n",
                               errs)[0].name == "a"
    assert parse_notifications({}, "n", errs) == () and not errs.lines
    bad = """
tokens: [{name: a, role: admin, token: t}]
notifications:
  - {name: a, url: "ftp://x"}
  - {name: b, url: "http://x", format: teams, min_severity: urgent, max_attempts: 0}
  - {name: b, url: "http://y"}
  - {url: "http://z"}
"""
    with pytest.raises(ConfigError) as exc:
        load_text(bad, env={})
    assert exc.value.errors == [
        "notifications[0].url: must be an http:// or https:// URL",
        ("notifications[1].format: must be one of alertmanager, slack, pagerduty, email, got "
         "'teams'"),
        ("notifications[1].min_severity: must be one of info, ticket, page, SEV-1, SEV-2, "
         "SEV-3, SEV-4, got 'urgent'"),
        "notifications[1].max_attempts: must be >= 1, got 0",
        "notifications[3].name: is required"]
    assert "hook-secret" not in repr(Target("x", "http://hook-secret"))
