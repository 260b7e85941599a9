"""The role matrix of the SLO / alert / incident / deploy-gate endpoints (monitor reads,
only admin changes; reader sees none of it)."""

from __future__ import annotations

import pytest

from gateway.control.auth import ACCESS
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY0, call, make_slo, slo_plane

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

READ = {"admin", "monitor"}
WRITE = {"admin"}
MATRIX = [
    ("GET", "/v1/slos", READ), ("POST", "/v1/slos", WRITE), ("GET", "/v1/slos/a", READ),
    ("PUT", "/v1/slos/a", WRITE), ("DELETE", "/v1/slos/a", WRITE),
    ("GET", "/v1/error-budgets", READ), ("GET", "/v1/error-budgets/svc", READ),
    ("GET", "/v1/deploy-gate/svc", READ),
    ("GET", "/v1/alerts", READ), ("POST", "/v1/alerts", WRITE),
    ("POST", "/v1/alerts/1/ack", WRITE), ("POST", "/v1/alerts/1/resolve", WRITE),
    ("GET", "/v1/notifications/deliveries", READ),
    ("GET", "/v1/incidents", READ), ("POST", "/v1/incidents", WRITE),
    ("GET", "/v1/incidents/INC-2023-001", READ),
    *[("POST", f"/v1/incidents/INC-2023-001/{a}", WRITE)
      for a in ("acknowledge", "mitigate", "escalate", "resolve", "timeline", "postmortem")],
    ("POST", "/v1/admin/evaluate", WRITE),
]


@pytest.mark.parametrize("method,path,allowed", MATRIX, ids=[f"{m} {p}" for m, p, _ in MATRIX])
async def test_roles(tmp_path, method, path, allowed):
    async with slo_plane(tmp_path, FakeClock(wall=DAY0), slos=(make_slo(name="a"),)) as (
            url, s, _app):
        for role in ("admin", "monitor", "reader", "gateway"):
            status, doc = await call(s, url, method, path, role=role, json={})
            if role in allowed:
                assert status != 403, (role, doc)
            else:
                assert status == 403 and doc["type"] == "about:blank", (role, status, doc)


def test_permissions():
    for perm in ("slos", "error_budgets", "deploy_gate", "alerts", "incidents"):
        key = f"{perm}:read"
        assert ACCESS[key] == READ, key
    for perm in ("slos", "alerts", "incidents"):
        assert ACCESS[f"{perm}:write"] == WRITE
