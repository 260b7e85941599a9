"""Routing: host, path prefix and method; first match wins; prefix stripping."""

from __future__ import annotations

import pytest

from gateway.config import RouteConfig
from gateway.routing import Router, route_host, strip


def r(name: str, prefix: str = "/", methods: set[str] | None = None,
      host: str | None = None) -> RouteConfig:
    return RouteConfig(name=name, upstream="u", service="s", path_prefix=prefix,
                       methods=frozenset(methods) if methods else None, host=host)


ROUTER = Router([
    r("pay-host", "/pay", {"GET", "POST"}, "api.example.com"),
    r("pay", "/pay"),
    r("static", "/static/"),
    r("admin-delete", "/admin", {"DELETE"}),
    r("catch-all", "/"),
])


@pytest.mark.parametrize("method,host,path,expected", [
    ("GET", "api.example.com", "/pay", "pay-host"),
    ("GET", "API.Example.com:8080", "/pay/x", "pay-host"),     # case and port ignored
    ("PUT", "api.example.com", "/pay/x", "pay"),                # method mismatch falls through
    ("GET", "other.example.com", "/pay", "pay"),                # host mismatch falls through
    ("GET", None, "/pay/", "pay"),
    ("GET", None, "/payments", "catch-all"),                    # prefixes match whole segments
    ("GET", None, "/static/app.js", "static"),
    ("GET", None, "/static", "catch-all"),                      # "/static/" needs the slash
    ("DELETE", None, "/admin/users/1", "admin-delete"),
    ("GET", None, "/admin/users/1", "catch-all"),
    ("GET", None, "/pay%2F..%2Fadmin", "catch-all"),            # raw path, encoded slash is no /
    ("GET", "[::1]:8080", "/pay", "pay"),
    ("GET", "api.example.com.", "/pay", "pay-host"),            # one trailing dot: same host
    ("GET", "API.EXAMPLE.COM.:443", "/pay", "pay-host"),
    ("GET", "api.example.com..", "/pay", "pay"),                # (the server refuses these)
])
def test_first_match_wins(method: str, host: str | None, path: str, expected: str) -> None:
    route = ROUTER.match(method, host, path)
    assert route is not None and route.name == expected


def test_no_match() -> None:
    router = Router([r("only", "/only", {"GET"})])
    assert router.match("GET", None, "/other") is None
    assert router.match("POST", None, "/only") is None


@pytest.mark.parametrize("prefix,target,expected", [
    ("/pay", "/pay/x/y?q=1", "/x/y?q=1"),
    ("/pay", "/pay", "/"),
    ("/pay", "/pay?q=%20", "/?q=%20"),
    ("/pay/", "/pay/x", "/x"),
    ("/", "/a%2Fb", "/a%2Fb"),
])
def test_strip(prefix: str, target: str, expected: str) -> None:
    assert strip(prefix, target) == expected


@pytest.mark.parametrize("host,expected", [
    ("api.example.com", "api.example.com"),
    ("API.Example.COM", "api.example.com"),
    ("api.example.com.", "api.example.com"),
    ("api.example.com.:8080", "api.example.com"),
    ("api.example.com:8080", "api.example.com"),
    ("[::1]:8080", "[::1]"),
    ("[::1]", "[::1]"),
    ("", ""),
])
def test_route_host_normalises_case_port_and_one_trailing_dot(host: str, expected: str) -> None:
    assert route_host(host) == expected


def test_route_host_in_config_is_normalised_too() -> None:
    router = Router([r("h", host="Api.Example.com."), r("other")])
    route = router.match("GET", "api.example.com", "/")
    assert route is not None and route.name == "h"
