"""Bearer tokens, roles and the access matrix.

Roles: `admin` everything; `monitor` reads all but budgets; `reader` reads golden signals
(`/v1/signals`) and the health overview only; `gateway` may only ingest; the audit log is admin only.
Every handler declares one permission; `ACCESS` says which roles hold it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from gateway.control.config import TokenConfig

# permission -> roles allowed; a handler names one permission, a new feature adds its own.
ACCESS: dict[str, frozenset[str]] = {
    "ingest": frozenset({"admin", "gateway"}),
    "signals:read": frozenset({"admin", "monitor", "reader"}),
    "health:read": frozenset({"admin", "monitor", "reader"}),
    "limits:read": frozenset({"admin", "monitor"}),
    "breakers:read": frozenset({"admin", "monitor"}),
    "audit:read": frozenset({"admin"}),
    "admin:write": frozenset({"admin"}),
    # --- Costs and budgets: budgets are admin only (they hold spending limits); cost usage
    # is readable by monitor, read-only
    "budgets:read": frozenset({"admin"}),
    "budgets:write": frozenset({"admin"}),
    "costs:read": frozenset({"admin", "monitor"}),
    "costs:write": frozenset({"admin"}),
    # --- SLOs, alerts, incidents: monitor has read-only access to incidents, health and
    # alerts, so it reads SLOs, error budgets (SLO budgets, not the
    # admin-only cost budgets), alerts, incidents and the deploy gate but changes nothing;
    # reader sees none of it (golden signals and the health overview only).
    "slos:read": frozenset({"admin", "monitor"}),
    "slos:write": frozenset({"admin"}),
    "error_budgets:read": frozenset({"admin", "monitor"}),
    "deploy_gate:read": frozenset({"admin", "monitor"}),
    "alerts:read": frozenset({"admin", "monitor"}),
    "alerts:write": frozenset({"admin"}),
    "incidents:read": frozenset({"admin", "monitor"}),
    "incidents:write": frozenset({"admin"}),
    # --- Tenants: monitor reads plans, overrides and usage; only admin changes them
    "tenants:read": frozenset({"admin", "monitor"}),
    "tenants:write": frozenset({"admin"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str


class Authenticator:
    """Maps a bearer token to its Principal, comparing in constant time against every token."""

    def __init__(self, tokens: tuple[TokenConfig, ...]) -> None:
        self._tokens = [(t.token.encode(), Principal(t.name, t.role)) for t in tokens]

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an `Authorization: Bearer <token>` header value, or None."""
        if not authorization:
            return None
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        candidate = credential.strip().encode("utf-8", "surrogateescape")
        found: Principal | None = None
        # No early exit: the time taken does not depend on which token (if any) matched.
        for secret, principal in self._tokens:
            if hmac.compare_digest(candidate, secret) and found is None:
                found = principal
        return found


def allowed(principal: Principal, permission: str) -> bool:
    return principal.role in ACCESS.get(permission, frozenset())
