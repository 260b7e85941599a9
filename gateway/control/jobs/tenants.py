"""Tenant housekeeping: the 80 % quota alerts handed to the notifier, usage rows pruned hourly."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from gateway.clock import Clock
from gateway.control.domain.tenants import USAGE_RETENTION_S
from gateway.control.store import Database

log = logging.getLogger("gateway.control.tenants")


async def housekeeping(db: Database, clock: Clock, publish: Callable[[], None]) -> None:
    pruned_at = -math.inf
    while True:
        await asyncio.sleep(0.5)
        try:
            publish()
            if clock.monotonic() - pruned_at >= 3600:
                pruned_at = clock.monotonic()
                await db.call(db.store.tenants.prune, clock.time() - USAGE_RETENTION_S)
        except Exception:
            log.exception("tenant housekeeping failed")
