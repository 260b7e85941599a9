"""JSON Schema (draft 2020-12) of both config files, for editors and for `gateway schema`.

The loaders (gateway/config.py, gateway/control/config.py and the parsers they call) stay the
authority: they report every error as `path.to.key: message` and check what a schema cannot
(cross references, files that must exist, certificates, time zones). The schema describes the
same keys, types, ranges and choices so that an editor completes and checks a config while it
is typed; tests/test_config_schema.py keeps the two in step (unknown keys both ways, the shipped
configs, wrong documents refused by both).

The published files `schema/gateway.schema.json` and `schema/control.schema.json` are
`gateway schema gateway|control` output, checked equal by the tests.

`${VAR}` / `${VAR:-default}` are replaced in the file's text before YAML is parsed, so in the
file as an editor sees it any scalar may be a string holding such a reference (`workers:
${WORKERS:-2}`): every typed scalar below also accepts such a string.
"""

from __future__ import annotations

from typing import Any

import orjson

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_ENV_REF = {"$ref": "#/$defs/env"}
_ENV_DEF = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "A value taken from the environment when the file is loaded: ${VAR} or "
                   "${VAR:-default} (an unset ${VAR} without a default is an error).",
}
NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_EMAIL = r"^[^ \r\n<>,]*@[^ \r\n<>,]*$"
_LISTEN_PATTERN = r"^(\[[^\]]+\]|[^\[\]]+):[0-9]{1,5}$"

Schema = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Building blocks: each mirrors one parser of gateway/validation.py


def _env(schema: Schema, description: str) -> Schema:
    """A typed scalar, or a string with a ${VAR} reference standing in for it."""
    return {"description": description, "anyOf": [schema, _ENV_REF]}


def _nullable(schema: Schema) -> Schema:
    """Keys whose loader treats null as "not given"."""
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    desc = schema.get("description")
    inner = {k: v for k, v in schema.items() if k != "description"}
    out: Schema = {"anyOf": [inner, {"type": "null"}]}
    if desc:
        out["description"] = desc
    return out


def string(description: str, *, nonempty: bool = True, pattern: str | None = None) -> Schema:
    s: Schema = {"type": "string"}
    if pattern:
        s["pattern"] = pattern
        return _env(s, description)
    if nonempty:
        s["pattern"] = r"\S"
    return {**s, "description": description}


def name(description: str) -> Schema:
    return string(description, pattern=NAME_PATTERN)


def listen(description: str) -> Schema:
    return string(description + " (host:port or [v6]:port; port 0: any free port)",
                  pattern=_LISTEN_PATTERN)


def url(description: str, schemes: str = "https?") -> Schema:
    return string(description, pattern=rf"^({schemes})://")


def boolean(description: str) -> Schema:
    return _env({"type": "boolean"}, description)


def integer(description: str, minimum: int | None = None, maximum: int | None = None) -> Schema:
    s: Schema = {"type": "integer"}
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    return _env(s, description)


def number(description: str, minimum: float | None = None, *, exclusive_min: bool = False,
           maximum: float | None = None, exclusive_max: bool = False) -> Schema:
    s: Schema = {"type": "number"}
    if minimum is not None:
        s["exclusiveMinimum" if exclusive_min else "minimum"] = minimum
    if maximum is not None:
        s["exclusiveMaximum" if exclusive_max else "maximum"] = maximum
    return _env(s, description)


def choice(description: str, values: tuple[str, ...] | list[str]) -> Schema:
    return _env({"enum": list(values)}, description)


def listing(description: str, items: Schema, *, min_items: int | None = None,
            max_items: int | None = None, unique: bool = False) -> Schema:
    s: Schema = {"type": "array", "description": description, "items": items}
    if min_items is not None:
        s["minItems"] = min_items
    if max_items is not None:
        s["maxItems"] = max_items
    if unique:
        s["uniqueItems"] = True
    return s


