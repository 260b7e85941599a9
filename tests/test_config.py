"""Config loading: every key validated, every error reported at once as `path.to.key: message`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.errors import ConfigError
from tests.conftest import ROOT

BASE = """
upstreams:
  - name: payments
    endpoints: ["http://127.0.0.1:9001"]
limits:
  - name: api_calls
    key: ip_address
    rate: "1000/hour"
routes:
  - name: r
    upstream: payments
    limits: [api_calls]
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load_text(text, env=env or {})
    return info.value.errors


def test_full_contract_example_parses() -> None:
    text = (Path(__file__).parent / "data" / "contract_example.yaml").read_text()
    cfg = config.load_text(text, env={})
    assert cfg.workers == 1 and cfg.drain_s == 10
    up = cfg.upstream("payments")
    assert [e.port for e in up.endpoints] == [9001, 9002]
    assert up.breaker.failure_threshold == 5 and up.breaker.reset_timeout_s == 300
    assert up.breaker.failure_on == frozenset({"connect_error", "timeout", 502, 503, 504})
    assert up.breaker.error_rate == config.ErrorRateConfig(0.5, 20, 10)
    lim = cfg.limit("api_calls")
    assert (lim.rate_count, lim.period_s, lim.capacity) == (1000, 3600.0, 51.0)
    assert lim.rate == pytest.approx(1000 / 3600)
    route = cfg.routes[0]
    assert route.host == "api.example.com" and route.methods == frozenset({"GET", "POST"})
    assert route.service == "payment_service" and route.limits == ("api_calls",)
    assert cfg.admin.token == "" and cfg.control_plane is not None
    assert cfg.control_plane.token == "dev-ingest-token"


def test_defaults_when_optional_sections_are_absent() -> None:
    cfg = config.load_text(BASE, env={})
    assert cfg.listen == "127.0.0.1:8080" and cfg.admin.listen == "127.0.0.1:9901"
    assert cfg.upstreams[0].breaker == config.BreakerConfig()
    assert cfg.routes[0].service == "payments"  # defaults to the upstream's name
    assert cfg.control_plane is None and cfg.redis is None


@pytest.mark.parametrize("rate,count,period", [
    ("10/second", 10, 1), ("5/minute", 5, 60), ("1000/hour", 1000, 3600), ("7/day", 7, 86400),
    ("100/10s", 100, 10), ("3/0.5s", 3, 0.5), ("20 / minutes", 20, 60),
])
def test_rates(rate: str, count: int, period: float) -> None:
    cfg = config.load_text(BASE.replace('"1000/hour"', f'"{rate}"'), env={})
    assert (cfg.limits[0].rate_count, cfg.limits[0].period_s) == (count, period)


def test_env_interpolation() -> None:
    text = BASE + 'admin: {token: "${TOK}", listen: "${ADDR:-127.0.0.1:9999}"}\n'
    cfg = config.load_text(text, env={"TOK": "s3cret"})
    assert cfg.admin.token == "s3cret" and cfg.admin.listen == "127.0.0.1:9999"
    assert errors_of(text, env={}) == [
        "${TOK}: environment variable is not set (use ${TOK:-default})"]


