"""Operator commands: `gateway admin ...` on a gateway's admin API and `gateway ctl ...` on the
control plane's `/v1` API.

Tables for people, `--json` for scripts (the API's answer, unchanged). Where to connect comes from
`--admin` / `GATEWAY_ADMIN_URL` and `--control` / `GATEWAY_CONTROL_URL`, tokens from
`GATEWAY_ADMIN_TOKEN` and `GATEWAY_CONTROL_TOKEN` (never from the command line, where `ps` would
show them). Standard library only (urllib): the CLI must work wherever the gateway is installed.

Exit codes: 0 done; 1 the server refused or failed (4xx/5xx other than below); 2 usage;
3 cannot connect (refused, timeout, bad address); 4 not authorised (401/403); 5 not found (404).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

EXIT_FAILED, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_NOT_FOUND = 1, 3, 4, 5
DEFAULT_ADMIN_URL = "http://127.0.0.1:9901"
DEFAULT_CONTROL_URL = "http://127.0.0.1:9000"


class CliError(Exception):
    """A message for the operator and the exit status that goes with it."""

    def __init__(self, message: str, status: int, http_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = http_status


class Api:
    """JSON over HTTP to one base URL with an optional bearer token."""

    def __init__(self, base: str, token: str, token_env: str, timeout: float) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.token_env = token_env
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.base + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(method, path, exc) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            why = getattr(reason, "strerror", None) or str(reason)
            raise CliError(f"cannot connect to {self.base}: {why}", EXIT_UNREACHABLE) from None
        except (TimeoutError, OSError) as exc:
            raise CliError(f"cannot connect to {self.base}: {exc}", EXIT_UNREACHABLE) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise CliError(f"{method} {url}: the answer is not JSON", EXIT_FAILED) from None

    def _http_error(self, method: str, path: str, exc: urllib.error.HTTPError) -> CliError:
        detail = ""
        try:
            doc = json.loads(exc.read() or b"null")
            if isinstance(doc, dict):
                detail = str(doc.get("detail") or doc.get("title") or "")
                if doc.get("errors"):
                    detail += "".join(f"\n  {e}" for e in doc["errors"])
        except (ValueError, OSError):
            pass
        where = f"{method} {path}"
        status = exc.code
        if status == 401:
            hint = (f" (set {self.token_env})" if not self.token
                    else f" (check {self.token_env})")
            return CliError(f"not authorised (401) for {where}: {detail or 'token required'}{hint}",
                            EXIT_AUTH, status)
        if status == 403:
            return CliError(f"forbidden (403) for {where}: {detail or 'not allowed'}",
                            EXIT_AUTH, status)
        if status == 404:
            return CliError(f"not found (404): {where}" + (f": {detail}" if detail else ""),
                            EXIT_NOT_FOUND, status)
        return CliError(f"{where} failed ({status})" + (f": {detail}" if detail else ""),
                        EXIT_FAILED, status)


# ---------------------------------------------------------------------------------------------
# Output


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "-" if ts is None else str(ts)
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value * 100:.1f}%"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


Column = tuple[str, Callable[[dict[str, Any]], Any]]


def _col(header: str, key: str, fmt: Callable[[Any], str] = _cell) -> Column:
    return header, lambda row: fmt(row.get(key))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Left-aligned columns under upper-case headers; `(none)` for no rows."""
    if not rows:
        return "(none)"
    cells = [[h.upper() for h, _ in columns]]
    cells += [[_cell(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _pairs(doc: dict[str, Any]) -> str:
    width = max((len(k) for k in doc), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in doc.items())


# ---------------------------------------------------------------------------------------------
# Commands: each returns (the API's answer, its human form)

Result = tuple[Any, str]

BREAKER_COLUMNS = [_col("upstream", "upstream"), _col("state", "state"),
                   _col("failures", "failure_count"), _col("opened at", "opened_at", _when),
                   _col("retry at", "retry_at", _when)]


def admin_breakers(api: Api, args: argparse.Namespace) -> Result:
    doc = api.call("GET", "/admin/breakers")
    rows = doc if isinstance(doc, list) else doc.get("breakers", [])
    return doc, table(rows, BREAKER_COLUMNS)


def admin_reset(api: Api, args: argparse.Namespace) -> Result:
    doc = api.call("POST", f"/admin/breakers/{_seg(args.upstream)}/reset")
    return doc, f"{args.upstream}: {doc.get('state', '?') if isinstance(doc, dict) else doc}"


def admin_reload(api: Api, args: argparse.Namespace) -> Result:
    doc = api.call("POST", "/admin/reload")
    return doc, f"reloaded: config version {doc.get('version')}"


def admin_limits_test(api: Api, args: argparse.Namespace) -> Result:
    doc = api.call("POST", "/admin/limits/test",
                   {"limit": args.limit, "key": args.key, "requests": args.requests})
    return doc, _pairs(doc)


def admin_config(api: Api, args: argparse.Namespace) -> Result:
    doc = api.call("GET", "/admin/config")
    import yaml
    return doc, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).rstrip()


INCIDENT_COLUMNS = [_col("id", "id"), _col("sev", "severity"), _col("status", "status"),
                    _col("service", "affected_service"), _col("level", "escalation_level"),
                    _col("created", "created_at", _when), _col("title", "title")]
ALERT_COLUMNS = [_col("id", "id"), _col("severity", "severity"), _col("status", "status"),
                 _col("service", "service"), _col("started", "started_at", _when),
                 _col("incident", "incident_id"), _col("title", "title")]
ERROR_BUDGET_COLUMNS = [_col("slo", "slo_id"), _col("service", "service"),
                        _col("objective", "objective"),
                        _col("remaining", "remaining_fraction", _pct),
                        _col("consumed", "consumed_fraction", _pct),
                        ("burn 1h", lambda r: _rate((r.get("burn_rates") or {}).get("1h"))),
                        _col("exhausted in s", "time_to_exhaustion_s")]
COST_BUDGET_COLUMNS = [_col("id", "id"), _col("name", "budget_name"),
                       _col("service", "service_name"), _col("period", "budget_period"),
                       _col("spent $", "spent_dollars"), _col("budget $", "budget_dollars"),
                       _col("used", "utilization_percent"), _col("status", "status"),
                       _col("enforcement", "enforcement")]


def _rate(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.2f}"


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _query(**params: Any) -> str:
    items = {k: v for k, v in params.items() if v not in (None, False)}
    return ("?" + urllib.parse.urlencode(items)) if items else ""


def ctl_incidents(api: Api, args: argparse.Namespace) -> Result:
    doc = api.call("GET", "/v1/incidents" + _query(status=args.status, service=args.service,
                                                   active="true" if args.active else None))
    return doc, table(doc.get("incidents", []), INCIDENT_COLUMNS)


def ctl_alerts(api: Api, args: argparse.Namespace) -> Result:
    doc = api.call("GET", "/v1/alerts" + _query(status=args.status, service=args.service,
                                                open="true" if args.open else None))
    return doc, table(doc.get("alerts", []), ALERT_COLUMNS)


def _is_incident(ident: str) -> bool:
    return ident.upper().startswith("INC-")


def ctl_ack(api: Api, args: argparse.Namespace) -> Result:
    body = {"reason": args.reason} if args.reason else {}
    if _is_incident(args.id):
        doc = api.call("POST", f"/v1/incidents/{_seg(args.id)}/acknowledge", body)
        return doc, f"incident {doc.get('id')}: {doc.get('status')}"
    doc = api.call("POST", f"/v1/alerts/{_seg(args.id)}/ack", body)
    return doc, f"alert {doc.get('id')}: {doc.get('status')}"


def ctl_resolve(api: Api, args: argparse.Namespace) -> Result:
    body: dict[str, Any] = {"reason": args.reason} if args.reason else {}
    if _is_incident(args.id):
        if not args.root_cause or not args.notes:
            raise CliError("resolving an incident needs --root-cause and --notes", 2)
        body["root_cause"] = args.root_cause
        body["resolution_notes"] = args.notes
        doc = api.call("POST", f"/v1/incidents/{_seg(args.id)}/resolve", body)
        return doc, f"incident {doc.get('id')}: {doc.get('status')}"
    doc = api.call("POST", f"/v1/alerts/{_seg(args.id)}/resolve", body)
    return doc, f"alert {doc.get('id')}: {doc.get('status')}"


def ctl_budgets(api: Api, args: argparse.Namespace) -> Result:
    if args.cost:
        doc = api.call("GET", "/v1/budgets")
        return doc, table(doc.get("budgets", []), COST_BUDGET_COLUMNS)
    path = "/v1/error-budgets" + (f"/{_seg(args.service)}" if args.service else "")
    doc = api.call("GET", path)
    return doc, table(doc.get("budgets", []), ERROR_BUDGET_COLUMNS)


def ctl_tenants(api: Api, args: argparse.Namespace) -> Result:
    try:
        doc = api.call("GET", "/v1/tenants")
    except CliError as exc:
        if exc.http_status == 404:
            raise CliError("tenants: not available on this control plane (404 on GET "
                           "/v1/tenants: it has no tenant API)", EXIT_NOT_FOUND, 404) from None
        raise
    return doc, table(doc.get("tenants", []), TENANT_COLUMNS)


def _usage(windows: Any) -> str:
    """`day 120/1000 (12%)` per quota window."""
    if not windows:
        return "-"
    return ", ".join(f"{w.get('window')} {w.get('current_usage')}/{w.get('limit')} "
                     f"({_cell(w.get('percent'))}%)" for w in windows)


TENANT_COLUMNS: tuple[Column, ...] = (
    _col("tenant", "tenant"), _col("plan", "plan"), _col("source", "plan_source"),
    _col("override", "override", lambda v: "yes" if v else "-"),
    _col("usage", "usage", _usage),
)


# ---------------------------------------------------------------------------------------------
# Wiring


def add_parsers(sub: Any) -> None:
    """Register `admin` and `ctl` on the top-level subparsers of `gateway`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    admin_common = argparse.ArgumentParser(add_help=False, parents=[common])
    admin_common.add_argument("--admin", default=None, metavar="URL",
                              help=f"admin API (default $GATEWAY_ADMIN_URL or {DEFAULT_ADMIN_URL});"
                                   " token from $GATEWAY_ADMIN_TOKEN")
    ctl_common = argparse.ArgumentParser(add_help=False, parents=[common])
    ctl_common.add_argument("--control", default=None, metavar="URL",
                            help=f"control plane (default $GATEWAY_CONTROL_URL or "
                                 f"{DEFAULT_CONTROL_URL}); token from $GATEWAY_CONTROL_TOKEN")

    p_admin = sub.add_parser("admin", help="a gateway's admin API: breakers, reload, limits, config")
    a = p_admin.add_subparsers(dest="admin_command", required=True)
    a.add_parser("breakers", parents=[admin_common], help="state of every upstream's breaker"
                 ).set_defaults(cli=admin_breakers)
    p = a.add_parser("reset", parents=[admin_common], help="close an upstream's breaker")
    p.add_argument("upstream")
    p.set_defaults(cli=admin_reset)
    a.add_parser("reload", parents=[admin_common], help="re-read the config file"
                 ).set_defaults(cli=admin_reload)
    p = a.add_parser("limits-test", parents=[admin_common],
                     help="would a request be admitted? (consumes nothing)")
    p.add_argument("--limit", required=True, help="the policy name")
    p.add_argument("--key", required=True, help="the client key, e.g. an address")
    p.add_argument("--requests", type=int, default=1)
    p.set_defaults(cli=admin_limits_test)
    a.add_parser("config", parents=[admin_common], help="the effective config, secrets redacted"
                 ).set_defaults(cli=admin_config)

    p_ctl = sub.add_parser("ctl", help="the control plane: incidents, alerts, budgets, tenants")
    c = p_ctl.add_subparsers(dest="ctl_command", required=True)
    p = c.add_parser("incidents", parents=[ctl_common], help="list incidents")
    p.add_argument("--status")
    p.add_argument("--service")
    p.add_argument("--active", action="store_true", help="only those not resolved")
    p.set_defaults(cli=ctl_incidents)
    p = c.add_parser("alerts", parents=[ctl_common], help="list alerts")
    p.add_argument("--status")
    p.add_argument("--service")
    p.add_argument("--open", action="store_true", help="only firing or acknowledged")
    p.set_defaults(cli=ctl_alerts)
    p = c.add_parser("ack", parents=[ctl_common],
                     help="acknowledge an alert (numeric id) or an incident (INC-...)")
    p.add_argument("id")
    p.add_argument("--reason", default="")
    p.set_defaults(cli=ctl_ack)
    p = c.add_parser("resolve", parents=[ctl_common],
                     help="resolve an alert or an incident (incidents need --root-cause and "
                          "--notes)")
    p.add_argument("id")
    p.add_argument("--reason", default="")
    p.add_argument("--root-cause")
    p.add_argument("--notes", help="resolution notes")
    p.set_defaults(cli=ctl_resolve)
    p = c.add_parser("budgets", parents=[ctl_common],
                     help="error budgets per SLO (--cost: cost budgets)")
    p.add_argument("--service")
    p.add_argument("--cost", action="store_true", help="cost budgets instead (admin token)")
    p.set_defaults(cli=ctl_budgets)
    c.add_parser("tenants", parents=[ctl_common], help="tenants, plans and quota usage"
                 ).set_defaults(cli=ctl_tenants)


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the `admin` or `ctl` command that `args` names; the exit status."""
    if args.command == "admin":
        api = Api(args.admin or os.environ.get("GATEWAY_ADMIN_URL") or DEFAULT_ADMIN_URL,
                  os.environ.get("GATEWAY_ADMIN_TOKEN", ""), "GATEWAY_ADMIN_TOKEN", args.timeout)
        name = f"admin {args.admin_command}"
    else:
        api = Api(args.control or os.environ.get("GATEWAY_CONTROL_URL") or DEFAULT_CONTROL_URL,
                  os.environ.get("GATEWAY_CONTROL_TOKEN", ""), "GATEWAY_CONTROL_TOKEN",
                  args.timeout)
        name = f"ctl {args.ctl_command}"
    try:
        doc, text = args.cli(api, args)
    except CliError as exc:
        print(f"gateway {name}: {exc}", file=err)
        return exc.status
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=False), file=out)
    else:
        print(text, file=out)
    return 0
