"""Shedding directives at the gateway: ShedGuard on a FakeClock, and what the proxy does with them
per route priority (in-process gateway, real upstream)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.shedding import ShedGuard
from tests.fakes import FakeClock
from tests.harness import Upstream, admin_url, running_gateway, url_of

ROUTES = """
  - {name: pay, match: {path_prefix: "/pay"}, upstream: up, service: svc, priority: critical}
  - {name: api, match: {path_prefix: "/api"}, upstream: up, service: svc, priority: high}
  - {name: web, match: {path_prefix: "/web"}, upstream: up, service: svc}
  - {name: search, match: {path_prefix: "/search"}, upstream: up, service: svc, priority: low}
  - {name: other, match: {path_prefix: "/other"}, upstream: up, service: calm, priority: low}
"""


def test_guard_applies_the_whole_set_and_entries_lapse() -> None:
    clock = FakeClock()
    g = ShedGuard(clock)
    assert not g.services and not g.alerting("svc")
    g.update({"shed_services": {"svc": {"until": clock.time() + 60, "alert": "svc-a:page"},
                                "bad": {"until": "soon"}, "worse": 3}})
    assert g.alerting("svc") and set(g.services) == {"svc"}
    clock.advance(61)
    assert not g.alerting("svc")            # not heard again: lapses by itself
    g.update({"shed_services": {"svc": {"until": clock.time() + 60}}})
    assert g.alerting("svc")
    g.update({})                            # the alert resolved
    assert not g.services and not g.alerting("svc")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


def config(url: str, shedding: bool) -> str:
    return (f'listen: "127.0.0.1:0"\nadmin: {{listen: "127.0.0.1:0"}}\n'
            f'upstreams: [{{name: up, endpoints: ["{url}"]}}]\n'
            f"routes:{ROUTES}"
            f"shedding: {{on_burn_rate_alert: {'true' if shedding else 'false'}}}\n")


async def statuses(gw: object) -> dict[str, tuple[int, dict[str, object] | None]]:
    out = {}
    async with aiohttp.ClientSession() as s:
        for path in ("pay", "api", "web", "search", "other"):
            async with s.get(url_of(gw, f"/{path}")) as resp:  # type: ignore[arg-type]
                body = await resp.read()
                out[path] = (resp.status, orjson.loads(body) if resp.status == 503 else None)
                if resp.status == 503:
                    assert resp.headers["Retry-After"] == "1"
    return out


async def test_an_alert_sheds_the_low_routes_of_its_service_only(
        tmp_path: Path, upstream: Upstream) -> None:
    async with running_gateway(tmp_path, config(upstream.url, True)) as gw:
        assert {k: v[0] for k, v in (await statuses(gw)).items()} == dict.fromkeys(
            ("pay", "api", "web", "search", "other"), 200)
        gw.shed_guard.update({"shed_services": {"svc": {"until": gw.clock.time() + 60}}})
        got = await statuses(gw)
        assert {k: v[0] for k, v in got.items()} == {"pay": 200, "api": 200, "web": 200,
                                                     "search": 503, "other": 200}
        problem = got["search"][1]
        assert problem is not None and problem["reason"] == "shedding"
        assert problem["type"].endswith("#temporary-reduced-capacity")
        assert gw.signals.shed == {("search", "shedding"): 1}


async def test_without_shedding_configured_the_directive_changes_nothing(
        tmp_path: Path, upstream: Upstream) -> None:
    async with running_gateway(tmp_path, config(upstream.url, False)) as gw:
        gw.shed_guard.update({"shed_services": {"svc": {"until": gw.clock.time() + 60}}})
        assert {v[0] for v in (await statuses(gw)).values()} == {200}


async def test_priorities_share_the_concurrency_limit(tmp_path: Path,
                                                      upstream: Upstream) -> None:
    text = config(upstream.url, True).replace(
        'endpoints: ["', 'concurrency: {adaptive: true, min: 10, max: 10}, endpoints: ["')
    async with running_gateway(tmp_path, text) as gw:
        lim = gw.runtime.upstreams["up"].limit
        assert lim is not None and lim.limit == 10
        lim.inflight = 5            # half the limit taken by requests in flight elsewhere
        got = await statuses(gw)
        # low may fill half the limit; the others more.
        assert {k: v[0] for k, v in got.items()} == {"pay": 200, "api": 200, "web": 200,
                                                     "search": 503, "other": 503}
        assert got["search"][1]["reason"] == "concurrency"  # type: ignore[index]
        lim.inflight = 9
        got = await statuses(gw)
        assert {k: v[0] for k, v in got.items()} == {"pay": 200, "api": 200, "web": 503,
                                                     "search": 503, "other": 503}
        # An alert moves every priority but critical one step down: normal now gets half.
        gw.shed_guard.update({"shed_services": {"svc": {"until": gw.clock.time() + 60}}})
        lim.inflight = 5
        got = await statuses(gw)
        assert {k: v[0] for k, v in got.items()} == {"pay": 200, "api": 200, "web": 503,
                                                     "search": 503, "other": 503}
        assert got["web"][1]["reason"] == "shedding"        # type: ignore[index]
        assert got["search"][1]["reason"] == "shedding"     # type: ignore[index]
        assert got["other"][1]["reason"] == "concurrency"   # type: ignore[index]
        lim.inflight = 0


async def test_websocket_tunnels_hold_no_concurrency_slot(tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    from tests.test_websocket import EchoUpstream
    echo = EchoUpstream()
    await echo.start()
    text = (f'listen: "127.0.0.1:0"\nadmin: {{listen: "127.0.0.1:0"}}\n'
            f'upstreams: [{{name: up, endpoints: ["{echo.url}"],'
            " concurrency: {adaptive: true, min: 2, max: 2}}]\n"
            "routes: [{name: chat, upstream: up, websocket: true}]\n")
    try:
        async with running_gateway(tmp_path, text) as gw:
            assert gw.proxy_address is not None
            url = f"ws://127.0.0.1:{gw.proxy_address[1]}/chat"
            lim = gw.runtime.upstreams["up"].limit
            assert lim is not None
            async with connect(url) as a, connect(url) as b, connect(url) as c:
                for ws in (a, b, c):            # three tunnels through a limit of two
                    await ws.send("hi")
                    assert await ws.recv() == "hi"
                assert lim.inflight == 0
    finally:
        await echo.stop()


async def test_reload_keeps_a_learnt_limit_and_applies_new_settings(
        tmp_path: Path, upstream: Upstream) -> None:
    text = config(upstream.url, True).replace(
        'endpoints: ["', 'concurrency: {adaptive: true, min: 4, max: 100}, endpoints: ["')
    async with running_gateway(tmp_path, text) as gw:
        lim = gw.runtime.upstreams["up"].limit
        assert lim is not None
        path = Path(gw.config_path)
        path.write_text(text.replace("priority: low", "priority: high"))    # routes only
        await gw.reload()
        assert gw.runtime.upstreams["up"].limit is lim       # what it learnt is kept
        path.write_text(text.replace("max: 100", "max: 50"))
        await gw.reload()
        new = gw.runtime.upstreams["up"].limit
        assert new is not None and new is not lim and new.limit == 50
        path.write_text(config(upstream.url, True))
        await gw.reload()
        assert gw.runtime.upstreams["up"].limit is None
        async with aiohttp.ClientSession() as s, s.get(admin_url(gw, "/metrics")) as resp:
            assert "gateway_upstream_concurrency_limit{" not in await resp.text()
