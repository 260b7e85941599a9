"""A deliberately minimal keep-alive HTTP/1.1 upstream for benchmarks (12-byte body).

It must never be the bottleneck, so it is a raw asyncio.Protocol on uvloop that answers every
request with the same bytes. `python benchmarks/upstream.py PORT [BODY_BYTES [CERT KEY]]`
(with CERT and KEY it speaks TLS, for https:// upstream benchmarks).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


def make_response(size: int) -> bytes:
    body = b"hello world\n" if size == 12 else b"x" * size
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Echo(asyncio.Protocol):
    response = make_response(12)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        # Requests here carry no body: each ends at a blank line.
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(self.response * n)  # type: ignore[attr-defined]


async def main(port: int, size: int, tls: tuple[str, str] | None = None) -> None:
    Echo.response = make_response(size)
    loop = asyncio.get_running_loop()
    ctx = None
    if tls is not None:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096, ssl=ctx)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 12,
                    (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else None))
