"""Circuit breakers end to end: real upstream processes, the real listener, a FakeClock for
`reset_timeout_s` (so recovery is tested without sleeping)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway import config as config_mod
from gateway.app import GatewayServer
from gateway.errors import REDUCED_CAPACITY
from tests.conftest import free_port, wait_port
from tests.fakes import FakeClock
from tests.harness import Upstream, admin_url, fetch, gateway_yaml, url_of

BREAKER = ("breaker: {failure_threshold: 3, reset_timeout_s: 30, half_open_successes: 2, "
           "half_open_max_inflight: 1}")


class UpstreamProcess:
    """`gateway demo-upstream` on a fixed port, killed and restarted at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo-upstream",
                                      "--listen", f"127.0.0.1:{self.port}"],
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def upstream_process() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    up.start()
    yield up
    up.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def start_gateway(tmp_path: Path, urls: list[str], clock: FakeClock,
                        breaker: str = BREAKER) -> GatewayServer:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(urls, upstream_extra=breaker))
    gw = GatewayServer(str(path), config_mod.load(path), clock=clock)
    await gw.start()
    return gw


async def trip_by_killing(gw: GatewayServer, upstream: UpstreamProcess,
                          session: aiohttp.ClientSession) -> None:
    """Kill the upstream and send failure_threshold (3) requests: the circuit is then open."""
    upstream.kill()
    for _ in range(3):
        assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 502


class AcceptCounter:
    """A listener on the upstream's port that only counts connection attempts."""

    def __init__(self, port: int) -> None:
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.setblocking(False)

    def count(self) -> int:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return self.accepted
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


