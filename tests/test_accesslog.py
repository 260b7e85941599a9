"""The access log: JSON lines, buffered off the loop, flushed by time, size and close."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import accesslog
from gateway.accesslog import AccessLog
from tests.fakes import FakeClock


def entry(i: int, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "request_id": f"req-{i}", "method": "GET", "path": f"/pay/{i}", "route": "payments-api",
        "upstream": "payments", "status": 200, "duration_ms": 12.3456, "bytes_in": 10,
        "bytes_out": 200, "limit": "allowed", "breaker": "closed"}
    kw.update(over)
    return kw


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def wait_for_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return lines(path)
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} lines did not appear in {path} within {timeout}s")


async def test_lines_are_json_and_appear_after_the_timed_flush(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    log = AccessLog(str(out), clock=FakeClock(wall=1_700_000_000.25), flush_interval_s=0.05)
    await log.start()
    try:
        log.log(**entry(1))
        log.log(**entry(2, path="/pay/2?api_key=sk_live_secret&x=1", status=429,
                        limit="limited", upstream="-", breaker=None))
        assert out.read_bytes() == b""          # buffered, not written on the request's path
        got = await wait_for_lines(out, 2)
    finally:
        await log.close()
    assert got[0] == {"time": "2023-11-14T22:13:20.250Z", "request_id": "req-1", "method": "GET",
                      "path": "/pay/1", "route": "payments-api", "upstream": "payments",
                      "status": 200, "duration_ms": 12.346, "bytes_in": 10, "bytes_out": 200,
                      "limit": "allowed", "breaker": "closed", "trace_id": ""}
    assert got[1]["path"] == "/pay/2"            # no query string, so no api_key
    assert (got[1]["status"], got[1]["limit"], got[1]["breaker"]) == (429, "limited", None)
    assert "secret" not in out.read_text()


async def test_64_kib_pending_flushes_before_the_timer(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    log = AccessLog(str(out), flush_interval_s=30)   # the timer alone would take 30 s
    await log.start()
    try:
        n = 0
        while n * 200 < accesslog.FLUSH_BYTES * 1.2:
            log.log(**entry(n))
            n += 1
        got = await wait_for_lines(out, n)
        assert [x["request_id"] for x in got] == [f"req-{i}" for i in range(n)]
    finally:
        await log.close()


async def test_close_writes_everything_pending(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    log = AccessLog(str(out), flush_interval_s=30)
    await log.start()
    for i in range(1000):
        log.log(**entry(i))
    await log.close()
    got = lines(out)
    assert [x["request_id"] for x in got] == [f"req-{i}" for i in range(1000)]
    # appends: a second run adds to the same file
    again = AccessLog(str(out))
    again.log(**entry(1000))       # logging before start() is buffered too
    await again.start()
    await again.close()
    assert len(lines(out)) == 1001


async def test_default_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog()
    await log.start()
    log.log(**entry(7))
    await log.close()
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert json.loads(line)["request_id"] == "req-7"


async def test_lines_beyond_the_pending_cap_are_dropped_and_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog, "MAX_PENDING_BYTES", 2000)
    out = tmp_path / "access.log"
    log = AccessLog(str(out))
    for i in range(50):               # no flusher running: the writer "cannot keep up"
        log.log(**entry(i))
    assert 0 < log.dropped < 50
    await log.start()
    await log.close()
    got = lines(out)
    kept = [x for x in got if "request_id" in x]
    assert got[-1] == {"dropped": log.dropped}
    assert len(kept) + log.dropped == 50


async def test_odd_values_never_raise(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    log = AccessLog(str(out))
    log.log(**entry(1, status=object(), duration_ms=float("nan")))
    await log.close()
    (got,) = lines(out)
    assert got["request_id"] == "req-1"
