"""The event loop every process of ours runs on: uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def new_loop() -> asyncio.AbstractEventLoop:
    """A fresh uvloop loop, set as the current loop."""
    try:
        import uvloop
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


_BACKGROUND: set[asyncio.Task[Any]] = set()


def background(coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
    """Start `coro` as a task that stays referenced until it finishes. The loop itself keeps
    only weak references to tasks, so one whose handle is dropped can be collected mid-flight."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task