BAD = [
    ("listen: 8080", ["listen: must be a string, got an integer"]),
    ('listen: "nohost"', ["listen: must be host:port (e.g. 127.0.0.1:8080), got 'nohost'"]),
    ("workers: 0", ["workers: must be >= 1, got 0"]),
    ("lisen: x", ["lisen: unknown key (did you mean 'listen'?)"]),
    ("admin: {listen: '127.0.0.1:1', tokn: x}", ["admin.tokn: unknown key (did you mean 'token'?)"]),
    ("trusted_proxies: [not-an-ip]",
     ["trusted_proxies[0]: must be an IP address or CIDR, got 'not-an-ip'"]),
    ("redis: {url: 'http://x', timeout_ms: 0}",
     ["redis.url: must be a redis://, rediss://, unix:// or redis+sentinel:// URL, "
      "got 'http://x'",
      "redis.timeout_ms: must be > 0, got 0"]),
    ("redis: {url: 'redis+sentinel://127.0.0.1:26379'}",
     ["redis.url: no master name: expected redis+sentinel://host:port/<master>/<db>"]),
    ("redis: {url: 'redis+sentinel://127.0.0.1:x/mymaster/0'}",
     ["redis.url: bad sentinel address '127.0.0.1:x': expected host:port"]),
    ("redis: {url: 'redis://127.0.0.1:6379/zero'}",
     ["redis.url: the path must be a database number, got 'zero'"]),
    ("redis: {url: 'rediss://127.0.0.1:6379/0', tls: {ca: /nonexistent/ca.pem, cert: /x.pem}}",
     ["redis.tls.ca: file not found: '/nonexistent/ca.pem'",
      "redis.tls.cert: file not found: '/x.pem'",
      "redis.tls: cert and key go together (a client certificate and its key)"]),
    ("redis: {url: 'redis://127.0.0.1:6379/0', tls: {}, cluster: yes-please}",
     ["redis.cluster: must be true or false, got 'yes-please'",
      "redis.tls: needs a rediss:// URL, got redis://"]),
    ("redis: {url: 'redis+sentinel://h:26379/m/0', cluster: true}",
     ["redis.cluster: needs a redis:// or rediss:// seed URL, got redis+sentinel://"]),
]


def test_redis_sentinel_cluster_and_tls_keys_parse(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = config.load_text(
        BASE + f"redis: {{url: 'rediss://10.0.0.1:6380/0', cluster: true, tls: {{ca: '{ca}'}}}}\n",
        env={})
    assert cfg.redis is not None and cfg.redis.cluster and cfg.redis.tls is not None
    assert cfg.redis.tls.ca == str(ca) and cfg.redis.tls.cert == ""
    assert config.parse_sentinel_url("redis+sentinel://:pw@a:26379,[::1]:26380,b/mymaster/3") == (
        [("a", 26379), ("::1", 26380), ("b", 26379)], "mymaster", 3, "", "pw")


@pytest.mark.parametrize("extra,expected", BAD, ids=[b[0][:30] for b in BAD])
def test_bad_top_level_keys(extra: str, expected: list[str]) -> None:
    assert errors_of(BASE + extra + "\n") == expected


def test_bad_upstream_limit_route_all_reported_at_once() -> None:
    text = """
upstreams:
  - name: payments
    endpoints: ["ftp://x", "http://127.0.0.1:9001/path"]
    timeout_s: -1
    breaker: {failure_threshold: 0, failure_on: [404, "boom"], error_rate: {threshold: 2}}
  - name: payments
    endpoints: []
limits:
  - {name: a, key: cookie, rate: "5/fortnight", burst: -1, store: memcached, mode: loud,
     on_store_error: panic, headers: "yes"}
routes:
  - name: r
    upstream: nowhere
    match: {path_prefix: "api", methods: ["GET", 3], hots: x}
    limits: [a, missing, a]
    strip_prefix: 1
"""
    assert errors_of(text) == [
        "upstreams[0].endpoints[0]: must be an http:// or https:// URL, got 'ftp://x'",
        "upstreams[0].endpoints[1]: must not have a path or query, got "
        "'http://127.0.0.1:9001/path'",
        "upstreams[0].timeout_s: must be > 0, got -1",
        "upstreams[0].breaker.failure_threshold: must be >= 1, got 0",
        "upstreams[0].breaker.failure_on[0]: 4xx statuses are client errors and never count as "
        "upstream failures, got 404",
        "upstreams[0].breaker.failure_on[1]: must be connect_error, timeout or a 5xx status, "
        "got 'boom'",
        "upstreams[0].breaker.error_rate.threshold: must be <= 1, got 2",
        "upstreams[1].name: duplicate name 'payments' (also upstreams[0])",
        "upstreams[1].endpoints: must list at least one endpoint",
        "limits[0].key: must be one of ip_address, user_id, client_id, api_key, client_cert, global or "
        "header:<Name>, got 'cookie'",
        "limits[0].rate: unknown period 'fortnight' (second, minute, hour, day or <k>s)",
        "limits[0].burst: must be >= 0, got -1",
        "limits[0].store: must be one of local, redis, got 'memcached'",
        "limits[0].mode: must be one of enforce, shadow, got 'loud'",
        "limits[0].on_store_error: must be one of allow, deny, local, got 'panic'",
        "limits[0].headers: must be true or false, got 'yes'",
        "routes[0].match.hots: unknown key (did you mean 'host'?)",
        "routes[0].match.path_prefix: must start with '/', got 'api'",
        "routes[0].match.methods[1]: must be an HTTP method, got 3",
        "routes[0].strip_prefix: must be true or false, got 1",
        "routes[0].limits[2]: lists 'a' twice",
        "routes[0].upstream: names unknown upstream 'nowhere' (known: payments)",
        "routes[0].limits[1]: names unknown limit 'missing' (known: a)",
    ]


def test_cross_references_and_required() -> None:
    text = """
upstreams: [{name: u, endpoints: ["http://127.0.0.1:1"]}]
limits: [{name: l, key: "header:X-Tenant", rate: "1/second", store: redis}]
routes: [{upstream: u}, {name: r2, upstream: v, limits: [l, nope]}]
"""
    assert errors_of(text) == [
        "routes[0].name: is required",
        "routes[1].upstream: names unknown upstream 'v' (known: u)",
        "routes[1].limits[1]: names unknown limit 'nope' (known: l)",
        "limits[0].store: is redis but no redis: section is configured",
    ]


def test_missing_top_level_sections_and_yaml_errors() -> None:
    assert errors_of("listen: '127.0.0.1:1'\n") == ["routes: is required", "upstreams: is required"]
    errs = errors_of("routes: [\n")
    assert len(errs) == 1 and errs[0].startswith("<yaml>: line ")


def test_redacted_config_hides_secrets() -> None:
    text = BASE + ("admin: {token: hunter2}\nredis: {url: 'redis://:pw@127.0.0.1:6379/0'}\n"
                   "control_plane: {token: t0k}\n")
    doc = config.load_text(text, env={}).redacted()
    flat = repr(doc)
    assert "hunter2" not in flat and "t0k" not in flat and ":pw@" not in flat
    assert doc["admin"]["token"] == "<redacted>"


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_gateway_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    res = run_check(good)
    assert res.returncode == 0, res.stderr
    assert "valid gateway config" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("key: ip_address", "key: nope") + "workers: -2\n")
    res = run_check(bad)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "workers: must be >= 1, got -2",
        "limits[0].key: must be one of ip_address, user_id, client_id, api_key, client_cert, global or "
        "header:<Name>, got 'nope'",
    ]
    res = run_check(tmp_path / "missing.yaml")
    assert res.returncode == 2 and "cannot read" in res.stderr


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in
                                        [ROOT / "config" / "gateway.yaml",
                                         ROOT / "config" / "control.yaml",
                                         *(ROOT / "config" / "examples").glob("*.yaml")]),
                         ids=str)
