"""W3C Trace Context through the gateway and span export over OTLP/HTTP to a local receiver
(an aiohttp server decoding `ExportTraceServiceRequest` with opentelemetry-proto)."""

from __future__ import annotations

import gzip
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway import config as config_mod
from gateway.errors import ConfigError
from gateway.tracing import Tracer, context_for, make_tracer, parse_traceparent
from tests.harness import Upstream, gateway_yaml, running_gateway, url_of

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


# --- the header --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    VALID,
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",   # a later version
    "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
])
def test_valid_traceparents(value: str) -> None:
    parsed = parse_traceparent(value)
    assert parsed is not None and parsed[0] == TRACE_ID and parsed[1] == PARENT_ID


@pytest.mark.parametrize("value", [
    "",
    VALID[:-1],                                                      # short
    VALID + "0",                                                     # version 00 is 55 exactly
    VALID.upper(),                                                   # hex is lower case
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",      # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",      # zero parent id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",      # version ff
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
    "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e47-6-00f067aa0ba902b7-01",      # a dash inside an id
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",     # later version, no dash
    " 0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
])
def test_invalid_traceparents(value: str) -> None:
    assert parse_traceparent(value) is None


def test_context_without_export() -> None:
    ctx = context_for(VALID, None)                      # forwarded unchanged
    assert ctx.header == VALID and ctx.trace_id == TRACE_ID and not ctx.sampled
    new = context_for(None, None)                       # a new trace, sampled flag set
    parsed = parse_traceparent(new.header)
    assert parsed is not None and parsed[0] == new.trace_id and parsed[2] == 1
    assert new.parent_id == "" and context_for(None, None).trace_id != new.trace_id
    assert context_for("", None).trace_id != TRACE_ID   # "" stands for "sent twice"


def _cfg(ratio: float, endpoint: str = "http://127.0.0.1:4318") -> config_mod.TracingConfig:
    return config_mod.TracingConfig(otlp_endpoint=endpoint, sample_ratio=ratio)


def test_sampling_is_parent_based_and_by_ratio_on_new_traces() -> None:
    never, always = Tracer(_cfg(0.0)), Tracer(_cfg(1.0))
    try:
        assert not any(context_for(None, never).sampled for _ in range(200))
        assert all(context_for(None, always).sampled for _ in range(200))
        ctx = context_for(VALID, never)                 # the parent sampled: so do we
        assert ctx.sampled and ctx.trace_id == TRACE_ID and ctx.parent_id == PARENT_ID
        assert ctx.span_id != PARENT_ID and ctx.header == f"00-{TRACE_ID}-{ctx.span_id}-01"
        unsampled = VALID[:-2] + "00"
        ctx = context_for(unsampled, always)            # the parent did not: neither do we
        assert not ctx.sampled and ctx.header == unsampled
        half = Tracer(_cfg(0.5))
        try:
            share = sum(context_for(None, half).sampled for _ in range(4000)) / 4000
            assert 0.45 < share < 0.55
            ctx = context_for(None, half)
            assert ctx.header.endswith("-01" if ctx.sampled else "-00")
        finally:
            half.shutdown()
    finally:
        never.shutdown()
        always.shutdown()


