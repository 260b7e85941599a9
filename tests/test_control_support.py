"""Shared helpers of the control plane and shipper tests (no tests here)."""

from __future__ import annotations

import gzip
import io
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from hdrh.histogram import HdrHistogram

from gateway.control.app import create_app
from gateway.control.config import ControlConfig, TokenConfig
from gateway.control.store import Store
from gateway.control.web import DB

DAY0 = 1_700_006_400            # a UTC midnight: bucket arithmetic is easy to read
TOKENS = {"admin": "admin-token-0123456789", "monitor": "monitor-token-0123456789",
          "reader": "reader-token-0123456789", "gateway": "gateway-token-0123456789"}


# Set by the `control_backend` fixture (tests/conftest.py) on PostgreSQL: makes a new database
# and returns its URL. None: SQLite files in tmp_path.
NEW_DATABASE: Callable[[], str] | None = None
_DATABASES: dict[str, str] = {}     # this test's PostgreSQL databases by the file they stand for


def database_of(tmp_path: Path, name: str = "control.db") -> str:
    """This test's control-plane database `tmp_path / name`: that SQLite file, or on PostgreSQL
    a database of its own (the same one each time the same path is asked for)."""
    path = str(tmp_path / name)
    if NEW_DATABASE is None:
        return path
    if path not in _DATABASES:
        _DATABASES[path] = NEW_DATABASE()
    return _DATABASES[path]


def control_config(tmp_path: Path, **kw: Any) -> ControlConfig:
    cfg = ControlConfig(listen="127.0.0.1:0", database=database_of(tmp_path),
                        tokens=tuple(TokenConfig(name=f"{role}-user", role=role, token=tok)
                                     for role, tok in TOKENS.items()))
    return replace(cfg, **kw)


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


@asynccontextmanager
async def running(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (a free port unless given); yield its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def control_plane(tmp_path: Path, clock: Any, **kw: Any
                        ) -> AsyncIterator[tuple[str, aiohttp.ClientSession, web.Application]]:
    app = create_app(control_config(tmp_path, **kw), clock=clock, compact_interval_s=3600,
                     retention_interval_s=3600)
    async with running(app) as url, aiohttp.ClientSession() as session:
        yield url, session, app


def store_of(app: web.Application) -> Store:
    return app[DB].store


def hist(values: Iterable[int]) -> str:
    h = HdrHistogram(1, 60_000_000, 2)
    for v in values:
        h.record_value(v)
    return h.encode().decode()


def series(route: str = "r1", service: str = "svc", code: int = 200, count: int | None = None,
           latencies_us: Iterable[int] = (1000,), *, upstream: str = "up1",
           method: str = "GET", bytes_in: int = 10, bytes_out: int = 20) -> dict[str, Any]:
    lat = list(latencies_us)
    return {"route": route, "upstream": upstream, "service": service, "method": method,
            "code": code, "count": len(lat) if count is None else count,
            "bytes_in": bytes_in, "bytes_out": bytes_out, "latency_us_hdr": hist(lat)}


def batch(batch_id: str, start: float, series_: list[dict[str, Any]], *,
          gateway_id: str = "gw1", seq: int = 0, length: float = 10.0,
          **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "batch_id": batch_id, "gateway_id": gateway_id, "seq": seq, "schema": 1,
        "interval_start": start, "interval_end": start + length, "series": series_,
        "upstreams": [], "limits": [], "breaker_transitions": [],
        "saturation": {"inflight_max": 3, "loop_lag_max_s": 0.002, "cpu_percent": 12.5,
                       "rss_bytes": 50_000_000}}
    doc.update(extra)
    return doc


async def ingest(session: aiohttp.ClientSession, url: str, doc: Any, *, role: str = "gateway",
                 compress: bool = False) -> tuple[int, Any]:
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    headers = {**auth(role), "Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    data: Any = io.BytesIO(body) if len(body) > 1024 * 1024 else body
    async with session.post(f"{url}/v1/ingest", data=data, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def get(session: aiohttp.ClientSession, url: str, path: str, *, role: str = "admin",
              **params: Any) -> tuple[int, Any]:
    async with session.get(f"{url}{path}", headers=auth(role),
                           params={k: str(v) for k, v in params.items()}) as resp:
        return resp.status, orjson.loads(await resp.read())


async def signals(session: aiohttp.ClientSession, url: str, **params: Any) -> list[dict[str, Any]]:
    status, doc = await get(session, url, "/v1/signals", role="reader", **params)
    assert status == 200, doc
    return doc["rows"]
