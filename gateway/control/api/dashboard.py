"""The dashboard: a static single-page app served by the control plane at `/`.

    GET /                      index.html (no-cache; asset URLs carry a content hash)
    GET /static/{path}         the files under control/dashboard/ (immutable for a year when the
                               request's `v` matches the file's hash, else no-cache)
    GET /favicon.ico           the icon, so browsers do not log a 404
    GET /v1/me                 the caller's name, role, permissions, and every permission the control
                               plane defines (any valid token): the page shows what the role may
                               see and do without guessing, and without 403s in the console

The page talks to the `/v1` API only, with the token the user typed (kept in sessionStorage), so it
needs nothing beyond this process at run time: the charting library (uPlot, MIT) is vendored under
dashboard/vendor/. Every answer carries a strict Content-Security-Policy allowing only this origin.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from gateway.control.auth import ACCESS, allowed
from gateway.control.web import PRINCIPAL

ROOT = Path(__file__).resolve().parent.parent / "dashboard"   # control/dashboard/

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".svg": "image/svg+xml", ".md": "text/plain", "": "text/plain"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str          # also the `v` of its versioned URL


def _asset(path: Path) -> Asset:
    body = path.read_bytes()
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or \
        "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("+xml"):
        ctype += "; charset=utf-8"
    return Asset(body, ctype, hashlib.sha256(body).hexdigest()[:16])


def load_assets(root: Path = ROOT) -> tuple[bytes, dict[str, Asset]]:
    """(index.html with versioned asset URLs, every other file by its path under root).

    Files are read once at startup: the set is small (about 80 KB) and fixed per release, and
    serving from a dict means no request can name a path outside it."""
    assets = {p.relative_to(root).as_posix(): _asset(p)
              for p in sorted(root.rglob("*")) if p.is_file() and p.name != "index.html"}
    html = (root / "index.html").read_text("utf-8")
    for name, asset in assets.items():
        html = html.replace(f'"/static/{name}"', f'"/static/{name}?v={asset.etag}"')
    return html.encode(), assets


INDEX = web.AppKey("dashboard_index", bytes)
ASSETS = web.AppKey("dashboard_assets", dict)


def _not_modified(request: web.Request, etag: str) -> bool:
    return request.headers.get("If-None-Match", "").strip() == f'"{etag}"'


async def index(request: web.Request) -> web.Response:
    body = request.app[INDEX]
    etag = hashlib.sha256(body).hexdigest()[:16]
    headers = dict(SECURITY_HEADERS, **{"Cache-Control": REVALIDATE, "ETag": f'"{etag}"'})
    if _not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, headers=headers, content_type="text/html", charset="utf-8")


async def static(request: web.Request) -> web.Response:
    asset: Asset | None = request.app[ASSETS].get(request.match_info["path"])
    if asset is None:
        raise web.HTTPNotFound(reason="no such file")
    versioned = request.query.get("v") == asset.etag
    headers = dict(SECURITY_HEADERS, **{"Cache-Control": IMMUTABLE if versioned else REVALIDATE,
                                        "ETag": f'"{asset.etag}"',
                                        "Content-Type": asset.content_type})
    if _not_modified(request, asset.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers=headers)


async def favicon(request: web.Request) -> web.Response:
    raise web.HTTPFound("/static/favicon.svg")


async def me(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    doc = {"name": principal.name, "role": principal.role,
           "permissions": sorted(p for p in ACCESS if allowed(principal, p)),
           "all_permissions": sorted(ACCESS)}
    return web.Response(body=orjson.dumps(doc), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def routes(app: web.Application, root: Path = ROOT) -> None:
    """Add the dashboard's routes to the control plane app."""
    app[INDEX], app[ASSETS] = load_assets(root)
    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/v1/me", me)