def test_missing_sdk_is_reported_clearly(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace.export", None)
    with caplog.at_level(logging.ERROR, logger="gateway.tracing"):
        assert make_tracer(_cfg(1.0)) is None
    assert "pip install 'gateway[otel]'" in caplog.text
    assert "tracing.otlp_endpoint is set" in caplog.text
    assert make_tracer(None) is None and make_tracer(_cfg(1.0, endpoint="")) is None


def test_tracing_config_is_validated() -> None:
    base = gateway_yaml(["http://127.0.0.1:1"])
    cfg = config_mod.load_text(base + "tracing: {otlp_endpoint: 'http://c:4318', "
                                      "sample_ratio: 0.25, service_name: edge}\n")
    assert cfg.tracing == config_mod.TracingConfig("http://c:4318", 0.25, "edge")
    assert config_mod.load_text(base).tracing is None
    with pytest.raises(ConfigError) as exc:
        config_mod.load_text(base + "tracing: {otlp_endpoint: 'grpc://c:4317', "
                                    "sample_ratio: 1.5, service_name: '', sampel: 1}\n")
    text = "\n".join(exc.value.errors)
    assert "tracing.otlp_endpoint: must be an http(s) URL" in text
    assert "tracing.sample_ratio: must be <= 1" in text
    assert "tracing.service_name:" in text
    assert "tracing.sampel: unknown key" in text


# --- through the gateway -----------------------------------------------------------------------


async def seen_traceparents(session: aiohttp.ClientSession, url: str,
                            headers: Any = None) -> tuple[list[str], list[str], str]:
    async with session.get(url, headers=headers) as resp:
        doc = await resp.json()
        return ([v for k, v in doc["headers"] if k.lower() == "traceparent"],
                [v for k, v in doc["headers"] if k.lower() == "tracestate"],
                resp.headers["X-Request-Id"])


async def test_upstream_sees_exactly_one_traceparent_and_the_log_its_trace_id(
        tmp_path: Path, upstream: Upstream) -> None:
    log_path = tmp_path / "access.log"
    text = gateway_yaml([upstream.url]) + f"access_log: {{enabled: true, path: '{log_path}'}}\n"
    async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
        url = url_of(gw, "/headers")
        tp, ts, rid1 = await seen_traceparents(s, url, {"traceparent": VALID,
                                                        "tracestate": "vendor=abc"})
        assert tp == [VALID] and ts == ["vendor=abc"]          # forwarded unchanged
        tp2, _, rid2 = await seen_traceparents(s, url)         # none: a new one
        assert len(tp2) == 1 and parse_traceparent(tp2[0]) is not None
        tp3, ts3, rid3 = await seen_traceparents(s, url, {"traceparent": "00-bogus",
                                                          "tracestate": "vendor=abc"})
        assert len(tp3) == 1 and parse_traceparent(tp3[0]) is not None
        assert ts3 == []                                        # a new trace: no old state
        tp4, _, rid4 = await seen_traceparents(s, url, [("traceparent", VALID),
                                                        ("traceparent", VALID)])
        assert len(tp4) == 1 and tp4[0] != VALID                # two fields: invalid, anew
    lines = {d["request_id"]: d for d in map(orjson.loads, log_path.read_text().splitlines())}
    assert lines[rid1]["trace_id"] == TRACE_ID
    for rid, seen in ((rid2, tp2), (rid3, tp3), (rid4, tp4)):
        assert lines[rid]["trace_id"] == seen[0][3:35]


class Receiver:
    """A local OTLP/HTTP trace receiver: POST /v1/traces, protobuf body (maybe gzipped)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        for rs in msg.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            self.resources.append(resource)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append({
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(), "name": span.name,
                        "kind": span.kind, "status": span.status.code,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "service": resource.get("service.name")})
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value"))


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.mark.timeout(60)
async def test_spans_reach_an_otlp_receiver_with_trace_ids_and_attributes(
        tmp_path: Path, upstream: Upstream) -> None:
    async with receiver() as rx:
        text = (gateway_yaml([upstream.url], route_extra="limits: [tight]\nstrip_prefix: true")
                .replace('path_prefix: "/"', 'path_prefix: "/api"')
                + "limits:\n  - {name: tight, key: ip_address, rate: 1/minute, burst: 1}\n"
                + f"tracing: {{otlp_endpoint: '{rx.url}', sample_ratio: 1.0, "
                  "service_name: edge-gw}\n")
        async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
            url = url_of(gw, "/api/headers")
            with_parent, _, _ = await seen_traceparents(s, url, {"traceparent": VALID})
            root, _, _ = await seen_traceparents(s, url)
            async with s.get(url_of(gw, "/api/headers")) as resp:     # bucket empty: 429
                assert resp.status == 429
            async with s.get(url_of(gw, "/nowhere")) as resp:
                assert resp.status == 404
        # the gateway has stopped: its span processor exported everything queued
    spans = rx.spans
    assert len(spans) == 4, spans
    assert {r["service.name"] for r in rx.resources} == {"edge-gw"}
    by_status = {sp["attributes"]["http.response.status_code"]: sp for sp in spans}

    # the client's trace continues: our span is its parent's child, and the upstream's parent
    first = next(sp for sp in spans if sp["trace_id"] == TRACE_ID)
    assert first["parent_span_id"] == PARENT_ID
    assert with_parent == [f"00-{TRACE_ID}-{first['span_id']}-01"]
    # a trace started here: the upstream saw our span as its parent
    second = next(sp for sp in spans if sp["trace_id"] == root[0][3:35])
    assert second["parent_span_id"] == "" and root[0][36:52] == second["span_id"]
    assert root[0].endswith("-01")

    ok = first["attributes"]
    assert first["name"] == "GET main" and first["kind"] == 2            # SPAN_KIND_SERVER
    assert ok["http.request.method"] == "GET" and ok["http.route"] == "main"
    assert ok["http.response.status_code"] == 200 and ok["url.path"] == "/api/headers"
    assert ok["gateway.upstream"] == "up" and ok["gateway.limit.decision"] == "allowed"
    assert ok["gateway.breaker.state"] == "closed" and ok["gateway.service"] == "svc"
    assert first["status"] == 0 and first["end"] > first["start"]         # STATUS_CODE_UNSET
    limited = by_status[429]["attributes"]
    assert limited["gateway.limit.decision"] == "limited" and limited["http.route"] == "main"
    missing = by_status[404]
    assert missing["name"] == "GET" and "http.route" not in missing["attributes"]
    assert missing["attributes"]["gateway.route"] == "-"
    assert len({sp["trace_id"] for sp in spans}) == 4


async def test_sample_ratio_zero_exports_only_parent_sampled_requests(
        tmp_path: Path, upstream: Upstream) -> None:
    async with receiver() as rx:
        text = gateway_yaml([upstream.url]) + (
            f"tracing: {{otlp_endpoint: '{rx.url}/v1/traces', sample_ratio: 0}}\n")
        async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
            url = url_of(gw, "/headers")
            for _ in range(5):
                tp, _, _ = await seen_traceparents(s, url)
                assert tp[0].endswith("-00")                      # not recorded: flag unset
            await seen_traceparents(s, url, {"traceparent": VALID})
    assert [sp["trace_id"] for sp in rx.spans] == [TRACE_ID]
    assert rx.resources[0]["service.name"] == "gateway"           # the default


async def test_reload_turns_export_on(tmp_path: Path, upstream: Upstream) -> None:
    async with receiver() as rx:
        text = gateway_yaml([upstream.url])
        async with running_gateway(tmp_path, text) as gw, aiohttp.ClientSession() as s:
            assert gw.proxy.tracer is None
            await seen_traceparents(s, url_of(gw, "/headers"))
            Path(gw.config_path).write_text(
                text + f"tracing: {{otlp_endpoint: '{rx.url}', sample_ratio: 1}}\n")
            await gw.reload()
            assert gw.proxy.tracer is not None
            await seen_traceparents(s, url_of(gw, "/headers"))
    assert len(rx.spans) == 1
