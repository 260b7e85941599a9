"""The admin listener: health, readiness, metrics, breakers, limit tests, reload, config."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any, Protocol

import orjson
from aiohttp import web

from gateway.errors import PROBLEM_CONTENT_TYPE, ConfigError, StoreError, problem_body


class AdminBackend(Protocol):
    """What the admin API needs from the process serving it (a gateway or a supervisor)."""

    token: str

    def ready(self) -> tuple[bool, str]: ...

    async def metrics(self) -> tuple[bytes, str]: ...

    async def breakers(self) -> list[dict[str, Any]]: ...

    async def reset_breaker(self, upstream: str) -> dict[str, Any] | None: ...

    async def limits_test(self, limit: str, key: str, requests: int) -> dict[str, Any]: ...

    async def reload(self) -> str: ...

    def effective_config(self) -> dict[str, Any]: ...


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def problem(status: int, detail: str, **extra: Any) -> web.Response:
    resp = web.Response(status=status, body=problem_body(status, detail, **extra))
    resp.content_type = PROBLEM_CONTENT_TYPE
    return resp


def _is_loopback(request: web.BaseRequest) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer or not isinstance(peer, tuple):  # unix socket: local by construction
        return True
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def make_app(backend: AdminBackend) -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)  # type: ignore[no-any-return]
        token = backend.token
        if token:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), token.encode()):
                resp = problem(401, "a valid 'Authorization: Bearer <admin.token>' is required")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
                return resp
        elif not _is_loopback(request):
            return problem(403, "admin.token is not set: the admin API answers loopback "
                                "callers only")
        return await handler(request)  # type: ignore[no-any-return]

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ok, state = backend.ready()
        return json_response({"status": state}, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = await backend.metrics()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def breakers(request: web.Request) -> web.Response:
        return json_response(await backend.breakers())

    async def reset(request: web.Request) -> web.Response:
        name = request.match_info["upstream"]
        state = await backend.reset_breaker(name)
        if state is None:
            return problem(404, f"no upstream named {name!r}")
        return json_response(state)

    async def limits_test(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return problem(400, f"body is not JSON: {exc}")
        if not isinstance(body, dict):
            return problem(400, "body must be a JSON object {\"limit\", \"key\", \"requests\"}")
        limit, key, n = body.get("limit"), body.get("key", "anonymous"), body.get("requests", 1)
        errors = []
        if not isinstance(limit, str):
            errors.append("limit: must be the name of a configured limit")
        if not isinstance(key, str):
            errors.append("key: must be a string")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            errors.append("requests: must be an integer >= 1")
        if errors:
            return problem(400, "; ".join(errors), errors=errors)
        assert isinstance(limit, str) and isinstance(key, str)  # narrowed by the checks above
        try:
            return json_response(await backend.limits_test(limit, key, n))
        except KeyError:
            return problem(404, f"no limit named {limit!r}")
        except StoreError as exc:
            resp = problem(503, f"the limiter store is unavailable: {exc.detail}")
            resp.headers["Retry-After"] = "1"
            return resp

    async def reload(request: web.Request) -> web.Response:
        try:
            version = await backend.reload()
        except ConfigError as exc:
            return problem(400, "the new config is invalid; the old config keeps serving",
                           errors=exc.errors)
        return json_response({"version": version})

    async def config(request: web.Request) -> web.Response:
        return json_response(backend.effective_config())

    app = web.Application(middlewares=[auth])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/breakers", breakers)
    app.router.add_post("/admin/breakers/{upstream}/reset", reset)
    app.router.add_post("/admin/limits/test", limits_test)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/config", config)
    return app
