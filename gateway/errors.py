"""One root error type, a few subclasses, and RFC 9457 problem+json rendering."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson

PROBLEM_CONTENT_TYPE = "application/problem+json"
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def problem_body(status: int, detail: str, type_: str = "about:blank",
                 title: str | None = None, **extra: Any) -> bytes:
    """Serialise a problem details object (RFC 9457)."""
    doc: dict[str, Any] = {
        "type": type_,
        "title": title or _TITLES.get(status) or _phrase(status),
        "status": status,
        "detail": detail,
    }
    doc.update(extra)
    return orjson.dumps(doc)


class GatewayError(Exception):
    """Root of every error this package raises on purpose."""

    status: int = 500
    problem_type: str = "about:blank"

    def __init__(self, detail: str, *, status: int | None = None,
                 problem_type: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if problem_type is not None:
            self.problem_type = problem_type
        self.headers = headers or {}
        self.extra = extra

    def problem(self) -> bytes:
        return problem_body(self.status, self.detail, self.problem_type, **self.extra)


class ConfigError(GatewayError):
    """A configuration file is invalid. `errors` holds every `path.to.key: message` line."""

    status = 400

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors) if self.errors else "invalid configuration",
                         errors=self.errors)


class UpstreamError(GatewayError):
    """The upstream exchange failed. `kind` is the breaker's failure name."""

    status = 502
    kind = "connect_error"


class UpstreamConnectError(UpstreamError):
    status = 502
    kind = "connect_error"


class UpstreamResetError(UpstreamError):
    """The upstream closed or reset the connection mid-exchange, or sent garbage.

    For the breaker this is a connection failure, like a refused connect."""

    status = 502
    kind = "connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "timeout"


class StoreError(GatewayError):
    """A limiter store (Redis) failed or timed out."""

    status = 503
    problem_type = REDUCED_CAPACITY
