"""The deploy gate: the error-budget policy as a decision. Pure (no I/O).

Per SLO of the service, on its remaining budget fraction r (tiers configurable per SLO,
`deploy_gate:`; defaults shown):

    r > allow_above (0.5)              allow             deploy any time
    r >= low_traffic_above (0.2)       low_traffic_only  deploy during low-traffic hours
    r >= critical_above (0.05)         critical_only     no deployments unless a critical fix
    otherwise                          blocked           full hold

The service's decision is the strictest over its SLOs; an open SEV-1 or SEV-2 incident on the
service blocks as well. `allowed` answers "may this deploy go now": true for `allow`, for
`low_traffic_only` when the caller says it is low-traffic time (`low_traffic=true`), and for
`critical_only` when the deploy is a critical fix (`critical=true`).
"""

from __future__ import annotations

from typing import Any

from gateway.control.domain.slo import GateTiers

DECISIONS = ("allow", "low_traffic_only", "critical_only", "blocked")   # most to least lenient
BLOCKING_SEVERITIES = ("SEV-1", "SEV-2")


def decide(remaining: float | None, tiers: GateTiers) -> str:
    if remaining is None:           # overspent with no traffic to speak of: nothing remains
        return "blocked"
    if remaining > tiers.allow_above:
        return "allow"
    if remaining >= tiers.low_traffic_above:
        return "low_traffic_only"
    if remaining >= tiers.critical_above:
        return "critical_only"
    return "blocked"


_REASONS = {
    "allow": "error budget above {allow:.0%} remaining: deploy any time",
    "low_traffic_only": "error budget {low:.0%}-{allow:.0%} remaining: deploy during low-traffic "
                        "hours only",
    "critical_only": "error budget {crit:.0%}-{low:.0%} remaining: critical fixes only",
    "blocked": "error budget below {crit:.0%} remaining: deployments blocked",
}


def gate(service: str, budgets: list[tuple[Any, dict[str, Any]]],
         open_incidents: list[dict[str, Any]], *, critical: bool = False,
         low_traffic: bool = False) -> dict[str, Any]:
    """The gate document. `budgets`: (SLO, budget report) pairs of the service."""
    per_slo = []
    worst = "allow"
    worst_line = ""
    for slo, report in budgets:
        t = slo.deploy_gate
        decision = decide(report["remaining_fraction"], t)
        r = report["remaining_fraction"]
        line = (f"SLO {slo.name}: " + _REASONS[decision].format(
            allow=t.allow_above, low=t.low_traffic_above, crit=t.critical_above)
            + (f" ({r:.1%} left)" if r is not None else " (overspent)"))
        per_slo.append({"slo_id": slo.id, "decision": decision, "remaining_fraction": r,
                        "consumed": report["consumed"], "allowed_bad": report["allowed_bad"],
                        "burn_rates": report["burn_rates"],
                        "tiers": {"allow_above": t.allow_above,
                                  "low_traffic_above": t.low_traffic_above,
                                  "critical_above": t.critical_above},
                        "reason": line})
        if not worst_line or DECISIONS.index(decision) > DECISIONS.index(worst):
            worst, worst_line = decision, line
    blocking = [i for i in open_incidents if i["severity"] in BLOCKING_SEVERITIES
                and i["status"] != "resolved"]
    reasons = [worst_line] if worst_line else []
    if blocking:
        worst = "blocked"
        reasons.insert(0, "open incident(s) " + ", ".join(
            f"{i['id']} ({i['severity']}, {i['status']})" for i in blocking)
            + f" on {service}: deployments blocked")
    allowed = (worst == "allow" or (worst == "low_traffic_only" and (low_traffic or critical))
               or (worst == "critical_only" and critical))
    remaining = [p["remaining_fraction"] for p in per_slo]
    return {
        "service": service,
        "decision": worst,
        "allowed": allowed,
        "reason": "; ".join(reasons),
        "remaining_fraction": (None if any(r is None for r in remaining)
                               else min(remaining) if remaining else None),
        "slos": per_slo,
        "blocking_incidents": [i["id"] for i in blocking],
        "request": {"critical": critical, "low_traffic": low_traffic},
    }
