"""Overload protection in the control plane: retries, concurrency limits and shed requests shipped
by the gateways, stored per bucket and read back by the service page (GET /v1/signals?service=)."""

from __future__ import annotations

import pytest

from tests.fakes import FakeClock
from tests.test_control_support import DAY0, batch, control_plane, get, ingest, series

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

AT = DAY0 + 3_600            # 01:00:00
NOW = AT + 600


def _up(name: str, **extra: object) -> dict:
    return {"upstream": name, "latency_us_hdr": None, "breaker_state": "closed",
            "pool_in_use_max": 1, "pool_max": 8, **extra}


def _local(route: str, service: str, reason: str, n: int, upstream: str) -> dict:
    return {**series(route, service, 503, latencies_us=[30] * n, upstream=upstream),
            "local": reason}


async def _overload(s, url: str, service: str, since: float, until: float) -> dict:
    status, doc = await get(s, url, "/v1/signals", role="reader", service=service, window="1m",
                            since=since, until=until)
    assert status == 200, doc
    return doc["overload"]


async def test_retries_limits_and_shedding_read_back_per_service(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=NOW)) as (url, s, _app):
        docs = [
            # two gateways, two intervals: retries add up, each gateway's latest limit is kept
            batch("a1", AT, [series("search", "shop", 200, count=50, upstream="api"),
                             _local("search", "shop", "concurrency", 7, "api"),
                             _local("browse", "shop", "shed", 4, "api"),
                             _local("browse", "shop", "limit", 9, "api")],
                  gateway_id="gw1", seq=0,
                  upstreams=[_up("api", retries={"retried": 5, "succeeded": 4, "failed": 1},
                                 concurrency_limit=40, concurrency_saturated=True)]),
            batch("a2", AT + 10, [series("search", "shop", 200, count=50, upstream="api"),
                                  _local("browse", "shop", "shed", 2, "api")],
                  gateway_id="gw1", seq=1,
                  upstreams=[_up("api", retries={"retried": 3, "budget_exhausted": 2},
                                 concurrency_limit=32, concurrency_saturated=False)]),
            batch("b1", AT, [series("search", "shop", 200, count=50, upstream="api")],
                  gateway_id="gw2", seq=0,
                  upstreams=[_up("api", concurrency_limit=64)]),
            # an older gateway's batch: none of the new fields, still accepted
            batch("old", AT, [series("home", "blog", 200, count=5, upstream="wp")],
                  gateway_id="gw3", seq=0, upstreams=[_up("wp")]),
        ]
        for doc in docs:
            status, body = await ingest(s, url, doc)
            assert status == 200, body

        status, body = await ingest(s, url, docs[0])       # a replay counts nothing twice
        assert status == 200, body
        late = batch("late", AT - 30, [series("search", "shop", 200, count=1, upstream="api")],
                     gateway_id="gw1", seq=5, upstreams=[_up("api", concurrency_limit=99)])
        status, body = await ingest(s, url, late)          # an older report keeps no limit
        assert status == 200, body
        shop = await _overload(s, url, "shop", AT - 60, AT + 120)
        assert shop == {
            "upstreams": [{"upstream": "api", "concurrency_limit": 32,
                           "concurrency_limit_max": 64, "saturated": False, "gateways": 2,
                           "retries": {"retried": 8, "succeeded": 4, "failed": 1,
                                       "budget_exhausted": 2}}],
            "routes": [{"route": "browse", "shed": 6, "concurrency": 0},
                       {"route": "search", "shed": 0, "concurrency": 7}]}
        # the range bounds the counts (retries and refusals); the limit is the latest report
        later = await _overload(s, url, "shop", AT + 60, AT + 120)
        assert later["routes"] == []
        assert later["upstreams"][0]["retries"] == {}
        assert later["upstreams"][0]["concurrency_limit"] == 32
        # the same counts in the 1h rollup
        status, doc = await get(s, url, "/v1/signals", role="reader", service="shop",
                                window="1h", since=AT, until=AT + 3_600)
        assert status == 200
        assert doc["overload"]["routes"][0] == {"route": "browse", "shed": 6, "concurrency": 0}
        # a service with none of it has an empty block
        assert await _overload(s, url, "blog", AT - 60, AT + 120) == {"upstreams": [],
                                                                      "routes": []}


async def test_new_fields_are_validated_and_bounded(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=NOW)) as (url, s, _app):
        bad = batch("bad", AT, [series(upstream="api")], upstreams=[_up(
            "api", retries={"retried": -1, "sometimes": 2}, concurrency_limit=10**9,
            concurrency_saturated="yes")])
        status, body = await ingest(s, url, bad)
        assert status == 400
        text = " ".join(body.get("errors") or [str(body)])
        for key in ("upstreams[0].retries.retried", "upstreams[0].retries",
                    "upstreams[0].concurrency_limit", "upstreams[0].concurrency_saturated"):
            assert key in text, (key, text)
