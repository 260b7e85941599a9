"""Compaction (queued latency histograms folded into the rollups) and retention, each run by one
replica at a time (`db.leads`)."""

from __future__ import annotations

from gateway.clock import Clock
from gateway.control.domain import rollup
from gateway.control.store import Database


async def compact_in_steps(db: Database) -> None:
    if not await db.leads("compaction"):
        return
    # one chunk per executor call: ingest requests queue in between, not behind it all
    while await db.call(rollup.compact, db.store, max_chunks=1) >= rollup.CHUNK:
        pass


async def retention(db: Database, clock: Clock) -> None:
    if await db.leads("retention"):
        await db.call(rollup.run_retention, db.store, clock.time())
