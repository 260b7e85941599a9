"""A real HTTP/1.1 upstream on 127.0.0.1 whose every answer a test scripts: status, delay,
connection resets, a response cut after its head, latency that depends on requests in flight.

A raw asyncio server (keep-alive, Content-Length bodies) rather than aiohttp, so a reset is a
real reset and the server costs little next to the gateway under load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str
    port: int


@dataclass(frozen=True, slots=True)
class Answer:
    status: int = 200
    delay_s: float = 0.0
    reset: bool = False                 # close the connection instead of answering
    cut_after: int | None = None        # send the head and this many body bytes, then reset
    body: bytes = b"ok\n"


Script = Callable[[Seen, int], Answer | Awaitable[Answer]]
"""(the request, requests in flight including it) -> what to do."""


@dataclass
class ScriptedUpstream:
    script: Script
    ports: list[int] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    inflight: int = 0
    _servers: list[asyncio.base_events.Server] = field(default_factory=list)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def start(self, listeners: int = 1) -> None:
        for _ in range(listeners):
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        for s in self._servers:
            await s.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                seen = Seen(method, target, port)
                self.seen.append(seen)
                self.inflight += 1
                try:
                    answer = self.script(seen, self.inflight)
                    if not isinstance(answer, Answer):
                        answer = await answer
                    if answer.delay_s:
                        await asyncio.sleep(answer.delay_s)
                finally:
                    self.inflight -= 1
                if answer.reset:
                    writer.transport.abort()
                    return
                body = answer.body
                writer.write(b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\nContent-Length: "
                             b"%d\r\n\r\n" % (answer.status, len(body)))
                if answer.cut_after is not None:
                    writer.write(body[:answer.cut_after])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.transport.abort()
                    return
                writer.write(body)
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            writer.close()
