"""Shedding directives: which services the gateways should shed low-priority traffic for.

A service with an open (firing or acknowledged) page-tier burn-rate alert is burning its error
budget fast enough to wake someone; every ingest answer tells the gateways so:

    {"shed_services": {"<service>": {"until": <unix s>, "alert": "<dedup key>"}}}

`until` is `SHED_TTL_S` ahead: the gateways drop an entry they have not heard again by then, so
a control plane that goes away does not leave them shedding. When the alert resolves the service
is absent from the next answer and shedding stops. What a gateway sheds is its own config's
business (`shedding.on_burn_rate_alert`, route priorities; see gateway/proxy.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store


SHED_TTL_S = 300.0


def directives(store: Store, now: float) -> dict[str, Any]:
    """The `shed_services` directive for an ingest answer (empty when nothing burns)."""
    shed: dict[str, dict[str, Any]] = {}
    for alert in store.alerts.slo_alerts(open_only=True, limit=1000):
        if alert.get("source") != "slo" or alert.get("severity") != "page":
            continue
        service = alert.get("service")
        if isinstance(service, str) and service not in shed:
            shed[service] = {"until": now + SHED_TTL_S, "alert": alert.get("dedup_key")}
    return {"shed_services": shed} if shed else {}
