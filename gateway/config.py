"""Gateway configuration: frozen dataclasses and a loader that reports every error at once.

`load(path)` reads YAML, replaces `${VAR}` / `${VAR:-default}` from the environment, validates every
key (unknown keys are errors, see README "Configuration") and cross references, and returns a `Config`.
Errors are collected as `path.to.key: message` lines and raised together in one `ConfigError`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
import yaml

from gateway import tls as tls_mod
from gateway import validation as valid
from gateway.errors import ConfigError

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Value objects


@dataclass(frozen=True, slots=True)
class ErrorRateConfig:
    threshold: float = 0.5
    min_requests: int = 20
    window_s: float = 10.0


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    reset_timeout_s: float = 300.0
    half_open_successes: int = 3
    half_open_max_inflight: int = 1
    # "connect_error", "timeout" and/or HTTP status codes (ints)
    failure_on: frozenset[str | int] = frozenset({"connect_error", "timeout", 502, 503, 504})
    error_rate: ErrorRateConfig | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """TLS to an upstream's https:// endpoints. Without `ca`, the system trust store."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None   # SNI and the name verified (default: the endpoint's host)
    verify: bool = True


RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Idempotent methods (RFC 9110 9.2.2): the only ones a retry may repeat."""


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 2                 # extra attempts after the first
    on: frozenset[str | int] = frozenset({"connect_error", 502, 503, 504})
    budget_ratio: float = 0.2         # retries in flight <= ratio * requests in flight (min 3)


@dataclass(frozen=True, slots=True)
class ConcurrencyConfig:
    adaptive: bool = True
    min: int = 4
    max: int = 1000


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout_s: float = 1.0
    timeout_s: float = 30.0
    max_connections: int = 512
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    tls: UpstreamTlsConfig | None = None
    fallback: str | None = None      # another upstream, used while this one's circuit is open
    retries: RetryConfig | None = None
    concurrency: ConcurrencyConfig | None = None


@dataclass(frozen=True, slots=True)
class LimitConfig:
    name: str
    key: str                      # ip_address | user_id | client_id | api_key | header:<Name>
    rate_count: int               # N in "N/period"
    period_s: float               # the period in seconds
    burst: int = 0
    store: str = "local"          # local | redis
    mode: str = "enforce"         # enforce | shadow
    on_store_error: str = "local"  # allow | deny | local
    headers: bool = True
    rate_text: str = ""           # the rate as written, for display
    delay_max_ms: float = 0.0     # hold a request up to this long for its token instead of a 429

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.rate_count / self.period_s

    @property
    def capacity(self) -> float:
        return float(self.burst + 1)

    @property
    def header_name(self) -> str | None:
        return self.key[7:] if self.key.startswith("header:") else None


WEBSOCKET_IDLE_S = 300.0     # a tunnel with no byte either way for this long is closed


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    upstream: str
    service: str
    path_prefix: str = "/"
    methods: frozenset[str] | None = None
    host: str | None = None
    strip_prefix: bool = False
    limits: tuple[str, ...] = ()
    websocket: bool = False               # tunnel `Upgrade: websocket` requests
    websocket_idle_timeout_s: float = WEBSOCKET_IDLE_S
    tenants: bool = True          # enforce the tenant plans (when `tenants:` is configured)
    priority: str = "normal"              # critical | high | normal | low (shedding order)


@dataclass(frozen=True, slots=True)
class PlanConfig:
    """A tenant plan: a token bucket (rate_count 0: none) and calendar quotas."""

    name: str
    rate_count: int = 0           # N in "N/period"; 0: no rate limit
    period_s: float = 1.0
    burst: int = 0
    quotas: tuple[tuple[str, int], ...] = ()   # (day|week|month, admitted requests per window)

    @property
    def rate(self) -> float:
        return self.rate_count / self.period_s

    @property
    def capacity(self) -> float:
        return float(self.burst + 1)

    @property
    def unlimited(self) -> bool:
        return not self.rate_count and not self.quotas


@dataclass(frozen=True, slots=True)
class TenantsConfig:
    key: str = "header:X-Tenant-Id"          # limit key syntax
    store: str = "local"                     # local | redis
    time_zone: str = "UTC"
    default_plan: str | None = None          # None: unknown tenants are answered 403
    plans: tuple[PlanConfig, ...] = ()
    assignments: tuple[tuple[str, str], ...] = ()   # (tenant, plan)
    on_store_error: str = "local"            # allow | deny | local (redis only)

    def plan(self, name: str) -> PlanConfig:
        for p in self.plans:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = "127.0.0.1:9901"
    token: str = ""


@dataclass(frozen=True, slots=True)
class RedisTLSConfig:
    ca: str = ""                  # PEM bundle of the CA(s) that signed the server; empty: system
    cert: str = ""                # client certificate (PEM), with its key
    key: str = ""


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    timeout_ms: float = 25.0
    cluster: bool = False         # the URL's host is a seed of a Redis Cluster
    tls: RedisTLSConfig | None = None


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    embedded: bool = False
    config: str = "config/control.yaml"
    url: str = "http://127.0.0.1:9000"
    token: str = ""
    # Every control-plane replica the shipper may use, in order (url is the first); a single
    # `url:` string gives a one-element tuple.
    urls: tuple[str, ...] = ()
    ship_interval_s: float = 10.0
    spool_dir: str = "var/spool"
    spool_max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = False
    path: str = ""                # empty: stderr


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    latency_buckets: tuple[float, ...] | None = None   # seconds; None: signals' defaults


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerTlsConfig:
    """TLS on the proxy listener: the first certificate is the default, the others are chosen
    by SNI against their subjectAltNames."""

    certificates: tuple[CertificateConfig, ...]
    min_version: str = "1.2"              # 1.2 | 1.3
    client_ca: str | None = None          # require and verify client certificates


PRIORITIES = ("critical", "high", "normal", "low")


@dataclass(frozen=True, slots=True)
class SheddingConfig:
    on_burn_rate_alert: bool = False   # shed a service's low routes while its page alert is open


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str = ""       # OTLP/HTTP collector base URL; empty: no span export
    sample_ratio: float = 0.1     # of the traces that start at the gateway
    service_name: str = "gateway"


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = "127.0.0.1:8080"
    workers: int = 1
    drain_s: float = 10.0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    redis: RedisConfig | None = None
    upstreams: tuple[UpstreamConfig, ...] = ()
    limits: tuple[LimitConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    control_plane: ControlPlaneConfig | None = None
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    tenants: TenantsConfig | None = None
    demo_upstream: str | None = None   # "host:port": start the bundled demo upstream there
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tls: ListenerTlsConfig | None = None
    tracing: TracingConfig | None = None
    shedding: SheddingConfig = field(default_factory=lambda: SheddingConfig())
    version: str = ""
    source: str = ""

    def upstream(self, name: str) -> UpstreamConfig:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)

    def limit(self, name: str) -> LimitConfig:
        for lim in self.limits:
            if lim.name == name:
                return lim
        raise KeyError(name)

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, with secrets replaced."""
        doc = asdict(self)
        if doc["admin"]["token"]:
            doc["admin"]["token"] = "<redacted>"
        if doc.get("control_plane") and doc["control_plane"]["token"]:
            doc["control_plane"]["token"] = "<redacted>"
        if doc.get("redis"):
            doc["redis"]["url"] = _redact_url(doc["redis"]["url"])
        doc["trusted_proxies"] = [str(n) for n in self.trusted_proxies]
        if doc.get("tracing"):
            doc["tracing"]["otlp_endpoint"] = _redact_url(doc["tracing"]["otlp_endpoint"])
        for u in doc["upstreams"]:
            u["endpoints"] = [e["url"] for e in u["endpoints"]]
            u["breaker"]["failure_on"] = sorted(u["breaker"]["failure_on"], key=str)
            if u.get("retries"):
                u["retries"]["on"] = sorted(u["retries"]["on"], key=str)
        for r in doc["routes"]:
            r["methods"] = sorted(r["methods"]) if r["methods"] else None
        return doc


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str, str]:
    """`redis+sentinel://[user:pass@]h:p[,h:p]/<master>/<db>` -> (sentinels, master, db,
    username, password). ValueError names the problem."""
    u = urlsplit(url)
    creds, _, hosts = u.netloc.rpartition("@")
    user, _, password = creds.partition(":")
    sentinels: list[tuple[str, int]] = []
    for hp in hosts.split(","):
        if hp.startswith("["):          # [v6]:port
            host, _, rest = hp[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = hp.partition(":")
        port = port or "26379"
        if not host or not port.isdigit():
            raise ValueError(f"bad sentinel address {hp!r}: expected host:port")
        sentinels.append((host, int(port)))
    parts = [p for p in u.path.split("/") if p]
    if not parts:
        raise ValueError("no master name: expected redis+sentinel://host:port/<master>/<db>")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"bad path {u.path!r}: expected /<master>/<db>")
    db = int(parts[1]) if len(parts) == 2 else 0
    return sentinels, unquote(parts[0]), db, unquote(user), unquote(password)


