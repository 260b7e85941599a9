"""Session fixtures: a real redis-server, free ports, the repo root."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class LoopLag:
    """How long the event loop was kept from running a 5 ms ticker, moment by moment.

    A test bounding how long a call takes on a shared 2-core CI box must allow for stalls that
    are nobody's fault (the process descheduled, a thread holding the GIL), and only for those:
    `during(t0, t1)` is the stall that overlapped a call's interval, to add to its bound.
    """

    PERIOD = 0.005

    def __init__(self) -> None:
        self.gaps: list[tuple[float, float]] = []   # (tick start, tick end) of each late tick
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.PERIOD)
            now = time.monotonic()
            if now - last > 2 * self.PERIOD:
                self.gaps.append((last, now))
            last = now

    def during(self, t0: float, t1: float) -> float:
        """Seconds of stall (beyond the ticker's period) in ticks overlapping [t0, t1]."""
        return sum(b - a - self.PERIOD for a, b in self.gaps if a < t1 and b > t0)


class RedisServer:
    """A real redis-server process on a free loopback port; can be stopped and restarted."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:  # CI installs it; a missing server is a failure, not a skip
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def flush(self) -> None:
        import redis
        r = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            r.flushall()
        finally:
            r.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's redis-server (restarted if a test stopped it)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def demo_upstream() -> Iterator[str]:
    """The bundled demo upstream as its own process (`gateway demo-upstream`); yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo-upstream", "--listen",
                             f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- Control-plane database backends ---------------------------------------------------------
# One list parametrises the control-plane tests: a test module opts in with
# `pytestmark = pytest.mark.usefixtures("control_backend")`, and every test in it runs once on
# SQLite and once on PostgreSQL (a fresh database per test on one private cluster per session).
CONTROL_BACKENDS = [pytest.param("sqlite", id="sqlite"),
                    pytest.param("postgresql", id="postgresql")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "control_backend" in metafunc.fixturenames:
        metafunc.parametrize("control_backend", CONTROL_BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Any]:
    from tests.postgres import PostgresCluster
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def control_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """"sqlite" or "postgresql"; `control_config()` (tests/test_control_support.py) then points
    at a SQLite file in tmp_path or at a fresh PostgreSQL database."""
    from tests import test_control_support as support
    if request.param == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        support.NEW_DATABASE = cluster.create_database
    try:
        yield request.param
    finally:
        support.NEW_DATABASE = None
        support._DATABASES.clear()
