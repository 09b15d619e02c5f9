"""Signing in to the dashboard, as every browser test starts."""

from __future__ import annotations


def sign_in(page, key: str, then: str | None = "who") -> None:
    """Signs in with `key` on the sign-in page, then waits for the element with test id `then` (the top bar's
    key name by default; None waits for nothing, for a key the gateway refuses)."""
    page.goto("/")
    page.get_by_test_id("api-key").fill(key)
    page.get_by_test_id("sign-in").click()
    if then:
        page.get_by_test_id(then).wait_for()
