"""Helpers of the SLO / alert / incident / deploy-gate tests (no tests here)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.control.app import create_app
from gateway.control.domain import rollup
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.slo import SLO
from gateway.control.jobs.notify import Target
from gateway.control.store import Store
from gateway.validation import Errors
from tests.test_control_support import DAY0, auth, control_config, running

__all__ = ["DAY0", "auth"]

MIN = 60
HOUR = 3_600
DAY = 86_400


def make_slo(**kw: Any) -> SLO:
    # no consumption alerts unless a test asks: these tests watch the burn-rate alerts
    doc = {"name": "api-availability", "service": "svc", "objective": 99.9,
           "budget_alerts": [], **kw}
    errs = Errors()
    s = slo_mod.parse_slo(doc, "slo", errs)
    assert s is not None, errs.lines
    return s


def add_slo(store: Store, s: SLO, now: float = 0.0) -> None:
    assert store.slos.insert_slo(s.id, s.service, s.to_doc(), "api", now)


def feed(store: Store, start: float, minutes: int, per_minute: int, bad_per_minute: float,
         *, service: str = "svc", route: str = rollup.TOTAL, limited_per_minute: int = 0
         ) -> None:
    """Rollup rows as ingest would make them: `minutes` minutes from `start` (a whole minute),
    `per_minute` requests a minute of which `bad_per_minute` are 5xx (fractions accumulate, so
    0.2 bad a minute is one every 5 minutes), in every window (1m/5m/1h/1d)."""
    sums: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    carry = 0.0
    for i in range(minutes):
        t = int(start) + i * MIN
        carry += bad_per_minute
        bad = int(carry + 1e-9)
        carry -= bad
        for win in rollup.WINDOWS.values():
            acc = sums[(win, rollup.bucket_start(t, win))]
            acc[0] += per_minute
            acc[1] += bad
            acc[2] += limited_per_minute
    rows = [(win, bs, service, route, n, 0, e5, rl, 0, 0, 0.0, 0.0, 0, 0)
            for (win, bs), (n, e5, rl) in sums.items()]
    with store.transaction():
        store.rollups.add_buckets(rows)


@asynccontextmanager
async def slo_plane(tmp_path: Path, clock: Any, *, slos: tuple[SLO, ...] = (),
                    notifications: tuple[Target, ...] = (), evaluation_interval_s: float = 3600
                    ) -> AsyncIterator[tuple[str, aiohttp.ClientSession, web.Application]]:
    """A control plane whose evaluator runs only when a test says so (unless told otherwise)."""
    cfg = control_config(tmp_path, slos=slos, notifications=notifications)
    app = create_app(cfg, clock=clock, compact_interval_s=3600, retention_interval_s=3600,
                     evaluation_interval_s=evaluation_interval_s)
    async with running(app) as url, aiohttp.ClientSession() as session:
        yield url, session, app


async def call(session: aiohttp.ClientSession, url: str, method: str, path: str, *,
               role: str = "admin", json: Any = None, **params: Any) -> tuple[int, Any]:
    async with session.request(method, f"{url}{path}", headers=auth(role), json=json,
                               params={k: str(v) for k, v in params.items()}) as resp:
        return resp.status, orjson.loads(await resp.read())
