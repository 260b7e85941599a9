"""TLS contexts: the proxy listener's (certificates chosen by SNI, optional client certificates)
and the upstream client's (verification, SNI, client certificates).

Listener: the standard library's `ssl` under uvloop, with the same HTTP protocol on top. The
context given to `create_server` is a base whose `sni_callback` switches each handshake to the
context of the certificate whose subjectAltNames match the client's server name (exact, or a
`*.` wildcard for one label), the first certificate otherwise. The callback reads the current
table, so a reload that re-reads the files affects new handshakes only: connections keep the
certificate they were made with. Every context offers ALPN `http/1.1` and refuses TLS below
`min_version`; with `client_ca` a client certificate is required and verified, and its subject
becomes the connection's `client_cert` (a limit key).

Files are loaded when the config is validated (`gateway check`, reload) as well as when the
contexts are built, so a missing or mismatched file is reported at its key
(`tls.certificates[0].key: ...`) and a reload with one keeps the old contexts.
"""

from __future__ import annotations

import hashlib
import ssl
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import ListenerTlsConfig, UpstreamTlsConfig

ALPN = ["http/1.1"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Short names for the client certificate's subject, as OpenSSL prints them.
_RDN = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
        "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
        "emailAddress": "emailAddress", "domainComponent": "DC", "serialNumber": "serialNumber"}


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot be used; `key` is the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def load_certificate(cert: str, key: str, ctx: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """Load a certificate chain and its private key (into `ctx`, or a scratch server context)."""
    ctx = ctx or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        # OpenSSL does not say which of the two files is wrong: find out, to name the key.
        names = certificate_names(cert, strict=True) if _is_pem_cert(cert) else None
        if names is None:
            raise TlsFileError("cert", f"{cert!r} is not a PEM certificate ({_reason(exc)})"
                               ) from None
        raise TlsFileError("key", f"{key!r} is not the private key of {cert!r} or not a PEM "
                                  f"key ({_reason(exc)})") from None
    except OSError as exc:
        raise TlsFileError("cert", f"cannot read {cert!r}: {_reason(exc)}") from None
    return ctx


def check_ca(path: str) -> None:
    """A CA bundle that loads (at least one certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileError("ca", f"{path!r} is not a PEM CA bundle ({_reason(exc)})") from None
    if not ctx.get_ca_certs():
        raise TlsFileError("ca", f"{path!r} holds no CA certificate")


def _is_pem_cert(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"-----BEGIN CERTIFICATE-----" in f.read()
    except OSError:
        return False


def certificate_names(path: str, *, strict: bool = False) -> list[str] | None:
    """The DNS names a certificate file's first certificate serves: its subjectAltNames, or its
    common name when it has none. None when the file holds no parsable certificate."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        cert = x509.load_pem_x509_certificate(data)
    except (OSError, ValueError):
        return None if strict else []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [n.lower().rstrip(".") for n in names]


def client_subject(peercert: Any) -> str:
    """A verified client certificate's subject as `CN=...,O=...` (in the certificate's order);
    "" without one."""
    if not peercert:
        return ""
    parts = []
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            parts.append(f"{_RDN.get(name, name)}={value}")
    return ",".join(parts)


def server_context(cert: str, key: str, cfg: ListenerTlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(ALPN)
    load_certificate(cert, key, ctx)
    if cfg.client_ca:
        try:
            ctx.load_verify_locations(cafile=cfg.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileError("client_ca", f"{cfg.client_ca!r}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ListenerTls:
    """The listener's TLS: `context` goes to `create_server`; `update()` on reload."""

    def __init__(self, cfg: ListenerTlsConfig) -> None:
        self._default: ssl.SSLContext = None  # type: ignore[assignment]
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}
        self.handshakes = 0
        first = cfg.certificates[0]
        self.context = server_context(first.cert, first.key, cfg)
        self.context.sni_callback = self._on_sni
        self.update(cfg)

    def update(self, cfg: ListenerTlsConfig) -> None:
        """Re-read every certificate; ConfigError (naming the key) leaves the current ones."""
        contexts: list[tuple[ssl.SSLContext, list[str]]] = []
        for i, c in enumerate(cfg.certificates):
            try:
                ctx = server_context(c.cert, c.key, cfg)
            except TlsFileError as exc:
                key = "tls.client_ca" if exc.key == "client_ca" else \
                    f"tls.certificates[{i}].{exc.key}"
                raise ConfigError([f"{key}: {exc.message}"]) from None
            contexts.append((ctx, certificate_names(c.cert) or []))
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        for ctx, names in contexts:
            for name in names:     # the first certificate naming a host wins
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], ctx)
                else:
                    exact.setdefault(name, ctx)
        base = self.context
        # Settings copied into each connection when it is created (not switched by the SNI
        # callback): kept in step with the config on the base context.
        base.minimum_version = _VERSIONS[cfg.min_version]
        if cfg.client_ca:
            base.load_verify_locations(cafile=cfg.client_ca)
            base.verify_mode = ssl.CERT_REQUIRED
        else:
            base.verify_mode = ssl.CERT_NONE
        self._default, self._exact, self._wildcard = contexts[0][0], exact, wildcard

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self._exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(".")
            if dot > 0:
                ctx = self._wildcard.get(name[dot + 1:])
                if ctx is not None:
                    return ctx
        return self._default

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None,
                _ctx: ssl.SSLContext) -> None:
        self.handshakes += 1
        sslobj.context = self.select(server_name)


def files_stamp(cfg: UpstreamTlsConfig | None) -> bytes:
    """A digest of the contents of an upstream's TLS files (ca, cert, key): operators rotate
    certificates in place, so a reload compares contents, not paths (nor mtimes, which a copy
    may keep). An unreadable file counts as its own content; loading it reports the error."""
    h = hashlib.sha256()
    for path in (cfg.ca, cfg.cert, cfg.key) if cfg is not None else ():
        h.update(b"\0" if path is None else path.encode() + b"\0")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
            except OSError as exc:
                h.update(f"error {exc.errno}".encode())
    return h.digest()


def client_context(cfg: UpstreamTlsConfig | None) -> ssl.SSLContext:
    """The context for an upstream's https:// endpoints: the system trust store, or `ca`;
    hostname checking against the endpoint's host or `server_name`; a client certificate."""
    if cfg is None or cfg.ca is None:
        ctx = ssl.create_default_context()
    else:
        try:
            ctx = ssl.create_default_context(cafile=cfg.ca)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileError("ca", f"{cfg.ca!r} is not a PEM CA bundle ({_reason(exc)})"
                               ) from None
    if cfg is not None:
        if not cfg.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert and cfg.key:
            load_certificate(cfg.cert, cfg.key, ctx)
    ctx.set_alpn_protocols(ALPN)
    return ctx
