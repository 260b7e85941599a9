"""THE hot path: match -> limits -> breaker -> forward -> record.

One `Proxy.handle` per request, reading top to bottom. Everything a config version needs lives in
a `Runtime`, swapped atomically on reload: a request keeps the runtime it started with.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from gateway.concurrency import REFUSED, GradientLimit
from gateway.config import RETRY_METHODS
from gateway.downstream import ClientGone, Request
from gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    REDUCED_CAPACITY,
    UpstreamError,
    problem_body,
)
from gateway.routing import strip
from gateway.tracing import context_for, find_traceparent
from gateway.tunnel import Tunnel
from gateway.upstream import UpstreamResponse

if TYPE_CHECKING:
    from gateway.accesslog import AccessLog
    from gateway.breaker import BreakerSet, CircuitBreaker, EndpointSelector
    from gateway.budgetguard import BudgetGuard
    from gateway.config import Config, RouteConfig, UpstreamConfig
    from gateway.ratelimit import Limiter
    from gateway.routing import Router
    from gateway.shedding import ShedGuard
    from gateway.signals import Signals
    from gateway.tenants import Tenancy
    from gateway.tracing import Tracer
    from gateway.upstream import EndpointPool

# RFC 9110 §7.6.1 connection-specific fields, plus framing the upstream client sets itself.
HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade",
    "trailer", "proxy-authenticate", "proxy-authorization",
})
_REQUEST_DROP = HOP_BY_HOP | {"content-length", "x-forwarded-for", "x-forwarded-proto",
                              "x-forwarded-host", "host", "expect", "x-request-id",
                              "forwarded", "x-real-ip", "traceparent", "tracestate"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "server", "date"}

# What a relayed 101 leaves out (Upgrade and Connection stay: they are the 101's point).
_TUNNEL_RESPONSE_DROP = frozenset({"content-length", "transfer-encoding", "keep-alive",
                                   "proxy-connection", "te", "trailer"})

SMALL_BODY = 64 * 1024          # request bodies up to this are read whole (replayable on retry)
SMALL_RESPONSE = 256 * 1024     # responses up to this (known length) are sent in one write

# The share of an upstream's adaptive concurrency limit each route priority may fill: when the
# limit is nearly reached, low-priority requests are refused first, and the last tenth is kept
# for high and critical ones. While the service's burn-rate alert is open (and shedding is on),
# low is shed outright and every other priority but critical drops one step (_ALERT_SHARE).
_SHARE = {"critical": 1.0, "high": 1.0, "normal": 0.9, "low": 0.5}
_ALERT_SHARE = {"critical": 1.0, "high": 0.9, "normal": 0.5, "low": 0.0}
_RETRY_BUDGET_MIN = 3           # retries in flight always allowed, whatever the ratio


class UpstreamRuntime:
    """One upstream of one config version: pools per endpoint, selector, breaker."""

    __slots__ = ("authorities", "breaker", "cfg", "fallback", "limit", "name", "pools",
                 "retries_inflight", "retry", "selector", "tls_hosts")

    def __init__(self, cfg: UpstreamConfig, pools: list[EndpointPool],
                 selector: EndpointSelector, breaker: CircuitBreaker) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.pools = pools
        self.authorities = [p.endpoint.authority for p in pools]  # Host when the client sent none
        self.selector = selector
        self.breaker = breaker
        self.fallback: UpstreamRuntime | None = None    # set once every upstream is built
        self.retry = cfg.retries if cfg.retries is not None and cfg.retries.attempts else None
        self.retries_inflight = 0                       # the retry budget's numerator
        self.limit: GradientLimit | None = None         # adaptive concurrency, set by the app
        # Host for https endpoints: the name TLS verified (a server checks that SNI and Host
        # agree, RFC 9110 7.4), not the client's; None for http endpoints.
        self.tls_hosts: list[str | None] = [
            p.endpoint.authority.replace(p.endpoint.host, p.server_name, 1)
            if p.ssl is not None else None for p in pools]

    def pool_use(self) -> tuple[int, int]:
        return (sum(p.in_use for p in self.pools), sum(p.max_connections for p in self.pools))


class Runtime:
    """Everything one config version serves with. Immutable after construction but for
    `inflight`, which tells when a retired runtime has no request left."""

    __slots__ = (
        "breakers",
        "cfg",
        "drained",
        "inflight",
        "limiter",
        "retired",
        "router",
        "tenancy",
        "upstreams",
    )

    def __init__(self, cfg: Config, router: Router, upstreams: dict[str, UpstreamRuntime],
                 limiter: Limiter, breakers: BreakerSet, tenancy: Tenancy | None = None) -> None:
        self.cfg = cfg
        self.tenancy = tenancy
        self.router = router
        self.upstreams = upstreams
        self.limiter = limiter
        self.breakers = breakers
        self.inflight = 0
        self.retired = False
        self.drained = asyncio.Event()


def _problem(request: Request, status: int, detail: str, type_: str = "about:blank",
             headers: tuple[tuple[str, str], ...] = (), **extra: Any) -> int:
    """Answer with a problem+json body; return the body bytes the client gets."""
    body = problem_body(status, detail, type_, **extra)
    request.respond(status, (("Content-Type", PROBLEM_CONTENT_TYPE),
                             ("X-Request-Id", request.request_id), *headers), body)
    return _sent(request, body)


def _sent(request: Request, body: bytes | None) -> int:
    """Body bytes a whole response puts on the wire (none for HEAD): the gateway's own answers
    count in gateway_response_bytes_total like the upstreams' bodies."""
    return 0 if not body or request.method == "HEAD" else len(body)


