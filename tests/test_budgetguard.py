"""BudgetGuard (gateway/budgetguard.py), the shipper's on_directives, and the proxy's 429s."""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp import web

from gateway.budgetguard import BUDGET_EXHAUSTED, BudgetGuard
from gateway.config import ControlPlaneConfig
from gateway.shipper import Shipper
from tests.fakes import FakeClock
from tests.harness import Upstream, gateway_yaml, running_gateway, url_of
from tests.test_control_support import running

T0 = 1_700_000_000.0


def test_check_rejects_until_the_period_ends():
    clock = FakeClock(wall=T0)
    g = BudgetGuard(clock)
    assert g.check("svc") is None
    g.update({"reject_services": {"svc": {"until": T0 + 100.5, "budget": "tiny"}}})
    status, headers, body = g.check("svc")  # type: ignore[misc]
    assert status == 429
    assert dict(headers) == {"Content-Type": "application/problem+json", "Retry-After": "101"}
    doc = orjson.loads(body)
    assert doc["type"] == BUDGET_EXHAUSTED == "https://gateway.dev/problems/budget-exhausted"
    assert doc["status"] == 429 and doc["budget"] == "tiny" and doc["service"] == "svc"
    assert doc["title"] and doc["detail"]
    assert g.check("other") is None
    clock.advance(100)
    assert dict(g.check("svc")[1])["Retry-After"] == "1"  # type: ignore[index]
    clock.advance(0.5)
    assert g.check("svc") is None                        # the period rolled over


def test_update_replaces_the_set_and_tolerates_junk():
    clock = FakeClock(wall=T0)
    g = BudgetGuard(clock)
    g.update({"reject_services": {"a": {"until": T0 + 10, "budget": "x"},
                                  "b": {"until": "soon"}, "c": 5, 7: {"until": T0 + 9}}})
    assert g.rejecting == {"a": T0 + 10}
    g.update({})                                         # the control plane lifted it
    assert g.check("a") is None and g.rejecting == {}
    g.update({"reject_services": {"*": {"until": T0 + 10, "budget": "all"}}})
    assert g.check("anything") is not None               # an all-services budget
    g.update({"reject_services": None})
    assert g.check("anything") is None


async def test_shipper_feeds_directives_from_ingest_responses(tmp_path):
    seen: list[dict] = []
    answers = [{"reject_services": {"svc": {"until": T0, "budget": "b"}}}, {}]

    async def ingest(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": True, "batch_id": "x",
                                  "directives": answers.pop(0)})

    app = web.Application()
    app.router.add_post("/v1/ingest", ingest)
    async with running(app) as url:
        cfg = ControlPlaneConfig(url=url, token="t", ship_interval_s=60,
                                 spool_dir=str(tmp_path / "spool"))
        shipper = Shipper(cfg, lambda: {"schema": 1, "series": []}, gateway_id="g",
                          on_directives=seen.append)
        await shipper.start()
        try:
            await shipper.tick()
            await shipper.tick()
        finally:
            await shipper.stop()
    assert seen[:2] == [{"reject_services": {"svc": {"until": T0, "budget": "b"}}}, {}]


async def test_the_proxy_answers_budget_exhausted_before_limits_and_upstream(tmp_path):
    up = Upstream()
    await up.start()
    try:
        text = gateway_yaml([up.url])
        async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
            async with s.get(url_of(gw, "/x")) as resp:
                assert resp.status == 200
            before = up.requests
            until = gw.clock.time() + 3_600
            gw.budget_guard.update({"reject_services": {"svc": {"until": until,
                                                                "budget": "tiny"}}})
            async with s.get(url_of(gw, "/x")) as resp:
                assert resp.status == 429
                assert resp.headers["Content-Type"] == "application/problem+json"
                assert 3_598 <= int(resp.headers["Retry-After"]) <= 3_600
                doc = await resp.json(content_type=None)
                assert doc["type"] == BUDGET_EXHAUSTED and doc["budget"] == "tiny"
            assert up.requests == before                      # never reached the upstream
            agg = gw.signals.swap()
            codes = {(s.upstream, s.code): s.count for s in agg.series}
            assert codes[("-", 429)] == 1                     # recorded, upstream "-"
            gw.budget_guard.update({})
            async with s.get(url_of(gw, "/x")) as resp:
                assert resp.status == 200
    finally:
        await up.stop()
