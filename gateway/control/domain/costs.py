"""Cost attribution and cost budgets: cost models, metering at ingest, cost reports,
imported charges, budget evaluation (alerts, enforcement directives). The HTTP API is api/costs.py,
the periodic evaluation jobs/finops.py.

Cost models (`cost_models:` in control.yaml, keyed by service; `"*"` applies to services without
their own model). Prices are USD, as numbers or decimal strings, read exactly (see budgets.py):

    cost_models:
      payment_service:
        per_request: "0.000001"         # api_calls, per request served
        per_upstream_second: "0.00002"  # compute, per second of request duration
        per_gb_in: "0.01"               # bandwidth, per GB (10^9 bytes) of request bodies
        per_gb_out: "0.09"              # bandwidth, per GB of response bodies
        fixed_monthly: "50"             # fixed, accrues linearly over each calendar month (UTC)

Metering. At ingest, in the batch's own transaction (so a replayed batch is never billed twice),
each series adds its *quantities* (requests, upstream microseconds, bytes in, bytes out) to
`cost_usage` rows keyed by (service, 15-minute bucket of the batch's interval_start, route,
cost_type, unit, price). Money is derived per row: micros = round_half_even(quantity * price *
10^6 / unit), so a row's cost is exact to half a micro-dollar however many batches fed it (a
million requests at 0.000001 is exactly 1_000_000 micros = 1 USD), and every report -- by day, by
route, by cost type, or the total -- is a sum of the same row integers: the groupings always add
up to the total. 15-minute buckets, because every real time zone offset is a multiple of 15
minutes, so a local day is always a whole number of buckets.

* Upstream seconds come from the series' latency histogram: count x HDR mean, i.e. the sum of each
  recorded bucket's median-equivalent value times its count (integer microseconds; the wire has no
  exact sum, and with 2 significant figures the error is under 1 %). The histogram times the whole
  request at the gateway, which for proxied requests is the upstream exchange plus a few tens of
  microseconds.
* Requests the gateway answered itself are not billed, neither as requests nor as upstream
  seconds nor bytes: series flagged `local` (a limit's 429, an open breaker's 503, a budget's
  429, a client gone before forwarding; see gateway/signals.py), and series with upstream "-"
  (no route, or rejected by a budget, also from gateways that do not flag them yet).
* The price is part of the row key: a price change starts new rows, old usage keeps its price.

Imported charges (`POST /v1/costs`, FinOps FOCUS columns): ServiceName, ChargePeriodStart,
ChargePeriodEnd, BilledCost (USD, exact to the micro-dollar), ChargeCategory (Usage, Purchase,
Tax, Credit, Adjustment), optional ServiceCategory (Storage -> storage, Compute -> compute,
Networking -> bandwidth, else other), x_CostType (overrides it), x_ChargeId (idempotency key),
ChargeDescription. A charge accrues linearly over its period (an instant charge at its start), as
do fixed monthly fees (from the service's first metered traffic); both use `budgets.allocated`,
whose floors telescope, so their parts also add up exactly. They have route "-".

Budgets: see budgets.py for the maths. Evaluated after every ingest (and every 15 s, and on every
budget change or report): each threshold alerts once per (budget, period, kind actual|forecast,
threshold), recorded in `budget_alerts` (UNIQUE), so the dedup holds across restarts. An enforcing
budget (`enforce: true`, `mode: enforce`) at >= 100 % of its effective amount puts its service (or
"*" for an all-services budget) in the ingest response's directives:

    {"reject_services": {"svc": {"until": <period end, unix s>, "budget": "<name>"}}}

which gateways apply (gateway/budgetguard.py) until the period ends or a later response drops it.
`mode: shadow` logs instead (once per budget and period).

Budget alerts go through the same path as the SLO alerts: each new threshold crossing is also
raised as an alert of `source: "budget"` in /v1/alerts (alerts.raise_alert; dedup key
`budget:<id>:<period start>:<actual|forecast>:<threshold>`; severity info -> info, warning ->
ticket, critical -> page; they stay open until acknowledged/resolved by hand) and handed to the
notifier (notify.py) from the event loop. `budget_alerts` stays the once-per-period ledger (and
is listed in the budget report), so the dedup does not depend on the alert's lifecycle.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from gateway import validation as valid
from gateway.control.domain import alerts as alerts_mod
from gateway.control.domain import budgets as bm
from gateway.control.domain import histogram
from gateway.control.domain.budgets import BudgetSpec
from gateway.control.domain.ingest import Batch

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import Store

T = TypeVar("T")
log = logging.getLogger("gateway.control.costs")

BUCKET_S = 900
# unit -> (cost_type, base units per priced unit)
UNITS: dict[str, tuple[str, int]] = {
    "request": ("api_calls", 1),
    "upstream_us": ("compute", 1_000_000),
    "byte_in": ("bandwidth", 1_000_000_000),
    "byte_out": ("bandwidth", 1_000_000_000),
}
MODEL_KEYS = {"per_request": "request", "per_upstream_second": "upstream_us",
              "per_gb_in": "byte_in", "per_gb_out": "byte_out"}
COST_TYPES = ("api_calls", "compute", "bandwidth", "storage", "fixed", "other")
FOCUS_CATEGORIES = ("Usage", "Purchase", "Tax", "Credit", "Adjustment")
SERVICE_CATEGORY_TYPES = {"storage": "storage", "compute": "compute", "networking": "bandwidth"}
GROUP_BY = ("day", "route", "cost_type", "service")
NO_ROUTE = "-"
MAX_RECORDS = 10_000
MAX_SPAN_S = 400 * 86_400


# ---------------------------------------------------------------------------------------------
# Cost models


@dataclass(frozen=True, slots=True)
class CostModel:
    prices: tuple[tuple[str, str], ...]     # (unit, price as a normalised decimal string)
    fixed_monthly_micros: int = 0


def _price_text(d: Decimal) -> str:
    return format(d.normalize(), "f")


def parse_cost_models(value: Any, path: str = "cost_models"
                      ) -> tuple[dict[str, CostModel], list[str]]:
    """Validate `cost_models:`; ({service: CostModel}, []) or ({}, every error line)."""
    errors: list[str] = []
    if value is None or value == {} or value == []:
        return {}, []
    if not isinstance(value, dict):
        return {}, [f"{path}: must be a mapping of service name to prices"]
    out: dict[str, CostModel] = {}
    for service, m in value.items():
        p = f"{path}.{service}"
        if not isinstance(service, str) or not service:
            errors.append(f"{p}: a service name must be a non-empty string")
            continue
        if not isinstance(m, dict):
            errors.append(f"{p}: must be a mapping of prices (per_request, per_upstream_second, "
                          "per_gb_in, per_gb_out, fixed_monthly)")
            continue
        prices: list[tuple[str, str]] = []
        fixed = 0
        for key, raw in m.items():
            if key == "fixed_monthly":
                if service == bm.ALL_SERVICES:
                    errors.append(f"{p}.{key}: only for a named service")
                    continue
                try:
                    fixed = bm.micros_of_dollars(raw)
                except bm.MoneyError as exc:
                    errors.append(f"{p}.{key}: {exc}")
                    continue
                if fixed < 0:
                    errors.append(f"{p}.{key}: must not be negative")
                continue
            if key not in MODEL_KEYS:
                errors.append(f"{p}.{key}: unknown key (per_request, per_upstream_second, "
                              "per_gb_in, per_gb_out, fixed_monthly)")
                continue
            try:
                d = bm.decimal_of(raw)
            except bm.MoneyError as exc:
                errors.append(f"{p}.{key}: {exc}")
                continue
            if d < 0 or d > 1_000_000:
                errors.append(f"{p}.{key}: must be between 0 and 1000000 USD, got {raw!r}")
                continue
            if d:
                prices.append((MODEL_KEYS[key], _price_text(d)))
        out[service] = CostModel(tuple(prices), fixed)
    return (out, []) if not errors else ({}, errors)


def check_config(m: dict[str, Any], errs: valid.Errors) -> None:
    """control/config.py's hook: validate `cost_models` and `budgets` deeply (errors into errs)."""
    if isinstance(m.get("cost_models"), (dict, list)):    # else reported by the shallow check
        for line in parse_cost_models(m["cost_models"])[1]:
            errs.lines.append(line)
    if isinstance(m.get("budgets"), list):
        names: dict[str, int] = {}
        for i, item in enumerate(m["budgets"]):
            if not isinstance(item, dict):
                continue            # reported by the shallow check
            spec, errors = bm.parse_budget(item, f"budgets[{i}]")
            errs.lines.extend(errors)
            if spec is not None:
                if spec.name in names:
                    errs.add(f"budgets[{i}].name", f"duplicate name {spec.name!r} "
                                                   f"(also budgets[{names[spec.name]}])")
                names.setdefault(spec.name, i)


