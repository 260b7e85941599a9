"""`Database`: the Store behind one worker thread, and the job lock of its replica."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from gateway.control.store.core import Store
from gateway.control.store.database import JobLock

T = TypeVar("T")


class Database:
    """The Store behind a single worker thread: `await db.call(fn, store, ...)`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-db")
        self.jobs = JobLock(store.path)   # replicas on PostgreSQL: one runs each job

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def leads(self, job: str) -> bool:
        """Whether this replica runs background `job` now (always, on SQLite)."""
        return await self.call(self.jobs.holds, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.jobs.close()
        self.store.close()
