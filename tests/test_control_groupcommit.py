"""Group commit of ingest: batches arriving during a write go out together in the next one,
summed per bucket, each answered with its own result; a failing group is retried item by item."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.control.domain import rollup
from gateway.control.domain.ingest import parse_batch
from gateway.control.store import Store
from gateway.control.store.groupcommit import GroupCommit
from gateway.control.web import INGEST
from tests.fakes import FakeClock
from tests.test_control_support import (
    DAY0,
    batch,
    control_plane,
    database_of,
    ingest,
    series,
    signals,
)

T = DAY0 + 3_600


class Writer:
    """Records each group it is given; waits on `gate` so that callers pile up meanwhile."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.groups: list[list[str]] = []
        self.gate = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, items: list[str]) -> list[str]:
        self.groups.append(list(items))
        await self.gate.wait()
        if self.fail_on in items:
            raise ValueError(f"cannot store {self.fail_on}")
        return [item.upper() for item in items]


async def test_arrivals_during_a_write_share_the_next_one_and_get_their_own_results():
    w = Writer()
    gc: GroupCommit[str, str] = GroupCommit(w, max_group=4)
    first = asyncio.ensure_future(gc.submit("a"))
    await asyncio.sleep(0)                      # "a" is being written alone
    rest = [asyncio.ensure_future(gc.submit(x)) for x in "bcdefg"]
    await asyncio.sleep(0)
    w.gate.set()
    assert await first == "A"
    assert [await f for f in rest] == list("BCDEFG")
    # the six that waited went in groups of at most max_group, in arrival order
    assert w.groups == [["a"], ["b", "c", "d", "e"], ["f", "g"]]
    assert (gc.groups, gc.items) == (3, 7)


async def test_a_failing_group_is_retried_one_by_one_so_only_the_bad_item_fails():
    w = Writer(fail_on="x")
    w.gate.set()
    gc: GroupCommit[str, str] = GroupCommit(w)
    blocker = asyncio.ensure_future(gc.submit("first"))
    await asyncio.sleep(0)                      # written alone before the others arrive
    futs = [asyncio.ensure_future(gc.submit(i)) for i in ("a", "x", "b")]
    assert await blocker == "FIRST"
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0] == "A" and results[2] == "B"
    assert isinstance(results[1], ValueError) and "cannot store x" in str(results[1])
    assert w.groups == [["first"], ["a", "x", "b"], ["a"], ["x"], ["b"]]


async def test_a_caller_gone_away_does_not_disturb_the_others():
    w = Writer()
    gc: GroupCommit[str, str] = GroupCommit(w)
    first = asyncio.ensure_future(gc.submit("a"))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(gc.submit("b"))
    stays = asyncio.ensure_future(gc.submit("c"))
    await asyncio.sleep(0)
    gone.cancel()
    w.gate.set()
    assert await first == "A" and await stays == "C"
    assert w.groups == [["a"], ["c"]]            # the cancelled one was not written


@pytest.mark.usefixtures("control_backend")
def test_apply_many_writes_what_one_by_one_writes_and_counts_a_replay_once(tmp_path):
    docs = [batch(f"b{i}", T + 50 * (i % 3), [series("r1", "svc", 200 if i % 4 else 500,
                                                     latencies_us=[1000] * (i + 1)),
                                              series("r2", "svc", 429, count=2)],
                  gateway_id=f"gw{i % 2}", seq=i,
                  limits=[{"policy": "p", "decision": "limited", "count": i}],
                  saturation={"inflight_max": i, "loop_lag_max_s": 0.001 * i,
                              "cpu_percent": 10.0 + i, "rss_bytes": 1000 * i})
            for i in range(8)]
    batches = [parse_batch(orjson.dumps(d), now=T + 300) for d in docs]
    grouped, single = Store(database_of(tmp_path, "g.db")), Store(database_of(tmp_path, "s.db"))
    try:
        replay = batches[3]
        assert rollup.apply_many(grouped, batches[:5] + [replay] + batches[5:], T + 300) == \
            [True] * 5 + [False] + [True] * 3
        assert rollup.apply_many(grouped, [replay], T + 300) == [False]
        assert [rollup.apply(single, b, T + 300) for b in batches] == [True] * 8
        for store in (grouped, single):
            rollup.compact(store)
        for win in rollup.WINDOWS.values():
            for route in ("*", "r1", "r2"):
                got = grouped.rollups.signals(win, T - 86_400, T + 86_400, service=None, route=route,
                                      limit=1000)
                want = single.rollups.signals(win, T - 86_400, T + 86_400, service=None, route=route,
                                      limit=1000)
                assert got == want and got, (win, route)
            assert grouped.rollups.limit_counts(win, T - 86_400, T + 86_400, None) == \
                single.rollups.limit_counts(win, T - 86_400, T + 86_400, None)
        assert grouped.table_counts() == single.table_counts()
    finally:
        grouped.close()
        single.close()


@pytest.mark.usefixtures("control_backend")
async def test_concurrent_ingest_over_http_counts_every_batch_once(tmp_path):
    async with control_plane(tmp_path, FakeClock(wall=T + 30)) as (url, s, app):
        docs = [batch(f"c{i}", T, [series("r1", "svc", 200, latencies_us=[1000 + i] * 3),
                                   series("r1", "svc", 503, latencies_us=[2000])],
                      gateway_id=f"gw{i % 5}", seq=i) for i in range(40)]
        results = await asyncio.gather(*(ingest(s, url, d) for d in docs + docs[:10]))
        assert all(status == 200 for status, _ in results)
        assert sum(body["duplicate"] for _, body in results) == 10
        rows = await signals(s, url, window="1m", service="svc", route="r1")
        assert [(r["request_count"], r["error_count_5xx"]) for r in rows] == [(160, 40)]
        assert app[INGEST].items == 50 and app[INGEST].groups < 50   # they really were grouped
