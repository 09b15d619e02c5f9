"""Shared fixtures: the machine's real PostgreSQL and NATS, each test run in its own database and stream.

When PostgreSQL or NATS is unreachable the tests that need them fail (never skip): a green run
must mean the storage and event paths were exercised.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlparse

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get("TUNEFORGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("TUNEFORGE_TEST_NATS_URL", "nats://127.0.0.1:4222")
RUN_ID = uuid.uuid4().hex[:10]


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=3):
            return True
    except OSError:
        return False


def require(url: str, port: int, what: str) -> None:
    if not _reachable(url, port):
        pytest.fail(f"{what} is not reachable at {url}: these tests need it (they never skip)")


def _fresh_postgres_database() -> Iterator[str]:
    from tuneforge_common.db import create_postgres_database, drop_postgres_databases

    require(PG_ADMIN_URL, 5432, "PostgreSQL")
    url = asyncio.run(create_postgres_database(PG_ADMIN_URL, f"tuneforge_test_{RUN_ID}"))
    yield url
    asyncio.run(drop_postgres_databases(PG_ADMIN_URL, [url]))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards; yields its asyncpg URL."""
    yield from _fresh_postgres_database()


@pytest.fixture
def second_postgres_url() -> Iterator[str]:
    """Another fresh database, for a second service: services never share tables."""
    yield from _fresh_postgres_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """Store tests run on both engines from the same code."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def nats_url() -> str:
    require(NATS_URL, 4222, "NATS")
    return NATS_URL


@pytest.fixture
def event_names() -> tuple[str, str]:
    """(stream, subject root) unique to this test so runs never collide on the shared server."""
    suffix = uuid.uuid4().hex[:10]
    return f"TUNEFORGE_TEST_{suffix}", f"tftest{suffix}"


@pytest.fixture
async def js_cleanup(nats_url: str, event_names: tuple[str, str]) -> AsyncIterator[None]:
    yield
    import nats

    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_stream(event_names[0])
    except Exception:
        pass
    await nc.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The embedded default stack (`tuneforge up` as a process), one for the whole session, shared by the
    end-to-end and browser tests (starting one takes seconds). On its first start `tuneforge up` prints
    TUNEFORGE_ADMIN_KEY=<key> once: the stack's http client sends it as a Bearer token and `api_key` is what an
    OpenAI client should send ("unused" for a stack that prints none, i.e. without API keys). A test that stops
    a stack starts its own with tests.e2e.embedded.start_stack."""
    from tests.e2e.embedded import start_stack, stop_stack_process

    started = start_stack(tmp_path_factory.mktemp("embedded"))
    yield started
    started.http.close()
    stop_stack_process(started.proc)
