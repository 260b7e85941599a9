"""TLS beside nginx, in one run: termination with keep-alive, new TLS connections per second,
and a plain route to an https:// upstream vs an http:// one.

    python benchmarks/tls.py [--rounds 3] [--duration 5] [--connections 32]

Starts benchmarks/upstream.py twice (plain and TLS, 12-byte body), nginx with one worker
terminating TLS in front of the plain one (benchmarks/nginx.py's settings plus `listen ... ssl`),
and three `gateway run` processes: TLS listener -> http upstream, plain listener -> https
upstream, plain -> http. Certificates from trustme (the test extra), TLS 1.2+ on both servers,
ECDSA P-256 keys. wrk (which does not verify certificates) drives every target in alternating
rounds so that drift on a shared machine hits all alike; the median of the rounds is reported,
with the ratios the issue targets:

  * TLS termination, keep-alive: gateway >= 0.4x nginx's req/s;
  * new TLS connections per second (`Connection: close`: a handshake per request, resumed or
    not as wrk's client does it against both): gateway >= 0.5x nginx's;
  * plain route to an https upstream vs to an http one (pooled keep-alive TLS: the cost is the
    record layer, not handshakes).

The floor is measured in the same rounds, to say where the time goes: a minimal uvloop TLS
responder (this file with `--floor`: the listener's TLS settings, a fixed 12-byte response, no
HTTP parsing, no proxying), i.e. what Python's `ssl` under uvloop costs before the gateway does
anything; and the same responder closing by abort (no TLS shutdown), for what uvloop's orderly
TLS close costs per connection.

Traffic only to 127.0.0.1, every run bounded by --duration.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import nginx as nginx_mod  # benchmarks/nginx.py
import psutil
import trustme
from run import ROOT, free_port, wait_port, wrk

TLS_BLOCK = """
    upstream up_{listen} {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{listen} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://up_{listen};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

GATEWAY = """
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin}"}}
{tls}
upstreams:
  - name: bench
    endpoints: ["{endpoint}"]
    max_connections: 512
{upstream_tls}
routes:
  - {{name: bench, upstream: bench, service: bench}}
"""


FLOOR_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n"
                  b"hello world\n")
FLOOR_CLOSE = FLOOR_RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


def floor(port: int, cert: str, key: str, abort: bool) -> None:
    """The floor: uvloop's TLS with the listener's settings and nothing above it (a whole
    request per read, as wrk sends them; `Connection: close` closes after the response).
    `abort`: close with transport.abort(), without the TLS shutdown (no close_notify, no wait
    for the client's): not a way to serve, a measurement of what the orderly close costs."""
    import asyncio

    import uvloop

    class Responder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            if b"onnection: close" in data:
                self.transport.write(FLOOR_CLOSE)
                if abort:
                    self.transport.abort()
                else:
                    self.transport.close()
                return
            n = data.count(b"\r\n\r\n")
            if n:
                self.transport.write(FLOOR_RESPONSE * n)

    async def serve() -> None:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(cert, key)
        server = await asyncio.get_running_loop().create_server(
            Responder, "127.0.0.1", port, backlog=4096, ssl=ctx)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


