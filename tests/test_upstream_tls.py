"""https:// upstream endpoints: verification, SNI, client certificates, pooled TLS connections,
and TLS failures as connect errors for the breaker. Real TLS servers on 127.0.0.1 (aiohttp),
certificates from trustme, the gateway's own listener in TLS too where the test says so."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from gateway.errors import ConfigError
from tests.harness import admin_url, fetch, running_gateway, url_of


class TlsUpstream:
    """An aiohttp server over TLS that counts handshakes and remembers the SNI names and client
    certificates it saw."""

    def __init__(self, ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*names).configure_cert(self.ctx)
        if client_ca is not None:
            client_ca.configure_trust(self.ctx)
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.sni_callback = self._on_hello
        self.handshakes = 0
        self.server_names: list[str | None] = []
        self.client_subjects: list[str] = []
        self.hosts: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _on_hello(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.handshakes += 1
        self.server_names.append(name)

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            if peer:
                self.client_subjects.append(str(peer["subject"]))
            self.hosts.append(request.headers.get("Host", ""))
            return web.json_response({"path": request.path, "proto":
                                      request.headers.get("X-Forwarded-Proto")})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def count(metrics: str, *labels: str) -> float:
    """The value of the gateway_requests_total series carrying every one of `labels`."""
    for line in metrics.splitlines():
        if line.startswith("gateway_requests_total{") and all(x in line for x in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def write(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def config(endpoint: str, tls: str, *, breaker: str = "", listener_tls: str = "") -> str:
    return ('listen: "127.0.0.1:0"\n'
            "drain_s: 1\n"
            'admin: {listen: "127.0.0.1:0"}\n'
            f"{listener_tls}"
            "upstreams:\n"
            "  - name: secure\n"
            f'    endpoints: ["{endpoint}"]\n'
            "    connect_timeout_s: 2\n"
            "    timeout_s: 5\n"
            f"    tls: {tls}\n"
            f"{breaker}"
            "routes:\n"
            "  - {name: main, upstream: secure}\n")


async def test_keep_alive_tls_connections_are_pooled(
        tmp_path: Path, ca: trustme.CA, session: aiohttp.ClientSession) -> None:
    up = TlsUpstream(ca, "localhost")
    await up.start()
    ca_pem = write(tmp_path, "ca.pem", ca.cert_pem.bytes())
    try:
        async with running_gateway(tmp_path, config(f"https://localhost:{up.port}",
                                                    f"{{ca: {ca_pem}}}")) as gw:
            for i in range(30):
                status, _, body = await fetch(session, "GET", url_of(gw, f"/n/{i}"))
                assert status == 200 and json.loads(body)["path"] == f"/n/{i}"
            assert up.handshakes == 1            # 30 requests, one pooled TLS connection
            assert up.server_names == ["localhost"]
            # Host is the name TLS verified, not the gateway's own (the client's Host).
            assert set(up.hosts) == {f"localhost:{up.port}"}
            # Concurrent requests open a connection each at most; the next burst reuses the
            # pooled ones and opens only what it lacks.
            pool = gw.runtime.upstreams["secure"].pools[0]
            results = await asyncio.gather(*(fetch(session, "GET", url_of(gw, "/c"))
                                             for _ in range(40)))
            assert all(r[0] == 200 for r in results)
            opened, idle = up.handshakes, pool.idle
            assert opened == pool.opened_total and idle >= 1
            results = await asyncio.gather(*(fetch(session, "GET", url_of(gw, "/c"))
                                             for _ in range(40)))
            assert all(r[0] == 200 for r in results)
            assert up.handshakes - opened <= 40 - idle
    finally:
        await up.stop()


async def test_server_name_override_and_client_certificate(
        tmp_path: Path, ca: trustme.CA, session: aiohttp.ClientSession) -> None:
    client_ca = trustme.CA()
    up = TlsUpstream(ca, "api.internal", client_ca=client_ca)
    await up.start()
    cert = client_ca.issue_cert("gateway.clients.test", common_name="gateway-egress")
    ca_pem = write(tmp_path, "ca.pem", ca.cert_pem.bytes())
    c_pem = write(tmp_path, "c.pem", b"".join(p.bytes() for p in cert.cert_chain_pems))
    k_pem = write(tmp_path, "c.key", cert.private_key_pem.bytes())
    try:
        # Reached by IP address; the certificate names api.internal: verified against it.
        text = config(f"https://127.0.0.1:{up.port}",
                      f"{{ca: {ca_pem}, server_name: api.internal, cert: {c_pem}, "
                      f"key: {k_pem}}}")
        async with running_gateway(tmp_path, text) as gw:
            status, _, body = await fetch(session, "GET", url_of(gw, "/x"))
            assert status == 200, body
            assert up.server_names == ["api.internal"]
            assert up.hosts == [f"api.internal:{up.port}"]
            assert "gateway-egress" in up.client_subjects[0]
        # Without the client certificate the upstream refuses the handshake: 502.
        text = config(f"https://127.0.0.1:{up.port}",
                      f"{{ca: {ca_pem}, server_name: api.internal}}")
        async with running_gateway(tmp_path, text) as gw:
            status, _, body = await fetch(session, "GET", url_of(gw, "/x"))
            assert status == 502, body
    finally:
        await up.stop()


async def test_verification_failure_is_502_and_opens_the_breaker(
        tmp_path: Path, ca: trustme.CA, session: aiohttp.ClientSession) -> None:
    impostor = TlsUpstream(trustme.CA(), "localhost")   # signed by a CA nobody configured
    await impostor.start()
    ca_pem = write(tmp_path, "ca.pem", ca.cert_pem.bytes())
    breaker = "    breaker: {failure_threshold: 3, reset_timeout_s: 60}\n"
    try:
        async with running_gateway(tmp_path, config(f"https://localhost:{impostor.port}",
                                                    f"{{ca: {ca_pem}}}", breaker=breaker)) as gw:
            for _ in range(3):
                status, headers, body = await fetch(session, "GET", url_of(gw, "/"))
                assert status == 502
                assert headers["Content-Type"] == "application/problem+json"
                assert "certificate verify failed" in json.loads(body)["detail"]
            status, headers, body = await fetch(session, "GET", url_of(gw, "/"))
            assert status == 503 and json.loads(body)["upstream"] == "secure"
            async with session.get(admin_url(gw, "/admin/breakers")) as resp:
                assert (await resp.json())[0]["state"] == "open"
            async with session.get(admin_url(gw, "/metrics")) as resp:
                text = await resp.text()
            assert count(text, 'upstream="secure"', 'code="502"') == 3
        # verify: false accepts it (a private upstream with a self-signed certificate).
        async with running_gateway(tmp_path, config(f"https://localhost:{impostor.port}",
                                                    "{verify: false}")) as gw:
            status, _, _ = await fetch(session, "GET", url_of(gw, "/"))
            assert status == 200
    finally:
        await impostor.stop()


async def test_curl_over_tls_through_the_gateway_to_an_https_upstream(
        tmp_path: Path, ca: trustme.CA) -> None:
    up = TlsUpstream(ca, "localhost")
    await up.start()
    ca_pem = write(tmp_path, "ca.pem", ca.cert_pem.bytes())
    edge = ca.issue_cert("localhost")
    e_crt = write(tmp_path, "edge.crt", b"".join(p.bytes() for p in edge.cert_chain_pems))
    e_key = write(tmp_path, "edge.key", edge.private_key_pem.bytes())
    listener = f"tls: {{certificates: [{{cert: {e_crt}, key: {e_key}}}]}}\n"
    try:
        async with running_gateway(tmp_path, config(f"https://localhost:{up.port}",
                                                    f"{{ca: {ca_pem}}}",
                                                    listener_tls=listener)) as gw:
            assert gw.proxy_address is not None
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "10", "--cacert", ca_pem,
                f"https://localhost:{gw.proxy_address[1]}/through",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, err
            assert json.loads(out) == {"path": "/through", "proto": "https"}
    finally:
        await up.stop()


async def test_reload_rereads_rotated_tls_files_for_new_connections(
        tmp_path: Path, ca: trustme.CA, session: aiohttp.ClientSession) -> None:
    """The CA file is rotated in place (same path, same config): a reload makes new
    connections verify against the new CA; the pooled connection keeps serving."""
    up = TlsUpstream(ca, "localhost")
    await up.start()
    ca_pem = write(tmp_path, "ca.pem", ca.cert_pem.bytes())
    try:
        async with running_gateway(tmp_path, config(f"https://localhost:{up.port}",
                                                    f"{{ca: {ca_pem}}}")) as gw:
            status, _, _ = await fetch(session, "GET", url_of(gw, "/before"))
            assert status == 200 and up.handshakes == 1
            # The upstream moves to a certificate of a new CA, and the CA file is replaced.
            new_ca = trustme.CA()
            new_ca.issue_cert("localhost").configure_cert(up.ctx)
            write(tmp_path, "ca.pem", b"not a certificate")
            with pytest.raises(ConfigError, match=r"upstreams\[0\]\.tls\.ca: "):
                await gw.reload()       # a broken file: refused, the old context kept
            write(tmp_path, "ca.pem", new_ca.cert_pem.bytes())
            # Before the reload the pooled connection (verified with the old CA) serves.
            status, _, _ = await fetch(session, "GET", url_of(gw, "/pooled"))
            assert status == 200 and up.handshakes == 1
            await gw.reload()
            status, _, _ = await fetch(session, "GET", url_of(gw, "/pooled-after"))
            assert status == 200 and up.handshakes == 1
            # New connections (a burst needs more than the one pooled) verify against the new
            # CA: they would fail with the old one (certificate verify failed, 502).
            results = await asyncio.gather(*(fetch(session, "GET", url_of(gw, f"/new/{i}"))
                                             for i in range(6)))
            assert [r[0] for r in results] == [200] * 6, [r[2] for r in results]
            assert up.handshakes > 1
            # An unchanged file on the next reload keeps the context (and the pool) as is.
            pool = gw.runtime.upstreams["secure"].pools[0]
            ctx = pool.ssl
            await gw.reload()
            assert gw.runtime.upstreams["secure"].pools[0] is pool and pool.ssl is ctx
    finally:
        await up.stop()
