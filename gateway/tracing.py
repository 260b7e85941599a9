"""W3C Trace Context at the gateway, and optional export of one span per request over OTLP/HTTP.

Propagation (always on, the only cost when `tracing:` is absent): every forwarded request
carries exactly one `traceparent`. A valid one from the client is forwarded (its `tracestate`
too); a missing or invalid one (malformed, all-zero ids, version ff, or sent twice) is replaced
by a new trace, and the client's `tracestate`, which belonged to another trace, is dropped. The
trace id is in the access log.

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

Measured (this module's choices, on the shared 2-core box): ids from `random.getrandbits` and
their formatting cost ~1-1.5 us per request; the header check is a handful of string comparisons
(no regex). A recorded request queues a `SpanRecord` tuple (~1 us) rather than an SDK span
(`ReadableSpan` ~3.5 us, `Tracer.start_span` + `end` ~17 us), and the exporter writes protobuf
itself (~5 us a span, against ~40-60 us for the SDK's OTLP exporter) on one kept-alive
connection. `benchmarks/ab.py tracing` (export on at 0.1 vs off): from +14 % CPU per request with
the SDK's exporter to +1 % with this one.
"""

from __future__ import annotations

import http.client
import logging
import struct
from collections.abc import Sequence
from random import getrandbits
from time import monotonic, time_ns
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from gateway.config import TracingConfig

log = logging.getLogger("gateway.tracing")

