"""TLS on the proxy listener, end to end: the real `gateway run`, certificates from trustme, and
real TLS clients (curl, `openssl s_client`, Python's ssl)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import trustme

from gateway import config as config_mod
from gateway.errors import ConfigError
from tests.conftest import free_port
from tests.harness import GatewayProcess, write_config

ORG = "gateway test"


class Pki:
    """A test CA, server certificates for two names, client certificates, files in a dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA(organization_name="gateway test CA")
        self.ca_pem = self.write("ca.pem", self.ca.cert_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)

    def server(self, prefix: str, *names: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(*names, organization_name=ORG, organization_unit_name=prefix)
        return (self.write(f"{prefix}.crt", b"".join(p.bytes() for p in cert.cert_chain_pems)),
                self.write(f"{prefix}.key", cert.private_key_pem.bytes()))

    def client(self, prefix: str, common_name: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(f"{common_name}.clients.test", common_name=common_name,
                                  organization_name=ORG, organization_unit_name=prefix)
        return (self.write(f"{prefix}.crt", b"".join(p.bytes() for p in cert.cert_chain_pems)),
                self.write(f"{prefix}.key", cert.private_key_pem.bytes()))


def tls_yaml(port: int, admin: int, upstream: str, tls: str, *, limits: str = "",
             route_limits: str = "") -> str:
    return (f'listen: "127.0.0.1:{port}"\n'
            "drain_s: 3\n"
            f'admin: {{listen: "127.0.0.1:{admin}"}}\n'
            f"tls:\n{tls}"
            "upstreams:\n"
            "  - name: up\n"
            f'    endpoints: ["{upstream}"]\n'
            f"{limits}"
            "routes:\n"
            "  - name: main\n"
            "    upstream: up\n"
            f"{route_limits}")


def start(tmp_path: Path, text: str) -> GatewayProcess:
    port, admin = int(text.split('listen: "127.0.0.1:')[1].split('"')[0]), \
        int(text.split('admin: {listen: "127.0.0.1:')[1].split('"')[0])
    gw = GatewayProcess(write_config(tmp_path, text), port, admin)
    gw.start()
    return gw


def served_ou(port: int, server_name: str | None) -> str:
    """The organizational unit of the certificate `openssl s_client` is served (with SNI when
    `server_name` is given)."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"]
    cmd += ["-servername", server_name] if server_name else ["-noservername"]
    out = subprocess.run(cmd, input=b"", capture_output=True, timeout=10, check=False)
    text = (out.stdout + out.stderr).decode()
    for line in text.splitlines():
        if "Peer certificate:" in line or line.startswith("subject="):
            return line.split("OU = ")[1].split(",")[0].strip() if "OU = " in line else \
                line.split("OU=")[1].split(",")[0].strip()
    raise AssertionError(text)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          check=False,
                          timeout=20)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def test_curl_over_tls_sni_alpn_and_forwarded_proto(tmp_path: Path, pki: Pki,
                                                    demo_upstream: str) -> None:
    a_cert, a_key = pki.server("alpha", "localhost", "api.example.com")
    b_cert, b_key = pki.server("beta", "other.example.com", "*.wild.test")
    port, admin = free_port(), free_port()
    gw = start(tmp_path, tls_yaml(port, admin, demo_upstream,
                                  f"  certificates:\n"
                                  f"    - {{cert: {a_cert}, key: {a_key}}}\n"
                                  f"    - {{cert: {b_cert}, key: {b_key}}}\n"))
    try:
        out = curl("--cacert", pki.ca_pem, f"https://localhost:{port}/headers")
        assert out.returncode == 0, out.stderr
        headers = dict(json.loads(out.stdout)["headers"])
        assert headers["X-Forwarded-Proto"] == "https"
        # SNI picks the certificate whose SANs match; the first is the default.
        assert served_ou(port, "other.example.com") == "beta"
        assert served_ou(port, "x.wild.test") == "beta"
        assert served_ou(port, "api.example.com") == "alpha"
        assert served_ou(port, "unknown.example.org") == "alpha"
        assert served_ou(port, None) == "alpha"
        # curl verifies the certificate chosen by SNI against the name it asked for.
        out = curl("--cacert", pki.ca_pem, "--resolve", f"other.example.com:{port}:127.0.0.1",
                   f"https://other.example.com:{port}/")
        assert out.returncode == 0, out.stderr
        # ALPN offers http/1.1 and nothing else; TLS 1.2 is the floor.
        ctx = ssl.create_default_context(cafile=pki.ca_pem)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        out = curl("--cacert", pki.ca_pem, "--tlsv1.0", "--tls-max", "1.1",
                   f"https://localhost:{port}/")
        assert out.returncode != 0
        # Plain HTTP on the TLS port is not served.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        assert gw.stop() == 0, gw.logs()


def test_min_version_1_3_refuses_a_tls_1_2_client(tmp_path: Path, pki: Pki,
                                                 demo_upstream: str) -> None:
    cert, key = pki.server("alpha", "localhost")
    port, admin = free_port(), free_port()
    gw = start(tmp_path, tls_yaml(port, admin, demo_upstream,
                                  f"  certificates: [{{cert: {cert}, key: {key}}}]\n"
                                  '  min_version: "1.3"\n'))
    try:
        assert curl("--cacert", pki.ca_pem, "--tls-max", "1.2",
                    f"https://localhost:{port}/").returncode != 0
        out = curl("--cacert", pki.ca_pem, "--tlsv1.3", f"https://localhost:{port}/")
        assert out.returncode == 0, out.stderr
    finally:
        gw.stop()


def test_mtls_requires_a_client_certificate_and_keys_limits_on_its_subject(
        tmp_path: Path, pki: Pki, demo_upstream: str) -> None:
    cert, key = pki.server("alpha", "localhost")
    c1, k1 = pki.client("c1", "client-one")
    c2, k2 = pki.client("c2", "client-two")
    other = trustme.CA()            # a client certificate from a CA the gateway does not trust
    stranger = other.issue_cert(common_name="stranger")
    s_cert = pki.write("s.crt", stranger.cert_chain_pems[0].bytes())
    s_key = pki.write("s.key", stranger.private_key_pem.bytes())
    port, admin = free_port(), free_port()
    gw = start(tmp_path, tls_yaml(
        port, admin, demo_upstream,
        f"  certificates: [{{cert: {cert}, key: {key}}}]\n  client_ca: {pki.ca_pem}\n",
        limits="limits:\n  - {name: per_cert, key: client_cert, rate: 1/hour, burst: 1}\n",
        route_limits="    limits: [per_cert]\n"))
    try:
        url = f"https://localhost:{port}/"
        assert curl("--cacert", pki.ca_pem, url).returncode != 0          # no certificate
        assert curl("--cacert", pki.ca_pem, "--cert", s_cert, "--key", s_key,
                    url).returncode != 0                                  # untrusted issuer
        codes = [curl("--cacert", pki.ca_pem, "--cert", c1, "--key", k1, "-o", "/dev/null",
                      "-w", "%{http_code}", url).stdout.decode() for _ in range(3)]
        assert codes == ["200", "200", "429"]       # capacity 2 per certificate subject
        out = curl("--cacert", pki.ca_pem, "--cert", c2, "--key", k2, "-o", "/dev/null",
                   "-w", "%{http_code}", url)
        assert out.stdout == b"200"                 # another subject: its own bucket
        # The bucket's key is the subject, as the admin API's test endpoint takes it.
        def allowed(subject: str) -> bool:
            req = urllib.request.Request(
                f"{gw.admin}/admin/limits/test", method="POST",
                data=json.dumps({"limit": "per_cert", "key": subject}).encode())
            with urllib.request.urlopen(req, timeout=5) as resp:
                return bool(json.loads(resp.read())["allowed"])
        assert not allowed(f"O={ORG},OU=c1,CN=client-one")
        assert allowed(f"O={ORG},OU=c2,CN=client-two")      # one token of two left
    finally:
        assert gw.stop() == 0, gw.logs()


def test_reload_rereads_certificates_keeps_connections_and_refuses_bad_files(
        tmp_path: Path, pki: Pki, demo_upstream: str) -> None:
    cert, key = pki.server("first", "localhost")
    port, admin = free_port(), free_port()
    gw = start(tmp_path, tls_yaml(port, admin, demo_upstream,
                                  f"  certificates: [{{cert: {cert}, key: {key}}}]\n"))
    try:
        ctx = ssl.create_default_context(cafile=pki.ca_pem)
        kept = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)
        kept.request("GET", "/")
        assert kept.getresponse().read() and kept.sock is not None
        assert served_ou(port, "localhost") == "first"

        # The same paths, new contents: SIGHUP re-reads them for new handshakes.
        new = pki.ca.issue_cert("localhost", organization_unit_name="second")
        Path(cert).write_bytes(new.cert_chain_pems[0].bytes())
        Path(key).write_bytes(new.private_key_pem.bytes())
        gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_ou(port, "localhost") != "second":
            assert time.monotonic() < deadline, gw.logs()
            time.sleep(0.1)
        kept.request("GET", "/")                    # the old connection still serves
        resp = kept.getresponse()
        assert resp.status == 200 and resp.read()
        assert kept.sock.getpeercert()["subject"][-1][0][1] != "second"  # type: ignore[union-attr]

        # A key that does not match its certificate: refused, naming the key; old one serves.
        other = pki.ca.issue_cert("localhost", organization_unit_name="third")
        Path(key).write_bytes(other.private_key_pem.bytes())
        req = urllib.request.Request(f"{gw.admin}/admin/reload", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 400
        errors = json.loads(err.value.read())["errors"]
        assert any(e.startswith("tls.certificates[0].key: ") for e in errors), errors
        assert served_ou(port, "localhost") == "second"
        assert curl("--cacert", pki.ca_pem, f"https://localhost:{port}/").returncode == 0
        kept.close()
    finally:
        assert gw.stop() == 0, gw.logs()


def test_gateway_check_names_bad_tls_files(tmp_path: Path, pki: Pki) -> None:
    cert, key = pki.server("alpha", "localhost")
    garbage = pki.write("garbage.pem", b"not a certificate\n")
    text = tls_yaml(8443, 9901, "http://127.0.0.1:9001",
                    f"  certificates:\n    - {{cert: {garbage}, key: {key}}}\n"
                    f"    - {{cert: {cert}, key: {cert}}}\n"
                    f"    - {{cert: {tmp_path}/missing.pem, key: {key}}}\n"
                    "  min_version: '1.1'\n"
                    f"  client_ca: {garbage}\n")
    path = write_config(tmp_path, text)
    out = subprocess.run(["python", "-m", "gateway", "check", "--config", str(path)],
                         capture_output=True, timeout=30, check=False)
    assert out.returncode == 2
    lines = out.stderr.decode().splitlines()
    assert any(x.startswith("tls.certificates[0].cert: ") for x in lines), lines
    assert any(x.startswith("tls.certificates[1].key: ") for x in lines), lines
    assert any(x.startswith("tls.certificates[2].cert: cannot read") for x in lines), lines
    assert any(x.startswith("tls.min_version: ") for x in lines), lines
    assert any(x.startswith("tls.client_ca: ") for x in lines), lines


def test_config_keys_of_tls_fallback_and_websocket(tmp_path: Path, pki: Pki) -> None:
    cert, _ = pki.server("alpha", "localhost")

    def errors(text: str) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            config_mod.load_text(text)
        return exc.value.errors

    base = ("upstreams:\n"
            "  - {name: a, endpoints: ['https://api.example.com'], fallback: b,\n"
            f"     tls: {{ca: {pki.ca_pem}, server_name: api.internal, verify: true}}}}\n"
            "  - {name: b, endpoints: ['http://127.0.0.1:9001:'], fallback: a}\n"
            "routes:\n  - {name: r, upstream: a, websocket: {idle_timeout_s: 30}}\n"
            "  - {name: s, upstream: b, websocket: true}\n")
    cfg = config_mod.load_text(base.replace("9001:", "9001"))
    a = cfg.upstream("a")
    assert a.endpoints[0].port == 443 and a.endpoints[0].authority == "api.example.com"
    assert a.tls is not None and a.tls.server_name == "api.internal" and a.fallback == "b"
    assert cfg.routes[0].websocket and cfg.routes[0].websocket_idle_timeout_s == 30
    assert cfg.routes[1].websocket and cfg.routes[1].websocket_idle_timeout_s == 300
    errs = errors(
        "upstreams:\n"
        "  - {name: a, endpoints: ['ftp://x'], fallback: a}\n"
        f"  - {{name: b, endpoints: ['http://x'], fallback: nope, tls: {{ca: {cert}}}}}\n"
        f"  - {{name: c, endpoints: ['https://x'], tls: {{cert: {cert}, verify: 1}}}}\n"
        "limits:\n  - {name: l, key: client_cert, rate: 1/second}\n"
        "routes:\n  - {name: r, upstream: a, websocket: {idle: 3}}\n")
    for prefix in ("upstreams[0].endpoints[0]: ", "upstreams[0].fallback: names the upstream",
                   "upstreams[1].fallback: names unknown upstream 'nope'",
                   "upstreams[1].tls: is set but no endpoint is https://",
                   "upstreams[2].tls.verify: ", "upstreams[2].tls.key: is required",
                   "limits[0].key: is client_cert but tls.client_ca",
                   "routes[0].websocket.idle: unknown key"):
        assert any(e.startswith(prefix) for e in errs), (prefix, errs)


def test_reload_changes_the_client_ca_for_new_handshakes(tmp_path: Path, pki: Pki,
                                                        demo_upstream: str) -> None:
    cert, key = pki.server("alpha", "localhost")
    c1, k1 = pki.client("c1", "client-one")
    (tmp_path / "other").mkdir()
    other = Pki(tmp_path / "other")            # another CA, and a client certificate of it
    c2, k2 = other.client("c2", "client-two")
    port, admin = free_port(), free_port()
    listener = f"  certificates: [{{cert: {cert}, key: {key}}}]\n"
    gw = start(tmp_path, tls_yaml(port, admin, demo_upstream,
                                  f"{listener}  client_ca: {pki.ca_pem}\n"))
    url = f"https://localhost:{port}/"

    def code(*args: str) -> str:
        return curl("--cacert", pki.ca_pem, "-o", "/dev/null", "-w", "%{http_code}", *args,
                    url).stdout.decode()

    def reload(tls: str) -> None:
        write_config(tmp_path, tls_yaml(port, admin, demo_upstream, tls))
        req = urllib.request.Request(f"{gw.admin}/admin/reload", method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    try:
        assert code("--cert", c1, "--key", k1) == "200"
        assert code("--cert", c2, "--key", k2) != "200"
        reload(f"{listener}  client_ca: {other.ca_pem}\n")
        assert code("--cert", c2, "--key", k2) == "200"
        assert code("--cert", c1, "--key", k1) != "200"
        reload(listener)                        # client certificates no longer required
        assert code() == "200"
    finally:
        assert gw.stop() == 0, gw.logs()
