"""One async SQLAlchemy setup for PostgreSQL (asyncpg) and SQLite (aiosqlite); Alembic migrations."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, or_, true
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.types import DateTime, TypeDecorator

from . import auth


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


class UtcDateTime(TypeDecorator):
    """Timezone-aware UTC on both engines (SQLite hands back naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(dt.UTC) if value is not None else None

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the one writer; busy_timeout waits instead of failing.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            # With WAL, NORMAL loses no committed data on a process crash (only on power loss) and spares an
            # fsync per commit.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


async def create_postgres_database(admin_url: str, prefix: str) -> str:
    """A new empty PostgreSQL database, `prefix` and a random suffix, on the server of `admin_url` (a libpq URL);
    its SQLAlchemy (asyncpg) URL. For tests and benchmarks: each makes its own, so runs never collide."""
    import asyncpg  # here: SQLite deployments need no PostgreSQL driver

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{admin_url.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+asyncpg://')}/{name}"


async def drop_postgres_databases(admin_url: str, urls: Iterable[str]) -> None:
    """Drop databases made by create_postgres_database, by their URLs, sessions still on them or not."""
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        for url in urls:
            await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def fresh_postgres_databases(admin_url: str, prefix: str, count: int = 1) -> AsyncIterator[list[str]]:
    """`count` new PostgreSQL databases (their SQLAlchemy URLs), dropped afterwards even when the body fails."""
    urls: list[str] = []
    try:
        for _ in range(count):
            urls.append(await create_postgres_database(admin_url, prefix))
        yield urls
    finally:
        await drop_postgres_databases(admin_url, urls)


async def migrate(engine: AsyncEngine, migrations_dir: Path, version_table: str, revision: str = "head") -> None:
    """Upgrade the service's tables to the latest Alembic revision (to `revision`, for migration tests)."""

    def _upgrade(sync_conn: Connection) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir))
        cfg.attributes["connection"] = sync_conn
        cfg.attributes["version_table"] = version_table
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


def run_alembic_env(context: Any, target_metadata: Any) -> None:
    """Body of every service's migrations/env.py (online mode, connection handed in by migrate())."""
    cfg = context.config
    connection = cfg.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=cfg.attributes["version_table"],
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def project_scope(column: Any, shared: bool) -> Any:
    """The rows the current caller may see: its project's, plus with `shared` the built-in rows (NULL
    project); everything for internal callers acting across projects."""
    caller = auth.current()
    if caller.unscoped:
        return true()
    mine = column == (caller.project or "")
    return or_(mine, column.is_(None)) if shared else mine


def owning_project() -> str | None:
    """The project a new row belongs to: the caller's; NULL (shared) only for internal/system callers."""
    caller = auth.current()
    return None if caller.unscoped else (caller.project or "")
