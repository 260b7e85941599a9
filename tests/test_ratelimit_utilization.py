"""gateway_ratelimit_utilization_ratio{policy}: the largest share of its capacity one key used in
the last window, on every store; exported by the real gateway's /metrics."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest

from gateway import metrics
from gateway.ratelimit import UTILIZATION_WINDOW_S, Limiter
from gateway.signals import Signals
from tests.fakes import FakeClock
from tests.harness import Upstream, admin_url, gateway_yaml, running_gateway, url_of
from tests.test_metrics import parse
from tests.test_ratelimit import (  # noqa: F401  (fixtures)
    FakeRequest,
    backend,
    limit,
    limiters,
    make,
    route,
)


async def test_utilization_is_the_busiest_key_of_the_last_window(
        make: Callable[..., Limiter]) -> None:  # noqa: F811  (the fixture)
    clock = FakeClock()
    lim = make([limit("api", "10/second", burst=9), limit("idle", "5/second")],
               [route("api", name="r"), route("idle", name="q")], clock=clock)
    lim.add_listener(lambda policy, decision: None)        # as the gateway's signals do
    r = route("api", name="r")
    alice, bob = FakeRequest({"X-User-Id": "alice"}), FakeRequest({"X-User-Id": "bob"})
    assert lim.utilization() == {"api": 0.0, "idle": 0.0}
    for _ in range(8):                                     # 8 of capacity 10
        assert (await lim.check(r, alice)).allowed
    for _ in range(2):
        assert (await lim.check(r, bob)).allowed
    assert lim.utilization() == {"api": pytest.approx(0.8), "idle": 0.0}
    for _ in range(3):                                     # alice is limited: 100 %
        await lim.check(r, alice)
    assert lim.utilization()["api"] == 1.0
    clock.advance(UTILIZATION_WINDOW_S + 1)                # the last window still shows it
    assert lim.utilization()["api"] == 1.0
    assert (await lim.check(r, bob)).allowed               # bob, refilled: 1 of 10
    clock.advance(UTILIZATION_WINDOW_S + 1)
    assert lim.utilization()["api"] == pytest.approx(0.1)
    clock.advance(UTILIZATION_WINDOW_S + 1)
    assert lim.utilization()["api"] == 0.0                 # two quiet windows
    text = metrics.render(Signals(clock), utilization=lim.utilization)
    samples = parse(text)
    assert samples[("gateway_ratelimit_utilization_ratio", (("policy", "api"),))] == 0.0
    assert ("gateway_ratelimit_utilization_ratio", (("policy", "idle"),)) in samples


async def test_the_gateway_exports_the_gauge(tmp_path) -> None:
    up = Upstream()
    await up.start()
    try:
        text = gateway_yaml([up.url], route_extra="limits: [per_user]") + (
            "limits:\n  - {name: per_user, key: user_id, rate: \"1/minute\", burst: 4}\n")
        async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
            for _ in range(4):                             # 4 of capacity 5
                async with s.get(url_of(gw, "/hello"), headers={"X-User-Id": "u1"}) as resp:
                    assert resp.status == 200
            async with s.get(admin_url(gw, "/metrics")) as resp:
                samples = parse(await resp.read())
            assert samples[("gateway_ratelimit_utilization_ratio",
                            (("policy", "per_user"),))] == pytest.approx(0.8, abs=0.01)
    finally:
        await up.stop()
