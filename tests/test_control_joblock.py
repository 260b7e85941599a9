"""Jobs run by hand take the background jobs' lock: on two replicas of one database,
`POST /v1/admin/evaluate` and `/v1/admin/retention/run` run on the replica holding the job's
lock and answer 409 problem+json on the other (PostgreSQL); a SQLite control plane is one
replica and always runs them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.control.app import create_app
from tests.fakes import FakeClock
from tests.test_control_support import DAY0, auth, control_config, running

pytestmark = pytest.mark.usefixtures("control_backend")   # sqlite and postgresql

JOBS = {"/v1/admin/evaluate": "evaluation", "/v1/admin/retention/run": "retention"}


def replica(tmp_path: Path, clock: FakeClock) -> web.Application:
    # background passes far apart: only the requests below take the locks
    return create_app(control_config(tmp_path), clock=clock, compact_interval_s=3600,
                      retention_interval_s=3600, evaluation_interval_s=3600,
                      budget_interval_s=3600)


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, str, dict[str, object]]:
    async with session.post(url, headers=auth("admin"), json={"reason": "by hand"}) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def test_a_job_run_by_hand_runs_on_one_replica_at_a_time(tmp_path: Path,
                                                               control_backend: str) -> None:
    clock = FakeClock(wall=DAY0)
    async with aiohttp.ClientSession() as s, running(replica(tmp_path, clock)) as url_b:
        async with running(replica(tmp_path, clock)) as url_a:         # the same database
            for path, job in JOBS.items():
                status, _, _ = await post(s, url_a + path)
                assert status == 200                # a takes the job's lock and runs it
                status, ctype, doc = await post(s, url_b + path)
                if control_backend == "sqlite":
                    assert status == 200
                    continue
                assert (status, ctype) == (409, "application/problem+json")
                assert doc["status"] == 409
                assert doc["detail"] == (f"job {job!r} runs on another replica now: ask that "
                                         f"one, or retry later")
                status, _, _ = await post(s, url_a + path)
                assert status == 200                # the holder keeps running it
        # a stopped: its locks go with its connection (the server releases them once that
        # session has ended, a moment after a closed it), and b takes them over
        for path in JOBS:
            deadline = time.monotonic() + 10
            while (status := (await post(s, url_b + path))[0]) == 409 and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert status == 200