def main() -> int:
    if sys.argv[1:2] == ["--floor"]:
        floor(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:6] == ["abort"])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    nginx = nginx_mod.binary()
    if nginx is None:
        print("nginx is not installed (apt-get install nginx)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gw-tls-"))
    tmp.chmod(0o755)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_pem = tmp / "leaf.crt", tmp / "leaf.key", tmp / "ca.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca_pem.write_bytes(ca.cert_pem.bytes())
    for p in (cert, key, ca_pem):
        p.chmod(0o644)          # nginx's worker may run as another user
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up, up_tls = free_port(), free_port()
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "benchmarks/upstream.py"),
                                       str(up)]))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "benchmarks/upstream.py"),
                                       str(up_tls), "12", str(cert), str(key)]))
        wait_port(up)
        wait_port(up_tls)
        ng = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_mod.CONF.format(tmp=tmp, blocks=TLS_BLOCK.format(
            listen=ng, upstream=up, cert=cert, key=key)))
        procs.append(subprocess.Popen(nginx_mod.command(nginx, tmp, conf),
                                      stderr=subprocess.DEVNULL))
        wait_port(ng)
        listener_tls = f"tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}"
        gateways = {
            "gw_tls": (listener_tls, f"http://127.0.0.1:{up}", ""),
            "gw_to_https": ("", f"https://localhost:{up_tls}", f"    tls: {{ca: {ca_pem}}}"),
            "gw_to_http": ("", f"http://127.0.0.1:{up}", ""),
        }
        ports: dict[str, int] = {"nginx_tls": ng}
        pids: dict[str, int] = {"nginx_tls": procs[-1].pid}
        for name, (tls, endpoint, upstream_tls) in gateways.items():
            port = free_port()
            path = tmp / f"{name}.yaml"
            path.write_text(GATEWAY.format(port=port, admin=free_port(), tls=tls,
                                           endpoint=endpoint, upstream_tls=upstream_tls))
            procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config",
                                           str(path)], stderr=subprocess.DEVNULL, cwd=tmp))
            wait_port(port)
            ports[name] = port
            pids[name] = procs[-1].pid
        for name, how in (("floor", "close"), ("floor_abort", "abort")):
            ports[name] = free_port()
            procs.append(subprocess.Popen([sys.executable, __file__, "--floor", str(ports[name]),
                                           str(cert), str(key), how], cwd=ROOT))
            wait_port(ports[name])
            pids[name] = procs[-1].pid

        def https(server: str) -> str:
            return f"https://127.0.0.1:{ports[server]}/"

        targets = {
            "nginx_tls_ka": (https("nginx_tls"), False, "nginx_tls"),
            "gw_tls_ka": (https("gw_tls"), False, "gw_tls"),
            "floor_ka": (https("floor"), False, "floor"),
            "nginx_tls_new": (https("nginx_tls"), True, "nginx_tls"),
            "gw_tls_new": (https("gw_tls"), True, "gw_tls"),
            "floor_new": (https("floor"), True, "floor"),
            "floor_abort_new": (https("floor_abort"), True, "floor_abort"),
            "gw_to_https": (f"http://127.0.0.1:{ports['gw_to_https']}/", False, "gw_to_https"),
            "gw_to_http": (f"http://127.0.0.1:{ports['gw_to_http']}/", False, "gw_to_http"),
        }
        for url, close, _ in targets.values():
            wrk(url, 1, args.connections, close=close)   # warm-up
        rps: dict[str, list[float]] = {t: [] for t in targets}
        cpu: dict[str, list[float]] = {t: [] for t in targets}
        for i in range(args.rounds):
            for name, (url, close, server) in targets.items():
                proc = psutil.Process(pids[server])
                tree = [proc, *proc.children(recursive=True)]
                t0 = sum(sum(p.cpu_times()[:2]) for p in tree)
                r = wrk(url, args.duration, args.connections, close=close)
                t1 = sum(sum(p.cpu_times()[:2]) for p in tree)
                rps[name].append(r["rps"])
                cpu[name].append((t1 - t0) / max(1.0, r["rps"] * args.duration) * 1e6)
            print(f"round {i + 1}: " + ", ".join(f"{t} {rps[t][-1]:,.0f}" for t in targets),
                  flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    med = {t: statistics.median(v) for t, v in rps.items()}
    us = {t: statistics.median(v) for t, v in cpu.items()}
    print(f"\n{args.rounds} alternating rounds of {args.duration} s, wrk -c{args.connections}; "
          "medians (server CPU per request: the server's process tree)\n")
    rows = [("nginx, 1 worker, TLS keep-alive", "nginx_tls_ka", None),
            ("gateway, TLS keep-alive", "gw_tls_ka", "nginx_tls_ka"),
            ("floor: uvloop TLS responder, keep-alive", "floor_ka", "nginx_tls_ka"),
            ("nginx, 1 worker, new TLS connection per request", "nginx_tls_new", None),
            ("gateway, new TLS connection per request", "gw_tls_new", "nginx_tls_new"),
            ("floor: uvloop TLS responder, new connection", "floor_new", "nginx_tls_new"),
            ("floor, closed by abort (no TLS shutdown)", "floor_abort_new", "floor_new"),
            ("gateway, plain route to an http upstream", "gw_to_http", None),
            ("gateway, plain route to an https upstream", "gw_to_https", "gw_to_http")]
    def paired(t: str, anchor: str) -> float:
        """The median over rounds of the ratio within each round (measured back to back)."""
        return statistics.median(a / b for a, b in zip(rps[t], rps[anchor]))

    print("| target | req/s | server CPU us/req | ratio (median of per-round ratios) |")
    print("|---|--:|--:|--:|")
    for label, t, anchor in rows:
        ratio = f"{paired(t, anchor):.2f}x ({med[t] / med[anchor]:.2f}x of medians)" \
            if anchor else "anchor"
        print(f"| {label} | {med[t]:,.0f} | {us[t]:.1f} | {ratio} |")
    checks = [("TLS termination keep-alive >= 0.4x nginx", paired("gw_tls_ka", "nginx_tls_ka"),
               0.4),
              ("new TLS connections/s >= 0.5x nginx", paired("gw_tls_new", "nginx_tls_new"),
               0.5)]
    print()
    for label, value, threshold in checks:
        print(f"- **{'PASS' if value >= threshold else 'FAIL'}** {label}: {value:.2f}x")
    # Contention on a shared machine slows nginx more than the gateway, which flatters the
    # req/s ratios; server CPU per request does not depend on who got the cores.
    print(f"- by server CPU per request (nginx's / the gateway's, medians): keep-alive "
          f"{us['nginx_tls_ka'] / us['gw_tls_ka']:.2f}x, new connections "
          f"{us['nginx_tls_new'] / us['gw_tls_new']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
