"""Control plane configuration (`config/control.yaml`): frozen dataclasses and a strict loader.

Keys: `listen` (default 127.0.0.1:9000), `database` (SQLite file, default var/control.db, relative
to the working directory; or a `postgresql://user:pass@host:port/db` URL), `tokens: [{name, role,
token}]`, and `slos`, `cost_models`, `budgets`, `notifications`. `slos` and `notifications` are
validated fully by slo.parse_slos and notify.parse_notifications, into slo.SLO and notify.Target
values; `cost_models` and `budgets` by costs.check_config.
`${VAR}` / `${VAR:-default}` are replaced from the environment. Unknown keys are errors; every error
is a `path.to.key: message` line, all raised together in one `ConfigError`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway import validation as valid
from gateway.config import load_document, parse_listen, read_text
from gateway.control.domain.costs import check_config as check_costs
from gateway.control.domain.slo import parse_slos
from gateway.control.jobs.notify import parse_notifications
from gateway.control.store.database import is_postgresql
from gateway.errors import ConfigError

ROLES = ("admin", "monitor", "reader", "gateway")

TOP_KEYS = {"listen", "database", "tokens", "slos", "cost_models", "budgets", "notifications"}
_GATEWAY_ONLY_KEYS = {"upstreams", "routes"}
_CONTROL_ONLY_KEYS = {"tokens", "database", "slos", "cost_models", "budgets", "notifications"}


@dataclass(frozen=True, slots=True)
class TokenConfig:
    name: str       # the actor written to the audit log
    role: str       # admin | monitor | reader | gateway
    token: str

    def __repr__(self) -> str:  # never print a secret by accident
        return f"TokenConfig(name={self.name!r}, role={self.role!r}, token='<redacted>')"


@dataclass(frozen=True, slots=True)
class ControlConfig:
    listen: str = "127.0.0.1:9000"
    database: str = "var/control.db"
    tokens: tuple[TokenConfig, ...] = ()
    # Typed loosely here: the modules that own them (slo, costs, notify) import this one.
    slos: tuple[Any, ...] = ()           # slo.SLO
    cost_models: Any = field(default_factory=dict)
    budgets: tuple[dict[str, Any], ...] = ()
    notifications: Any = ()               # notify.Target tuple
    version: str = ""
    source: str = ""


def is_control_config(doc: Any) -> bool:
    """True when a parsed YAML document looks like a control plane config (for `gateway check`)."""
    if not isinstance(doc, dict):
        return False
    keys = set(doc)
    return not (keys & _GATEWAY_ONLY_KEYS) and bool(keys & _CONTROL_ONLY_KEYS)


def _list_of_mappings(value: Any, path: str, errs: valid.Errors) -> tuple[dict[str, Any], ...] | None:
    if value is None:
        return ()
    if not isinstance(value, list):
        errs.add(path, f"must be a list, got {valid.kind(value)}")
        return None
    ok = True
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            errs.add(f"{path}[{i}]", f"must be a mapping, got {valid.kind(item)}")
            ok = False
    return tuple(value) if ok else None


def _list_or_mapping(value: Any, path: str, errs: valid.Errors) -> Any:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return _list_of_mappings(value, path, errs)
    errs.add(path, f"must be a list or a mapping, got {valid.kind(value)}")
    return None


def parse_tokens(value: Any, path: str, errs: valid.Errors) -> tuple[TokenConfig, ...]:
    if not isinstance(value, list):
        errs.add(path, f"must be a list, got {valid.kind(value)}")
        return ()
    if not value:
        errs.add(path, "must list at least one token")
        return ()
    out: list[TokenConfig] = []
    names: dict[str, int] = {}
    secrets: dict[str, int] = {}
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        m = valid.mapping(item, ipath, errs, {"name", "role", "token"}, {"name", "role", "token"})
        if m is None:
            continue
        n0 = len(errs.lines)
        name = valid.name(m["name"], f"{ipath}.name", errs) if "name" in m else None
        role = m.get("role")
        if "role" in m and role not in ROLES:
            errs.add(f"{ipath}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        token = valid.string(m["token"], f"{ipath}.token", errs) if "token" in m else None
        if token is not None and token != token.strip():
            errs.add(f"{ipath}.token", "must not start or end with whitespace")
        if name is not None:
            if name in names:
                errs.add(f"{ipath}.name", f"duplicate name {name!r} (also {path}[{names[name]}])")
            else:
                names[name] = i
        if token is not None:
            if token in secrets:  # never echo the secret itself
                errs.add(f"{ipath}.token", f"the same token as {path}[{secrets[token]}] "
                                           f"(each token must map to one name and role)")
            else:
                secrets[token] = i
        if len(errs.lines) == n0 and name and token and role in ROLES:
            out.append(TokenConfig(name=name, role=role, token=token))
    return tuple(out)


def parse_control_config(doc: Any, *, source: str = "", raw: bytes = b"") -> ControlConfig:
    """Validate a parsed control.yaml document; raise ConfigError listing every problem."""
    errs = valid.Errors()
    if doc is None:
        doc = {}
    m = valid.mapping(doc, "", errs, TOP_KEYS, {"tokens"})
    if m is None:
        raise ConfigError(errs.lines)
    kw: dict[str, Any] = {}
    if "listen" in m:
        kw["listen"] = parse_listen(m["listen"], "listen", errs)
    if "database" in m:
        kw["database"] = valid.string(m["database"], "database", errs)
        if kw["database"] is not None and is_postgresql(kw["database"]):
            url = urlsplit(kw["database"])
            if not url.hostname and "host=" not in url.query:
                errs.add("database", "a postgresql:// URL needs a host "
                                     "(postgresql://user:pass@host:port/db)")
            elif not url.path.strip("/"):
                errs.add("database", "a postgresql:// URL needs a database name "
                                     "(postgresql://user:pass@host:port/db)")
    if "tokens" in m:
        kw["tokens"] = parse_tokens(m["tokens"], "tokens", errs)
    for key in ("slos", "budgets"):
        if key in m:
            kw[key] = _list_of_mappings(m[key], key, errs)
    for key in ("cost_models", "notifications"):
        if key in m:
            kw[key] = _list_or_mapping(m[key], key, errs)
    # --- Costs and budgets: deep validation of cost_models and budgets
    check_costs(m, errs)
    # --- SLOs and notifications: full validation (slo.py, notify.py), replacing the
    # shallow checks above when those passed (so an error is never reported twice)
    if "slos" in m and kw.get("slos") is not None:
        kw["slos"] = parse_slos(m["slos"], "slos", errs)
    if "notifications" in m and kw.get("notifications") is not None:
        kw["notifications"] = parse_notifications(m["notifications"], "notifications", errs)
    if errs.lines:
        raise ConfigError(errs.lines)
    version = hashlib.sha256(raw or repr(sorted(m.items(), key=str)).encode()).hexdigest()[:12]
    return ControlConfig(version=version, source=source,
                         **{k: v for k, v in kw.items() if v is not None})


def load_text(text: str, *, source: str = "<string>",
              env: dict[str, str] | None = None) -> ControlConfig:
    """Parse and validate control config text (after environment interpolation)."""
    return load_document(text, parse_control_config, source=source, env=env)


def load(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> ControlConfig:
    """Read, interpolate and validate a control plane config file."""
    return load_text(read_text(path), source=str(path), env=env)
