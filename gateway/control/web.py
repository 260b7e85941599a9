"""The control plane's web kit, one copy for every handler module: the application's keys,
the auth and error middleware, problem+json and JSON answers, request-body and path/query
helpers, the `requires` guard, and the hand-off of alert events to the notifier.

Handler modules import this one; it imports no handler or job module (no cycle through app.py):
the notifier and the evaluator are typed here by what handlers need of them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import orjson
from aiohttp import web

from gateway import validation as valid
from gateway.clock import Clock
from gateway.control.auth import Authenticator, Principal, allowed
from gateway.control.config import ControlConfig
from gateway.control.domain.alerts import Event
from gateway.control.domain.costs import FinOps
from gateway.control.domain.tenants import TenantBook
from gateway.control.store import Database, Store
from gateway.control.store.database import UnstorableText
from gateway.control.store.groupcommit import GroupCommit
from gateway.errors import PROBLEM_CONTENT_TYPE, problem_body

log = logging.getLogger("gateway.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


CONFIG = web.AppKey("config", ControlConfig)
CLOCK = web.AppKey("clock", Clock)
DB = web.AppKey("db", Database)
AUTH = web.AppKey("auth", Authenticator)
PRINCIPAL = web.RequestKey("principal", Principal)
FINOPS = web.AppKey("finops", FinOps)
BOOK = web.AppKey("tenant_book", TenantBook)
INGEST = web.AppKey("ingest", GroupCommit)     # ingest batches written in groups


class Publisher(Protocol):
    """What handlers need of the notifier (jobs/notify.py's Notifier)."""

    def publish(self, event: Event) -> None: ...


class Evaluates(Protocol):
    """What handlers need of the SLO evaluator (jobs/evaluator.py's Evaluator)."""

    def evaluate(self, now: float) -> list[Event]: ...


NOTIFIER = web.AppKey("slo_notifier", Publisher)
EVALUATOR = web.AppKey("slo_evaluator", Evaluates)


def publish(app: web.Application, events: Iterable[Event]) -> None:
    """Hand alert or incident events to the app's notifier, if it has one (event loop only)."""
    notifier = app.get(NOTIFIER)
    if notifier is not None:
        for e in events:
            notifier.publish(e)


class Queued(Protocol):
    events: Any     # a deque of Event, appended on the database thread


def publish_queued(app: web.Application, source: Queued | None) -> None:
    """Hand the alert events `source` (the budget evaluator, the tenant book) queued on the
    database thread to the notifier (event loop only)."""
    if source is None or not source.events:
        return
    events = list(source.events)
    source.events.clear()
    publish(app, events)




# ---------------------------------------------------------------------------------------------
# Errors, auth


def problem(status: int, detail: str, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="control"'} if status == 401 else None
    return web.Response(status=status, body=problem_body(status, detail, **extra),
                        content_type=PROBLEM_CONTENT_TYPE, headers=headers)


def requires(permission: str) -> Callable[[Handler], Handler]:
    """Mark a handler with the permission (see auth.ACCESS) a caller's role must hold."""
    def mark(handler: Handler) -> Handler:
        handler.permission = permission  # type: ignore[attr-defined]
        return handler
    return mark


class BadParam(valid.Invalid):
    """One bad query parameter or body field (answered like every Invalid: a 400 problem)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__([f"{name}: {message}"])


# The longest `reason` a change may carry into the audit log, the same on every endpoint.
MAX_REASON = 2000


async def json_body(request: web.Request, *, required: bool = False,
                    list_as: str | None = None) -> dict[str, Any]:
    """A write request's body: a JSON object, with its optional `reason` (a string of at most
    MAX_REASON characters, kept in the audit log) checked. Without a body: {} or, when
    `required` (the body is the change), an error. With `list_as`, a bare JSON list is taken as
    the object {list_as: list}. Every problem is Invalid naming `body` or `reason`, which the
    middleware answers as a 400 problem."""
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        if required:
            raise BadParam("body", "is required (a JSON object)")
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadParam("body", f"must be a JSON object, got invalid JSON ({exc})") from None
    if list_as is not None and isinstance(doc, list):
        return {list_as: doc}
    if not isinstance(doc, dict):
        raise BadParam("body", f"must be a JSON object, got {valid.kind(doc)}")
    if "reason" in doc:
        errs = valid.Errors()
        valid.string(doc["reason"], "reason", errs, nonempty=False, maximum=MAX_REASON)
        errs.check()
    return doc


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    permission = getattr(handler, "permission", None)
    if permission is not None or request.path.startswith("/v1/") or request.path == "/v1":
        principal = request.app[AUTH].authenticate(request.headers.get("Authorization"))
        if principal is None:
            return problem(401, "a valid bearer token is required")
        if permission is not None and not allowed(principal, permission):
            return problem(403, f"role {principal.role!r} may not do this ({permission})")
        request[PRINCIPAL] = principal
    try:
        return await handler(request)
    except valid.Invalid as exc:       # from a handler, or from domain code on the database thread
        return invalid(exc.lines)
    except UnstorableText as exc:
        return problem(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, exc.reason)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return problem(500, "internal error")


async def held_elsewhere(request: web.Request, job: str) -> web.Response | None:
    """A 409 problem when another replica holds the lock of background `job` (the one its
    periodic run takes): a run asked for by hand never overlaps another replica's. None when
    this replica holds it (always, on SQLite)."""
    if await request.app[DB].leads(job):
        return None
    return problem(409, f"job {job!r} runs on another replica now: ask that one, or retry later")


MAX_ROW_ID = 2 ** 63 - 1      # SQLite's INTEGER (and PostgreSQL's bigint) ceiling


def path_id(request: web.Request, what: str, name: str = "id") -> int:
    """The integer row id in the path, for every `{id}` route of an integer-keyed resource.
    Anything that cannot name a row (not ASCII digits, or beyond a signed 64-bit integer, which
    the database driver would refuse with an error) is a 404 problem naming the id, never a
    500."""
    raw = request.match_info[name]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_ROW_ID:
        raise web.HTTPNotFound(reason=f"no {what} {raw[:64]!r}")
    return int(raw)


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def parse_time(name: str, value: str) -> float:
    """Unix seconds or ISO-8601 (naive means UTC); BadParam naming `name` otherwise."""
    errs = valid.Errors()
    t = valid.instant(value, name, errs)
    errs.check()
    assert t is not None
    return t


def query_limit(request: web.Request, default: int, maximum: int) -> int:
    """The `limit` query parameter: an integer from 1 to `maximum` (`default` without one)."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise BadParam("limit", f"must be an integer from 1 to {maximum}, got {raw!r}")
    return int(raw)


def request_actor(request: web.Request) -> str:
    """The authenticated caller's name (the audit log's actor)."""
    return request[PRINCIPAL].name


def request_time(request: web.Request) -> float:
    return request.app[CLOCK].time()


def request_store(request: web.Request) -> Store:
    return request.app[DB].store


async def on_db(request: web.Request, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on the database thread."""
    return await request.app[DB].call(fn, *args, **kwargs)


def query_flag(request: web.Request, name: str) -> bool:
    """A true/false query parameter (false without it)."""
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise BadParam(name, f"must be true or false, got {raw!r}")
    return raw in ("true", "1", "yes")


def invalid(errors: list[str]) -> web.Response:
    """One 400 problem listing a body's `path: message` errors (the first as its detail)."""
    return problem(400, errors[0], errors=errors[:50])
