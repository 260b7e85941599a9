"""Headless Chromium for the dashboard tests: Debian's `chromium`, driven by Playwright.

No browser is downloaded (`playwright install` cannot run here): Playwright's own driver talks to
/usr/bin/chromium, which `.ci/run` installs. A missing browser is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

ARTIFACTS = ROOT / "tests" / "artifacts"

# The flags the machine notes ask for: no sandbox (root), no GPU, and nothing that phones home
# (the machine's closed network refuses those connections, noisily).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-features=Translate,MediaRouter,OptimizationHints",
]


def chromium_path() -> str:
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("chromium is not installed (apt-get install chromium chromium-driver)")


@dataclass
class PageLog:
    """What the page said: console errors/warnings, uncaught exceptions, failed requests."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        def on_console(msg: Any) -> None:
            text = f"{msg.text} @ {msg.location.get('url', '')}"
            if msg.type == "error":
                self.errors.append(text)
            elif msg.type == "warning":
                self.warnings.append(text)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("requestfailed",
                lambda req: self.failed.append(f"{req.method} {req.url}: {req.failure}"))

    def clear(self) -> None:
        self.errors.clear()
        self.warnings.clear()
        self.failed.clear()


@contextmanager
def chromium(user_data_dir: Path) -> Iterator[Any]:
    """A Playwright Browser on Debian's Chromium (sync API). Each context is a fresh profile."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    user_data_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        # launch() gives every context a fresh, empty profile of its own; the crash dumps and
        # caches of this run go to user_data_dir (the machine's HOME stays clean).
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS,
                                     env=dict(os.environ, HOME=str(user_data_dir)),
                                     timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path