async def test_kill_opens_after_exactly_threshold_fast_503s_then_probes_close_it(
        tmp_path: Path, upstream_process: UpstreamProcess,
        session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    gw = await start_gateway(tmp_path, [upstream_process.url], clock)
    try:
        for _ in range(5):
            assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 200
        upstream_process.kill()
        breaker = gw.runtime.upstreams["up"].breaker
        for i in range(3):
            assert breaker.state == "closed", i
            assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 502
        assert breaker.state == "open"      # exactly failure_threshold failures

        # While open: 503 at once, with Retry-After, and not one connection attempt.
        counter = AcceptCounter(upstream_process.port)
        gw.signals.swap()
        try:
            for _ in range(20):
                status, headers, data = await fetch(session, "GET", url_of(gw, "/x"))
                assert status == 503
                assert headers["Retry-After"] == "30"
                assert headers["Content-Type"] == "application/problem+json"
                doc = orjson.loads(data)
                assert doc["type"] == REDUCED_CAPACITY and doc["upstream"] == "up"
            await asyncio.sleep(0.05)
            assert counter.count() == 0
        finally:
            counter.close()
        agg = gw.signals.swap()
        fast = [s for s in agg.series if s.code == 503]
        assert sum(s.count for s in fast) == 20
        worst_us = max(s.histogram().get_max_value() for s in fast)
        assert worst_us < 1000, f"a 503 took {worst_us} us of gateway time"

        # Recovery: the upstream is back, but the circuit waits for reset_timeout_s.
        upstream_process.start()
        clock.advance(29)
        status, headers, _ = await fetch(session, "GET", url_of(gw, "/"))
        assert status == 503 and headers["Retry-After"] == "1"
        clock.advance(1)
        assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 200
        assert breaker.state == "half_open"
        assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 200
        assert breaker.state == "closed"    # half_open_successes = 2
        for _ in range(10):
            assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 200

        status, _, data = await fetch(session, "GET", admin_url(gw, "/admin/breakers"))
        assert status == 200
        assert [(b["upstream"], b["state"]) for b in orjson.loads(data)] == [("up", "closed")]
        _, _, metrics = await fetch(session, "GET", admin_url(gw, "/metrics"))
        text = metrics.decode()
        for frm, to in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
            assert (f'gateway_circuit_breaker_transitions_total{{from="{frm}",to="{to}",'
                    f'upstream="up"}} 1.0') in text, (frm, to)
        assert 'gateway_circuit_breaker_state{upstream="up"} 0.0' in text
    finally:
        await gw.stop()


async def test_flapping_upstream_reopens_on_a_failed_probe(
        tmp_path: Path, upstream_process: UpstreamProcess,
        session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    gw = await start_gateway(tmp_path, [upstream_process.url], clock)
    breaker = gw.runtime.upstreams["up"].breaker
    try:
        for cycle in range(3):
            upstream_process.kill()
            while breaker.state != "open":
                assert (await fetch(session, "GET", url_of(gw, "/")))[0] in (200, 502)
            clock.advance(30)
            # the probe finds it still down: open again, with a fresh reset timer
            assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 502
            assert breaker.state == "open"
            status, headers, _ = await fetch(session, "GET", url_of(gw, "/"))
            assert status == 503 and headers["Retry-After"] == "30", cycle
            upstream_process.start()
            clock.advance(30)
            for _ in range(2):
                assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 200
            assert breaker.state == "closed", cycle
    finally:
        await gw.stop()


async def test_one_dead_endpoint_is_ejected_with_no_client_errors_after(
        tmp_path: Path, upstream_process: UpstreamProcess,
        session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(tmp_path, [upstream_process.url, dead], clock)
    try:
        statuses = [(await fetch(session, "GET", url_of(gw, "/")))[0] for _ in range(6)]
        assert statuses == [200, 502] * 3           # round robin until the third failure
        after = [(await fetch(session, "GET", url_of(gw, "/")))[0] for _ in range(50)]
        assert after == [200] * 50                  # the dead endpoint is out of rotation
        assert gw.runtime.upstreams["up"].selector.ejected() == [1]
        assert gw.runtime.upstreams["up"].breaker.state == "closed"
    finally:
        await gw.stop()


async def test_half_open_lets_exactly_max_inflight_probes_through(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    up = Upstream()
    await up.start()
    clock = FakeClock()
    gw = await start_gateway(tmp_path, [up.url], clock, breaker=BREAKER.replace(
        "half_open_max_inflight: 1", "half_open_max_inflight: 2"))
    try:
        breaker = gw.runtime.upstreams["up"].breaker
        for _ in range(3):
            breaker.acquire()
            breaker.on_result("connect_error")
        assert breaker.state == "open"
        clock.advance(30)
        before = up.requests
        results = await asyncio.gather(*(fetch(session, "GET", url_of(gw, "/delay/300"))
                                         for _ in range(50)))
        statuses = sorted(r[0] for r in results)
        assert statuses.count(200) == 2 and statuses.count(503) == 48
        assert up.requests - before == 2
        assert breaker.state == "closed"
    finally:
        await gw.stop()
        await up.stop()


async def test_admin_reset_closes_an_open_circuit(
        tmp_path: Path, upstream_process: UpstreamProcess,
        session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    gw = await start_gateway(tmp_path, [upstream_process.url], clock)
    try:
        await trip_by_killing(gw, upstream_process, session)
        status, _, data = await fetch(session, "GET", admin_url(gw, "/admin/breakers"))
        (snap,) = orjson.loads(data)
        assert snap["state"] == "open" and snap["failure_count"] >= 3
        assert snap["opened_at"] and snap["retry_at"]
        upstream_process.start()
        assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 503
        status, _, data = await fetch(session, "POST", admin_url(gw, "/admin/breakers/up/reset"))
        assert status == 200 and orjson.loads(data)["state"] == "closed"
        assert (await fetch(session, "GET", url_of(gw, "/")))[0] == 200
        status, headers, _ = await fetch(session, "POST",
                                         admin_url(gw, "/admin/breakers/nope/reset"))
        assert status == 404 and headers["Content-Type"] == "application/problem+json"
    finally:
        await gw.stop()


async def test_reload_keeps_breaker_state_of_unchanged_upstreams(
        tmp_path: Path, upstream_process: UpstreamProcess,
        session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    gw = await start_gateway(tmp_path, [upstream_process.url], clock)
    try:
        await trip_by_killing(gw, upstream_process, session)
        assert gw.runtime.upstreams["up"].breaker.state == "open"
        path = Path(gw.config_path)
        path.write_text(path.read_text().replace("drain_s: 5", "drain_s: 6"))
        await gw.reload()
        assert gw.runtime.upstreams["up"].breaker.state == "open"     # same upstream config
        path.write_text(path.read_text().replace("failure_threshold: 3", "failure_threshold: 4"))
        await gw.reload()
        assert gw.runtime.upstreams["up"].breaker.state == "closed"   # a changed breaker
    finally:
        await gw.stop()
