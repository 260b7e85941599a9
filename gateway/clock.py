"""Time as a dependency: everything stateful takes a Clock; tests pass a FakeClock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Source of time. `monotonic()` for durations, `time()` for wall-clock stamps."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


SYSTEM_CLOCK = SystemClock()