def _check_redis_url(url: str, errs: valid.Errors) -> None:
    """The parts of a redis URL the store would otherwise reject at start."""
    u = urlsplit(url)
    if u.scheme == "redis+sentinel":
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            errs.add("redis.url", str(exc))
        return
    if u.scheme == "unix":
        if not u.path:
            errs.add("redis.url", "unix:// URL without a socket path")
        return
    try:
        _ = u.port
    except ValueError:
        errs.add("redis.url", f"bad port in {_redact_url(url)!r}")
        return
    db = u.path.strip("/")
    if db and not db.isdigit():
        errs.add("redis.url", f"the path must be a database number, got {db!r}")


def _redis_tls(value: Any, errs: valid.Errors) -> RedisTLSConfig | None:
    tm = valid.mapping(value, "redis.tls", errs, {"ca", "cert", "key"})
    if tm is None:
        return None
    tkw: dict[str, str] = {}
    for name in ("ca", "cert", "key"):
        if name in tm:
            path = valid.string(tm[name], f"redis.tls.{name}", errs)
            if path is not None and not Path(path).is_file():
                errs.add(f"redis.tls.{name}", f"file not found: {path!r}")
            elif path is not None:
                tkw[name] = path
    if ("cert" in tm) != ("key" in tm):
        errs.add("redis.tls", "cert and key go together (a client certificate and its key)")
    return RedisTLSConfig(**tkw)


def _check_redis_combination(rkw: dict[str, Any], errs: valid.Errors) -> None:
    scheme = urlsplit(rkw.get("url") or "redis:").scheme
    if rkw.get("tls") is not None and scheme != "rediss":
        errs.add("redis.tls", f"needs a rediss:// URL, got {scheme}://")
    if rkw.get("cluster") and scheme not in ("redis", "rediss"):
        errs.add("redis.cluster", f"needs a redis:// or rediss:// seed URL, got {scheme}://")


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":<redacted>@")
        return parts._replace(netloc=netloc).geturl()
    return url


# ---------------------------------------------------------------------------------------------
# Environment interpolation

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """Replace ${VAR} and ${VAR:-default}. Returns the text and the names of unset variables."""
    source: Mapping[str, str] = os.environ if env is None else env
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = source.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                missing.append(name)
                return ""
            return default
        return value

    return _VAR.sub(sub, text), missing


# ---------------------------------------------------------------------------------------------
# Parsing helpers: each takes (value, path, errors) and returns a parsed value or None


def parse_listen(value: Any, path: str, errs: valid.Errors) -> str | None:
    """`host:port` or `[v6]:port`; port 0 means any free port."""
    s = valid.string(value, path, errs)
    if s is None:
        return None
    try:
        split_hostport(s)
    except ValueError as exc:
        errs.add(path, str(exc))
        return None
    return s


def split_hostport(s: str) -> tuple[str, int]:
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
    else:
        host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:8080), got {s!r}")
    return host, int(port)


