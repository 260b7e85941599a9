"""The periodic budget evaluation (one replica at a time) and the hand-off of budget alerts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.clock import Clock
from gateway.control.domain.costs import FinOps
from gateway.control.store import Database

log = logging.getLogger("gateway.control.costs")


async def evaluate_budgets(db: Database, clock: Clock, finops: FinOps, interval_s: float,
                           publish: Callable[[], None]) -> None:
    """Evaluate every `interval_s`; publish alert events (raised by any evaluation, ingest
    included) within a second."""
    last = clock.monotonic()
    while True:
        await asyncio.sleep(min(1.0, interval_s))
        try:
            if clock.monotonic() - last >= interval_s:
                last = clock.monotonic()
                if await db.leads("finops"):     # one replica evaluates budgets
                    await db.call(finops.evaluate, db.store, clock.time())
            publish()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("budget evaluation failed")