# ---------------------------------------------------------------------------------------------
# Money of a usage row

_FRACTIONS: dict[tuple[str, str], Fraction] = {}


def row_micros(unit: str, price: str, quantity: int) -> int:
    """round_half_even(quantity * price * 10^6 / unit size): one row's cost in micro-dollars."""
    f = _FRACTIONS.get((unit, price))
    if f is None:
        f = _FRACTIONS[(unit, price)] = (Fraction(Decimal(price)) * bm.MICROS_PER_DOLLAR
                                         / UNITS[unit][1])
    return bm.round_half_even(quantity * f)


def hist_sum_us(hist: Any) -> int:
    """Sum of a series' recorded latencies, as count x HDR mean (integer microseconds)."""
    if not hist.total_count:
        return 0
    total = 0
    itr = hist.get_recorded_iterator()
    for item in itr:
        total += itr.count_at_this_value * hist._hdr_median_equiv_value(item.value_iterated_to)
    return int(total)


# ---------------------------------------------------------------------------------------------
# Metering at ingest


def attribute(store: Store, batch: Batch, models: dict[str, CostModel]) -> int:
    """Add the batch's metered quantities to cost_usage (call inside the batch's transaction).
    Returns how many rows were written."""
    if not models:
        return 0
    bucket = int(batch.interval_start // BUCKET_S) * BUCKET_S
    default = models.get(bm.ALL_SERVICES)
    sums: dict[tuple[str, str, str, str], int] = defaultdict(int)
    seen: dict[str, None] = {}
    for s in batch.series:
        if s.local or s.upstream == NO_ROUTE:
            continue
        model = models.get(s.service, default)
        if model is None:
            continue
        seen[s.service] = None
        for unit, price in model.prices:
            if unit == "request":
                q = s.count
            elif unit == "byte_in":
                q = s.bytes_in
            elif unit == "byte_out":
                q = s.bytes_out
            else:
                q = hist_sum_us(histogram.decode_trusted(s.latency))
            if q:
                sums[(s.service, s.route, unit, price)] += q
    rows = [(svc, bucket, route, UNITS[unit][0], unit, price, q)
            for (svc, route, unit, price), q in sums.items()]
    store.costs.add_cost_usage(rows)
    store.costs.note_cost_services([(svc, int(batch.interval_start)) for svc in seen])
    return len(rows)


# ---------------------------------------------------------------------------------------------
# Cost report: every cost as (service, route, cost_type, [a, b), micros) pieces


@dataclass(frozen=True, slots=True)
class Piece:
    service: str
    route: str
    cost_type: str
    at: int           # start of the time the piece covers (for group_by=day)
    micros: int


def _cut_span(total: int, start: int, end: int, a: int, b: int, cuts: list[int]
              ) -> list[tuple[int, int]]:
    """The span's accrual in [a, b), cut at `cuts`: [(piece start, micros)], zero parts dropped."""
    out = []
    edges = [a, *[c for c in cuts if a < c < b], b]
    for lo, hi in pairwise(edges):
        v = bm.share(total, start, end, lo, hi)
        if v:
            out.append((lo, v))
    return out


def _month_starts(a: int, b: int) -> list[tuple[int, int]]:
    """The UTC calendar months [start, end) overlapping [a, b)."""
    out = []
    t = a
    while t < b:
        s, e = bm.period_bounds("monthly", t, "UTC")
        out.append((s, e))
        t = e
    return out


def pieces(store: Store, models: dict[str, CostModel], since: int, until: int,
           service: str | None, now: float, *, cut_days: str | None = None) -> list[Piece]:
    """All costs in [since, until): metered usage by bucket_start, and spans (imported charges,
    fixed monthly fees) accrued up to min(until, now), cut at the local midnights of `cut_days`
    (a time zone) when given."""
    out: list[Piece] = []
    for svc, bstart, route, cost_type, unit, price, qty in store.costs.cost_usage(since, until, service):
        micros = row_micros(unit, price, qty)
        if micros:
            out.append(Piece(svc, route, cost_type, bstart, micros))
    horizon = min(until, int(now))
    if horizon <= since:
        return out
    cuts = bm.day_boundaries(since, horizon, cut_days) if cut_days else []
    for svc, cost_type, ps, pe, micros in store.costs.charges(since, horizon, service):
        for at, v in _cut_span(micros, ps, pe, since, horizon, cuts):
            out.append(Piece(svc, NO_ROUTE, cost_type, at, v))
    first_seen = store.costs.cost_services()
    for svc, model in models.items():
        if not model.fixed_monthly_micros or svc == bm.ALL_SERVICES:
            continue
        if service is not None and svc != service:
            continue
        begin = max(since, first_seen.get(svc, horizon))
        if begin >= horizon:
            continue
        for ms, me in _month_starts(begin, horizon):
            lo, hi = max(begin, ms), min(horizon, me)
            for at, v in _cut_span(model.fixed_monthly_micros, ms, me, lo, hi, cuts):
                out.append(Piece(svc, NO_ROUTE, "fixed", at, v))
    return out


def total_micros(store: Store, models: dict[str, CostModel], since: int, until: int,
                 service: str | None, now: float) -> int:
    return sum(p.micros for p in pieces(store, models, since, until, service, now))


def cost_report(store: Store, models: dict[str, CostModel], since: int, until: int,
                service: str | None, group_by: str | None, tz: str, now: float
                ) -> dict[str, Any]:
    ps = pieces(store, models, since, until, service, now,
                cut_days=tz if group_by == "day" else None)
    total = sum(p.micros for p in ps)
    doc: dict[str, Any] = {"service": service, "from": since, "to": until, "timezone": tz,
                           "group_by": group_by, "currency": "USD",
                           "total": bm.money(total)}
    if group_by is not None:
        groups: dict[str, int] = defaultdict(int)
        for p in ps:
            if group_by == "day":
                key = bm.day_label(p.at, tz)
            else:
                key = getattr(p, group_by)
            groups[key] += p.micros
        doc["groups"] = [{"key": k, **bm.money(v)} for k, v in sorted(groups.items())]
    return doc


# ---------------------------------------------------------------------------------------------
# Imported charges (FOCUS)


def parse_charges(doc: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate an import body (`{"records": [...]}` or a bare list) of FOCUS-style records.
    Columns this importer does not read are ignored, as FOCUS exports carry many more."""
    records = doc.get("records") if isinstance(doc, dict) else doc
    if not isinstance(records, list) or not records:
        return [], ["records: must be a non-empty list of FOCUS cost records"]
    if len(records) > MAX_RECORDS:
        return [], [f"records: at most {MAX_RECORDS} per request"]
    out: list[dict[str, Any]] = []
    errs = valid.Errors()
    for i, item in enumerate(records):
        p = f"records[{i}]"
        n0 = len(errs.lines)
        r = valid.mapping(item, p, errs, None,
                          {"ServiceName", "ChargePeriodStart", "ChargePeriodEnd", "BilledCost"})
        if r is None:
            continue
        svc = valid.string(r["ServiceName"], f"{p}.ServiceName", errs,
                           maximum=bm.MAX_SERVICE) if "ServiceName" in r else None
        start = valid.instant(r["ChargePeriodStart"], f"{p}.ChargePeriodStart", errs) \
            if "ChargePeriodStart" in r else None
        end = valid.instant(r["ChargePeriodEnd"], f"{p}.ChargePeriodEnd", errs) \
            if "ChargePeriodEnd" in r else None
        if start is not None and end is not None and not 0 <= end - start <= MAX_SPAN_S:
            errs.add(f"{p}.ChargePeriodEnd", f"must be after ChargePeriodStart, by at most "
                                             f"{MAX_SPAN_S // 86_400} days")
        micros = None
        if "BilledCost" in r:
            try:
                micros = bm.micros_of_dollars(r["BilledCost"])
                if abs(micros) > bm.MAX_AMOUNT_CENTS * bm.MICROS_PER_CENT:
                    raise bm.MoneyError("is too large")
            except bm.MoneyError as exc:
                errs.add(f"{p}.BilledCost", str(exc))
        currency = r.get("BillingCurrency", "USD")
        if currency != "USD":
            errs.add(f"{p}.BillingCurrency", f"only USD is supported, got {currency!r}")
        category = valid.choice(r.get("ChargeCategory", "Usage"), f"{p}.ChargeCategory", errs,
                                FOCUS_CATEGORIES)
        cost_type = r.get("x_CostType")
        if cost_type is None:
            sc = r.get("ServiceCategory")
            cost_type = SERVICE_CATEGORY_TYPES.get(sc.lower(), "other") \
                if isinstance(sc, str) else "other"
        cost_type = valid.choice(cost_type, f"{p}.x_CostType", errs, COST_TYPES)
        key = r.get("x_ChargeId")
        if key is not None:
            key = valid.string(key, f"{p}.x_ChargeId", errs, maximum=256)
        desc = valid.string(r.get("ChargeDescription", ""), f"{p}.ChargeDescription", errs,
                            nonempty=False, maximum=2000)
        if len(errs.lines) == n0:
            assert start is not None and end is not None
            out.append({"key": key, "service": svc, "cost_type": cost_type,
                        "category": category, "start": int(start), "end": int(end),
                        "micros": micros, "description": desc})
    return out, errs.lines


# ---------------------------------------------------------------------------------------------
# Budgets: evaluation, alerts, directives


def spec_of(row: dict[str, Any]) -> BudgetSpec:
    spec, errors = bm.parse_budget(orjson.loads(row["spec"]))
    if spec is None:  # only valid specs are ever stored
        raise ValueError(f"stored budget {row['id']} is invalid: {errors}")
    return spec


def spec_json(spec: BudgetSpec) -> str:
    doc = spec.to_doc()
    doc["thresholds"] = [str(t) for t in spec.thresholds]
    doc["forecast_thresholds"] = [str(t) for t in spec.forecast_thresholds]
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()


def effective_cents(row: dict[str, Any], spec: BudgetSpec, now: float) -> tuple[int, bool]:
    """(amount in cents now, whether an emergency override is in force)."""
    oc, exp = row.get("override_cents"), row.get("override_expires_at")
    if oc is not None and exp is not None and now < exp and oc > spec.amount_cents:
        return int(oc), True
    return spec.amount_cents, False


class FinOps:
    """The cost models and the budget evaluator of one control plane process."""

    def __init__(self, models: dict[str, CostModel],
                 notify: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.models = models
        self.notify = notify
        self.events: deque[Any] = deque()     # alerts.Event for the notifier (thread-safe)
        self._shadow_logged: set[tuple[int, int]] = set()
        self._rejecting: dict[str, tuple[int, str]] = {}

    # -- ingest -------------------------------------------------------------------------------

    def attribute(self, store: Store, batch: Batch) -> None:
        attribute(store, batch, self.models)

    def directives(self, store: Store, now: float) -> dict[str, Any]:
        """Evaluate every budget (recording new alerts); the gateways' directives."""
        return self.evaluate(store, now)[1]

    # -- evaluation ---------------------------------------------------------------------------

    def view(self, store: Store, row: dict[str, Any], now: float,
             alerts: bool = False) -> dict[str, Any]:
        """One budget with its current period's usage, status and forecast (no side effects)."""
        spec = spec_of(row)
        start, end = bm.period_bounds(spec.period, now, spec.timezone)
        service = None if spec.service == bm.ALL_SERVICES else spec.service
        actual = total_micros(store, self.models, start, end, service, now)
        cents, overridden = effective_cents(row, spec, now)
        amount = cents * bm.MICROS_PER_CENT
        fc = bm.forecast(actual, start, end, now)
        enforcing = spec.enforce and actual >= amount
        doc: dict[str, Any] = {
            "id": row["id"], **spec.to_doc(), "budget_name": spec.name,
            "service_name": spec.service, "budget_period": spec.period,
            "budget_amount_cents": spec.amount_cents,
            "effective_amount_cents": cents,
            "override": None if row.get("override_cents") is None else {
                "amount_cents": row["override_cents"], "expires_at": row["override_expires_at"],
                "reason": row["override_reason"], "active": overridden},
            "period_start": start, "period_end": end,
            "budget_dollars": bm.dollars_of_micros(amount),
            "current_usage_micros": actual, "current_usage_cents": bm.cents_of_micros(actual),
            "spent_dollars": bm.dollars_of_micros(actual),
            "utilization_percent": bm.percent(actual, amount),
            "forecast_micros": fc,
            "forecast_cents": None if fc is None else bm.cents_of_micros(fc),
            "forecast_utilization_percent": None if fc is None else bm.percent(fc, amount),
            "status": bm.usage_status(actual, amount),
            "enforcement": ("rejecting" if spec.mode == "enforce" else "shadow")
            if enforcing else ("armed" if spec.enforce else "off"),
            "source": row["source"], "created_at": row["created_at"],
            "updated_at": row["updated_at"],
        }
        if alerts:
            doc["alerts"] = [alert_doc(a) for a in store.budgets.budget_alerts(row["id"], 50)]
        return doc

    def evaluate(self, store: Store, now: float
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(budget views, directives); records each newly crossed threshold once per period."""
        views = []
        reject: dict[str, dict[str, Any]] = {}
        for row in store.budgets.all():
            v = self.view(store, row, now)
            views.append(v)
            spec = spec_of(row)
            amount = v["effective_amount_cents"] * bm.MICROS_PER_CENT
            for kind, spend, thresholds in (("actual", v["current_usage_micros"], spec.thresholds),
                                            ("forecast", v["forecast_micros"],
                                             spec.forecast_thresholds)):
                if spend is None:
                    continue
                for t in thresholds:
                    if not bm.reached(spend, amount, t):
                        break           # sorted ascending
                    new_id = store.budgets.add_budget_alert(
                        row["id"], spec.name, spec.service, v["period_start"], v["period_end"],
                        kind, str(t), bm.severity(t), spend, amount, now)
                    if new_id is not None:
                        self._alerted(store, new_id, v, kind, t, spend)
            if v["enforcement"] == "rejecting":
                cur = reject.get(spec.service)
                if cur is None or cur["until"] < v["period_end"]:
                    reject[spec.service] = {"until": v["period_end"], "budget": spec.name}
            elif v["enforcement"] == "shadow":
                key = (row["id"], v["period_start"])
                if key not in self._shadow_logged:
                    self._shadow_logged.add(key)
                    log.warning("budget exhausted (shadow mode: not rejecting)", extra={
                        "event": "budget_shadow_reject", "budget": spec.name,
                        "service": spec.service, "until": v["period_end"]})
        self._log_changes(reject)
        return views, ({"reject_services": reject} if reject else {})

    def _alerted(self, store: Store, alert_id: int, v: dict[str, Any], kind: str,
                 t: Decimal, spend: int) -> None:
        doc = {"id": alert_id, "source": "budget", "budget": v["name"], "budget_id": v["id"],
               "service": v["service"], "kind": kind, "threshold": float(t),
               "severity": bm.severity(t), "spend": bm.money(spend),
               "amount_cents": v["effective_amount_cents"],
               "period_start": v["period_start"], "period_end": v["period_end"]}
        log.warning("budget threshold reached", extra={"event": "budget_alert", **{
            k: doc[k] for k in ("budget", "service", "kind", "threshold", "severity")}})
        try:  # the same path as SLO alerts: /v1/alerts and the notifier
            pct = bm.percent(spend, v["effective_amount_cents"] * bm.MICROS_PER_CENT)
            what = "spend" if kind == "actual" else "forecast spend"
            alert = alerts_mod.raise_alert(
                store, dedup_key=f"budget:{v['id']}:{v['period_start']}:{kind}:{t}",
                source="budget", service=v["service"], severity=ALERT_SEVERITY[doc["severity"]],
                title=f"Budget {v['name']!r}: {what} at {pct}% of {v['period']} budget",
                description=f"{what} {bm.dollars_of_micros(spend)} USD reached threshold "
                            f"{t} of {bm.dollars_of_micros(v['effective_amount_cents'] * 10_000)}"
                            f" USD ({v['period']} period from {v['period_start']})",
                labels={"alertname": "BudgetThreshold", "budget": v["name"], "kind": kind,
                        "threshold": str(t)},
                details=doc, now=store.clock.time())
            self.events.append(alerts_mod.Event("firing", alert))
        except Exception:
            log.exception("budget alert could not be raised in /v1/alerts")
        if self.notify is not None:
            try:
                self.notify(doc)
            except Exception:
                log.exception("budget alert notification failed")

    def _log_changes(self, reject: dict[str, dict[str, Any]]) -> None:
        now_set = {s: (d["until"], d["budget"]) for s, d in reject.items()}
        for svc, (until, budget) in now_set.items():
            if self._rejecting.get(svc) != (until, budget):
                log.warning("budget exhausted: gateways reject the service", extra={
                    "event": "budget_enforced", "service": svc, "budget": budget,
                    "until": until})
        for svc in self._rejecting.keys() - now_set.keys():
            log.info("budget enforcement lifted", extra={"event": "budget_lifted",
                                                         "service": svc})
        self._rejecting = now_set


ALERT_SEVERITY = {"info": "info", "warning": "ticket", "critical": "page"}


def alert_doc(a: dict[str, Any]) -> dict[str, Any]:
    return {**a, "threshold": float(Decimal(a["threshold"])), "spend": bm.money(a["spend_micros"])}


def sync_config_budgets(store: Store, specs: list[BudgetSpec], now: float) -> None:
    """Budgets of control.yaml: created when missing; updated when their config entry changed
    since it was last applied (API changes stand until the entry itself is edited)."""
    for spec in specs:
        text = spec_json(spec)
        h = hashlib.sha256(text.encode()).hexdigest()[:16]
        bid = store.budgets.budget_id_by_name(spec.name)
        if bid is None:
            new = store.budgets.insert_budget(spec.name, text, "config", h, now)
            store.audit.record("config", "create", f"budget:{new}", "control.yaml",
                        {"budget": spec.to_doc()}, at=now)
            continue
        row = store.budgets.budget(bid)
        if row is not None and row["config_hash"] != h:
            store.budgets.update_budget(bid, spec.name, text, now, config_hash=h)
            store.audit.record("config", "update", f"budget:{bid}", "control.yaml changed",
                        {"budget": spec.to_doc()}, at=now)


def from_config(cost_models: Any, budgets: Any,
                notify: Callable[[dict[str, Any]], None] | None = None
                ) -> tuple[FinOps, list[BudgetSpec]]:
    """The FinOps evaluator of control.yaml's cost models, and its budgets (synced at startup)."""
    models, errors = parse_cost_models(cost_models)
    specs = []
    for i, item in enumerate(budgets):
        spec, errs = bm.parse_budget(item, f"budgets[{i}]")
        errors.extend(errs)
        if spec is not None:
            specs.append(spec)
    if errors:  # load() validated already; a hand-built config may not have been
        raise ValueError("; ".join(errors))
    return FinOps(models, notify), specs
