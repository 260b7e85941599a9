"""Route matching: host, path prefix and method; first match wins."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config import RouteConfig


class Router:
    """Matches requests against routes in config order.

    A path prefix matches whole segments: `/pay` matches `/pay`, `/pay/`, `/pay/x` and `/pay?q`,
    but not `/payments`. A prefix ending in `/` matches everything below it. Matching is on the raw (still percent-encoded) path, exactly the
    bytes the upstream will see, so an encoded `%2F` never sneaks past a prefix.
    """

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        # (route, host, methods, prefix, prefix_with_slash)
        self._routes = tuple(
            (r, None if r.host is None else route_host(r.host), r.methods, r.path_prefix,
             r.path_prefix if r.path_prefix.endswith("/") else r.path_prefix + "/")
            for r in routes)

    def match(self, method: str, host: str | None, path: str) -> RouteConfig | None:
        """`host` may carry a port; `path` is the raw path without the query."""
        h = route_host(host) if host else ""
        for route, rhost, methods, prefix, prefix_slash in self._routes:
            if rhost is not None and rhost != h:
                continue
            if methods is not None and method not in methods:
                continue
            if prefix != "/" and path != prefix and not path.startswith(prefix_slash):
                continue
            return route
        return None


def route_host(host: str) -> str:
    """The host a route matches: lower-case, without the port and without one trailing dot
    (`API.example.com.:8080` is `api.example.com`), so that spellings an upstream or DNS treats
    as the same host cannot skip a host-restricted route."""
    h = host.lower()
    if h[:1] == "[":
        return h[: h.find("]") + 1]
    colon = h.rfind(":")
    if colon != -1:
        h = h[:colon]
    if h[-1:] == ".":
        h = h[:-1]
    return h


def strip(prefix: str, target: str) -> str:
    """Remove a matched route prefix from a raw request target (path + query)."""
    if prefix == "/":
        return target
    rest = target[len(prefix.rstrip("/")):]
    if not rest or rest[0] == "?":
        return "/" + rest
    return rest
