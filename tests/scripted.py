"""A real HTTP/1.1 upstream on 127.0.0.1 whose every answer a test scripts: status, delay,
connection resets, a response cut after its head, latency that depends on requests in flight.

A raw asyncio server (keep-alive, Content-Length bodies) rather than aiohttp, so a reset is a
real reset and the server costs little next to the gateway under load.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path


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


def knee(threshold: int = 20, fast_s: float = 0.005, slow_s: float = 0.5) -> Script:
    """An upstream that answers in `fast_s` until more than `threshold` requests are in flight,
    and in `slow_s` beyond (a queue forming inside it)."""
    def script(seen: Seen, inflight: int) -> Answer:
        return Answer(200, delay_s=fast_s if inflight <= threshold else slow_s)
    return script


@dataclass(frozen=True, slots=True)
class LoadResult:
    admitted_s: list[float]          # latencies of the 200s
    refused_s: list[float]           # latencies of the 503s
    other: int                       # anything else

    def p99_ms(self, which: str = "admitted") -> float:
        xs = sorted(self.admitted_s if which == "admitted" else self.refused_s)
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000 if xs else float("nan")


async def closed_loop(url: str, clients: int, duration_s: float,
                      warmup_s: float = 0.0, backoff_s: float = 0.1) -> LoadResult:
    """`clients` loops each sending GETs back to back for `warmup_s` + `duration_s`; the
    answers of the last `duration_s` are counted. After a 503 a client waits `backoff_s` (less
    than the Retry-After it is given, but not a tight loop of refusals)."""
    import time

    import aiohttp
    admitted: list[float] = []
    refused: list[float] = []
    other = 0
    start = time.monotonic()
    counted_from = start + warmup_s
    end = counted_from + duration_s

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal other
        while (t0 := time.monotonic()) < end:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError:
                status = 0
            dt = time.monotonic() - t0
            if status == 503:
                await asyncio.sleep(backoff_s)
            if t0 < counted_from:
                continue
            if status == 200:
                admitted.append(dt)
            elif status == 503:
                refused.append(dt)
            else:
                other += 1

    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients * 2),
            timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return LoadResult(admitted, refused, other)


class KneeProcess:
    """`knee()` in a process of its own (`python -m tests.scripted THRESHOLD FAST_S SLOW_S`), so
    that the clients' event loop does not delay its answers."""

    def __init__(self, threshold: int = 20, fast_s: float = 0.005, slow_s: float = 0.5) -> None:
        self.args = [str(threshold), str(fast_s), str(slow_s)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.scripted", *self.args],
                                     stdout=subprocess.PIPE, cwd=root,
                                     env=dict(os.environ, PYTHONPATH=str(root)))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()       # its port, once it listens
        if not line:
            raise RuntimeError("the knee upstream did not start")
        self.url = f"http://127.0.0.1:{int(line)}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None


async def _serve_knee(threshold: int, fast_s: float, slow_s: float) -> None:
    up = ScriptedUpstream(knee(threshold, fast_s, slow_s))
    await up.start()
    print(up.ports[0], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop
    uvloop.run(_serve_knee(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])))


def histogram(metrics: str, name: str, label: str) -> dict[float, float]:
    """The cumulative buckets `le -> count` of one histogram series in a text exposition."""
    out: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith(name + "_bucket{") and label in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def share_within(before: dict[float, float], after: dict[float, float],
                 bound_s: float) -> tuple[float, float]:
    """(observations between two scrapes, the share of them within `bound_s`)."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    within = after[bound_s] - before.get(bound_s, 0.0)
    return total, (within / total if total else float("nan"))
