"""`gateway slo-rules`: Prometheus recording and alerting rules for the SLOs of control.yaml.

Sloth-style names over the gateway's own metrics (`gateway_requests_total`,
`gateway_request_duration_seconds_bucket`), labels `slo` and `service` on every series:

  slo:sli_error:ratio_rate<w>         error ratio over w = 5m 30m 1h 2h 6h 1d 3d (`window` label)
  slo:sli_error:ratio_rate<period>    over the SLO window (30d, 28d, ...; a calendar month or week
                                      is its nominal 30 or 7 days here: PromQL has no calendar),
                                      averaged from the 5m ratio as Sloth does
  slo:objective:ratio, slo:error_budget:ratio, slo:time_period:days
  slo:current_burn_rate:ratio         the 5m error ratio over the budget
  slo:period_burn_rate:ratio          the period's error ratio over the budget
  slo:period_error_budget_remaining:ratio
  alert SLOErrorBudgetBurn            severity page | ticket: the control plane's multiwindow
                                      multi-burn-rate rules and thresholds (slo.RULES scaled by
                                      the SLO window: 14.4 / 6 / 3 / 1 for 30 days)

Which series belong to an SLO: its `route` when it names one; otherwise the routes whose
`service` is the SLO's service in the gateway config given with `--gateway-config`; without one,
`upstream="<service>"` (a route's service defaults to its upstream's name).

Bad events: availability counts 5xx (and 429 with `count_429`); latency counts requests not in
the `le` bucket of the threshold. A threshold that is not a bucket bound uses the largest bound
below it (stricter: fewer good events), said in a comment of the output. The control plane's
`min_events` has no equivalent here: Prometheus alerts are not held back on low traffic.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

from gateway import config as gw_config
from gateway.control.config import load
from gateway.control.domain import slo as slo_mod
from gateway.control.domain.slo import SLO
from gateway.errors import ConfigError
from gateway.signals import LATENCY_BUCKETS_S

REQUESTS = "gateway_requests_total"
BUCKETS = "gateway_request_duration_seconds_bucket"
ALERT = "SLOErrorBudgetBurn"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _regex_alternatives(names: Sequence[str]) -> str:
    specials = set(".^$*+?()[]{}|\\")
    escaped = ["".join("\\" + c if c in specials else c for c in n) for n in names]
    return _quote("|".join(escaped))


def selector(s: SLO, routes_of: Mapping[str, Sequence[str]] | None) -> str:
    """The label matchers of the SLO's series (no braces)."""
    if s.route:
        return f"route={_quote(s.route)}"
    if routes_of is not None:
        routes = sorted(routes_of.get(s.service, ()))
        if not routes:
            # no route serves it: match nothing rather than everything
            return 'route="__none__"'
        if len(routes) == 1:
            return f"route={_quote(routes[0])}"
        return f"route=~{_regex_alternatives(routes)}"
    return f"upstream={_quote(s.service)}"


def latency_bound(threshold_ms: float, buckets_s: Sequence[float]) -> float | None:
    """The largest bucket bound (seconds) not above the threshold; None if none is."""
    t = threshold_ms / 1000.0
    below = [b for b in buckets_s if b <= t + 1e-12]
    return max(below) if below else None


def error_ratio(s: SLO, sel: str, window: str, buckets_s: Sequence[float]) -> str:
    if s.sli == "availability":
        codes = "5..|429" if s.count_429 else "5.."
        return (f"(sum(rate({REQUESTS}{{{sel},code=~\"{codes}\"}}[{window}])) or vector(0))\n"
                f"/\nsum(rate({REQUESTS}{{{sel}}}[{window}]))")
    assert s.threshold_ms is not None
    bound = latency_bound(s.threshold_ms, buckets_s)
    le = floatToGoString(bound) if bound is not None else "0"
    return (f"1 - (\n  (sum(rate({BUCKETS}{{{sel},le=\"{le}\"}}[{window}])) or vector(0))\n"
            f"  /\n  sum(rate({BUCKETS}{{{sel},le=\"+Inf\"}}[{window}]))\n)")


def _period_name(s: SLO) -> str:
    return {"month": "30d", "week": "7d"}.get(s.window, s.window)


