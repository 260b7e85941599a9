"""The dashboard's HTTP side: `/`, `/static/...` (cache headers, CSP, no escape from the folder),
`/v1/me`; and what is shipped (the vendored uPlot, no outside URLs). The page itself is tested in
a real browser in test_dashboard_browser.py."""

from __future__ import annotations

import re

import pytest

from gateway.control.api import dashboard
from gateway.control.auth import ACCESS
from tests.fakes import FakeClock
from tests.test_control_support import DAY0, TOKENS, auth, control_plane

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

SELF_ONLY = {"default-src 'none'", "script-src 'self'", "style-src 'self'",
             "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"}


def csp_directives(value: str) -> set[str]:
    return {d.strip() for d in value.split(";") if d.strip()}


async def test_index_is_served_with_a_strict_csp_and_versioned_assets(tmp_path) -> None:
    async with control_plane(tmp_path, FakeClock(wall=DAY0)) as (url, s, _app):
        async with s.get(f"{url}/") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            html = await resp.text()
            assert csp_directives(resp.headers["Content-Security-Policy"]) >= SELF_ONLY
            assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            etag = resp.headers["ETag"]
        async with s.get(f"{url}/", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304

        refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
        assert {r.split("?")[0] for r in refs} >= {
            "/static/app.js", "/static/style.css", "/static/vendor/uplot/uPlot.iife.min.js",
            "/static/vendor/uplot/uPlot.min.css"}
        for ref in refs:
            path, _, version = ref.partition("?v=")
            assert version, f"{ref} is not versioned"
            async with s.get(f"{url}{ref}") as resp:
                assert resp.status == 200, ref
                assert "immutable" in resp.headers["Cache-Control"]
                assert "max-age=31536000" in resp.headers["Cache-Control"]
                assert resp.headers["ETag"] == f'"{version}"'
                assert "Content-Security-Policy" in resp.headers
            # the same file without (or with a stale) version must be revalidated
            async with s.get(f"{url}{path}?v=stale") as resp:
                assert resp.status == 200
                assert resp.headers["Cache-Control"] == "no-cache"

        async with s.get(f"{url}/static/app.js") as resp:
            assert resp.headers["Content-Type"].startswith("text/javascript")
        async with s.get(f"{url}/static/style.css") as resp:
            assert resp.headers["Content-Type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/../dashboard.py",
                                  "/static/%2e%2e/dashboard.py", "/static/..%2fapp.py",
                                  "/static/index.html"])
async def test_static_serves_only_the_shipped_files(tmp_path, path: str) -> None:
    async with control_plane(tmp_path, FakeClock(wall=DAY0)) as (url, s, _app), \
            s.get(f"{url}{path}") as resp:
        assert resp.status == 404
        body = await resp.read()
        assert b"import" not in body and b"def " not in body


async def test_static_needs_no_token_but_me_does(tmp_path) -> None:
    async with control_plane(tmp_path, FakeClock(wall=DAY0)) as (url, s, _app):
        async with s.get(f"{url}/favicon.ico", allow_redirects=False) as resp:
            assert resp.status == 302
        async with s.get(f"{url}/v1/me") as resp:
            assert resp.status == 401
        async with s.get(f"{url}/v1/me", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401


@pytest.mark.parametrize("role", ["admin", "monitor", "reader", "gateway"])
async def test_me_tells_the_role_and_its_permissions(tmp_path, role: str) -> None:
    async with control_plane(tmp_path, FakeClock(wall=DAY0)) as (url, s, _app), \
            s.get(f"{url}/v1/me", headers=auth(role)) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["role"] == role
    assert doc["name"] == f"{role}-user"
    assert set(doc["permissions"]) == {p for p, roles in ACCESS.items() if role in roles}
    assert set(doc["all_permissions"]) == set(ACCESS)
    assert TOKENS[role] not in str(doc)


def test_nothing_shipped_reaches_outside_the_control_plane() -> None:
    """No CDN, font or analytics URL in the page or its scripts: the dashboard works offline."""
    html, assets = dashboard.load_assets()
    texts = {"index.html": html.decode()}
    texts.update({name: a.body.decode("utf-8", "replace") for name, a in assets.items()
                  if not name.startswith("vendor/")})
    for name, text in texts.items():
        urls = re.findall(r"https?://[^\s\"')]+", text)
        assert all(u.startswith("http://www.w3.org/") for u in urls), (name, urls)
    assert ".innerHTML" not in texts["app.js"]         # API strings are never parsed as HTML
    lib = assets["vendor/uplot/uPlot.iife.min.js"].body
    assert b"uPlot" in lib and len(lib) < 80_000
    assert b"MIT" in assets["vendor/uplot/LICENSE"].body
