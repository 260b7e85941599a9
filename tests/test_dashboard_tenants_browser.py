"""The dashboard's tenants page in headless Chromium against a real `gateway control` process fed
through /v1/ingest: usage bars per window, nearest their quota first, overrides on a tenant's
page, hidden for the reader role. Screenshot: tests/artifacts/tenants.png."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import PageLog, chromium, screenshot
from tests.conftest import free_port, wait_port
from tests.test_control_support import batch, series

TOKENS = {"admin": "t-admin-0123", "reader": "t-reader-0123", "gateway": "t-ingest-0123"}


def api(base: str, path: str, role: str, body: Any = None, method: str = "POST") -> Any:
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKENS[role]}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tenants-dash")
    port = free_port()
    cfg = tmp / "control.yaml"
    cfg.write_text(f'listen: "127.0.0.1:{port}"\ndatabase: "{tmp / "control.db"}"\ntokens:\n'
                   + "".join(f"  - {{name: {r}-user, role: {r}, token: {t}}}\n"
                             for r, t in TOKENS.items()))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "control", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    try:
        wait_port(port, 20)
        url = f"http://127.0.0.1:{port}"
        now = time.time()
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        month = day[:7]
        rows = [("busy", 950, 12, "starter", [("day", day, 1000), ("month", month, 20000)]),
                ("calm", 10, 0, "free", [("day", day, 1000)]),
                ("mid", 820, 0, "free", [("day", day, 1000)])]
        doc = batch("b1", now - 5, [series()], length=1.0, tenants=[
            {"tenant": t, "plan": p, "admitted": a, "rejected": r,
             "windows": [{"window": k, "id": i, "limit": lim} for k, i, lim in ws]}
            for t, a, r, p, ws in rows])
        api(url, "/v1/ingest", "gateway", doc)
        api(url, "/v1/tenants/busy/quotas", "admin",
            {"daily_quota": 2000, "reason": "launch week", "expires_at": now + 86400})
        api(url, "/v1/tenants/busy/quotas", "admin",
            {"qps": 50, "effective_date": now + 3600, "reason": "tomorrow"})
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wait_until(page: Any, js: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {js}")
        page.wait_for_timeout(50)


@pytest.mark.timeout(120)
def test_tenants_page_shows_usage_bars_and_overrides(control: str, tmp_path: Path) -> None:
    with chromium(tmp_path / "chromium") as browser:
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        log = PageLog()
        log.attach(page)
        page.goto(control + "/")
        page.fill("#token", TOKENS["admin"])
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector('#whoami[data-role="admin"]')
        assert page.locator('#nav a[data-nav="tenants"]').is_visible()
        page.evaluate("() => { location.hash = '#/tenants' }")
        page.wait_for_selector(".tenant-row")
        wait_until(page, "() => document.body.dataset.loading === 'false'")
        order = page.eval_on_selector_all(".tenant-row", "rs => rs.map(r => r.dataset.tenant)")
        assert order == ["busy", "mid", "calm"]              # nearest their quota first
        busy = page.locator('.tenant-row[data-tenant="busy"]')
        assert busy.locator(".tenant-window").count() == 2
        day_bar = busy.locator('.tenant-window[data-window="day"] .bar')
        assert float(day_bar.get_attribute("aria-valuenow") or 0) == 95.0
        assert "warning" in (busy.locator('.tenant-window[data-window="day"] .fill')
                             .get_attribute("class") or "")
        text = busy.inner_text()
        assert "950 of 1,000" in text and "12 rejected" in text and "plan starter" in text
        assert "override day 2,000" in text
        screenshot(page, "tenants.png")
        busy.locator("a").first.click()
        page.wait_for_selector(".view.tenants table")
        wait_until(page, "() => document.body.dataset.loading === 'false'")
        states = page.eval_on_selector_all(".view.tenants table tbody tr td:first-child",
                                           "ts => ts.map(t => t.innerText.trim())")
        assert states == ["pending", "active"]
        assert log.errors == []
        ctx.close()

        reader = browser.new_context()
        rp = reader.new_page()
        rp.goto(control + "/")
        rp.fill("#token", TOKENS["reader"])
        rp.click("#signin-form button[type=submit]")
        rp.wait_for_selector('#whoami[data-role="reader"]')
        assert rp.locator('#nav a[data-nav="tenants"]').is_hidden()
        reader.close()
