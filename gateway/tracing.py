"""W3C Trace Context at the gateway, and optional export of one span per request over OTLP/HTTP.

Propagation (always on, the only cost when `tracing:` is absent): every forwarded request
carries exactly one `traceparent`. A valid one from the client is forwarded (its `tracestate`
too); a missing or invalid one (malformed, all-zero ids, version ff, or sent twice) is replaced
by a new trace. The trace id is in the access log.

Export (`tracing.otlp_endpoint` set, the `otel` extra installed): a request is recorded when its
parent says so (the client's sampled flag: parent-based sampling, as OpenTelemetry's default
sampler does) or, when it starts the trace, with probability `sample_ratio` decided on the trace
id (the low 64 bits against a bound, like `TraceIdRatioBased`, so every hop sampling on the same
id agrees). A recorded request gets a span of its own, kind SERVER, whose id is the parent id the
upstream sees; the span is built after the response and handed to the SDK's BatchSpanProcessor,
which exports from its own thread: the event loop never waits on the collector, and a full queue
drops spans rather than requests.

Without export, a new trace is sent with the sampled flag set: the gateway records nothing, but
services behind it that sample parent-based keep recording as they did before the gateway added
a `traceparent`.

Measured (this module's choices): ids from `random.getrandbits` and formatting cost ~0.5 us per
request; the header check is a handful of string comparisons (no regex); building a
`ReadableSpan` and queueing it costs ~3.5 us, against ~17 us for the SDK's `Tracer.start_span` +
`end`, so spans are built directly.
"""

from __future__ import annotations

import logging
from random import getrandbits
from time import time_ns
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from gateway.config import TracingConfig

log = logging.getLogger("gateway.tracing")

_HEX_DASH = "0123456789abcdef-"
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_LOW64 = (1 << 64) - 1


class TraceContext(NamedTuple):
    """One request's place in its trace (a NamedTuple: built per request, cheap)."""

    trace_id: str       # 32 lower-case hex digits
    span_id: str        # the parent id the upstream sees: ours when recorded, else the client's
    parent_id: str      # the client's parent id; "" when the trace starts at the gateway
    sampled: bool       # a span is exported for this request
    header: str         # the `traceparent` sent upstream


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent id, flags) of a valid `traceparent`, else None (W3C Trace Context 1,
    version 00 exactly 55 characters; later versions may append `-...`)."""
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    if value[:2] == "00":
        if len(value) != 55:
            return None
    elif value[:2] == "ff" or (len(value) > 55 and value[55] != "-"):
        return None
    head = value[:55]
    # Only hex digits and the three dashes checked above (strip leaves anything else behind).
    if head.strip(_HEX_DASH) or head.count("-") != 3:
        return None
    trace_id, parent_id = head[3:35], head[36:52]
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(head[53:55], 16)


def find_traceparent(headers: list[tuple[str, str]]) -> str | None:
    """The client's `traceparent`; "" (invalid) when it sent more than one."""
    found = None
    for name, value in headers:
        if len(name) == 11 and name.lower() == "traceparent":
            found = value if found is None else ""
    return found


def context_for(incoming: str | None, tracer: Tracer | None) -> TraceContext:
    """The request's trace context from the client's `traceparent` (None: it sent none)."""
    parsed = parse_traceparent(incoming) if incoming else None
    if parsed is not None:
        trace_id, parent_id, flags = parsed
        if tracer is not None and flags & 1:
            span_id = f"{getrandbits(64) or 1:016x}"
            return TraceContext(trace_id, span_id, parent_id, True,
                                f"00-{trace_id}-{span_id}-01")
        assert incoming is not None
        return TraceContext(trace_id, parent_id, parent_id, False, incoming)
    tid = getrandbits(128) or 1
    trace_id = f"{tid:032x}"
    span_id = f"{getrandbits(64) or 1:016x}"
    if tracer is None:
        return TraceContext(trace_id, span_id, "", False, f"00-{trace_id}-{span_id}-01")
    sampled = (tid & _LOW64) < tracer.bound
    return TraceContext(trace_id, span_id, "", sampled,
                        f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}")


class TracingUnavailable(Exception):
    """`tracing.otlp_endpoint` is set but the OpenTelemetry SDK or exporter is not installed."""


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces path under a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Tracer:
    """Builds and queues the spans of recorded requests (see the module docstring)."""

    def __init__(self, cfg: TracingConfig) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
        except ImportError as exc:
            raise TracingUnavailable(
                f"tracing.otlp_endpoint is set but the OpenTelemetry SDK is not installed "
                f"({exc.name} missing): pip install 'gateway[otel]'; requests keep their "
                f"traceparent, no span is exported") from None
        from gateway import __version__
        self.cfg = cfg
        self.bound = round(cfg.sample_ratio * (1 << 64))
        self.endpoint = traces_url(cfg.otlp_endpoint)
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=self.endpoint, timeout=5),
                                             schedule_delay_millis=1000)
        self._resource = Resource.create({"service.name": cfg.service_name,
                                          "service.version": __version__})
        self._scope = InstrumentationScope("gateway", __version__)
        self._span = ReadableSpan
        self._context = SpanContext
        self._sampled_flags = TraceFlags(TraceFlags.SAMPLED)
        self._server = SpanKind.SERVER
        self._ok = Status(StatusCode.UNSET)
        self._error = Status(StatusCode.ERROR)

    def export(self, ctx: TraceContext, duration_s: float, method: str, route: str,
               path: str, status: int, upstream: str, service: str, limit: str,
               breaker: str, peer_ip: str | None) -> None:
        """Queue the span of one finished request; never blocks."""
        end = time_ns()
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "http.response.status_code": status,
            "url.path": path,
            "url.scheme": "http",
            "gateway.route": route,
            "gateway.upstream": upstream,
            "gateway.service": service,
            "gateway.limit.decision": limit,
            "gateway.breaker.state": breaker,
        }
        if route != "-":
            attributes["http.route"] = route
        if peer_ip:
            attributes["client.address"] = peer_ip
        parent = None
        if ctx.parent_id:
            parent = self._context(int(ctx.trace_id, 16), int(ctx.parent_id, 16), True,
                                   self._sampled_flags)
        span = self._span(
            f"{method} {route}" if route != "-" else method,
            context=self._context(int(ctx.trace_id, 16), int(ctx.span_id, 16), False,
                                  self._sampled_flags),
            parent=parent, resource=self._resource, attributes=attributes,
            kind=self._server, status=self._error if status >= 500 else self._ok,
            start_time=end - int(duration_s * 1e9), end_time=end,
            instrumentation_scope=self._scope)
        self._processor.on_end(span)

    def shutdown(self) -> None:
        """Export what is queued and stop the export thread (blocking: call off the loop)."""
        self._processor.shutdown()


def make_tracer(cfg: TracingConfig | None) -> Tracer | None:
    """The tracer a config asks for; None (propagation only) when it asks for none or the SDK is
    missing, which is logged as an error naming the extra to install."""
    if cfg is None or not cfg.otlp_endpoint:
        return None
    try:
        tracer = Tracer(cfg)
    except TracingUnavailable as exc:
        log.error(str(exc), extra={"event": "tracing_unavailable"})
        return None
    log.info("tracing: exporting spans", extra={"endpoint": tracer.endpoint,
                                                "sample_ratio": cfg.sample_ratio,
                                                "service_name": cfg.service_name})
    return tracer
