"""Browser tests: the dashboard in headless Chromium (Debian's `chromium`, driven by Playwright through its
executable path; never `playwright install`), against the session's embedded stack (tests/conftest.py).

Without chromium the tests skip with the reason, except under CI=true where that is a failure: a green CI run
must mean the dashboard was exercised. Screenshots go to tests/output/screenshots/ (gitignored).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

SCREENSHOTS = Path(__file__).resolve().parents[1] / "output" / "screenshots"
SIZES = {"1280x800": (1280, 800), "1920x1080": (1920, 1080)}


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


# Module-scoped, not session-scoped: while Playwright's sync API is started its event loop counts as running in
# this thread, so the async tests that follow in the same session (pytest-asyncio) could not start theirs.
@pytest.fixture(scope="module")
def browser() -> Iterator:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox can't start.
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, stack) -> Iterator:
    from tuneforge_gateway.web import WEB_DIR

    if not (WEB_DIR / "index.html").is_file():
        pytest.fail(f"the dashboard is not built in {WEB_DIR}: run `make install` (or `make dashboard`)")
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=stack.url)
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    yield opened
    context.close()


@pytest.fixture
def screenshot(page):
    """screenshot(name): the page at each size, as tests/output/screenshots/<name>-<size>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(name: str) -> None:
        for size, (width, height) in SIZES.items():
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(150)  # the charts resize on the window's resize event
            page.screenshot(path=SCREENSHOTS / f"{name}-{size}.png")
        page.set_viewport_size({"width": 1280, "height": 800})

    return take


@pytest.fixture
def started(stack) -> Iterator[list[str]]:
    """Ids of the jobs a test started: each still running at the end is terminated, so none holds the stack's one
    agent for the tests after it."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        stack.http.post(f"/api/v1/jobs/{job_id}/cancel")  # a 409 once it is over: nothing to do then
