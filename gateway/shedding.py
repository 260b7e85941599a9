"""Which services the control plane says are burning their error budget (shedding at the proxy).

The control plane answers every ingest with `directives`; a service with an open page-tier
burn-rate alert shows up as

    {"shed_services": {"<service>": {"until": <unix s>, "alert": "<alert name>"}}}

`update()` replaces the whole set with each response (a missing service is no longer shed: its
alert resolved). An entry lapses by itself at `until` (the control plane sets it a few minutes
ahead and renews it with every answer), so a gateway cut off from its control plane does not shed
forever; until then the last known set stands (fail-static), like budget enforcement.

What the proxy does with it (only with `shedding.on_burn_rate_alert: true`) is in proxy.py: the
service's `low` routes are shed, the other priorities but `critical` get a smaller share of the
upstream's adaptive concurrency limit.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from gateway.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("gateway.shedding")


class ShedGuard:
    """The services with an open page-tier burn-rate alert, as the control plane last said."""

    __slots__ = ("_clock", "services")

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self.services: dict[str, float] = {}
        """service -> until (unix s); empty (falsy) when nothing is shed, the hot path's test."""

    def update(self, directives: dict[str, Any]) -> None:
        """Apply a control plane response's `directives` (the complete, current set)."""
        raw = directives.get("shed_services") if isinstance(directives, dict) else None
        services: dict[str, float] = {}
        if isinstance(raw, dict):
            for service, d in raw.items():
                until = d.get("until") if isinstance(d, dict) else None
                if not isinstance(service, str) or isinstance(until, bool) \
                        or not isinstance(until, (int, float)) or not math.isfinite(until):
                    continue
                services[service] = float(until)
        if services.keys() != self.services.keys():
            log.warning("shedding changed", extra={
                "event": "shedding_update", "shedding": sorted(services)})
        self.services = services

    def alerting(self, service: str) -> bool:
        """Whether `service` has an open page alert (and the word on it has not lapsed)."""
        until = self.services.get(service)
        return until is not None and self._clock.time() < until