def groups_of(s: SLO, routes_of: Mapping[str, Sequence[str]] | None,
              buckets_s: Sequence[float]) -> list[dict[str, Any]]:
    """The rule groups of one SLO: SLI recordings, metadata, alerts."""
    sel = selector(s, routes_of)
    labels = {"slo": s.id, "service": s.service}
    match = f'slo="{s.id}", service="{s.service}"'
    budget = s.budget_fraction
    sli_rules: list[dict[str, Any]] = []
    for window in slo_mod.BURN_WINDOWS:
        sli_rules.append({"record": f"slo:sli_error:ratio_rate{window}",
                          "expr": error_ratio(s, sel, window, buckets_s),
                          "labels": {**labels, "window": window}})
    period = _period_name(s)
    days = s.window_s / 86_400
    meta = [
        {"record": f"slo:sli_error:ratio_rate{period}",
         "expr": (f"sum_over_time(slo:sli_error:ratio_rate5m{{{match}}}[{period}])\n"
                  f"/ ignoring (window)\n"
                  f"count_over_time(slo:sli_error:ratio_rate5m{{{match}}}[{period}])"),
         "labels": {**labels, "window": period}},
        {"record": "slo:objective:ratio", "expr": f"vector({s.target:.12g})", "labels": labels},
        {"record": "slo:error_budget:ratio", "expr": f"vector({budget:.12g})",
         "labels": labels},
        {"record": "slo:time_period:days", "expr": f"vector({days:.12g})", "labels": labels},
        {"record": "slo:current_burn_rate:ratio",
         "expr": (f"slo:sli_error:ratio_rate5m{{{match}}}\n/ on (slo, service) group_left\n"
                  f"slo:error_budget:ratio{{{match}}}"),
         "labels": labels},
        {"record": "slo:period_burn_rate:ratio",
         "expr": (f"slo:sli_error:ratio_rate{period}{{{match}}}\n/ on (slo, service) "
                  f"group_left\nslo:error_budget:ratio{{{match}}}"),
         "labels": labels},
        {"record": "slo:period_error_budget_remaining:ratio",
         "expr": f"1 - slo:period_burn_rate:ratio{{{match}}}", "labels": labels},
    ]
    alerts: list[dict[str, Any]] = []
    for tier in slo_mod.TIERS:
        parts = []
        shown = []
        for rule, threshold in s.rules():
            if rule.tier != tier:
                continue
            factor = f"{threshold:.6g}"
            limit = f"({factor} * {budget:.12g})"
            parts.append(f"(\n  max(slo:sli_error:ratio_rate{rule.long}{{{match}}} > {limit})"
                         f" without (window)\n  and\n"
                         f"  max(slo:sli_error:ratio_rate{rule.short}{{{match}}} > {limit})"
                         f" without (window)\n)")
            shown.append(f"{rule.long}/{rule.short} > {factor}x")
        if not parts:
            continue
        what = "error budget" if s.sli == "availability" else "latency budget"
        alerts.append({
            "alert": ALERT,
            "expr": "\nor\n".join(parts),
            "labels": {"severity": tier, **labels, "sli": s.sli},
            "annotations": {
                "summary": f"{s.id}: {what} burning too fast ({tier})",
                "description": (f"SLO {s.id} ({s.objective:g}% {s.sli} of {s.service} over "
                                f"{s.window}): burn rate above "
                                f"{'; '.join(shown)} (long/short window)."),
            },
        })
    out = [{"name": f"slo-sli-recordings-{s.id}", "rules": sli_rules},
           {"name": f"slo-meta-recordings-{s.id}", "rules": meta}]
    if alerts:
        out.append({"name": f"slo-alerts-{s.id}", "rules": alerts})
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def render(slos: Sequence[SLO], routes_of: Mapping[str, Sequence[str]] | None = None,
           buckets_s: Sequence[float] | None = None, source: str = "") -> str:
    """The rules file (YAML) for these SLOs."""
    if buckets_s is None:
        buckets_s = LATENCY_BUCKETS_S
    head = ["# Prometheus rules for the SLOs of " + (source or "control.yaml") +
            ", generated by `gateway slo-rules`.",
            "# Check with: promtool check rules <this file>"]
    for s in slos:
        if s.sli == "latency" and s.threshold_ms is not None:
            bound = latency_bound(s.threshold_ms, buckets_s)
            if bound is None or abs(bound * 1000 - s.threshold_ms) > 1e-9:
                head.append(f"# {s.id}: {s.threshold_ms:g} ms is not a bucket bound of "
                            f"{BUCKETS}; good = faster than "
                            + (f"{bound:g} s" if bound is not None else "nothing") + ".")
        if not s.route and routes_of is None:
            head.append(f"# {s.id}: series of upstream {s.service!r} (no --gateway-config "
                        f"to map the service to its routes).")
    groups: list[dict[str, Any]] = []
    for s in slos:
        groups.extend(groups_of(s, routes_of, buckets_s))
    body = yaml.dump({"groups": groups}, Dumper=_Dumper, sort_keys=False, width=100,
                     allow_unicode=True)
    return "\n".join(head) + "\n" + body


def run(config_path: str, gateway_config: str | None = None) -> int:
    """`gateway slo-rules --config control.yaml [--gateway-config gateway.yaml]`: print the
    rules (an empty group list without SLOs); 2 with the config errors on stderr."""
    try:
        cfg = load(config_path)
        routes_of: dict[str, list[str]] | None = None
        if gateway_config is not None:
            gw = gw_config.load(gateway_config)
            routes_of = {}
            for r in gw.routes:
                routes_of.setdefault(r.service, []).append(r.name)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"<file>: {exc}", file=sys.stderr)
        return 2
    if not cfg.slos:      # still a valid (empty) rules file: pipelines need not special-case it
        print(f"slos: {config_path} defines no SLOs", file=sys.stderr)
    sys.stdout.write(render(cfg.slos, routes_of, source=config_path))
    return 0
