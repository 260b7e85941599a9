"""Paging and mail: PagerDuty Events v2 bodies at a real HTTP receiver, e-mail through a real SMTP
server (aiosmtpd, STARTTLS with a trustme certificate, AUTH), incident transitions notified once
each and routed by severity, every delivery in the delivery log; the new config keys."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from gateway.control.api.admin import run_evaluation
from gateway.control.config import load_text
from gateway.control.jobs import mail
from gateway.control.jobs.notify import Target
from gateway.control.web import NOTIFIER
from gateway.errors import ConfigError
from tests.conftest import free_port
from tests.fakes import FakeClock
from tests.test_control_notify import Receiver, outage
from tests.test_control_slo_support import DAY, DAY0, MIN, call, slo_plane
from tests.test_control_support import running, store_of

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql


async def idle(app: web.Application) -> None:
    await asyncio.wait_for(app[NOTIFIER].idle(), 20)


# ---------------------------------------------------------------------------------------------
# PagerDuty


async def test_pagerduty_trigger_acknowledge_resolve_with_one_dedup_key(tmp_path):
    rx = Receiver()
    t0 = DAY0 + DAY
    clock = FakeClock(wall=t0)
    async with running(rx.app) as hook:
        pd = Target("pager", f"{hook}/pd", format="pagerduty", routing_key="R0UT1NGKEY",
                    min_severity="page")
        async with slo_plane(tmp_path, clock, notifications=(pd,)) as (url, s, app):
            outage(store_of(app), t0)
            clock.advance(2 * MIN)
            await run_evaluation(app)
            await idle(app)
            alert_trigger, incident_trigger = rx.got["pd"]
            _, alerts_doc = await call(s, url, "GET", "/v1/alerts")
            (alert,) = alerts_doc["alerts"]
            assert alert_trigger["routing_key"] == "R0UT1NGKEY"
            assert alert_trigger["event_action"] == "trigger"
            assert alert_trigger["dedup_key"] == f"gateway/alert/{alert['id']}"
            p = alert_trigger["payload"]
            assert p["severity"] == "critical" and p["source"] == "svc"
            assert p["summary"].startswith("api-availability: error budget burning")
            assert p["timestamp"].endswith("Z") and p["class"] == "SLOBurnRate"
            assert p["custom_details"]["incident_id"] == alert["incident_id"]
            assert incident_trigger["event_action"] == "trigger"
            assert incident_trigger["dedup_key"] == f"gateway/incident/{alert['incident_id']}"
            assert incident_trigger["payload"]["severity"] == "error"   # SEV-2: 40 % over 5m
            # acknowledging the alert stops the paging: same dedup_key
            status, _ = await call(s, url, "POST", f"/v1/alerts/{alert['id']}/ack")
            assert status == 200
            await idle(app)
            assert rx.got["pd"][2] == {"routing_key": "R0UT1NGKEY",
                                       "event_action": "acknowledge",
                                       "dedup_key": alert_trigger["dedup_key"]}
            for _ in range(60):                          # the outage is over: resolved
                clock.advance(MIN)
                await run_evaluation(app)
            await idle(app)
            alert_events = [b for b in rx.got["pd"] if b["dedup_key"] ==
                            alert_trigger["dedup_key"]]
            assert [b["event_action"] for b in alert_events] == ["trigger", "acknowledge",
                                                                 "resolve"]
            assert alert_events[2] == {"routing_key": "R0UT1NGKEY", "event_action": "resolve",
                                       "dedup_key": alert_trigger["dedup_key"]}
            _, doc = await call(s, url, "GET", "/v1/notifications/deliveries")
            assert {d["status"] for d in doc["deliveries"]} == {"delivered"}
            assert [d["event"] for d in doc["deliveries"] if d["alert_id"] == alert["id"]] == [
                "resolved", "acknowledged", "firing"]


async def test_pagerduty_refusal_is_not_retried(tmp_path):
    async def refuse(request: web.Request) -> web.Response:
        hits.append(await request.json())
        return web.json_response({"status": "invalid event", "message": "Event object is "
                                  "invalid"}, status=400)

    hits: list[dict[str, Any]] = []
    rx = web.Application()
    rx.router.add_post("/pd", refuse)
    clock = FakeClock(wall=DAY0 + DAY)
    async with running(rx) as hook:
        pd = Target("pager", f"{hook}/pd", format="pagerduty", routing_key="k",
                    max_attempts=5, backoff_s=0)
        async with slo_plane(tmp_path, clock, notifications=(pd,)) as (url, s, app):
            status, _ = await call(s, url, "POST", "/v1/alerts",
                                   json={"title": "disk 91 % full", "service": "svc"})
            assert status == 201
            await idle(app)
            assert len(hits) == 1 and hits[0]["payload"]["severity"] == "warning"   # ticket
            _, doc = await call(s, url, "GET", "/v1/notifications/deliveries")
            (d,) = doc["deliveries"]
            assert (d["status"], d["attempts"], d["http_status"]) == ("failed", 1, 400)


# ---------------------------------------------------------------------------------------------
# E-mail


class MailBox:
    """aiosmtpd handler: keeps accepted messages; `defer` answers 451 to that many DATA first."""

    def __init__(self, defer: int = 0) -> None:
        self.defer = defer
        self.messages: list[email.message.EmailMessage] = []
        self.deferred_ids: list[str] = []
        self.rcpts: list[list[str]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            if self.defer > 0:
                self.defer -= 1
                self.deferred_ids.append(str(msg["Message-ID"]))
                return "451 4.3.0 try again later"
            assert session.authenticated and session.ssl is not None   # AUTH after STARTTLS
            self.messages.append(msg)          # type: ignore[arg-type]
            self.rcpts.append(list(envelope.rcpt_tos))
        return "250 OK"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                   auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"alerts" and \
        auth_data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)      # handled=False: answer 535


@pytest.fixture
def smtp_tls(tmp_path) -> Iterator[tuple[trustme.CA, str]]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield ca, str(ca_file)


def _smtp_server(ca: trustme.CA, box: MailBox) -> Controller:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    return Controller(box, hostname="127.0.0.1", port=free_port(), tls_context=server_ctx,
                      require_starttls=True, authenticator=_authenticator,
                      auth_require_tls=True, ready_timeout=10)


def _mail_target(port: int, ca_file: str, **kw: Any) -> Target:
    smtp = mail.SmtpConfig(host="127.0.0.1", port=port, sender="alerts@gateway.example",
                           username="alerts", password="s3cret", ca_file=ca_file)
    return Target("mail", format="email", smtp=smtp,
                  to=("oncall@example.com", "sre@example.com"), **kw)


async def test_email_over_starttls_with_auth_one_message_per_event(tmp_path, smtp_tls):
    ca, ca_file = smtp_tls
    box = MailBox(defer=1)                       # the first attempt is deferred (451)
    controller = _smtp_server(ca, box)
    controller.start()
    try:
        clock = FakeClock(wall=DAY0 + DAY)
        target = _mail_target(controller.port, ca_file, backoff_s=0.05, max_attempts=3)
        async with slo_plane(tmp_path, clock, notifications=(target,)) as (url, s, app):
            status, alert = await call(s, url, "POST", "/v1/alerts",
                                       json={"title": "cert <expires> in 10 days",
                                             "service": "svc", "description": "renew it"})
            assert status == 201
            await idle(app)
            status, _ = await call(s, url, "POST", f"/v1/alerts/{alert['id']}/resolve")
            assert status == 200
            await idle(app)
            # two events, two messages: the deferred attempt was retried as the same message
            assert len(box.messages) == 2
            fired, resolved = box.messages
            assert box.deferred_ids == [str(fired["Message-ID"])]
            assert box.rcpts[0] == ["oncall@example.com", "sre@example.com"]
            assert fired["Subject"] == "[FIRING:ticket] cert <expires> in 10 days"
            assert fired["From"] == "alerts@gateway.example"
            assert fired["To"] == "oncall@example.com, sre@example.com"
            assert resolved["Subject"] == "[RESOLVED] cert <expires> in 10 days"
            plain = fired.get_body(("plain",)).get_content()
            html = fired.get_body(("html",)).get_content()
            assert "renew it" in plain and "service: svc" in plain
            assert "cert &lt;expires&gt;" not in plain and "<th align=\"left\">service</th>" \
                in html and "<td>svc</td>" in html
            _, doc = await call(s, url, "GET", "/v1/notifications/deliveries")
            assert [(d["event"], d["status"], d["attempts"]) for d in doc["deliveries"]] == [
                ("resolved", "delivered", 1), ("firing", "delivered", 2)]
    finally:
        controller.stop()


async def test_email_refused_auth_fails_without_retrying(tmp_path, smtp_tls):
    ca, ca_file = smtp_tls
    box = MailBox()
    controller = _smtp_server(ca, box)
    controller.start()
    try:
        clock = FakeClock(wall=DAY0 + DAY)
        target = _mail_target(controller.port, ca_file, backoff_s=0.05, max_attempts=3)
        assert target.smtp is not None
        target = replace(target, smtp=replace(target.smtp, password="wrong"))
        async with slo_plane(tmp_path, clock, notifications=(target,)) as (url, s, app):
            status, _ = await call(s, url, "POST", "/v1/alerts",
                                   json={"title": "x", "service": "svc"})
            assert status == 201
            await idle(app)
            assert box.messages == []
            _, doc = await call(s, url, "GET", "/v1/notifications/deliveries")
            (d,) = doc["deliveries"]
            assert (d["status"], d["attempts"]) == ("failed", 1), d
            assert "authentication refused: 535" in d["error"]
    finally:
        controller.stop()


# ---------------------------------------------------------------------------------------------
# Incidents


async def test_incident_lifecycle_one_notification_per_transition_routed_by_severity(tmp_path):
    rx = Receiver()
    clock = FakeClock(wall=DAY0 + DAY)
    async with running(rx.app) as hook:
        targets = (
            Target("am", f"{hook}/am", min_severity="SEV-2"),
            Target("chat", f"{hook}/chat", format="slack", min_severity="SEV-1"),
            Target("pager", f"{hook}/pd", format="pagerduty", routing_key="key",
                   min_severity="page"),
        )
        async with slo_plane(tmp_path, clock, notifications=targets) as (url, s, app):
            status, inc = await call(s, url, "POST", "/v1/incidents", json={
                "title": "checkout errors", "severity": "SEV-2",
                "affected_service": "payments"})
            assert status == 201
            for action, body in (("acknowledge", {}), ("mitigate", {}), ("escalate", {}),
                                 ("resolve", {"resolution_notes": "rolled back",
                                              "root_cause": "bad deploy"})):
                clock.advance(MIN)
                status, _ = await call(s, url, "POST", f"/v1/incidents/{inc['id']}/{action}",
                                       json=body)
                assert status == 200, action
                await idle(app)
            am = rx.got["am"]
            assert [p["commonAnnotations"]["incident_event"] for p in am] == [
                "opened", "acknowledged", "escalated", "resolved"]     # mitigate: none
            assert [p["status"] for p in am] == ["firing", "firing", "firing", "resolved"]
            assert {p["alerts"][0]["fingerprint"] for p in am} == {am[0]["alerts"][0][
                "fingerprint"]}
            assert am[0]["commonLabels"] == {"alertname": "Incident", "incident_id": inc["id"],
                                             "severity": "SEV-2", "service": "payments",
                                             "cause": "manual"}
            assert "chat" not in rx.got                                  # SEV-1 only
            pd = rx.got["pd"]
            assert [b["event_action"] for b in pd] == ["trigger", "acknowledge", "trigger",
                                                       "resolve"]
            assert {b["dedup_key"] for b in pd} == {f"gateway/incident/{inc['id']}"}
            assert pd[0]["payload"]["severity"] == "error"             # SEV-2
            assert pd[0]["payload"]["custom_details"]["event"] == "opened"
            _, doc = await call(s, url, "GET", "/v1/notifications/deliveries")
            rows = doc["deliveries"]
            assert len(rows) == 8 and {(d["incident_id"], d["alert_id"], d["status"])
                                       for d in rows} == {(inc["id"], None, "delivered")}


async def test_unacknowledged_incident_escalation_is_notified_once_per_level(tmp_path):
    rx = Receiver()
    clock = FakeClock(wall=DAY0 + DAY)
    async with running(rx.app) as hook:
        targets = (Target("am", f"{hook}/am"),)
        async with slo_plane(tmp_path, clock, notifications=targets) as (url, s, app):
            status, _ = await call(s, url, "POST", "/v1/incidents", json={
                "title": "queue backlog", "severity": "SEV-1", "affected_service": "jobs"})
            assert status == 201
            for _ in range(40):                      # 40 minutes: levels 1 and 2 (15 min each)
                clock.advance(MIN)
                await run_evaluation(app)
            await idle(app)
            events = [(p["commonAnnotations"]["incident_event"],
                       p["commonAnnotations"]["summary"]) for p in rx.got["am"]]
            assert [e for e, _ in events] == ["opened", "escalated", "escalated"]
            assert "escalated to level 1" in events[1][1]
            assert "escalated to level 2" in events[2][1]


# ---------------------------------------------------------------------------------------------
# Config


def test_pagerduty_and_email_config():
    good = """
