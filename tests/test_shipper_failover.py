"""The shipper with a list of control-plane URLs, against real `gateway control` processes:
tries them in order, moves on when one is down, sticks to the one that worked, spools when all
are down, and every request is counted exactly once across them."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from gateway import config
from gateway.config import ControlPlaneConfig
from gateway.errors import ConfigError
from gateway.shipper import Shipper
from tests.fakes import FakeClock
from tests.harness import ControlProcess
from tests.test_shipper import Snapshots
from tests.test_shipping_e2e import ADMIN


async def counted(session: aiohttp.ClientSession, control: ControlProcess) -> int:
    async with session.get(f"{control.url}/v1/signals",
                           params={"service": "svc", "route": "r1", "window": "1h",
                                   "since": str(int(time.time()) - 7200)},
                           headers=ADMIN) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    rows = doc["rows"] if isinstance(doc, dict) else doc
    return sum(r["request_count"] for r in rows)


@pytest.mark.timeout(90)
async def test_shipper_fails_over_to_the_next_url_and_sticks_to_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = ControlProcess(tmp_path / "a"), ControlProcess(tmp_path / "b")
    clock = FakeClock(wall=time.time())
    snap = Snapshots(clock)
    results: Counter = Counter()
    cfg = ControlPlaneConfig(url=a.url, urls=(a.url, b.url), token="t-ingest",
                             ship_interval_s=3600, spool_dir=str(tmp_path / "spool"))
    shipper = Shipper(cfg, snap, gateway_id="gw-f", clock=clock,
                      on_result=lambda r: results.update([r]), timeout_s=2.0)
    a.start()
    b.start()
    try:
        await shipper.start()
        async with aiohttp.ClientSession() as session:
            for _ in range(3):                    # both up: the first URL is used
                await shipper.tick()
                clock.advance(10)
            assert (await counted(session, a), await counted(session, b)) == (1 + 2 + 3, 0)

            a.stop()                               # the first goes away: the second, no spool
            for _ in range(3):
                await shipper.tick()
                clock.advance(10)
            assert shipper.spooled == 0
            assert await counted(session, b) == 4 + 5 + 6

            a.start()                              # back, but the shipper sticks to b
            await shipper.tick()
            clock.advance(10)
            assert (await counted(session, a), await counted(session, b)) == (6, 15 + 7)

            a.stop()
            b.stop()                               # all down: spooled, as with one URL
            for _ in range(2):
                await shipper.tick()
                clock.advance(10)
            assert shipper.spooled == 2
            a.start()                              # only a comes back: the spool drains to it
            assert await shipper.drain() == 0
            await shipper.stop()                   # + the final snapshot
            b.start()
            total = await counted(session, a) + await counted(session, b)
            assert total == sum(snap.sent) == sum(range(1, 11))
            assert results["success"] == 10 and results["dropped"] == 0
    finally:
        await shipper.stop()
        a.stop()
        b.stop()


def test_control_plane_url_accepts_a_list() -> None:
    base = ('upstreams: [{name: u, endpoints: ["http://127.0.0.1:1"]}]\n'
            'routes: [{name: r, upstream: u}]\n')
    cfg = config.load_text(base + "control_plane:\n  url: [http://a:1, http://b:2/]\n", env={})
    assert cfg.control_plane is not None
    assert cfg.control_plane.urls == ("http://a:1", "http://b:2/")
    assert cfg.control_plane.url == "http://a:1"
    one = config.load_text(base + "control_plane:\n  url: http://a:1\n", env={})
    assert one.control_plane is not None and one.control_plane.urls == ("http://a:1",)
    with pytest.raises(ConfigError) as err:
        config.load_text(base + "control_plane:\n  url: [http://a:1, ftp://b]\n", env={})
    assert err.value.errors == ["control_plane.url[1]: must be an http(s) URL, got 'ftp://b'"]
    with pytest.raises(ConfigError) as err:
        config.load_text(base + "control_plane:\n  url: []\n", env={})
    assert err.value.errors == ["control_plane.url: must list at least one URL"]
