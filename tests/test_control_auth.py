"""The role matrix over every endpoint and role; open endpoints; audit log."""

from __future__ import annotations

import itertools

import orjson
import pytest

from gateway.control.auth import ACCESS, Authenticator
from gateway.control.config import TokenConfig
from tests.fakes import FakeClock
from tests.test_control_support import (
    DAY0,
    TOKENS,
    batch,
    control_plane,
    get,
    ingest,
    series,
    store_of,
)

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

T = DAY0 + 3_600
ROLES = ("admin", "monitor", "reader", "gateway")

# (method, path, roles allowed) -- the access matrix of the README's roles table
MATRIX = [
    ("POST", "/v1/ingest", {"admin", "gateway"}),
    ("GET", "/v1/signals", {"admin", "monitor", "reader"}),
    ("GET", "/v1/health/overview", {"admin", "monitor", "reader"}),
    ("GET", "/v1/limits", {"admin", "monitor"}),
    ("GET", "/v1/breakers", {"admin", "monitor"}),
    ("GET", "/v1/audit", {"admin"}),
    ("POST", "/v1/admin/retention/run", {"admin"}),
]
CALLERS = [None, "bad-token", "Basic YWRtaW46YWRtaW4=", *ROLES]
_ids = itertools.count()


async def _call(s, url: str, method: str, path: str, caller: str | None) -> tuple[int, dict]:
    headers = {}
    if caller in TOKENS:
        headers["Authorization"] = f"Bearer {TOKENS[caller]}"
    elif caller == "bad-token":
        headers["Authorization"] = "Bearer " + TOKENS["admin"] + "x"
    elif caller is not None:
        headers["Authorization"] = caller
    body = None
    if path == "/v1/ingest":
        body = orjson.dumps(batch(f"m-{next(_ids)}", T, [series()]))
    async with s.request(method, f"{url}{path}", data=body, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read()) if resp.status != 204 else {}


@pytest.mark.parametrize("method,path,allowed", MATRIX, ids=[m[1] for m in MATRIX])
async def test_role_matrix(tmp_path, method, path, allowed):
    async with control_plane(tmp_path, FakeClock(wall=T + 30)) as (url, s, _app):
        for caller in CALLERS:
            status, doc = await _call(s, url, method, path, caller)
            if caller not in ROLES:
                expected = 401
            else:
                expected = 200 if caller in allowed else 403
            assert status == expected, (caller, doc)
            if status >= 400:
                assert doc["status"] == status and doc["type"] == "about:blank", doc


def test_matrix_matches_the_access_table():
    perms = {"/v1/ingest": "ingest", "/v1/signals": "signals:read",
             "/v1/health/overview": "health:read", "/v1/limits": "limits:read",
             "/v1/breakers": "breakers:read", "/v1/audit": "audit:read",
             "/v1/admin/retention/run": "admin:write"}
    for _, path, allowed in MATRIX:
        assert ACCESS[perms[path]] == allowed
    assert all("admin" in roles for roles in ACCESS.values())          # admin: everything
    assert [p for p, r in ACCESS.items() if "gateway" in r] == ["ingest"]  # gateway: only ingest


async def test_open_endpoints_and_unknown_paths(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=T + 30)) as (url, s, _app):
        async with s.get(f"{url}/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with s.get(f"{url}/") as resp:
            assert resp.status == 200 and "control plane" in await resp.text()
        assert (await ingest(s, url, batch("x-1", T, [series()])))[0] == 200
        assert (await ingest(s, url, batch("x-1", T, [series()])))[0] == 200
        async with s.get(f"{url}/metrics") as resp:
            text = await resp.text()
            assert resp.status == 200
            assert 'control_ingest_batches_total{result="accepted"} 1.0' in text
            assert 'control_ingest_batches_total{result="duplicate"} 1.0' in text
            assert "control_ingest_duration_seconds_count 2.0" in text
        async with s.get(f"{url}/v1/nope") as resp:
            assert resp.status == 401
        status, doc = await get(s, url, "/v1/nope")
        assert status == 404 and doc["status"] == 404
        async with s.get(f"{url}/v1/ingest", headers={"Authorization":
                                                      f"Bearer {TOKENS['admin']}"}) as resp:
            assert resp.status == 405


def test_authenticator():
    auth = Authenticator((TokenConfig("a", "admin", "secret-a"),
                          TokenConfig("g", "gateway", "secret-g")))
    assert auth.authenticate("Bearer secret-a").role == "admin"
    assert auth.authenticate("bearer  secret-g").name == "g"
    for bad in (None, "", "Bearer", "Bearer secret", "Bearer secret-a2", "Token secret-a",
                "Bearer sécret"):
        assert auth.authenticate(bad) is None, bad


async def test_retention_run_is_audited_and_audit_filters(tmp_path):
    clock = FakeClock(wall=T + 30)
    async with control_plane(tmp_path, clock) as (url, s, app):
        headers = {"Authorization": f"Bearer {TOKENS['admin']}"}
        async with s.post(f"{url}/v1/admin/retention/run", headers=headers,
                          json={"reason": "disk nearly full"}) as resp:
            assert resp.status == 200
            assert set((await resp.json())["deleted"]) >= {"1m", "5m", "1h", "1d"}
        clock.advance(10)
        store_of(app).audit.record("ops-bot", "reset", "breaker/payments", "manual reset",
                            {"by": "test"})
        status, doc = await get(s, url, "/v1/audit")
        assert status == 200
        entries = doc["entries"]
        assert [(e["actor"], e["action"], e["target"]) for e in entries] == [
            ("ops-bot", "reset", "breaker/payments"), ("admin-user", "run", "retention")]
        assert entries[1]["reason"] == "disk nearly full" and entries[1]["at"] == T + 30
        status, doc = await get(s, url, "/v1/audit", actor="admin-user")
        assert [e["action"] for e in doc["entries"]] == ["run"]
        status, doc = await get(s, url, "/v1/audit", action="reset", limit=1)
        assert [e["actor"] for e in doc["entries"]] == ["ops-bot"]
        status, doc = await get(s, url, "/v1/audit", since=T + 35)
        assert [e["actor"] for e in doc["entries"]] == ["ops-bot"]
        status, doc = await get(s, url, "/v1/audit", limit="many")
        assert status == 400 and doc["detail"].startswith("limit:")
        # ingest is not a change: never audited
        assert (await ingest(s, url, batch("a-1", T, [series()])))[0] == 200
        status, doc = await get(s, url, "/v1/audit")
        assert len(doc["entries"]) == 2


async def test_bad_query_parameters_are_400(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=T + 30)) as (url, s, _app):
        for params, field in (({"window": "2m"}, "window"), ({"since": "yesterday"}, "since"),
                              ({"until": "nan"}, "until"), ({"since": "100", "until": "50"},
                                                            "since")):
            status, doc = await get(s, url, "/v1/signals", **params)
            assert status == 400 and doc["detail"].startswith(field + ":"), doc