class Proxy:
    """The request handler given to the downstream server."""

    def __init__(self, runtime: Runtime, signals: Signals,
                 access_log: AccessLog | None = None,
                 budget_guard: BudgetGuard | None = None,
                 shed_guard: ShedGuard | None = None,
                 tracer: Tracer | None = None) -> None:
        self.runtime = runtime
        self.tracer = tracer          # None: traceparent propagation only, no spans
        self.signals = signals
        self.access_log = access_log
        self.budget_guard = budget_guard
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(6).hex()
        self.scheme = "http"
        """X-Forwarded-Proto for clients not behind a trusted proxy: "https" on a TLS listener."""
        self.shed_guard = shed_guard

    async def handle(self, request: Request) -> None:
        rt = self.runtime
        rt.inflight += 1
        signals = self.signals
        signals.inflight += 1
        try:
            await self._handle(rt, request)
        finally:
            signals.inflight -= 1
            rt.inflight -= 1
            if rt.retired and rt.inflight == 0:
                rt.drained.set()

    async def _handle(self, rt: Runtime, request: Request) -> None:
        t0 = perf_counter()
        method = request.method
        target = request.target
        q = target.find("?")
        path = target if q < 0 else target[:q]
        # One id per request, the client's own if it sent one: on every response and log line.
        request_id = request.request_id = request.x_request_id or \
            f"{self._id_prefix}{next(self._ids):010x}"

        # 1. match
        route = rt.router.match(method, request.host, path)
        if route is None:
            sent = _problem(request, 404, f"no route matches {method} {path}")
            self._record("-", "-", "-", method, 404, t0, None, 0, sent, request, "-", "-",
                         local="no_route")
            return
        guard = self.budget_guard  # cost budget exhausted; upstream "-": not billed
        if guard is not None and (r := guard.check(route.service)) is not None:
            request.respond(r[0], (*r[1], ("X-Request-Id", request_id)), r[2])
            self._record(route.name, "-", route.service, method, r[0], t0, None, 0,
                         _sent(request, r[2]), request, "budget", "-", local="budget")
            return

        if request.upgrade and not route.websocket:
            # Not silently downgraded to a plain request: the client would wait for a 101.
            sent = _problem(request, 400, f"WebSocket upgrades are not enabled on route "
                                          f"{route.name!r} (its config needs websocket: true)")
            self._record(route.name, route.upstream, route.service, method, 400, t0, None, 0,
                         sent, request, "-", "-", local="bad_request")
            return

        # 2. limits
        extra_headers: tuple[tuple[str, str], ...] = ()
        limit_decision = "-"
        if route.limits:
            outcome = await rt.limiter.check(route, request)
            limit_decision = outcome.decision
            if not outcome.allowed:
                request.respond(outcome.status, (*outcome.headers, ("X-Request-Id", request_id)),
                                outcome.body)
                self._record(route.name, route.upstream, route.service, method, outcome.status,
                             t0, None, 0, _sent(request, outcome.body), request, limit_decision,
                             "-", local="limit")
                return
            extra_headers = outcome.headers
            if outcome.delay_s > 0.0 and not await request.hold(outcome.delay_s):
                # throttled, and the client left while its request waited for the token
                rt.limiter.release(route, request)
                self._record(route.name, route.upstream, route.service, method, 499, t0, None,
                             0, 0, request, limit_decision, "-", local="client_gone")
                request.cut()
                return

        # 2b. the tenant's plan: its bucket and calendar quotas
        tenancy = rt.tenancy
        if tenancy is not None and route.tenants:
            t_outcome = await tenancy.check(request)
            if not t_outcome.allowed:
                request.respond(t_outcome.status,
                                (*t_outcome.headers, ("X-Request-Id", request_id)),
                                t_outcome.body)
                self._record(route.name, route.upstream, route.service, method,
                             t_outcome.status, t0, None, 0, _sent(request, t_outcome.body),
                             request, "tenant", "-", local="limit")
                return
            if t_outcome.headers:
                extra_headers = (*extra_headers, *t_outcome.headers)

        # 3. breaker
        up = rt.upstreams[route.upstream]
        breaker = up.breaker
        if not breaker.acquire():
            fb = up.fallback
            if fb is not None and fb.breaker.acquire():
                # The primary's circuit is open (or half-open with its probe slots taken): the
                # fallback answers, counted under its own name, and the client is told.
                extra_headers = (*extra_headers, ("X-Gateway-Fallback", up.name))
                up = fb
                breaker = fb.breaker
            else:
                retry = breaker.retry_after_s()
                sent = _problem(request, 503, f"upstream {up.name!r} is unavailable (circuit "
                                              f"{breaker.state}); retry in {retry}s",
                                REDUCED_CAPACITY, (("Retry-After", str(retry)),), upstream=up.name)
                self._record(route.name, up.name, route.service, method, 503, t0, None, 0, sent,
                             request, limit_decision, breaker.state, local="breaker")
                return

        # 3b. overload: shedding by priority, the adaptive concurrency limit
        lim = up.limit
        ticket = REFUSED
        shed = self.shed_guard
        if (shed is not None and shed.services) or \
                (lim is not None and (ticket := lim.acquire(_SHARE[route.priority])) == REFUSED):
            ticket = self._admit(rt, request, route, up, lim, t0, limit_decision)
            if ticket == REFUSED:
                breaker.release()
                return

        # 4. forward: every exit from here gives the breaker a verdict or releases its slot
        verdict = [False]
        rtt: float | None = None
        try:
            if request.upgrade:
                if lim is not None:
                    # The limit admits the handshake; a tunnel living for hours must not hold
                    # a slot of it.
                    lim.release(ticket, None)
                    lim = None
                await self._websocket(rt, request, route, up, t0, target, request_id,
                                      extra_headers, limit_decision, verdict)
                return
            rtt = await self._forward(rt, request, route, up, t0, method, target,
                                      request_id, extra_headers, limit_decision, verdict)
        except BaseException:
            if not verdict[0]:
                breaker.release()
            raise
        finally:
            if lim is not None and ticket != REFUSED:
                lim.release(ticket, rtt)

    def _admit(self, rt: Runtime, request: Request, route: RouteConfig, up: UpstreamRuntime,
               lim: GradientLimit | None, t0: float, limit_decision: str) -> int:
        """A concurrency ticket (0 without a limit), or REFUSED after answering the 503: the
        slow path of step 3b, when a shedding directive is in force or the limit refused."""
        shed = self.shed_guard
        alert = (shed is not None and rt.cfg.shedding.on_burn_rate_alert
                 and shed.alerting(route.service))
        priority = route.priority
        share = (_ALERT_SHARE if alert else _SHARE)[priority]
        reason = ""
        if share <= 0.0:
            reason = "shedding"
        elif lim is not None:
            ticket = lim.acquire(share)
            if ticket != REFUSED:
                return ticket
            # Over what the priority may use: the alert's lower share is shedding, the rest
            # is the limit itself.
            reason = "shedding" if alert and lim.admits(_SHARE[priority]) else "concurrency"
        else:
            return 0
        detail = (f"service {route.service!r} is shedding {priority}-priority requests while "
                  f"its error budget burns" if reason == "shedding" else
                  f"upstream {up.name!r} is at its concurrency limit")
        sent = _problem(request, 503, detail, REDUCED_CAPACITY, (("Retry-After", "1"),),
                        upstream=up.name, reason=reason)
        counts = self.signals.shed
        counts[route.name, reason] = counts.get((route.name, reason), 0) + 1
        self._record(route.name, up.name, route.service, request.method, 503, t0, None, 0,
                     sent, request, limit_decision, up.breaker.state,
                     local="shed" if reason == "shedding" else "concurrency")
        return REFUSED

    async def _forward(self, rt: Runtime, request: Request, route: RouteConfig,
                       up: UpstreamRuntime, t0: float, method: str, target: str,
                       request_id: str, extra_headers: tuple[tuple[str, str], ...],
                       limit_decision: str, verdict: list[bool]) -> float | None:
        """Forward one request; the upstream latency to the answer's head (None when there
        was no answer) for the concurrency limit."""
        breaker = up.breaker
        index = up.selector.pick()
        pool = up.pools[index]
        if route.strip_prefix:
            target = strip(route.path_prefix, target)
        headers = self._upstream_headers(request, up.authorities[index], rt.limiter.trusts,
                                         request_id, up.tls_hosts[index])
        body_counter = [0]
        body: bytes | AsyncIterator[bytes] | None
        content_length = request.content_length
        if not request.body_exists:
            body = None
        else:
            # Limits and breaker have passed: take the body now rather than leave a client
            # that sent `Expect: 100-continue` waiting out its timeout.
            request.send_continue()
            if content_length is not None and content_length <= SMALL_BODY:
                try:
                    body = await request.read()
                except ClientGone:
                    verdict[0] = True
                    breaker.release()
                    self._record(route.name, up.name, route.service, method, 499, t0, None, 0,
                                 0, request, limit_decision, breaker.state, local="client_gone")
                    request.cut()
                    return None
                body_counter[0] = len(body)
            else:
                body = _stream_body(request, body_counter)

        # Only a request whose body is held whole (or has none) can be sent twice.
        retry = up.retry
        if retry is not None and (method not in RETRY_METHODS
                                  or not (body is None or isinstance(body, bytes))):
            retry = None
        judged = False
        t_up = perf_counter()
        try:
            uresp = await pool.request(method, target, headers, body,
                                       content_length=content_length)
        except UpstreamError as exc:
            if retry is None or exc.kind not in retry.on:
                verdict[0] = True
                breaker.on_result(exc.kind)
                up.selector.on_result(index, True)
                t_done = perf_counter()
                sent = _problem(request, exc.status, exc.detail)
                self._record(route.name, up.name, route.service, method, exc.status, t0,
                             t_done - t_up, body_counter[0], sent, request, limit_decision,
                             breaker.state)
                return None
            a = await self._retry(rt, request, route, up, t0, method, target, request_id,
                                  index, body if isinstance(body, bytes) else None,
                                  body_counter[0], limit_decision, verdict, exc, t_up)
            if a is None:
                return None
            uresp, index, t_up, judged = a
        except ClientGone:
            verdict[0] = True
            breaker.release()
            self._record(route.name, up.name, route.service, method, 499, t0,
                         perf_counter() - t_up, body_counter[0], 0, request, limit_decision,
                         breaker.state)
            request.cut()
            return None
        else:
            if retry is not None and uresp.status in retry.on:
                a = await self._retry(rt, request, route, up, t0, method, target, request_id,
                                      index, body if isinstance(body, bytes) else None,
                                      body_counter[0], limit_decision, verdict, uresp, t_up)
                if a is None:
                    return None
                uresp, index, t_up, judged = a
        rtt = perf_counter() - t_up

        status = uresp.status
        resp_headers: list[tuple[str, str]] = []
        connection_listed: tuple[str, ...] = ()
        has_request_id = has_ratelimit = False
        for name, value in uresp.headers:
            lname = name.lower()
            if lname in _RESPONSE_DROP:
                if lname == "connection":
                    connection_listed = tuple(v.strip().lower() for v in value.split(","))
                elif lname in ("server", "date"):
                    resp_headers.append((name, value))
                continue
            if lname == "x-request-id":
                has_request_id = True
            elif lname.startswith("ratelimit"):
                has_ratelimit = True
            resp_headers.append((name, value))
        if connection_listed:
            resp_headers = [(n, v) for n, v in resp_headers
                            if n.lower() not in connection_listed]
        if not has_request_id:
            resp_headers.append(("X-Request-Id", request_id))
        if extra_headers:
            if has_ratelimit:  # ours replace the upstream's own RateLimit headers
                ours = {n.lower() for n, _ in extra_headers}
                resp_headers = [h for h in resp_headers if h[0].lower() not in ours]
            resp_headers.extend(extra_headers)

        # 5. respond (small known-length bodies in one write; the rest streamed)
        bytes_out = 0
        try:
            if not uresp.has_body:
                uresp.release()
                request.respond(status, resp_headers, reason=uresp.reason,
                                content_length=uresp.content_length
                                if method == "HEAD" else None)
            elif uresp.content_length is not None and uresp.content_length <= SMALL_RESPONSE:
                data = await uresp.read_all(SMALL_RESPONSE)
                uresp.release()
                bytes_out = len(data)
                request.respond(status, resp_headers, data, reason=uresp.reason)
            else:
                request.start(status, resp_headers, reason=uresp.reason,
                              content_length=uresp.content_length)
                while True:
                    chunk = await uresp.read()
                    if not chunk:
                        break
                    bytes_out += len(chunk)
                    await request.write(chunk)
                request.end()
                uresp.release()
        except UpstreamError as exc:
            verdict[0] = True
            uresp.abort()
            if not judged:
                breaker.on_result(exc.kind)
                up.selector.on_result(index, True)
            t_done = perf_counter()
            if request.headers_sent:
                # The status line is gone already: cut the connection so the client sees a
                # truncated body rather than a complete-looking one.
                request.cut()
            else:
                bytes_out += _problem(request, exc.status, exc.detail)
            self._record(route.name, up.name, route.service, method, exc.status, t0,
                         t_done - t_up, body_counter[0], bytes_out, request,
                         limit_decision, breaker.state)
            return rtt
        except ClientGone:
            verdict[0] = True
            uresp.abort()
            if not judged:
                breaker.release()
            self._record(route.name, up.name, route.service, method, 499, t0,
                         perf_counter() - t_up, body_counter[0], bytes_out, request,
                         limit_decision, breaker.state)
            request.cut()
            return rtt

        verdict[0] = True
        if not judged:
            breaker.on_result(status)
            up.selector.on_result(index, breaker.is_failure(status))
        self._record(route.name, up.name, route.service, method, status, t0,
                     perf_counter() - t_up, body_counter[0], bytes_out, request,
                     limit_decision, breaker.state)
        return rtt

    async def _retry(self, rt: Runtime, request: Request, route: RouteConfig,
                     up: UpstreamRuntime, t0: float, method: str, target: str,
                     request_id: str, index: int, body: bytes | None, bytes_in: int,
                     limit_decision: str, verdict: list[bool],
                     failure: UpstreamError | UpstreamResponse, t_up: float,
                     ) -> tuple[UpstreamResponse, int, float, bool] | None:
        """After an attempt failed with an outcome in `retries.on` (nothing has reached the
        client yet): each failed attempt is given its breaker and endpoint verdict, and the
        request sent again, on the next endpoint in rotation (another one where there are
        several), while attempts, the retry budget and the breaker allow.

        Returns (answer, endpoint index, its attempt's start, whether the breaker has judged
        it already), or None once this method has answered the client itself."""
        retry = up.retry
        assert retry is not None
        breaker = up.breaker
        retries = 0
        final = False           # the failure is not one to retry
        try:
            while True:
                verdict[0] = True
                if isinstance(failure, UpstreamError):
                    breaker.on_result(failure.kind)
                    up.selector.on_result(index, True)
                else:
                    breaker.on_result(failure.status)
                    up.selector.on_result(index, breaker.is_failure(failure.status))
                if final or not self._may_retry(up, retries):
                    if retries:
                        self._count_retry(up.name, "failed")
                    if isinstance(failure, UpstreamResponse):
                        return failure, index, t_up, True
                    sent = _problem(request, failure.status, failure.detail)
                    self._record(route.name, up.name, route.service, method, failure.status,
                                 t0, perf_counter() - t_up, bytes_in, sent, request,
                                 limit_decision, breaker.state)
                    return None
                if isinstance(failure, UpstreamResponse):
                    await _discard(failure)
                if not retries:
                    up.retries_inflight += 1
                retries += 1
                verdict[0] = False      # _may_retry acquired the breaker for this attempt
                index = self._next_endpoint(up, index)
                headers = self._upstream_headers(request, up.authorities[index],
                                                 rt.limiter.trusts, request_id,
                                                 up.tls_hosts[index])
                t_up = perf_counter()
                try:
                    uresp = await up.pools[index].request(method, target, headers, body,
                                                          content_length=request.content_length)
                except UpstreamError as exc:
                    failure, final = exc, exc.kind not in retry.on
                    continue
                except ClientGone:
                    verdict[0] = True
                    breaker.release()
                    self._record(route.name, up.name, route.service, method, 499, t0,
                                 perf_counter() - t_up, bytes_in, 0, request, limit_decision,
                                 breaker.state)
                    request.cut()
                    return None
                if uresp.status in retry.on:
                    failure = uresp
                    continue
                self._count_retry(up.name, "succeeded")
                return uresp, index, t_up, False
        finally:
            if retries:
                up.retries_inflight -= 1

    def _may_retry(self, up: UpstreamRuntime, retries: int) -> bool:
        """One more attempt, if attempts are left, the retry budget holds (retries in flight
        at most `budget_ratio` of the first attempts in flight, or _RETRY_BUDGET_MIN) and the
        breaker lets it through (it then holds the attempt's slot)."""
        retry = up.retry
        assert retry is not None
        if retries >= retry.attempts:
            return False
        # Requests in flight to the upstream that are not retries: its pools' busy
        # connections, read only here so that the plain path counts nothing.
        first = sum(p.in_use for p in up.pools) - up.retries_inflight
        if up.retries_inflight + 1 > max(_RETRY_BUDGET_MIN, retry.budget_ratio * first):
            self._count_retry(up.name, "budget_exhausted")
            return False
        if not up.breaker.acquire():
            return False
        self._count_retry(up.name, "retried")
        return True

    @staticmethod
    def _next_endpoint(up: UpstreamRuntime, index: int) -> int:
        nxt = up.selector.pick()
        if nxt == index and len(up.pools) > 1:
            nxt = up.selector.pick()
        return nxt

    def _count_retry(self, upstream: str, result: str) -> None:
        counts = self.signals.retries
        counts[upstream, result] = counts.get((upstream, result), 0) + 1

    async def _websocket(self, rt: Runtime, request: Request, route: RouteConfig,
                         up: UpstreamRuntime, t0: float, target: str, request_id: str,
                         extra_headers: tuple[tuple[str, str], ...], limit_decision: str,
                         verdict: list[bool]) -> None:
        """A WebSocket handshake the limits and the breaker admitted: sent to the upstream on
        a connection of its own; its 101 is relayed and the two connections joined into a
        tunnel, recorded as one request (status 101) lasting as long as the tunnel. Any other
        answer is relayed as it is."""
        breaker = up.breaker
        index = up.selector.pick()
        pool = up.pools[index]
        if route.strip_prefix:
            target = strip(route.path_prefix, target)
        headers = self._upstream_headers(request, up.authorities[index], rt.limiter.trusts,
                                         request_id, up.tls_hosts[index])
        headers.append(("Connection", "Upgrade"))
        headers.append(("Upgrade", request.get("Upgrade") or "websocket"))
        t_up = perf_counter()
        try:
            uresp = await pool.open_tunnel(target, headers)
            status = uresp.status
            data = b""
            if status != 101:
                try:
                    data = await uresp.read_all(SMALL_RESPONSE) if uresp.has_body else b""
                finally:
                    uresp.release()
        except UpstreamError as exc:
            verdict[0] = True
            breaker.on_result(exc.kind)
            up.selector.on_result(index, True)
            self._record(route.name, up.name, route.service, "GET", exc.status, t0,
                         perf_counter() - t_up, 0, 0, request, limit_decision, breaker.state)
            _problem(request, exc.status, exc.detail)
            return
        verdict[0] = True
        breaker.on_result(status)
        up.selector.on_result(index, breaker.is_failure(status))
        handshake_s = perf_counter() - t_up
        resp_headers = [(n, v) for n, v in uresp.headers
                        if n.lower() not in _TUNNEL_RESPONSE_DROP]
        if not any(n.lower() == "x-request-id" for n, _ in resp_headers):
            resp_headers.append(("X-Request-Id", request_id))
        resp_headers.extend(extra_headers)
        if status != 101:
            request.respond(status, [(n, v) for n, v in resp_headers
                                     if n.lower() not in ("connection", "upgrade")],
                            data, reason=uresp.reason)
            self._record(route.name, up.name, route.service, "GET", status, t0, handshake_s,
                         0, len(data), request, limit_decision, breaker.state)
            return
        up_transport, up_tail = uresp.detach()
        try:
            client, client_tail, tunnels = request.switch_protocols(resp_headers)
        except ClientGone:
            up_transport.abort()
            pool.tunnel_closed()
            self._record(route.name, up.name, route.service, "GET", 499, t0, handshake_s, 0, 0,
                         request, limit_decision, breaker.state)
            return
        tunnel = Tunnel(client, up_transport, client_tail, up_tail,
                        idle_timeout_s=route.websocket_idle_timeout_s,
                        on_close=pool.tunnel_closed)
        tunnels.add(tunnel)
        # A tunnel needs nothing more of this config version: a reload must not wait for it
        # (tunnels live for hours) to retire the old runtime.
        rt.inflight -= 1
        if rt.retired and rt.inflight == 0:
            rt.drained.set()
        try:
            if request.draining:
                tunnel.going_away()
            await asyncio.shield(tunnel.closed)
        finally:
            rt.inflight += 1            # (given back by handle())
            tunnels.discard(tunnel)
            if not tunnel.closed.done():
                tunnel.abort()
        self._record(route.name, up.name, route.service, "GET", 101, t0, handshake_s,
                     tunnel.bytes_in, tunnel.bytes_out, request, limit_decision, breaker.state)

    def record_rejected(self, status: int, detail: str, peer_ip: str) -> None:
        """A request the server refused before it was whole (400, 408, 414, 431): counted like
        any other response, under route "-"."""
        # (the server answers it with problem_body(status, detail))
        self.signals.record_local("-", "-", "-", "OTHER", status, 0.0,
                                  len(problem_body(status, detail)), "bad_request")
        log = self.access_log
        if log is not None:
            log.log(request_id="", method="-", path="-", route="-", upstream="-", status=status,
                    duration_ms=0.0, bytes_in=0, bytes_out=0, limit="-", breaker="-")

    def _upstream_headers(self, request: Request, authority: str,
                          trusts: Callable[[str], bool], request_id: str,
                          tls_host: str | None = None) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        connection_listed: tuple[str, ...] = ()
        xff = proto = fwd_host = None
        claims: list[tuple[str, str]] = []     # Forwarded, X-Real-IP: kept from trusted peers
        traceparent = None                     # the client's; "" when it sent two (invalid)
        tracestate: list[tuple[str, str]] = []  # kept only with a valid traceparent
        # The one Host the router saw (a second Host field is refused; an absolute-form
        # target's authority replaces it).
        host = request.host
        for name, value in request.headers:
            lname = name.lower()
            if lname in _REQUEST_DROP:
                if lname == "x-forwarded-for":
                    xff = value if xff is None else f"{xff}, {value}"
                elif lname == "x-forwarded-proto":
                    proto = value
                elif lname == "x-forwarded-host":
                    fwd_host = value
                elif lname == "connection":
                    connection_listed += tuple(v.strip().lower() for v in value.split(","))
                elif lname == "forwarded" or lname == "x-real-ip":
                    claims.append((name, value))
                elif lname == "traceparent":
                    traceparent = value if traceparent is None else ""
                elif lname == "tracestate":
                    tracestate.append((name, value))
                continue
            out.append((name, value))
        if connection_listed:
            out = [(n, v) for n, v in out if n.lower() not in connection_listed]
        peer_ip = request.peer_ip or "unknown"
        trusted = trusts(peer_ip)          # the limiter's check: one answer for both
        out.append(("Host", tls_host or host or authority))
        out.append(("X-Forwarded-For", f"{xff}, {peer_ip}" if xff else peer_ip))
        out.append(("X-Forwarded-Proto", proto if (proto and trusted) else self.scheme))
        out.append(("X-Forwarded-Host", fwd_host if (fwd_host and trusted) else (host or "")))
        if claims and trusted:
            out.extend(claims)
        out.append(("X-Request-Id", request_id))  # exactly one: the id we log and answer with
        trace = request.trace      # a retry keeps the trace of the first attempt
        if trace is None:
            trace = request.trace = context_for(traceparent, self.tracer)
        out.append(("traceparent", trace.header))  # exactly one
        if tracestate and trace.parent_id:  # the client's trace continues: so does its state
            out.extend(tracestate)
        return out

    def _record(self, route: str, upstream: str, service: str, method: str, status: int,
                t0: float, upstream_s: float | None, bytes_in: int, bytes_out: int,
                request: Request, limit: str, breaker: str, local: str = "") -> None:
        duration = perf_counter() - t0
        if local:   # answered by the gateway itself: shipped apart from the admitted requests
            self.signals.record_local(route, upstream, service, method, status, duration,
                                      bytes_out, local)
        else:
            self.signals.record(route, upstream, service, method, status, duration, upstream_s,
                                bytes_in, bytes_out)
        log = self.access_log
        tracer = self.tracer
        if log is None and tracer is None:
            return
        trace = request.trace
        if trace is None:  # answered before forwarding: the trace context is made only now
            trace = request.trace = context_for(find_traceparent(request.headers), tracer)
        path = request.target.split("?", 1)[0]
        if log is not None:
            log.log(request_id=request.request_id, method=method,
                    path=path, route=route, upstream=upstream, status=status,
                    duration_ms=round(duration * 1000, 3), bytes_in=bytes_in,
                    bytes_out=bytes_out, limit=limit, breaker=breaker, trace_id=trace.trace_id)
        if tracer is not None and trace.sampled:
            tracer.export(trace, duration, method, route, path, status, upstream, service,
                          limit, breaker, request.peer_ip)


async def _discard(uresp: UpstreamResponse) -> None:
    """Drop a failed attempt's answer: a small one is read so its connection is reused."""
    try:
        if uresp.has_body and uresp.content_length is not None \
                and uresp.content_length <= SMALL_RESPONSE:
            await uresp.read_all(SMALL_RESPONSE)
            uresp.release()
        elif not uresp.has_body:
            uresp.release()
        else:
            uresp.abort()
    except UpstreamError:
        uresp.abort()


async def _stream_body(request: Request, counter: list[int]) -> AsyncIterator[bytes]:
    chunk = request.chunk
    while True:
        data = await chunk()           # ClientGone if the client cuts the body short
        if not data:
            return
        counter[0] += len(data)
        yield data
