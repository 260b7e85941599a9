"""End-to-end helpers: real upstream servers, an in-process gateway, the `gateway` command."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from gateway import config as config_mod
from gateway.app import GatewayServer
from gateway.demo import make_app
from tests.conftest import ROOT, free_port, wait_port


class Upstream:
    """The demo upstream app on 127.0.0.1, in this test's loop, counting connections."""

    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.extra: list[web.RouteDef] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.peers)

    async def start(self, port: int = 0) -> None:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer:
                self.peers.add(peer[:2])
            self.requests += 1
            return await handler(request)  # type: ignore[no-any-return]

        app = make_app(self.extra)
        app.middlewares.append(count)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def gateway_yaml(upstream_urls: list[str], *, extra: str = "", route_extra: str = "",
                 upstream_extra: str = "", listen: str = "127.0.0.1:0",
                 admin: str = "127.0.0.1:0") -> str:
    """A one-upstream, one-route config; `*_extra` are YAML lines added to that item."""
    def indent(block: str) -> str:
        return "".join(f"    {line}\n" for line in block.strip().splitlines()) if block else ""

    eps = ", ".join(f'"{u}"' for u in upstream_urls)
    return (f'listen: "{listen}"\n'
            "drain_s: 5\n"
            f'admin: {{listen: "{admin}"}}\n'
            "upstreams:\n"
            "  - name: up\n"
            f"    endpoints: [{eps}]\n"
            "    connect_timeout_s: 1\n"
            "    timeout_s: 2\n"
            + indent(upstream_extra)
            + "routes:\n"
            "  - name: main\n"
            '    match: {path_prefix: "/"}\n'
            "    upstream: up\n"
            "    service: svc\n"
            + indent(route_extra)
            + extra)


@asynccontextmanager
async def running_gateway(tmp_path: Path, text: str) -> AsyncIterator[GatewayServer]:
    """A GatewayServer in this test's loop, on free ports."""
    path = tmp_path / f"gateway-{time.monotonic_ns()}.yaml"
    path.write_text(text)
    gw = GatewayServer(str(path), config_mod.load(path))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def url_of(gw: GatewayServer, path: str = "/") -> str:
    assert gw.proxy_address is not None
    return f"http://127.0.0.1:{gw.proxy_address[1]}{path}"


def admin_url(gw: GatewayServer, path: str) -> str:
    assert gw.admin_address is not None
    return f"http://127.0.0.1:{gw.admin_address[1]}{path}"


class GatewayProcess:
    """The real `gateway run` command as a subprocess."""

    def __init__(self, config_path: Path, port: int, admin_port: int,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.admin_port = admin_port
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.with_suffix(".log")

    def start(self, timeout: float = 20.0) -> None:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.config_path.parent,
            env=dict(os.environ, **(self.env or {})), start_new_session=True)
        wait_port(self.port, timeout)
        deadline = time.monotonic() + timeout
        import urllib.request
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.admin}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway not ready; log:\n{self.logs()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=5)
        self.log.close()
        self.proc = None
        return code


class ControlProcess:
    """The real `gateway control` on a free 127.0.0.1 port: its config (`path`) is written at
    once, its SQLite file in the same directory, the tokens `t-admin` (admin) and `t-ingest`
    (gateway), and `extra` YAML (slos, budgets, ...); `start()` runs it (again after `stop()`,
    on the same port and database)."""

    def __init__(self, tmp_path: Path, extra: str = "") -> None:
        self.port = free_port()
        self.path = tmp_path / "control.yaml"
        self.path.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                             f'database: "{tmp_path / "control.db"}"\n'
                             "tokens:\n"
                             "  - {name: admin, role: admin, token: t-admin}\n"
                             "  - {name: gw, role: gateway, token: t-ingest}\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "control", "--config",
                                      str(self.path)], stderr=subprocess.DEVNULL)
        if wait:
            wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
            self.proc = None


def write_config(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def fetch(session: aiohttp.ClientSession, method: str, url: str,
                **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with session.request(method, url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


__all__ = ["ROOT", "free_port", "wait_port"]


def under_uvloop(namespace: dict[str, Any]) -> Callable[..., None]:
    """A test that runs every argument-less `async def test_*` defined so far in a module (pass
    `globals()`) once more on a uvloop loop, the loop the gateway runs on:
    `test_under_uvloop = under_uvloop(globals())`."""
    scenarios = [fn for name, fn in sorted(namespace.items())
                 if name.startswith("test_") and inspect.iscoroutinefunction(fn)
                 and not inspect.signature(fn).parameters]

    @pytest.mark.parametrize("scenario", scenarios, ids=lambda fn: fn.__name__[5:])
    def test_under_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())  # type: ignore[arg-type]

    return test_under_uvloop
