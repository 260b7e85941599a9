"""Config keys of overload protection: retries, concurrency, priority, shedding."""

from __future__ import annotations

import pytest

from gateway import config as config_mod
from gateway.config import ConcurrencyConfig, RetryConfig, SheddingConfig
from gateway.errors import ConfigError

BASE = ('upstreams: [{{name: a, endpoints: ["http://127.0.0.1:1"]{up}}}]\n'
        "routes: [{{name: r, upstream: a{route}}}]\n{top}")


def load(up: str = "", route: str = "", top: str = "") -> config_mod.Config:
    return config_mod.load_text(BASE.format(up=up, route=route, top=top))


def test_the_contract_example_loads() -> None:
    cfg = load(", retries: {attempts: 2, on: [connect_error, 502, 503, 504], budget_ratio: 0.2}"
               ", concurrency: {adaptive: true, min: 4, max: 512}", ", priority: low",
               "shedding: {on_burn_rate_alert: true}\n")
    u = cfg.upstreams[0]
    assert u.retries == RetryConfig(2, frozenset({"connect_error", 502, 503, 504}), 0.2)
    assert u.concurrency == ConcurrencyConfig(True, 4, 512)
    assert cfg.routes[0].priority == "low"
    assert cfg.shedding == SheddingConfig(True)


def test_defaults() -> None:
    cfg = load()
    assert cfg.upstreams[0].retries is None and cfg.upstreams[0].concurrency is None
    assert cfg.routes[0].priority == "normal"
    assert cfg.shedding == SheddingConfig(False)
    assert load(", retries: {}").upstreams[0].retries == RetryConfig()


@pytest.mark.parametrize(("up", "route", "top", "error"), [
    (", retries: {attempts: -1}", "", "", "upstreams[0].retries.attempts: must be >= 0"),
    (", retries: {on: [404]}", "", "", "upstreams[0].retries.on[0]: must be connect_error"),
    (", retries: {budget_ratio: 1.5}", "", "", "upstreams[0].retries.budget_ratio: must be <="),
    (", retries: {tries: 2}", "", "", "upstreams[0].retries.tries: unknown key"),
    (", concurrency: {min: 9, max: 5}", "", "", "upstreams[0].concurrency.min: must not exceed"),
    (", concurrency: {min: 0}", "", "", "upstreams[0].concurrency.min: must be >= 1"),
    (", concurrency: {adaptive: maybe}", "", "", "upstreams[0].concurrency.adaptive:"),
    ("", ", priority: urgent", "", "routes[0].priority: must be one of critical, high"),
    ("", "", "shedding: {on_burn_rate_alert: 1}\n", "shedding.on_burn_rate_alert:"),
    ("", "", "shedding: {on_alert: true}\n", "shedding.on_alert: unknown key"),
])
def test_bad_values_name_the_key(up: str, route: str, top: str, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(up, route, top)
    assert any(line.startswith(error) for line in exc.value.errors), exc.value.errors


def test_redacted_config_lists_retry_outcomes() -> None:
    doc = load(", retries: {on: [503, connect_error]}").redacted()
    assert doc["upstreams"][0]["retries"]["on"] == [503, "connect_error"]
    assert doc["routes"][0]["priority"] == "normal"
    assert doc["shedding"] == {"on_burn_rate_alert": False}