_HEX_DASH = "0123456789abcdef-"
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


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
            return _new(TraceContext, (trace_id, span_id, parent_id, True,
                                       f"00-{trace_id}-{span_id}-01"))
        assert incoming is not None
        return _new(TraceContext, (trace_id, parent_id, parent_id, False, incoming))
    # One draw for both ids, and the tuple built directly: each halves this path's cost, which
    # every forwarded request pays (NamedTuple's own __new__ is a Python function).
    ids = f"{getrandbits(192):048x}"
    trace_id, span_id = ids[:32], ids[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:   # all-zero ids are invalid
        return context_for(None, tracer)
    if tracer is None:
        return _new(TraceContext, (trace_id, span_id, "", False, f"00-{trace_id}-{span_id}-01"))
    sampled = (int(trace_id[16:], 16)) < tracer.bound
    return _new(TraceContext, (trace_id, span_id, "", sampled,
                               f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"))


_new = tuple.__new__


class TracingUnavailable(Exception):
    """`tracing.otlp_endpoint` is set but the OpenTelemetry SDK or exporter is not installed."""


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces path under a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class SpanRecord(NamedTuple):
    """One finished request, as queued for export: built on the event loop in well under a
    microsecond (no SDK span objects); the exporter's thread turns it into protobuf."""

    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    method: str
    route: str
    path: str
    status: int
    upstream: str
    service: str
    limit: str
    breaker: str
    client: str | None

    @property
    def context(self) -> Any:
        """What BatchSpanProcessor.on_end reads (`context.trace_flags.sampled`): every record
        is a sampled span."""
        return _SAMPLED_CONTEXT


_SAMPLED_CONTEXT: Any = None


class Tracer:
    """Queues the spans of recorded requests (see the module docstring)."""

    def __init__(self, cfg: TracingConfig) -> None:
        global _SAMPLED_CONTEXT
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanContext, TraceFlags
        except ImportError as exc:
            raise TracingUnavailable(
                f"tracing.otlp_endpoint is set but the OpenTelemetry SDK is not installed "
                f"({exc.name} missing): pip install 'gateway[otel]'; requests keep their "
                f"traceparent, no span is exported") from None
        from gateway import __version__
        _SAMPLED_CONTEXT = SpanContext(1, 1, False, TraceFlags(TraceFlags.SAMPLED))
        self.cfg = cfg
        self.bound = round(cfg.sample_ratio * (1 << 64))
        self.endpoint = traces_url(cfg.otlp_endpoint)
        resource = Resource.create({"service.name": cfg.service_name,
                                    "service.version": __version__})
        self._processor = BatchSpanProcessor(
            _exporter_class()(self.endpoint, dict(resource.attributes), __version__),
            schedule_delay_millis=1000)
        self._on_end = self._processor.on_end

    def export(self, ctx: TraceContext, duration_s: float, method: str, route: str,
               path: str, status: int, upstream: str, service: str, limit: str,
               breaker: str, peer_ip: str | None) -> None:
        """Queue the span of one finished request; never blocks."""
        end = time_ns()
        self._on_end(SpanRecord(ctx.trace_id, ctx.span_id, ctx.parent_id,  # type: ignore[arg-type]
                                end - int(duration_s * 1e9), end, method, route, path, status,
                                upstream, service, limit, breaker, peer_ip))

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


# ---------------------------------------------------------------------------------------------
# OTLP/HTTP export: protobuf written by hand for the one span shape the gateway makes.
#
# The SDK's OTLP exporter encodes through generated protobuf classes and a generic attribute
# walk: ~40-60 us of CPU per span on this machine, which at sample_ratio 0.1 cost the plain
# route 14 % of its throughput (benchmarks/ab.py tracing). Written directly, with the encodings of
# repeated attribute values cached, a span costs a few microseconds. The wire format is
# opentelemetry-proto's ExportTraceServiceRequest (the test decodes it with that package).

_CACHE_MAX = 4096      # attribute encodings kept; url.path and client.address are not cached


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue message (without its own tag)."""
    if isinstance(value, str):
        any_value = _field(b"\x0a", value.encode())
    elif isinstance(value, bool):
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    else:
        any_value = b"\x21" + struct.pack("<d", float(value))
    return _field(b"\x0a", key.encode()) + _field(b"\x12", any_value)


def _exporter_class() -> type[Any]:
    """The exporter, defined once the SDK is known to be importable."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class OtlpHttpExporter(SpanExporter):
        """POSTs batches to a collector's /v1/traces from the batch processor's thread."""

        def __init__(self, url: str, resource: dict[str, Any], version: str) -> None:
            self.url = url
            resource_msg = b"".join(_field(b"\x0a", _key_value(k, v))
                                    for k, v in resource.items())
            scope = _field(b"\x0a", b"gateway") + _field(b"\x12", version.encode())
            self._resource = _field(b"\x0a", resource_msg)      # ResourceSpans.resource
            self._scope = _field(b"\x0a", scope)                # ScopeSpans.scope
            self._common: dict[tuple[Any, ...], bytes] = {}
            self._last_error = 0.0
            self._parts = urlsplit(url)
            self._path = self._parts.path or "/"
            self._conn: http.client.HTTPConnection | None = None

        def encode(self, spans: Sequence[Any]) -> bytes:
            parts = [self._scope]
            for span in spans:
                parts.append(_field(b"\x12", self._span(span)))
            scope_spans = _field(b"\x12", b"".join(parts))
            return _field(b"\x0a", self._resource + scope_spans)

        def _span(self, rec: SpanRecord) -> bytes:
            """A Span message: kind SERVER, the request's attributes (HTTP semantic
            conventions, then the gateway's own), status ERROR for 5xx."""
            out = [b"\x0a\x10", bytes.fromhex(rec.trace_id),
                   b"\x12\x08", bytes.fromhex(rec.span_id)]
            if rec.parent_id:
                out += (b"\x22\x08", bytes.fromhex(rec.parent_id))
            out.append(struct.pack("<BQBQ", 0x39, rec.start_ns, 0x41, rec.end_ns))
            key = (rec.method, rec.route, rec.status, rec.upstream, rec.service, rec.limit,
                   rec.breaker)
            common = self._common.get(key)
            if common is None:
                if len(self._common) >= _CACHE_MAX:
                    self._common.clear()
                common = self._common[key] = self._encode_common(*key)
            out.append(common)
            out.append(_field(b"\x4a", _key_value("url.path", rec.path)))
            if rec.client:
                out.append(_field(b"\x4a", _key_value("client.address", rec.client)))
            return b"".join(out)

        @staticmethod
        def _encode_common(method: str, route: str, status: int, upstream: str,
                           service: str, limit: str, breaker: str) -> bytes:
            """Name, kind, status and the attributes that repeat across requests: encoded
            once per combination (a bounded set: routes, statuses, decisions, states)."""
            attrs = [("http.request.method", method), ("http.response.status_code", status),
                     ("url.scheme", "http"), ("gateway.route", route),
                     ("gateway.upstream", upstream), ("gateway.service", service),
                     ("gateway.limit.decision", limit), ("gateway.breaker.state", breaker)]
            if route != "-":
                attrs.append(("http.route", route))
            out = [_field(b"\x2a", (f"{method} {route}" if route != "-" else method).encode()),
                   b"\x30\x02"]                                      # SPAN_KIND_SERVER
            out += (_field(b"\x4a", _key_value(k, v)) for k, v in attrs)
            if status >= 500:
                out.append(b"\x7a\x02\x18\x02")                     # Status.code ERROR
            return b"".join(out)

        def export(self, spans: Sequence[Any]) -> Any:
            body = self.encode(spans)
            try:
                return self._post(body)
            except (OSError, http.client.HTTPException):
                self._close()
                try:                          # a kept-alive connection the collector closed
                    return self._post(body)
                except (OSError, http.client.HTTPException) as exc:
                    self._close()
                    now = monotonic()
                    if now - self._last_error > 60:    # at most one line a minute
                        self._last_error = now
                        log.warning("span export failed; spans dropped",
                                    extra={"endpoint": self.url, "error": str(exc),
                                           "spans": len(spans)})
                    return SpanExportResult.FAILURE

        def _post(self, body: bytes) -> Any:
            """One POST on a kept-alive connection (a new one per export cost milliseconds)."""
            if self._conn is None:
                cls = (http.client.HTTPSConnection if self._parts.scheme == "https"
                       else http.client.HTTPConnection)
                self._conn = cls(self._parts.hostname or "", self._parts.port, timeout=5)
            self._conn.request("POST", self._path, body,
                               {"Content-Type": "application/x-protobuf"})
            resp = self._conn.getresponse()
            resp.read()
            if 200 <= resp.status < 300:
                return SpanExportResult.SUCCESS
            now = monotonic()
            if now - self._last_error > 60:
                self._last_error = now
                log.warning("span export refused; spans dropped",
                            extra={"endpoint": self.url, "status": resp.status})
            return SpanExportResult.FAILURE

        def _close(self) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        def shutdown(self) -> None:
            self._close()

    return OtlpHttpExporter
