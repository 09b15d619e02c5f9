"""The embedded default stack (`tuneforge up` as a process) for the end-to-end tests.

One stack serves the whole session, shared by every module (starting one takes seconds a module need not
spend again); a test that stops a stack starts its own with `start_stack`. On its first start `tuneforge up`
prints TUNEFORGE_ADMIN_KEY=<key> once: the stack's http client sends it as a Bearer token and `api_key` is
what an OpenAI client should send ("unused" for a stack that prints none, i.e. without API keys).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.embedded import Stack, start_stack, stop_stack_process


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("embedded"))
    yield started
    started.http.close()
    stop_stack_process(started.proc)