def mapping(description: str, properties: dict[str, Schema], required: tuple[str, ...] = (),
            **extra: Any) -> Schema:
    """A mapping whose loader refuses unknown keys (`additionalProperties: false`)."""
    s: Schema = {"type": "object", "description": description, "properties": properties,
                 "additionalProperties": False}
    if required:
        s["required"] = list(required)
    s.update(extra)
    return s


def _ci(word: str) -> str:
    """A case-insensitive ECMA-262 pattern for a word (JSON Schema patterns take no flags)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


_UNITS = "|".join(_ci(u) for u in ("second", "sec", "s", "minute", "min", "m", "hour", "h",
                                   "day", "d"))
RATE_PATTERN = rf"^\s*0*[1-9][0-9]*\s*/\s*([0-9]+(\.[0-9]+)?\s*[sS]|({_UNITS})[sS]?)\s*$"


def rate(description: str) -> Schema:
    return string(description + " (N/second|minute|hour|day, or N/<k>s, e.g. '100/minute', "
                                "'10/30s')", pattern=RATE_PATTERN)


def limit_key(description: str, *, allow_global: bool) -> Schema:
    keys = ["ip_address", "user_id", "client_id", "api_key", "client_cert"]
    if allow_global:
        keys.append("global")
    return string(description, pattern=rf"^({'|'.join(keys)}|header:{_TOKEN})$")


_STATUS_5XX: Schema = {"type": "integer", "minimum": 500, "maximum": 599}


def _failures(description: str) -> Schema:
    return listing(description, {"anyOf": [{"enum": ["connect_error", "timeout"]}, _STATUS_5XX,
                                           _ENV_REF]})


def _money(description: str) -> Schema:
    """A USD amount: a number or a decimal string (exact to the micro-dollar)."""
    return {"description": description,
            "anyOf": [{"type": "number", "minimum": 0, "maximum": 1_000_000},
                      {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*$"}, _ENV_REF]}


def _fractions(description: str) -> Schema:
    return listing(description, {"anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*$"}, _ENV_REF]}, max_items=20)


def _document(title: str, description: str, properties: dict[str, Schema],
              required: tuple[str, ...]) -> Schema:
    return {"$schema": DRAFT, "title": f"gateway: {title} config", "description": description, "type": "object",
            "properties": properties, "additionalProperties": False, "required": list(required),
            "$defs": {"env": _ENV_DEF}}


# ---------------------------------------------------------------------------------------------
# The data plane: config/gateway.yaml


def _breaker() -> Schema:
    return _nullable(mapping("The upstream's circuit breaker (defaults: the seeds' values).", {
        "failure_threshold": integer("Consecutive failures that open the circuit (default 5).",
                                     1),
        "reset_timeout_s": number("Seconds an open circuit waits before half_open (default 300).",
                                  0, exclusive_min=True),
        "half_open_successes": integer("Successes in half_open that close the circuit "
                                       "(default 3).", 1),
        "half_open_max_inflight": integer("Probes let through at once while half_open "
                                          "(default 1).", 1),
        "failure_on": _failures("What counts as a failure: connect_error, timeout and/or 5xx "
                                "statuses (default connect_error, timeout, 502, 503, 504); 4xx "
                                "never count."),
        "error_rate": _nullable(mapping("Optional second trip rule: open when the error rate "
                                        "over a window passes a threshold.", {
            "threshold": number("Error ratio that opens the circuit (default 0.5).", 0,
                                exclusive_min=True, maximum=1),
            "min_requests": integer("Requests the window must hold before the rule applies "
                                    "(default 20).", 1),
            "window_s": number("The window, seconds (default 10).", 0, exclusive_min=True),
        })),
    }))


def _upstream() -> Schema:
    return mapping("An upstream: a named pool of endpoints with timeouts and a breaker.", {
        "name": name("The upstream's name, referenced by routes and shown in metrics."),
        "endpoints": listing("http:// or https:// base URLs (no path), round robin over the "
                             "healthy ones.", url("An endpoint URL."), min_items=1),
        "connect_timeout_s": number("Connect timeout, seconds (default 1).", 0,
                                    exclusive_min=True),
        "timeout_s": number("Timeout of the whole upstream exchange, seconds (default 30).", 0,
                            exclusive_min=True),
        "max_connections": integer("Pooled keep-alive connections per endpoint (default 512).",
                                   1),
        "breaker": _breaker(),
        "tls": _nullable(mapping("TLS to the https:// endpoints (default: verified against "
                                 "the system trust store).", {
            "ca": _nullable(string("PEM CA bundle to verify the upstream against (instead of "
                                   "the system store).")),
            "cert": _nullable(string("Client certificate (PEM); needs key.")),
            "key": _nullable(string("The client certificate's private key; needs cert.")),
            "server_name": _nullable(string("SNI and the name verified (default: the "
                                            "endpoint's host).")),
            "verify": boolean("Verify the upstream's certificate (default true)."),
        }, dependentRequired={"cert": ["key"], "key": ["cert"]})),
        "fallback": _nullable(name("Another upstream used while this one's circuit is open "
                                   "(one hop).")),
        "retries": _nullable(mapping("Retries of idempotent requests (GET, HEAD, OPTIONS, "
                                     "PUT, DELETE).", {
            "attempts": integer("Extra attempts after the first (default 2).", 0, 10),
            "on": _failures("What is retried: connect_error, timeout and/or 5xx statuses "
                            "(default connect_error, 502, 503, 504)."),
            "budget_ratio": number("Retries in flight at most this share of requests in "
                                   "flight (min 3; default 0.2).", 0, maximum=1),
        })),
        "concurrency": _nullable(mapping("Adaptive concurrency limit of the upstream.", {
            "adaptive": boolean("Adapt the limit to the measured latency (default true)."),
            "min": integer("The lowest limit (default 4); at most max.", 1),
            "max": integer("The highest limit (default 1000).", 1),
        })),
    }, ("name", "endpoints"))


def _limit() -> Schema:
    return mapping("A rate-limit policy (token bucket).", {
        "name": name("The policy name, shown to clients and in metrics."),
        "key": limit_key("Who is limited: ip_address | user_id | client_id | api_key | "
                         "client_cert | global | header:<Name>.", allow_global=True),
        "rate": rate("Tokens added per period"),
        "burst": integer("Bucket capacity = burst + 1 (burst 0: no bursting; default 0).", 0),
        "store": choice("Where buckets live: local (per process) or redis (shared; needs "
                        "redis:). Default local.", ("local", "redis")),
        "mode": choice("enforce, or shadow (count and log, never reject). Default enforce.",
                       ("enforce", "shadow")),
        "on_store_error": choice("redis store only: what to do when Redis fails (default "
                                 "local).", ("allow", "deny", "local")),
        "headers": boolean("Send RateLimit-Policy / RateLimit on every response of the route "
                           "(default true)."),
        "delay_max_ms": number("Hold a request up to this long for its token instead of "
                               "answering 429 (default 0: never).", 0, maximum=60_000),
    }, ("name", "key", "rate"))


def _route() -> Schema:
    return mapping("A route: requests it matches go to its upstream through its limits.", {
        "name": name("The route's name (metrics label, access log)."),
        "match": _nullable(mapping("What the route matches; every part optional. Routes match "
                                   "in order, first match wins.", {
            "path_prefix": string("Path prefix, whole segments ('/pay' matches /pay and /pay/x, "
                                  "not /payments).", pattern="^/"),
            "methods": listing("HTTP methods (omit to match any).",
                               string("An HTTP method.", pattern=rf"^{_TOKEN}$"), min_items=1),
            "host": string("Host, compared lower-case without port or trailing dot."),
        })),
        "upstream": string("The upstream requests go to (a name from upstreams:)."),
        "service": name("The service name for golden signals, SLOs and costs (default: the "
                        "upstream's name)."),
        "strip_prefix": boolean("Remove the path prefix before forwarding (default false)."),
        "limits": listing("Limit policies (names from limits:); every one must admit the "
                          "request.", string("A limit's name."), unique=True),
        "websocket": _nullable({"description": "Tunnel `Upgrade: websocket` requests: true, or "
                                               "{idle_timeout_s} (default 300).",
                                "anyOf": [{"type": "boolean"}, _ENV_REF, mapping(
                                    "WebSocket tunnels with their idle timeout.", {
                                        "idle_timeout_s": number(
                                            "Close a tunnel idle this long, seconds.", 0,
                                            exclusive_min=True)})]}),
        "tenants": boolean("Enforce the tenant plans on this route (default true, when "
                           "tenants: is configured)."),
        "priority": _nullable(choice("Shedding order under overload (default normal).",
                                     ("critical", "high", "normal", "low"))),
    }, ("name", "upstream"))


def _tenants() -> Schema:
    plan = _nullable(mapping("A plan: a token bucket and calendar quotas; {} is unlimited.", {
        "rate": rate("The plan's rate"),
        "burst": integer("Bucket capacity = burst + 1; needs rate.", 0),
        "quotas": _nullable(mapping("Admitted requests per calendar window.", {
            w: integer(f"Admitted requests per {w}.", 1) for w in ("day", "week", "month")})),
    }))
    return _nullable({
        "type": "object", "additionalProperties": False, "required": ["plans"],
        "description": "Tenants, their plans and calendar quotas.",
        "properties": {
            "key": limit_key("Where the tenant id comes from (default header:X-Tenant-Id).",
                             allow_global=False),
            "store": choice("local or redis (shared; needs redis:). Default local.",
                            ("local", "redis")),
            "time_zone": string("IANA time zone of the calendar windows (default UTC)."),
            "default_plan": _nullable(string("The plan of tenants not assigned one (default: "
                                             "unknown tenants are answered 403).")),
            "plans": {"type": "object", "description": "Plans by name.", "minProperties": 1,
                      "propertyNames": {"pattern": NAME_PATTERN}, "additionalProperties": plan},
            "assignments": _nullable({"type": "object",
                                      "description": "Tenant id -> plan name.",
                                      "propertyNames": {"minLength": 1, "maxLength": 256},
                                      "additionalProperties": {"type": "string"}}),
            "on_store_error": choice("redis store only: what to do when Redis fails (default "
                                     "local).", ("allow", "deny", "local")),
        }})


def gateway_schema() -> Schema:
    props: dict[str, Schema] = {
        "listen": listen("The proxy listener (default 127.0.0.1:8080)"),
        "workers": integer("Processes sharing the port with SO_REUSEPORT (default 1).", 1, 256),
        "drain_s": number("Seconds in-flight requests get at shutdown (default 10).", 0),
        "trusted_proxies": listing("IP addresses or CIDRs whose X-Forwarded-For is believed "
                                   "for ip_address keys.", string("An IP address or CIDR.")),
        "admin": mapping("The admin API (breakers, reload, limits test, effective config).", {
            "listen": listen("The admin listener (default 127.0.0.1:9901)"),
            "token": _nullable(string("Bearer token; empty: the admin API answers loopback "
                                      "callers only.", nonempty=False)),
        }),
        "redis": _nullable(mapping("Redis, needed only by limits and tenants with store: "
                                   "redis.", {
            "url": url("redis://, rediss://, unix:// or redis+sentinel://h:p[,h:p]/<master>/<db> "
                       "URL (default redis://127.0.0.1:6379/0).",
                       r"redis|rediss|unix|redis\+sentinel"),
            "timeout_ms": number("Per call, milliseconds (default 25): a slow Redis never "
                                 "stalls requests longer.", 0, exclusive_min=True),
            "cluster": boolean("The URL's host is a seed of a Redis Cluster (redis:// or "
                               "rediss:// only)."),
            "tls": _nullable(mapping("TLS files for a rediss:// URL.", {
                "ca": string("PEM bundle of the CA(s) that signed the server (default: the "
                             "system store)."),
                "cert": string("Client certificate (PEM); needs key."),
                "key": string("The client certificate's key; needs cert."),
            }, dependentRequired={"cert": ["key"], "key": ["cert"]})),
        })),
        "upstreams": listing("The upstreams, by name.", _upstream()),
        "limits": listing("Rate-limit policies, referenced by routes.", _limit()),
        "routes": listing("Routes, matched in order (first match wins).", _route(),
                          min_items=1),
        "control_plane": _nullable(mapping("Where signals are shipped, and the embedded "
                                           "control plane.", {
            "embedded": boolean("Start the control plane with `gateway run` (default false)."),
            "config": string("The embedded control plane's own config (default "
                             "config/control.yaml)."),
            "url": {"description": "Where aggregates are shipped: one URL, or a list of "
                                   "control-plane replicas tried in order.",
                    "anyOf": [url("A control-plane URL."),
                              listing("Control-plane replicas, tried in order.",
                                      url("A control-plane URL."), min_items=1)]},
            "token": string("The ingest token (role gateway).", nonempty=False),
            "ship_interval_s": number("Seconds between shipments (default 10).", 0,
                                      exclusive_min=True),
            "spool_dir": string("Aggregates that could not be delivered wait here (default "
                                "var/spool)."),
            "spool_max_bytes": integer("Size cap of the spool (default 64 MiB).", 1024),
        })),
        "access_log": _nullable({"description": "JSON-lines access log: true, or {enabled, "
                                                "path}. Off by default.",
                                 "anyOf": [{"type": "boolean"}, _ENV_REF, mapping(
                                     "The access log.", {
                                         "enabled": boolean("Write the access log."),
                                         "path": string("File to append to (empty: stderr).",
                                                        nonempty=False)})]}),
        "demo_upstream": _nullable(listen("Start the bundled demo upstream on this address")),
        "tls": _nullable(mapping("TLS on the proxy listener.", {
            "certificates": listing("The first is the default; the others are chosen by SNI.",
                                    mapping("A certificate and its key.", {
                                        "cert": string("Certificate chain (PEM)."),
                                        "key": string("Its private key (PEM)."),
                                    }, ("cert", "key")), min_items=1),
            "min_version": _env({"enum": ["1.2", "1.3", 1.2, 1.3]},
                                "Lowest TLS version (default 1.2)."),
            "client_ca": _nullable(string("Require and verify client certificates signed by "
                                          "this CA bundle.")),
        }, ("certificates",))),
        "metrics": _nullable(mapping("Prometheus metrics.", {
            "latency_buckets": _nullable(listing(
                "The `le` bounds (seconds, positive, ascending) of the latency histograms; a "
                "change needs a restart.",
                number("A bucket bound, seconds.", 0, exclusive_min=True),
                min_items=1, max_items=100)),
        })),
        "tracing": _nullable(mapping("Trace spans exported over OTLP/HTTP.", {
            "otlp_endpoint": _nullable(string("OTLP/HTTP collector base URL; empty: no span "
                                              "export.", pattern=r"^(https?://[^/:?#]+.*)?$")),
            "sample_ratio": number("Share of the traces that start at the gateway that are "
                                   "sampled (default 0.1).", 0, maximum=1),
            "service_name": string("service.name of the spans (default gateway)."),
        })),
        "tenants": _tenants(),
        "shedding": _nullable(mapping("Load shedding by route priority.", {
            "on_burn_rate_alert": boolean("Shed a service's low routes while its page alert "
                                          "is open (default false)."),
        })),
    }
    return _document("gateway", "The data plane's config (`gateway run --config`).", props,
                     ("upstreams", "routes"))


# ---------------------------------------------------------------------------------------------
# The control plane: config/control.yaml


def _slo() -> Schema:
    latency = {"properties": {"sli": {"const": "latency"}}, "required": ["sli"]}
    return mapping("A service level objective.", {
        "name": name("Unique name (also the SLO's id)."),
        "service": name("The service (route `service:` of the gateways)."),
        "route": _nullable(name("Only this route of the service.")),
        "objective": number("Target percentage, e.g. 99.9.", 1, exclusive_min=True,
                            maximum=100, exclusive_max=True),
        "sli": choice("availability (5xx are bad) or latency (slower than threshold_ms is "
                      "bad). Default availability.", ("availability", "latency")),
        "threshold_ms": number("The latency SLI's threshold, milliseconds (latency only).", 0,
                               exclusive_min=True, maximum=60_000),
        "count_429": boolean("Count 429s as bad (availability only; default false)."),
        "window": choice("Rolling (1h, 1d, 7d, 28d, 30d) or calendar (week, month) window "
                         "(default 30d).", ("1h", "1d", "7d", "28d", "30d", "week", "month")),
        "timezone": string("IANA time zone of calendar windows (default UTC)."),
        "min_events": integer("Events the long window must hold before an alert fires "
                              "(default 100).", 0),
        "cooldown_s": number("Seconds before a resolved alert may fire again (default 600).",
                             0),
        "deploy_gate": mapping("Deploy-gate tiers on the remaining budget fraction.", {
            "allow_above": number("Above: deploy any time (default 0.5).", 0, maximum=1),
            "low_traffic_above": number("Above: low-traffic hours only (default 0.2).", 0,
                                        maximum=1),
            "critical_above": number("Above: critical fixes only; below: blocked (default "
                                     "0.05).", 0, maximum=1),
        }),
        "description": string("Free text shown with the SLO.", nonempty=False),
        "budget_alerts": listing("Percentages of the error budget consumed that raise an "
                                 "alert, ascending (default [50, 90]).",
                                 number("A percentage.", 0, exclusive_min=True, maximum=100),
                                 unique=True),
    }, ("name", "service", "objective"),
        allOf=[{"if": latency, "then": {"required": ["threshold_ms"],
                                        "not": {"required": ["count_429"]}},
                "else": {"not": {"required": ["threshold_ms"]}}}])


def _target() -> Schema:
    def fmt(*formats: str) -> Schema:
        return {"properties": {"format": {"enum": list(formats)}}, "required": ["format"]}
    return mapping("A notification target (webhook, Slack, PagerDuty or e-mail).", {
        "name": name("Unique; shown in the delivery log."),
        "url": url("Where events are posted (not for email; pagerduty has a default)."),
        "format": choice("Payload format (default alertmanager).",
                         ("alertmanager", "slack", "pagerduty", "email")),
        "min_severity": choice("Lowest severity sent: info < ticket < page (alerts), SEV-4 .. "
                               "SEV-1 (incidents). Default info.",
                               ("info", "ticket", "page", "SEV-1", "SEV-2", "SEV-3", "SEV-4")),
        "send_resolved": boolean("Send resolutions (default true)."),
        "timeout_s": number("Per attempt, seconds (default 5).", 0, exclusive_min=True,
                            maximum=300),
        "max_attempts": integer("Attempts, with exponential backoff (default 4).", 1, 20),
        "backoff_s": number("First backoff, seconds, doubled per attempt up to 60 (default 1).",
                            0, maximum=60),
        "headers": {"type": "object", "description": "Extra HTTP headers (not for email).",
                    "additionalProperties": {"type": "string"}},
        "routing_key": string("PagerDuty Events API v2 routing key (pagerduty only)."),
        "smtp": mapping("The SMTP server (email only).", {
            "host": string("SMTP host."),
            "port": integer("SMTP port (default 25).", 1, 65535),
            "starttls": boolean("Upgrade with STARTTLS."),
            "username": string("Login user; needs password."),
            "password": string("Login password; needs username."),
            "from": string("Sender address.", pattern=_EMAIL),
            "ca_file": string("CA bundle to verify the server's certificate."),
        }, ("host", "from"), dependentRequired={"username": ["password"],
                                                "password": ["username"]}),
        "to": {"description": "Recipient address(es) (email only).",
               "anyOf": [string("An e-mail address.", pattern=_EMAIL),
                         listing("Recipients.", string("An e-mail address.", pattern=_EMAIL),
                                 min_items=1)]},
    }, ("name",), allOf=[
        {"if": fmt("email"), "then": {"required": ["smtp", "to"],
                                      "not": {"anyOf": [{"required": ["url"]},
                                                        {"required": ["headers"]}]}},
         "else": {"not": {"anyOf": [{"required": ["smtp"]}, {"required": ["to"]}]}}},
        {"if": fmt("pagerduty"), "then": {"required": ["routing_key"]},
         "else": {"not": {"required": ["routing_key"]}}},
        {"if": {"not": fmt("email", "pagerduty")}, "then": {"required": ["url"]}},
    ])


def _budget() -> Schema:
    return mapping("A cost budget with alert thresholds and optional enforcement.", {
        "name": string("Unique name (at most 200 characters)."),
        "service": _nullable(string("The service; null or '*' for all (default all).")),
        "period": choice("The budget period.", ("daily", "weekly", "monthly")),
        "amount_cents": integer("The budget, US cents.", 1, 10 ** 13),
        "thresholds": _fractions("Fractions of the amount spent that alert (default [0.8, 0.9, "
                                 "1.0])."),
        "forecast_thresholds": _fractions("Fractions of the amount forecast to be spent that "
                                          "alert (default: thresholds)."),
        "timezone": string("IANA time zone of the period's boundaries (default UTC)."),
        "enforce": boolean("Send enforcement directives to the gateways when exhausted."),
        "mode": choice("enforce, or shadow (report only).", ("enforce", "shadow")),
    }, ("name", "period", "amount_cents"))


def control_schema() -> Schema:
    cost_model = mapping("Prices of one service ('*': every service without its own).", {
        "per_request": _money("USD per request."),
        "per_upstream_second": _money("USD per second of upstream time."),
        "per_gb_in": _money("USD per GB received."),
        "per_gb_out": _money("USD per GB sent."),
        "fixed_monthly": _money("A fixed USD fee per month (named services only)."),
    })
    props: dict[str, Schema] = {
        "listen": listen("The control plane's listener (default 127.0.0.1:9000)"),
        "database": string("SQLite file (default var/control.db) or a "
                           "postgresql://user:pass@host:port/db URL."),
        "tokens": listing("API tokens: each maps to one name and role.", mapping(
            "A token.", {
                "name": name("The actor written to the audit log."),
                "role": choice("admin | monitor | reader | gateway (ingest).",
                               ("admin", "monitor", "reader", "gateway")),
                "token": string("The bearer token (no surrounding whitespace).",
                                pattern=r"^\S(.*\S)?$"),
            }, ("name", "role", "token")), min_items=1),
        "slos": _nullable(listing("Service level objectives.", _slo())),
        "cost_models": {"description": "Prices by service name, for metered costs.",
                        "anyOf": [{"type": "object", "additionalProperties": cost_model},
                                  {"type": "array", "maxItems": 0}, {"type": "null"}]},
        "budgets": _nullable(listing("Cost budgets.", _budget())),
        "notifications": {"description": "Where alerts and incidents are sent: a list of "
                                         "targets, or {targets: [...]}.",
                          "anyOf": [listing("Notification targets.", _target()),
                                    mapping("Notification targets.", {
                                        "targets": listing("Notification targets.",
                                                           _target())}),
                                    {"type": "null"}]},
    }
    return _document("control", "The control plane's config (`gateway control --config`).",
                     props, ("tokens",))


SCHEMAS = {"gateway": gateway_schema, "control": control_schema}


def render(which: str) -> str:
    """The schema as published in schema/<which>.schema.json."""
    return orjson.dumps(SCHEMAS[which](), option=orjson.OPT_INDENT_2).decode() + "\n"
