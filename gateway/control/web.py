"""The control plane's web kit, one copy for every handler module: the application's keys,
the auth and error middleware, problem+json and JSON answers, request-body and path/query
helpers, the `requires` guard, and the database worker the handlers call the store through.

Handler modules import this one; it imports no handler module (no cycle through app.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import orjson
from aiohttp import web

from gateway.clock import Clock
from gateway.control.auth import Authenticator, Principal, allowed
from gateway.control.config import ControlConfig
from gateway.control.database import JobLock, UnstorableText
from gateway.control.store import Store
from gateway.errors import PROBLEM_CONTENT_TYPE, problem_body

log = logging.getLogger("gateway.control")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Database:
    """The Store behind a single worker thread: `await db.call(fn, store, ...)`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-db")
        self.jobs = JobLock(store.path)   # replicas on PostgreSQL: one runs each job

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def leads(self, job: str) -> bool:
        """Whether this replica runs background `job` now (always, on SQLite)."""
        return await self.call(self.jobs.holds, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.jobs.close()
        self.store.close()



CONFIG = web.AppKey("config", ControlConfig)
CLOCK = web.AppKey("clock", Clock)
DB = web.AppKey("db", Database)
AUTH = web.AppKey("auth", Authenticator)
PRINCIPAL = web.RequestKey("principal", Principal)


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


class BadParam(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")


async def json_body(request: web.Request) -> dict[str, Any]:
    """A write request's JSON object body ({} without one), with its optional `reason` (a
    string of at most 2000 characters, kept in the audit log) checked."""
    if not request.can_read_body:
        return {}
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadParam("body", "must be JSON") from None
    if not isinstance(doc, dict):
        raise BadParam("body", "must be a JSON object")
    reason = doc.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 2000:
        raise BadParam("reason", "must be a string of at most 2000 characters")
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
    except (BadParam, UnstorableText) as exc:
        return problem(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, exc.reason)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return problem(500, "internal error")


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
    """Unix seconds or ISO-8601 (naive means UTC)."""
    try:
        t = float(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(value.strip().replace("z", "Z"))
        except ValueError:
            raise BadParam(name, f"must be unix seconds or ISO-8601, got {value!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    if not math.isfinite(t):
        raise BadParam(name, f"must be a finite number, got {value!r}")
    return t



def query_limit(request: web.Request, default: int, maximum: int) -> int:
    """The `limit` query parameter: an integer from 1 to `maximum` (`default` without one)."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise BadParam("limit", f"must be an integer from 1 to {maximum}, got {raw!r}")
    return int(raw)