def test_shipped_configs_are_valid(path: Path) -> None:
    res = run_check(ROOT / path)
    assert res.returncode == 0, res.stderr


def test_metrics_latency_buckets_parse_and_errors_name_the_key() -> None:
    cfg = config.load_text(BASE + "metrics: {latency_buckets: [0.05, 0.1, 0.2, 1]}\n", env={})
    assert cfg.metrics.latency_buckets == (0.05, 0.1, 0.2, 1.0)
    assert config.load_text(BASE, env={}).metrics.latency_buckets is None
    for value, error in (
            ("[0.1, 0.1]", ("metrics.latency_buckets[1]: must be greater than the bound before "
                            "it (0.1)")),
            ("[0.5, 0.2]", "metrics.latency_buckets[1]: must be greater than the bound before"),
            ("[0, 1]", "metrics.latency_buckets[0]: must be > 0"),
            ("[-1]", "metrics.latency_buckets[0]: must be > 0"),
            ('[0.1, "fast"]', "metrics.latency_buckets[1]: must be a number"),
            ("[]", "metrics.latency_buckets: must list 1 to 100 bucket bounds"),
            ("0.5", "metrics.latency_buckets: must be a list")):
        errs = errors_of(BASE + f"metrics: {{latency_buckets: {value}}}\n")
        assert any(e.startswith(error) for e in errs), (value, errs)
    assert any(e.startswith("metrics.buckets: unknown key")
               for e in errors_of(BASE + "metrics: {buckets: [1]}\n"))