_PERIODS = {"second": 1, "sec": 1, "s": 1, "minute": 60, "min": 60, "m": 60,
            "hour": 3600, "h": 3600, "day": 86400, "d": 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(?:(\d+(?:\.\d+)?)\s*s|([a-z]+))\s*$")


def parse_rate(value: Any, path: str, errs: valid.Errors) -> tuple[int, float] | None:
    """`N/second|minute|hour|day` or `N/<k>s` -> (N, period seconds)."""
    if not isinstance(value, str):
        errs.add(path, f"must be a string like '100/minute', got {value!r}")
        return None
    m = _RATE.match(value.lower())
    if not m:
        errs.add(path, f"must be N/second|minute|hour|day or N/<k>s, got {value!r}")
        return None
    count = int(m.group(1))
    if m.group(2) is not None:
        period = float(m.group(2))
    else:
        unit = m.group(3)
        if unit.endswith("s") and unit[:-1] in _PERIODS:
            unit = unit[:-1]
        if unit not in _PERIODS:
            errs.add(path, f"unknown period {m.group(3)!r} (second, minute, hour, day or <k>s)")
            return None
        period = float(_PERIODS[unit])
    if count <= 0:
        errs.add(path, f"count must be > 0, got {value!r}")
        return None
    if period <= 0:
        errs.add(path, f"period must be > 0, got {value!r}")
        return None
    return count, period


def parse_endpoint(value: Any, path: str, errs: valid.Errors) -> Endpoint | None:
    s = valid.string(value, path, errs)
    if s is None:
        return None
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https"):
        errs.add(path, f"must be an http:// or https:// URL, got {s!r}")
        return None
    try:
        port = parts.port
    except ValueError:
        errs.add(path, f"has an invalid port: {s!r}")
        return None
    if not parts.hostname:
        errs.add(path, f"has no host: {s!r}")
        return None
    if parts.path not in ("", "/") or parts.query:
        errs.add(path, f"must not have a path or query, got {s!r}")
        return None
    return Endpoint(url=s.rstrip("/"), scheme=parts.scheme, host=parts.hostname,
                    port=port or (443 if parts.scheme == "https" else 80))


_KEYS = ("ip_address", "user_id", "client_id", "api_key", "client_cert")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


def parse_breaker(value: Any, path: str, errs: valid.Errors) -> BreakerConfig | None:
    if value is None:
        return BreakerConfig()
    allowed = {"failure_threshold", "reset_timeout_s", "half_open_successes",
               "half_open_max_inflight", "failure_on", "error_rate"}
    m = valid.mapping(value, path, errs, allowed)
    if m is None:
        return None
    d = BreakerConfig()
    kw: dict[str, Any] = {}
    ok = True
    for key, minimum in (("failure_threshold", 1), ("half_open_successes", 1),
                         ("half_open_max_inflight", 1)):
        if key in m:
            v = valid.integer(m[key], f"{path}.{key}", errs, minimum=minimum)
            ok &= v is not None
            kw[key] = v
    if "reset_timeout_s" in m:
        v2 = valid.number(m["reset_timeout_s"], f"{path}.reset_timeout_s", errs, minimum=0,
                  exclusive_min=True)
        ok &= v2 is not None
        kw["reset_timeout_s"] = v2
    if "failure_on" in m:
        items = valid.listing(m["failure_on"], f"{path}.failure_on", errs)
        if items is None:
            ok = False
        else:
            out: set[str | int] = set()
            for i, item in enumerate(items):
                ipath = f"{path}.failure_on[{i}]"
                if item in ("connect_error", "timeout") or (
                        isinstance(item, int) and not isinstance(item, bool) and 500 <= item <= 599):
                    out.add(item)
                elif isinstance(item, int) and not isinstance(item, bool) and 400 <= item <= 499:
                    errs.add(ipath, f"4xx statuses are client errors and never count as "
                                    f"upstream failures, got {item}")
                    ok = False
                else:
                    errs.add(ipath, f"must be connect_error, timeout or a 5xx status, got {item!r}")
                    ok = False
            kw["failure_on"] = frozenset(out)
    if "error_rate" in m and m["error_rate"] is not None:
        epath = f"{path}.error_rate"
        em = valid.mapping(m["error_rate"], epath, errs, {"threshold", "min_requests", "window_s"})
        if em is None:
            ok = False
        else:
            er = ErrorRateConfig()
            ekw: dict[str, Any] = {}
            if "threshold" in em:
                ekw["threshold"] = valid.number(em["threshold"], f"{epath}.threshold", errs, minimum=0,
                                        exclusive_min=True, maximum=1)
            if "min_requests" in em:
                ekw["min_requests"] = valid.integer(em["min_requests"], f"{epath}.min_requests", errs,
                                           minimum=1)
            if "window_s" in em:
                ekw["window_s"] = valid.number(em["window_s"], f"{epath}.window_s", errs, minimum=0,
                                       exclusive_min=True)
            if any(v is None for v in ekw.values()):
                ok = False
            else:
                kw["error_rate"] = ErrorRateConfig(**{**asdict(er), **ekw})
    if not ok:
        return None
    return BreakerConfig(**{k: getattr(d, k) for k in d.__slots__ if k not in kw}, **kw)


def parse_upstream(value: Any, path: str, errs: valid.Errors) -> UpstreamConfig | None:
    allowed = {"name", "endpoints", "connect_timeout_s", "timeout_s", "max_connections", "breaker",
               "tls", "fallback", "retries", "concurrency"}
    m = valid.mapping(value, path, errs, allowed, {"name", "endpoints"})
    if m is None:
        return None
    n0 = len(errs.lines)
    name = valid.name(m.get("name"), f"{path}.name", errs) if "name" in m else None
    endpoints: list[Endpoint] = []
    if "endpoints" in m:
        eps = valid.listing(m["endpoints"], f"{path}.endpoints", errs)
        if eps is not None:
            if not eps:
                errs.add(f"{path}.endpoints", "must list at least one endpoint")
            for i, e in enumerate(eps):
                ep = parse_endpoint(e, f"{path}.endpoints[{i}]", errs)
                if ep is not None:
                    endpoints.append(ep)
    kw: dict[str, Any] = {}
    if "connect_timeout_s" in m:
        kw["connect_timeout_s"] = valid.number(m["connect_timeout_s"], f"{path}.connect_timeout_s", errs,
                                       minimum=0, exclusive_min=True)
    if "timeout_s" in m:
        kw["timeout_s"] = valid.number(m["timeout_s"], f"{path}.timeout_s", errs, minimum=0,
                               exclusive_min=True)
    if "max_connections" in m:
        kw["max_connections"] = valid.integer(m["max_connections"], f"{path}.max_connections", errs,
                                     minimum=1)
    breaker = parse_breaker(m.get("breaker"), f"{path}.breaker", errs)
    if m.get("tls") is not None:
        kw["tls"] = parse_upstream_tls(m["tls"], f"{path}.tls", errs)
        if not any(e.scheme == "https" for e in endpoints) and "endpoints" in m:
            errs.add(f"{path}.tls", "is set but no endpoint is https://")
    if m.get("fallback") is not None:
        fb = valid.name(m["fallback"], f"{path}.fallback", errs)
        if fb is not None and fb == name:
            errs.add(f"{path}.fallback", f"names the upstream itself ({fb!r})")
        kw["fallback"] = fb
    if m.get("retries") is not None:
        kw["retries"] = parse_retries(m["retries"], f"{path}.retries", errs)
    if m.get("concurrency") is not None:
        kw["concurrency"] = parse_concurrency(m["concurrency"], f"{path}.concurrency", errs)
    if len(errs.lines) > n0 or name is None:
        return None
    return UpstreamConfig(name=name, endpoints=tuple(endpoints), breaker=breaker or BreakerConfig(),
                          **kw)


def parse_retries(value: Any, path: str, errs: valid.Errors) -> RetryConfig | None:
    if isinstance(value, dict) and True in value and "on" not in value:
        # YAML 1.1 reads a bare `on:` key as the boolean true
        value = {("on" if k is True else k): v for k, v in value.items()}
    m = valid.mapping(value, path, errs, {"attempts", "on", "budget_ratio"})
    if m is None:
        return None
    kw: dict[str, Any] = {}
    if "attempts" in m:
        kw["attempts"] = valid.integer(m["attempts"], f"{path}.attempts", errs, minimum=0, maximum=10)
    if "budget_ratio" in m:
        kw["budget_ratio"] = valid.number(m["budget_ratio"], f"{path}.budget_ratio", errs, minimum=0,
                                  maximum=1)
    if "on" in m:
        items = valid.listing(m["on"], f"{path}.on", errs)
        out: set[str | int] = set()
        for i, item in enumerate(items or []):
            if item in ("connect_error", "timeout") or (
                    isinstance(item, int) and not isinstance(item, bool) and 500 <= item <= 599):
                out.add(item)
            else:
                errs.add(f"{path}.on[{i}]", f"must be connect_error, timeout or a 5xx status, "
                                            f"got {item!r}")
        if items is not None:
            kw["on"] = frozenset(out)
    if any(v is None for v in kw.values()):
        return None
    return RetryConfig(**kw)


def parse_concurrency(value: Any, path: str, errs: valid.Errors) -> ConcurrencyConfig | None:
    m = valid.mapping(value, path, errs, {"adaptive", "min", "max"})
    if m is None:
        return None
    kw: dict[str, Any] = {}
    if "adaptive" in m:
        kw["adaptive"] = valid.boolean(m["adaptive"], f"{path}.adaptive", errs)
    if "min" in m:
        kw["min"] = valid.integer(m["min"], f"{path}.min", errs, minimum=1)
    if "max" in m:
        kw["max"] = valid.integer(m["max"], f"{path}.max", errs, minimum=1)
    if any(v is None for v in kw.values()):
        return None
    c = ConcurrencyConfig(**kw)
    if c.min > c.max:
        errs.add(f"{path}.min", f"must not exceed max ({c.max}), got {c.min}")
        return None
    return c


def parse_shedding(value: Any, path: str, errs: valid.Errors) -> SheddingConfig | None:
    m = valid.mapping(value, path, errs, {"on_burn_rate_alert"})
    if m is None:
        return None
    on = valid.boolean(m.get("on_burn_rate_alert", False), f"{path}.on_burn_rate_alert", errs)
    return None if on is None else SheddingConfig(on_burn_rate_alert=on)


def parse_upstream_tls(value: Any, path: str, errs: valid.Errors) -> UpstreamTlsConfig | None:
    m = valid.mapping(value, path, errs, {"ca", "cert", "key", "server_name", "verify"})
    if m is None:
        return None
    n0 = len(errs.lines)
    kw: dict[str, Any] = {}
    for key in ("ca", "cert", "key"):
        if m.get(key) is not None:
            kw[key] = valid.readable(m[key], f"{path}.{key}", errs)
    if m.get("server_name") is not None:
        kw["server_name"] = valid.string(m["server_name"], f"{path}.server_name", errs)
    if "verify" in m:
        kw["verify"] = valid.boolean(m["verify"], f"{path}.verify", errs)
    if ("cert" in kw) != ("key" in kw):
        missing = "key" if "cert" in kw else "cert"
        errs.add(f"{path}.{missing}", "is required with " + ("cert" if "cert" in kw else "key"))
    if len(errs.lines) > n0:
        return None
    cfg = UpstreamTlsConfig(**kw)
    try:
        tls_mod.client_context(cfg)
    except tls_mod.TlsFileError as exc:
        errs.add(f"{path}.{exc.key}", exc.message)
        return None
    return cfg


def parse_listener_tls(value: Any, path: str, errs: valid.Errors) -> ListenerTlsConfig | None:
    """`tls:` on the listener; every certificate is loaded now, so a bad file is refused by
    `gateway check` and by a reload, naming its key."""
    m = valid.mapping(value, path, errs, {"certificates", "min_version", "client_ca"},
                 {"certificates"})
    if m is None:
        return None
    n0 = len(errs.lines)
    certs: list[CertificateConfig] = []
    items = valid.listing(m["certificates"], f"{path}.certificates", errs) if "certificates" in m \
        else None
    if items is not None and not items:
        errs.add(f"{path}.certificates", "must list at least one {cert, key}")
    for i, item in enumerate(items or []):
        ipath = f"{path}.certificates[{i}]"
        im = valid.mapping(item, ipath, errs, {"cert", "key"}, {"cert", "key"})
        if im is None or "cert" not in im or "key" not in im:
            continue
        cert = valid.readable(im["cert"], f"{ipath}.cert", errs)
        key = valid.readable(im["key"], f"{ipath}.key", errs)
        if cert is None or key is None:
            continue
        try:
            tls_mod.load_certificate(cert, key)
        except tls_mod.TlsFileError as exc:
            errs.add(f"{ipath}.{exc.key}", exc.message)
            continue
        certs.append(CertificateConfig(cert=cert, key=key))
    kw: dict[str, Any] = {}
    if "min_version" in m:
        v = m["min_version"]
        kw["min_version"] = valid.choice(str(v) if isinstance(v, (int, float)) else v,
                                    f"{path}.min_version", errs, ("1.2", "1.3"))
    if m.get("client_ca") is not None:
        ca = valid.readable(m["client_ca"], f"{path}.client_ca", errs)
        if ca is not None:
            try:
                tls_mod.check_ca(ca)
            except tls_mod.TlsFileError as exc:
                errs.add(f"{path}.client_ca", exc.message)
        kw["client_ca"] = ca
    if len(errs.lines) > n0:
        return None
    return ListenerTlsConfig(certificates=tuple(certs), **kw)


def parse_websocket(value: Any, path: str, errs: valid.Errors) -> tuple[bool, float] | None:
    """`websocket: true|false`, or `websocket: {idle_timeout_s: N}` (enabled, with that idle
    timeout)."""
    if isinstance(value, bool):
        return value, WEBSOCKET_IDLE_S
    m = valid.mapping(value, path, errs, {"idle_timeout_s"})
    if m is None:
        return None
    idle = WEBSOCKET_IDLE_S
    if "idle_timeout_s" in m:
        v = valid.number(m["idle_timeout_s"], f"{path}.idle_timeout_s", errs, minimum=0,
                 exclusive_min=True)
        if v is None:
            return None
        idle = v
    return True, idle


def parse_limit(value: Any, path: str, errs: valid.Errors) -> LimitConfig | None:
    allowed = {"name", "key", "rate", "burst", "store", "mode", "on_store_error", "headers",
               "delay_max_ms"}
    m = valid.mapping(value, path, errs, allowed, {"name", "key", "rate"})
    if m is None:
        return None
    n0 = len(errs.lines)
    name = valid.name(m["name"], f"{path}.name", errs) if "name" in m else None
    key = None
    if "key" in m:
        key = m["key"]
        if not isinstance(key, str) or not (
                key in _KEYS or key == "global"
                or (key.startswith("header:") and _TOKEN.match(key[7:] or "-"))):
            errs.add(f"{path}.key", f"must be one of {', '.join(_KEYS)}, global or "
                                    f"header:<Name>, got {key!r}")
            key = None
    rate = parse_rate(m["rate"], f"{path}.rate", errs) if "rate" in m else None
    kw: dict[str, Any] = {}
    if "burst" in m:
        kw["burst"] = valid.integer(m["burst"], f"{path}.burst", errs, minimum=0)
    if "store" in m:
        kw["store"] = valid.choice(m["store"], f"{path}.store", errs, ("local", "redis"))
    if "mode" in m:
        kw["mode"] = valid.choice(m["mode"], f"{path}.mode", errs, ("enforce", "shadow"))
    if "on_store_error" in m:
        kw["on_store_error"] = valid.choice(m["on_store_error"], f"{path}.on_store_error", errs,
                                       ("allow", "deny", "local"))
    if "headers" in m:
        kw["headers"] = valid.boolean(m["headers"], f"{path}.headers", errs)
    if "delay_max_ms" in m:
        kw["delay_max_ms"] = valid.number(m["delay_max_ms"], f"{path}.delay_max_ms", errs, minimum=0,
                                  maximum=60_000)
    if len(errs.lines) > n0 or name is None or key is None or rate is None:
        return None
    return LimitConfig(name=name, key=key, rate_count=rate[0], period_s=rate[1],
                       rate_text=str(m["rate"]), **kw)


def parse_route(value: Any, path: str, errs: valid.Errors) -> RouteConfig | None:
    allowed = {"name", "match", "upstream", "service", "strip_prefix", "limits", "websocket",
               "tenants", "priority"}
    m = valid.mapping(value, path, errs, allowed, {"name", "upstream"})
    if m is None:
        return None
    n0 = len(errs.lines)
    name = valid.name(m["name"], f"{path}.name", errs) if "name" in m else None
    upstream = valid.string(m["upstream"], f"{path}.upstream", errs) if "upstream" in m else None
    service = (valid.name(m["service"], f"{path}.service", errs) if "service" in m
               else (upstream or name))
    kw: dict[str, Any] = {}
    if "match" in m and m["match"] is not None:
        mpath = f"{path}.match"
        mm = valid.mapping(m["match"], mpath, errs, {"path_prefix", "methods", "host"})
        if mm is not None:
            if "path_prefix" in mm:
                p = valid.string(mm["path_prefix"], f"{mpath}.path_prefix", errs)
                if p is not None and not p.startswith("/"):
                    errs.add(f"{mpath}.path_prefix", f"must start with '/', got {p!r}")
                kw["path_prefix"] = p
            if "methods" in mm:
                ms = valid.listing(mm["methods"], f"{mpath}.methods", errs)
                if ms is not None:
                    out = set()
                    for i, meth in enumerate(ms):
                        if not isinstance(meth, str) or not _TOKEN.match(meth):
                            errs.add(f"{mpath}.methods[{i}]",
                                     f"must be an HTTP method, got {meth!r}")
                        else:
                            out.add(meth.upper())
                    if not ms:
                        errs.add(f"{mpath}.methods", "must not be empty (omit it to match any)")
                    kw["methods"] = frozenset(out)
            if "host" in mm:
                h = valid.string(mm["host"], f"{mpath}.host", errs)
                kw["host"] = h.lower() if h else None
    if "strip_prefix" in m:
        kw["strip_prefix"] = valid.boolean(m["strip_prefix"], f"{path}.strip_prefix", errs)
    if "tenants" in m:
        kw["tenants"] = valid.boolean(m["tenants"], f"{path}.tenants", errs)
    if "limits" in m:
        ls = valid.listing(m["limits"], f"{path}.limits", errs)
        if ls is not None:
            names = []
            for i, ln in enumerate(ls):
                s = valid.string(ln, f"{path}.limits[{i}]", errs)
                if s is not None:
                    if s in names:
                        errs.add(f"{path}.limits[{i}]", f"lists {s!r} twice")
                    names.append(s)
            kw["limits"] = tuple(names)
    if m.get("websocket") is not None:
        ws = parse_websocket(m["websocket"], f"{path}.websocket", errs)
        if ws is not None:
            kw["websocket"], kw["websocket_idle_timeout_s"] = ws
    if m.get("priority") is not None:
        kw["priority"] = valid.choice(m["priority"], f"{path}.priority", errs, PRIORITIES)
    if len(errs.lines) > n0 or name is None or upstream is None or service is None:
        return None
    return RouteConfig(name=name, upstream=upstream, service=service, **kw)


def parse_control_plane(value: Any, path: str, errs: valid.Errors) -> ControlPlaneConfig | None:
    if value is None:
        return None
    allowed = {"embedded", "config", "url", "token", "ship_interval_s", "spool_dir",
               "spool_max_bytes"}
    m = valid.mapping(value, path, errs, allowed)
    if m is None:
        return None
    n0 = len(errs.lines)
    kw: dict[str, Any] = {}
    if "embedded" in m:
        kw["embedded"] = valid.boolean(m["embedded"], f"{path}.embedded", errs)
    if "config" in m:
        kw["config"] = valid.string(m["config"], f"{path}.config", errs)
    if "url" in m:
        # One URL or a list of them (control-plane replicas, tried in order).
        many = isinstance(m["url"], list)
        if many and not m["url"]:
            errs.add(f"{path}.url", "must list at least one URL")
        urls: list[str] = []
        for i, item in enumerate(m["url"] if many else [m["url"]]):
            where = f"{path}.url[{i}]" if many else f"{path}.url"
            u = valid.string(item, where, errs)
            if u is not None and urlsplit(u).scheme not in ("http", "https"):
                errs.add(where, f"must be an http(s) URL, got {u!r}")
            elif u is not None:
                urls.append(u)
        if urls:
            kw["url"] = urls[0]
            kw["urls"] = tuple(urls)
    if "token" in m:
        kw["token"] = valid.string(m["token"], f"{path}.token", errs, nonempty=False)
    if "ship_interval_s" in m:
        kw["ship_interval_s"] = valid.number(m["ship_interval_s"], f"{path}.ship_interval_s", errs,
                                     minimum=0, exclusive_min=True)
    if "spool_dir" in m:
        kw["spool_dir"] = valid.string(m["spool_dir"], f"{path}.spool_dir", errs)
    if "spool_max_bytes" in m:
        kw["spool_max_bytes"] = valid.integer(m["spool_max_bytes"], f"{path}.spool_max_bytes", errs,
                                     minimum=1024)
    if len(errs.lines) > n0:
        return None
    return ControlPlaneConfig(**kw)


def parse_tracing(value: Any, path: str, errs: valid.Errors) -> TracingConfig | None:
    if value is None:
        return None
    m = valid.mapping(value, path, errs, {"otlp_endpoint", "sample_ratio", "service_name"})
    if m is None:
        return None
    n0 = len(errs.lines)
    kw: dict[str, Any] = {}
    if "otlp_endpoint" in m:
        u = valid.string(m["otlp_endpoint"] if m["otlp_endpoint"] is not None else "",
                 f"{path}.otlp_endpoint", errs, nonempty=False)
        if u:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                errs.add(f"{path}.otlp_endpoint", f"must be an http(s) URL of an OTLP/HTTP "
                                                  f"collector, got {_redact_url(u)!r}")
        kw["otlp_endpoint"] = u
    if "sample_ratio" in m:
        kw["sample_ratio"] = valid.number(m["sample_ratio"], f"{path}.sample_ratio", errs, minimum=0,
                                  maximum=1)
    if "service_name" in m:
        kw["service_name"] = valid.string(m["service_name"], f"{path}.service_name", errs)
    if len(errs.lines) > n0:
        return None
    return TracingConfig(**kw)


TOP_KEYS = {"listen", "workers", "drain_s", "trusted_proxies", "admin", "redis", "upstreams",
            "limits", "routes", "control_plane", "access_log", "demo_upstream", "tls",
            "metrics", "tracing", "tenants", "shedding"}


def parse_metrics(value: Any, path: str, errs: valid.Errors) -> MetricsConfig:
    """`metrics: {latency_buckets: [seconds, ...]}`: the `le` bounds of the latency histograms,
    positive and strictly ascending, at most 100 of them."""
    m = valid.mapping(value, path, errs, {"latency_buckets"})
    if m is None or m.get("latency_buckets") is None:
        return MetricsConfig()
    p = f"{path}.latency_buckets"
    items = valid.listing(m["latency_buckets"], p, errs)
    if items is None:
        return MetricsConfig()
    if not items or len(items) > 100:
        errs.add(p, f"must list 1 to 100 bucket bounds (seconds), got {len(items)}")
        return MetricsConfig()
    bounds: list[float] = []
    for i, v in enumerate(items):
        b = valid.number(v, f"{p}[{i}]", errs, minimum=0, exclusive_min=True)
        if b is None:
            return MetricsConfig()
        if bounds and b <= bounds[-1]:
            errs.add(f"{p}[{i}]", f"must be greater than the bound before it ({bounds[-1]:g}): "
                                  "bounds are ascending seconds")
            return MetricsConfig()
        bounds.append(float(b))
    return MetricsConfig(latency_buckets=tuple(bounds))


def parse_plan(name: str, value: Any, path: str, errs: valid.Errors) -> PlanConfig | None:
    """`{rate, burst, quotas: {day, week, month}}`; `{}` is unlimited."""
    if value is None:
        value = {}
    m = valid.mapping(value, path, errs, {"rate", "burst", "quotas"})
    if m is None:
        return None
    n0 = len(errs.lines)
    kw: dict[str, Any] = {}
    if "rate" in m:
        rate = parse_rate(m["rate"], f"{path}.rate", errs)
        if rate is not None:
            kw["rate_count"], kw["period_s"] = rate
    if "burst" in m:
        if "rate" not in m:
            errs.add(f"{path}.burst", "needs a rate")
        kw["burst"] = valid.integer(m["burst"], f"{path}.burst", errs, minimum=0)
    if "quotas" in m and m["quotas"] is not None:
        qm = valid.mapping(m["quotas"], f"{path}.quotas", errs, {"day", "week", "month"})
        if qm is not None:
            quotas = []
            for w in ("day", "week", "month"):       # a fixed order: keys and headers rely on it
                if w in qm:
                    q = valid.integer(qm[w], f"{path}.quotas.{w}", errs, minimum=1)
                    if q is not None:
                        quotas.append((w, q))
            kw["quotas"] = tuple(quotas)
    if len(errs.lines) > n0:
        return None
    return PlanConfig(name=name, **kw)


def parse_tenants(value: Any, path: str, errs: valid.Errors) -> TenantsConfig | None:
    if value is None:
        return None
    allowed = {"key", "store", "time_zone", "default_plan", "plans", "assignments",
               "on_store_error"}
    m = valid.mapping(value, path, errs, allowed, {"plans"})
    if m is None:
        return None
    n0 = len(errs.lines)
    kw: dict[str, Any] = {}
    if "key" in m:
        key = m["key"]
        if not isinstance(key, str) or not (
                key in _KEYS or (key.startswith("header:") and _TOKEN.match(key[7:] or "-"))):
            errs.add(f"{path}.key", f"must be one of {', '.join(_KEYS)} or header:<Name>, "
                                    f"got {key!r}")
        else:
            kw["key"] = key
    if "store" in m:
        kw["store"] = valid.choice(m["store"], f"{path}.store", errs, ("local", "redis"))
    if "on_store_error" in m:
        kw["on_store_error"] = valid.choice(m["on_store_error"], f"{path}.on_store_error", errs,
                                       ("allow", "deny", "local"))
    if "time_zone" in m:
        tz = valid.string(m["time_zone"], f"{path}.time_zone", errs)
        if tz is not None:
            from gateway.quotawindows import zone
            try:
                zone(tz)
                kw["time_zone"] = tz
            except ValueError as exc:
                errs.add(f"{path}.time_zone", str(exc))
    plans: list[PlanConfig] = []
    pm = valid.mapping(m.get("plans"), f"{path}.plans", errs, set(m.get("plans") or ())
                  if isinstance(m.get("plans"), dict) else set())
    if pm is not None:
        if not pm:
            errs.add(f"{path}.plans", "must name at least one plan")
        for pname, pval in pm.items():
            if not isinstance(pname, str) or not _NAME.match(pname):
                errs.add(f"{path}.plans.{pname}", "plan names may contain only letters, digits, "
                                                  "'_', '.', ':' and '-'")
                continue
            plan = parse_plan(pname, pval, f"{path}.plans.{pname}", errs)
            if plan is not None:
                plans.append(plan)
    names = set(pm or ())
    if "default_plan" in m and m["default_plan"] is not None:
        dp = valid.string(m["default_plan"], f"{path}.default_plan", errs)
        if dp is not None and pm is not None and dp not in names:
            errs.add(f"{path}.default_plan", f"names unknown plan {dp!r} "
                                             f"(known: {', '.join(sorted(names)) or 'none'})")
        kw["default_plan"] = dp
    if "assignments" in m and m["assignments"] is not None:
        am = valid.mapping(m["assignments"], f"{path}.assignments", errs,
                      set(m["assignments"]) if isinstance(m["assignments"], dict) else set())
        if am is not None:
            out = []
            for tenant, pname in am.items():
                tpath = f"{path}.assignments.{tenant}"
                if not isinstance(tenant, str) or not tenant or len(tenant) > 256:
                    errs.add(tpath, "a tenant id must be a non-empty string of at most 256 "
                                    "characters")
                    continue
                if not isinstance(pname, str) or (pm is not None and pname not in names):
                    errs.add(tpath, f"names unknown plan {pname!r} "
                                    f"(known: {', '.join(sorted(names)) or 'none'})")
                    continue
                out.append((tenant, pname))
            kw["assignments"] = tuple(out)
    if len(errs.lines) > n0:
        return None
    return TenantsConfig(plans=tuple(plans), **kw)



def parse_config(doc: Any, *, source: str = "", raw: bytes = b"") -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    errs = valid.Errors()
    if doc is None:
        doc = {}
    m = valid.mapping(doc, "", errs, TOP_KEYS, {"upstreams", "routes"})
    if m is None:
        raise ConfigError(errs.lines)
    kw: dict[str, Any] = {}
    if "listen" in m:
        kw["listen"] = parse_listen(m["listen"], "listen", errs)
    if "workers" in m:
        kw["workers"] = valid.integer(m["workers"], "workers", errs, minimum=1, maximum=256)
    if "drain_s" in m:
        kw["drain_s"] = valid.number(m["drain_s"], "drain_s", errs, minimum=0)
    if "demo_upstream" in m and m["demo_upstream"] is not None:
        kw["demo_upstream"] = parse_listen(m["demo_upstream"], "demo_upstream", errs)
    if "trusted_proxies" in m:
        nets = []
        for i, t in enumerate(valid.listing(m["trusted_proxies"], "trusted_proxies", errs) or []):
            try:
                nets.append(ipaddress.ip_network(str(t), strict=False))
            except ValueError:
                errs.add(f"trusted_proxies[{i}]", f"must be an IP address or CIDR, got {t!r}")
        kw["trusted_proxies"] = tuple(nets)
    if "admin" in m:
        am = valid.mapping(m["admin"], "admin", errs, {"listen", "token"})
        if am is not None:
            akw: dict[str, Any] = {}
            if "listen" in am:
                akw["listen"] = parse_listen(am["listen"], "admin.listen", errs)
            if "token" in am:
                akw["token"] = valid.string(am["token"] if am["token"] is not None else "",
                                    "admin.token", errs, nonempty=False)
            kw["admin"] = AdminConfig(**{k: v for k, v in akw.items() if v is not None})
    if "redis" in m and m["redis"] is not None:
        rm = valid.mapping(m["redis"], "redis", errs, {"url", "timeout_ms", "cluster", "tls"})
        if rm is not None:
            rkw: dict[str, Any] = {}
            if "url" in rm:
                u = valid.string(rm["url"], "redis.url", errs)
                if u is not None and urlsplit(u).scheme not in ("redis", "rediss", "unix",
                                                               "redis+sentinel"):
                    errs.add("redis.url", f"must be a redis://, rediss://, unix:// or "
                                          f"redis+sentinel:// URL, got {_redact_url(u)!r}")
                elif u is not None:
                    _check_redis_url(u, errs)
                rkw["url"] = u
            if "timeout_ms" in rm:
                rkw["timeout_ms"] = valid.number(rm["timeout_ms"], "redis.timeout_ms", errs, minimum=0,
                                         exclusive_min=True)
            if "cluster" in rm:
                rkw["cluster"] = valid.boolean(rm["cluster"], "redis.cluster", errs)
            if "tls" in rm and rm["tls"] is not None:
                rkw["tls"] = _redis_tls(rm["tls"], errs)
            _check_redis_combination(rkw, errs)
            kw["redis"] = RedisConfig(**{k: v for k, v in rkw.items() if v is not None})
    if "access_log" in m and m["access_log"] is not None:
        lm = m["access_log"]
        if isinstance(lm, bool):
            kw["access_log"] = AccessLogConfig(enabled=lm)
        else:
            lmm = valid.mapping(lm, "access_log", errs, {"enabled", "path"})
            if lmm is not None:
                lkw: dict[str, Any] = {}
                if "enabled" in lmm:
                    lkw["enabled"] = valid.boolean(lmm["enabled"], "access_log.enabled", errs)
                if "path" in lmm:
                    lkw["path"] = valid.string(lmm["path"], "access_log.path", errs, nonempty=False)
                kw["access_log"] = AccessLogConfig(**{k: v for k, v in lkw.items()
                                                      if v is not None})
    kw["control_plane"] = parse_control_plane(m.get("control_plane"), "control_plane", errs)
    if "metrics" in m and m["metrics"] is not None:
        kw["metrics"] = parse_metrics(m["metrics"], "metrics", errs)
    if m.get("tls") is not None:
        kw["tls"] = parse_listener_tls(m["tls"], "tls", errs)
    kw["tracing"] = parse_tracing(m.get("tracing"), "tracing", errs)
    tenants = parse_tenants(m.get("tenants"), "tenants", errs)
    if tenants is not None:
        kw["tenants"] = tenants
    if isinstance(m.get("tenants"), dict) and m["tenants"].get("store") == "redis" \
            and "redis" not in m:
        errs.add("tenants.store", "is redis but no redis: section is configured")
    if m.get("shedding") is not None:
        kw["shedding"] = parse_shedding(m["shedding"], "shedding", errs)

    upstreams = _parse_named(m, "upstreams", parse_upstream, errs)
    limits = _parse_named(m, "limits", parse_limit, errs)
    routes = _parse_named(m, "routes", parse_route, errs)

    # Cross references, reported at the referencing key.
    # Against the names declared, even by entries with errors of their own, so one mistake is
    # reported once rather than again at every reference.
    up_names = _declared_names(m.get("upstreams"))
    lim_names = _declared_names(m.get("limits"))
    if isinstance(m.get("routes"), list):
        for i, r in enumerate(m["routes"]):
            if not isinstance(r, dict):
                continue
            up = r.get("upstream")
            if isinstance(up, str) and up not in up_names and "upstreams" in m:
                known = ", ".join(sorted(up_names)) or "none"
                errs.add(f"routes[{i}].upstream", f"names unknown upstream {up!r} (known: {known})")
            if isinstance(r.get("limits"), list):
                for j, ln in enumerate(r["limits"]):
                    if isinstance(ln, str) and ln not in lim_names:
                        errs.add(f"routes[{i}].limits[{j}]",
                                 f"names unknown limit {ln!r} "
                                 f"(known: {', '.join(sorted(lim_names)) or 'none'})")
    if isinstance(m.get("upstreams"), list):
        # A fallback is one hop: the fallback's own fallback is not followed (so two upstreams
        # may name each other), and its circuit is checked like any other.
        for i, u in enumerate(m["upstreams"]):
            fb = u.get("fallback") if isinstance(u, dict) else None
            if isinstance(fb, str) and fb not in up_names and fb != u.get("name"):
                known = ", ".join(sorted(up_names)) or "none"
                errs.add(f"upstreams[{i}].fallback", f"names unknown upstream {fb!r} "
                                                     f"(known: {known})")
    for i, lim in enumerate(limits):
        if lim.key == "client_cert" and (m.get("tls") is None or not isinstance(m["tls"], dict)
                                         or m["tls"].get("client_ca") is None):
            errs.add(f"limits[{i}].key", "is client_cert but tls.client_ca is not set "
                                         "(no client certificate would ever be verified)")
    if any(lim.store == "redis" for lim in limits) and "redis" not in m:
        for i, lim in enumerate(limits):
            if lim.store == "redis":
                errs.add(f"limits[{i}].store", "is redis but no redis: section is configured")
                break
    if not routes and not errs.lines and isinstance(m.get("routes"), list):
        errs.add("routes", "must list at least one route")

    if errs.lines:
        raise ConfigError(errs.lines)
    kw = {k: v for k, v in kw.items() if v is not None or k == "control_plane"}
    version = hashlib.sha256(raw or orjson.dumps(doc, default=str)).hexdigest()[:12]
    return Config(upstreams=tuple(upstreams), limits=tuple(limits), routes=tuple(routes),
                  version=version, source=source, **kw)


def _declared_names(items: Any) -> set[str]:
    if not isinstance(items, list):
        return set()
    return {i["name"] for i in items if isinstance(i, dict) and isinstance(i.get("name"), str)}


def _parse_named(m: dict[str, Any], key: str, parse: Callable[[Any, str, valid.Errors], Any],
                 errs: valid.Errors) -> list[Any]:
    if key not in m:
        return []
    items = valid.listing(m[key], key, errs)
    if items is None:
        return []
    out = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            name = item["name"]
            if name in seen:
                errs.add(f"{path}.name", f"duplicate name {name!r} (also {key}[{seen[name]}])")
            else:
                seen[name] = i
        parsed = parse(item, path, errs)
        if parsed is not None:
            out.append(parsed)
    return out


def load_document(text: str, parse: Callable[..., T], *, source: str = "<string>",
                  env: Mapping[str, str] | None = None) -> T:
    """Interpolate, parse YAML and validate with `parse(doc, source=, raw=)`, reporting every
    error (unset variables, YAML syntax, every key) in one ConfigError. Shared by the gateway
    and the control-plane configs."""
    expanded, missing = interpolate(text, env)
    errors = [f"${{{name}}}: environment variable is not set (use ${{{name}:-default}})"
              for name in dict.fromkeys(missing)]
    try:
        doc = yaml.safe_load(expanded)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(errors + [f"<yaml>: {where}: {getattr(exc, 'problem', exc)}"]) from None
    try:
        cfg = parse(doc, source=source, raw=expanded.encode())
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors) from None
    if errors:
        raise ConfigError(errors)
    return cfg


def read_text(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"<file>: cannot read {str(p)!r}: {exc.strerror}"]) from None


def load_text(text: str, *, source: str = "<string>", env: dict[str, str] | None = None) -> Config:
    """Parse and validate gateway config text (after environment interpolation)."""
    return load_document(text, parse_config, source=source, env=env)


def load(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate a gateway config file."""
    return load_text(read_text(path), source=str(path), env=env)