tokens: [{name: a, role: admin, token: t}]
notifications:
  - {name: pager, format: pagerduty, routing_key: "${PD_KEY}", min_severity: SEV-2}
  - name: mail
    format: email
    to: [oncall@example.com]
    smtp: {host: smtp.example.com, port: 587, username: u, password: "${SMTP_PW}",
           from: alerts@example.com}
"""
    cfg = load_text(good, env={"PD_KEY": "abc", "SMTP_PW": "pw"})
    pager, box = cfg.notifications
    assert (pager.url, pager.routing_key, pager.min_severity) == (
        "https://events.pagerduty.com/v2/enqueue", "abc", "SEV-2")
    assert box.smtp == mail.SmtpConfig(host="smtp.example.com", sender="alerts@example.com",
                                       username="u", password="pw")
    assert box.smtp.starttls and box.to == ("oncall@example.com",)
    assert "pw" not in repr(box) and "pw" not in repr(box.smtp) and "abc" not in repr(pager)
    bad = """
tokens: [{name: a, role: admin, token: t}]
notifications:
  - {name: p1, format: pagerduty}
  - {name: p2, format: pagerduty, routing_key: k, to: [a@b.c]}
  - {name: m1, format: email, url: "http://x", to: [], smtp: {host: h, from: nobody}}
  - {name: m2, format: email, to: [a@b.c], smtp: {host: h, from: a@b.c, port: 0, usr: x,
                                                    username: u}}
  - {name: m3, format: email}
  - {name: w, url: "http://x", routing_key: k, smtp: {}}
"""
    with pytest.raises(ConfigError) as exc:
        load_text(bad, env={})
    assert exc.value.errors == [
        "notifications[0].routing_key: is required for format pagerduty",
        "notifications[1].to: applies to format email only",
        "notifications[2].url: does not apply to format email (see smtp)",
        ("notifications[2].smtp.from: must be an e-mail address like name@example.com, "
         "got 'nobody'"),
        "notifications[2].to: must list at least one e-mail address",
        "notifications[3].smtp.usr: unknown key",
        "notifications[3].smtp.port: must be >= 1, got 0",
        "notifications[3].smtp.password: is required with username",
        "notifications[4].smtp: is required for format email",
        "notifications[4].to: is required for format email",
        "notifications[5].routing_key: applies to format pagerduty only",
        "notifications[5].smtp: applies to format email only"]
