"""Group commit: items that arrive while a write is in progress go out together in the next one.

Ingest answers a gateway only once its batch is committed (the gateway spools until then), so a
batch cannot be acknowledged from memory and written later. What can be shared is the
transaction: while one group is being written, new arrivals wait, and the next write takes all
of them at once. Under light load every group has one item and nothing waits longer than its own
write; under heavy load the groups grow by themselves (up to `max_group`), and with them what the
store can sum before writing (one upsert per bucket for the whole group, one commit).

A write that fails for a group is retried item by item, so one bad item (text an engine cannot
store, say) fails alone and the others are still written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger("gateway.control.groupcommit")

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class GroupCommit(Generic[I, R]):
    def __init__(self, write: Callable[[list[I]], Awaitable[list[R]]], *,
                 max_group: int = 64) -> None:
        self._write = write
        self._max = max_group
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.groups = 0          # writes done, and the items they carried (for the metrics)
        self.items = 0

    async def submit(self, item: I) -> R:
        """Wait until `item` is written (with whatever arrived meanwhile); its result."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:self._max], self._waiting[self._max:]
                live = [(item, fut) for item, fut in group if not fut.cancelled()]
                if live:
                    await self._write_group(live)
        finally:
            self._writer = None

    async def _write_group(self, group: list[tuple[I, asyncio.Future[R]]]) -> None:
        self.groups += 1
        self.items += len(group)
        try:
            results = await self._write([item for item, _ in group])
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0][1], exc=exc)
                return
            log.info("a group write failed; writing its items one by one",
                     extra={"items": len(group), "error": repr(exc)})
            for one in group:
                await self._write_group([one])
            return
        for (_, fut), result in zip(group, results, strict=True):
            _settle(fut, result=result)


def _settle(fut: asyncio.Future[R], *, result: R | None = None,
            exc: BaseException | None = None) -> None:
    if fut.done():              # the caller went away (client disconnected): nothing to tell
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)  # type: ignore[arg-type]
