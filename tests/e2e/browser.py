"""Drive Debian's headless Chromium from tests, through the ``playwright`` package.

Playwright's own browser download (``playwright install``) cannot run on these machines, so the
helper launches the system Chromium (``/usr/bin/chromium``, from ``make browser``) with the flags
this closed network needs, in a fresh profile each time. The functions are synchronous; from an
async test call them through ``asyncio.to_thread`` so the test's event loop keeps serving.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Final

import pytest

CHROMIUM_CANDIDATES: Final = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# network refuses; --no-sandbox because tests run as root.
CHROMIUM_ARGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
_POLL_S: Final = 0.1


def _missing(what: str) -> None:
    """Fail under CI=true (a missing tool is a broken setup there), else skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {what}")
    pytest.skip(what)


def chromium_binary() -> str:
    """Return the path of the system Chromium; fail under CI=true when it is missing, else skip."""
    for candidate in (*CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _missing("Chromium is missing (run `make browser`)")
    raise AssertionError("unreachable")  # pytest.fail/skip raise


def open_and_wait(url: str, *, until_text: str, screenshot: Path, timeout_s: float) -> str:
    """Open ``url`` in headless Chromium, wait until the page's text contains ``until_text``,
    save a screenshot, and return the page's final text.

    Poll the text rather than wait on one navigation, so pages that reload themselves (a solved
    challenge landing on the API) are followed. On timeout, keep the screenshot of what the page
    showed and fail with its text and the browser console.
    """
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is missing (pip install playwright)")
        raise
    binary = chromium_binary()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    console: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="extauthz-chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=binary,
            headless=True,
            args=list(CHROMIUM_ARGS),
            timeout=timeout_s * 1000,
        )
        try:
            page = context.new_page()
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
            page.goto(url, timeout=timeout_s * 1000, wait_until="domcontentloaded")
            deadline = time.monotonic() + timeout_s
            text = ""
            while True:
                try:
                    text = page.inner_text("body", timeout=1000)
                except PlaywrightError:
                    text = ""  # mid-navigation: the old document is gone, the new one not ready
                if until_text in text or time.monotonic() > deadline:
                    break
                time.sleep(_POLL_S)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    if until_text not in text:
        pytest.fail(
            f"{until_text!r} did not appear within {timeout_s}s at {url}; page text:\n{text}\n"
            f"console:\n" + "\n".join(console)
        )
    return text
