"""Budget enforcement at the proxy: which services the control plane says to reject.

The control plane answers every ingest with `directives`; an exhausted enforcing budget shows up as

    {"reject_services": {"<service>" | "*": {"until": <unix s, the budget period's end>,
                                             "budget": "<budget name>"}}}

`update()` replaces the whole set with each response (a service missing from it is served again:
the budget was raised, overridden or deleted). An entry also lapses by itself at `until` (the period
rolled over), so a gateway cut off from its control plane does not reject forever. The last known set
otherwise stands while the control plane is unreachable (fail-static).

`check()` is on the hot path: one or two dict lookups and a clock read; the problem body is built
once per update. Rejections are 429 problem+json of type `BUDGET_EXHAUSTED` with `Retry-After`
until the period ends.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.errors import PROBLEM_CONTENT_TYPE, problem_body

log = logging.getLogger("gateway.budgetguard")

BUDGET_EXHAUSTED = "https://gateway.dev/problems/budget-exhausted"
ALL_SERVICES = "*"

Rejection = tuple[int, tuple[tuple[str, str], ...], bytes]


class BudgetGuard:
    """Rejects the requests of services whose enforcing cost budget is exhausted."""

    __slots__ = ("_clock", "_entries")

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        # service -> (until, problem body)
        self._entries: dict[str, tuple[float, bytes]] = {}

    def update(self, directives: dict[str, Any]) -> None:
        """Apply a control plane response's `directives` (the complete, current set)."""
        raw = directives.get("reject_services") if isinstance(directives, dict) else None
        entries: dict[str, tuple[float, bytes]] = {}
        if isinstance(raw, dict):
            for service, d in raw.items():
                if not isinstance(service, str) or not isinstance(d, dict):
                    continue
                until = d.get("until")
                if isinstance(until, bool) or not isinstance(until, (int, float)) \
                        or not math.isfinite(until):
                    continue
                budget = str(d.get("budget", ""))
                who = "every service" if service == ALL_SERVICES else f"service {service!r}"
                body = problem_body(
                    429, f"the cost budget {budget!r} of {who} is exhausted until the period "
                         f"ends or the budget is raised", BUDGET_EXHAUSTED,
                    title="Budget Exhausted", budget=budget, service=service,
                    until=int(until))
                entries[service] = (float(until), body)
        if entries.keys() != self._entries.keys():
            log.warning("budget enforcement changed", extra={
                "event": "budget_guard_update", "rejecting": sorted(entries)})
        self._entries = entries

    def check(self, service: str) -> Rejection | None:
        """None to serve the request; else (429, headers, problem body)."""
        entries = self._entries
        if not entries:
            return None
        hit = entries.get(service) or entries.get(ALL_SERVICES)
        if hit is None:
            return None
        until, body = hit
        left = until - self._clock.time()
        if left <= 0:
            return None           # the period rolled over
        return (429, (("Content-Type", PROBLEM_CONTENT_TYPE),
                      ("Retry-After", str(max(1, math.ceil(left))))), body)

    @property
    def rejecting(self) -> dict[str, float]:
        """service -> until (for the admin API and tests)."""
        return {s: u for s, (u, _) in self._entries.items()}
