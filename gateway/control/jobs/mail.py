"""E-mail notifications: the `smtp:` settings of an `email` target, the message, one SMTP send.

    notifications:
      - name: oncall-mail
        format: email
        to: [oncall@example.com, sre@example.com]
        smtp:
          host: smtp.example.com
          port: 587                  # default 587 (465 is implicit TLS: not supported, use 587)
          starttls: true             # default true: refuse to send where the server cannot
          username: alerts           # optional; AUTH only after STARTTLS unless starttls: false
          password: "${SMTP_PASSWORD}"
          from: alerts@example.com
          ca_file: /etc/ssl/relay-ca.pem   # optional: trust this CA (an internal relay)

One event is one message to every recipient (one SMTP transaction, a plain-text and an HTML
part). The message, its Message-ID included, is built once per event: a retry after a transient
failure resends the same message, which receivers can deduplicate by that id, and a message the
server took is never sent again.

The send is blocking stdlib smtplib, run in a worker thread by the notifier: it needs no new
runtime dependency (aiosmtplib would be one) and a mail goes out at most once per event, so a
thread per send costs nothing that matters.
"""

from __future__ import annotations

import html
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from gateway import validation as valid

SMTP_KEYS = {"host", "port", "starttls", "username", "password", "from", "ca_file"}


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    sender: str                       # `from`
    port: int = 587
    starttls: bool = True
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    def __repr__(self) -> str:        # never print the password
        return f"SmtpConfig(host={self.host!r}, port={self.port}, from={self.sender!r})"


class MailError(Exception):
    """A send that failed; `permanent` when retrying the same message cannot help."""

    def __init__(self, message: str, *, permanent: bool, code: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code


def _address(value: Any, path: str, errs: valid.Errors) -> str | None:
    s = valid.string(value, path, errs)
    if s is not None and ("@" not in s or any(c in s for c in " \r\n<>,")):
        errs.add(path, f"must be an e-mail address like name@example.com, got {s!r}")
        return None
    return s


def parse_smtp(value: Any, path: str, errs: valid.Errors) -> SmtpConfig | None:
    n0 = len(errs.lines)
    m = valid.mapping(value, path, errs, SMTP_KEYS, {"host", "from"})
    if m is None:
        return None
    kw: dict[str, Any] = {}
    if "host" in m:
        kw["host"] = valid.string(m["host"], f"{path}.host", errs)
    if "from" in m:
        kw["sender"] = _address(m["from"], f"{path}.from", errs)
    if "port" in m:
        kw["port"] = valid.integer(m["port"], f"{path}.port", errs, minimum=1, maximum=65535)
    if "starttls" in m:
        kw["starttls"] = valid.boolean(m["starttls"], f"{path}.starttls", errs)
    for key in ("username", "password", "ca_file"):
        if key in m:
            kw[key] = valid.string(m[key], f"{path}.{key}", errs)
    if ("username" in m) != ("password" in m):
        errs.add(f"{path}.{'password' if 'username' in m else 'username'}",
                 "is required with " + ("username" if "username" in m else "password"))
    if len(errs.lines) != n0:
        return None
    return SmtpConfig(**kw)


def parse_recipients(value: Any, path: str, errs: valid.Errors) -> tuple[str, ...] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        errs.add(path, f"must be a list of e-mail addresses, got {valid.kind(value)}")
        return None
    if not value:
        errs.add(path, "must list at least one e-mail address")
        return None
    n0 = len(errs.lines)
    out = [_address(v, f"{path}[{i}]", errs) for i, v in enumerate(value)]
    return None if len(errs.lines) != n0 else tuple(a for a in out if a)


def message(smtp: SmtpConfig, to: tuple[str, ...], subject: str, lines: list[tuple[str, str]],
            text: str) -> EmailMessage:
    """A multipart/alternative message: `text` then `lines` (label, value) as plain text and as
    an HTML table."""
    msg = EmailMessage()
    msg["Subject"] = subject.replace("\r", " ").replace("\n", " ")[:250]
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=smtp.sender.rsplit("@", 1)[1])
    plain = text + "\n\n" + "\n".join(f"{k}: {v}" for k, v in lines) + "\n"
    msg.set_content(plain)
    rows = "".join(f"<tr><th align=\"left\">{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in lines)
    msg.add_alternative(f"<html><body><p>{html.escape(text)}</p><table>{rows}</table>"
                        f"</body></html>", subtype="html")
    return msg


def send(smtp: SmtpConfig, msg: EmailMessage, timeout_s: float) -> str:
    """Send one message (blocking). Returns '' or a note on refused recipients; raises
    MailError. A message taken by the server for some recipients counts as sent."""
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=timeout_s) as conn:
            conn.ehlo()
            if smtp.starttls:
                if not conn.has_extn("starttls"):
                    raise MailError(f"{smtp.host}:{smtp.port} does not offer STARTTLS",
                                    permanent=True)
                ctx = ssl.create_default_context(cafile=smtp.ca_file)
                conn.starttls(context=ctx)
                conn.ehlo()
            if smtp.username is not None and smtp.password is not None:
                conn.login(smtp.username, smtp.password)
            refused = conn.send_message(msg)
    except MailError:
        raise
    except smtplib.SMTPAuthenticationError as exc:
        raise MailError(f"authentication refused: {exc.smtp_code}", permanent=True,
                        code=exc.smtp_code) from exc
    except smtplib.SMTPResponseException as exc:
        # 5xx: the server refuses this message for good; 4xx: try again later
        raise MailError(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}"[:500],
                        permanent=exc.smtp_code >= 500, code=exc.smtp_code) from exc
    except smtplib.SMTPRecipientsRefused as exc:
        raise MailError(f"every recipient refused: {sorted(exc.recipients)}"[:500],
                        permanent=True) from exc
    except ssl.SSLError as exc:
        raise MailError(f"TLS: {exc}"[:500], permanent=True) from exc
    except (smtplib.SMTPException, OSError) as exc:
        raise MailError(f"{type(exc).__name__}: {exc}"[:500], permanent=False) from exc
    return f"refused: {sorted(refused)}"[:500] if refused else ""
