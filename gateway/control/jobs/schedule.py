"""Running a background job every interval, surviving its failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("gateway.control")


async def every(interval_s: float, name: str, job: Callable[[], Awaitable[Any]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic job failed", extra={"job": name})
