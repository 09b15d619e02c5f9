"""Catalog tables and queries (SQLAlchemy Core, one transaction per use case)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tuneforge_common.db import UtcDateTime, project_scope
from tuneforge_common.events import outbox_table
from tuneforge_common.paging import decode_token, encode_token, page_size

metadata = MetaData()

models = Table(
    "models",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("uri", Text, nullable=False),
    Column("architecture", String(255), nullable=False),
    Column("parameter_count", BigInteger, nullable=False),
    Column("context_length", Integer, nullable=False),
    Column("dtype", String(32), nullable=False),
    Column("has_chat_template", Boolean, nullable=False),
    Column("builtin", Boolean, nullable=False, default=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("tags", Text, nullable=False, default="[]"),  # JSON list
    Column("license", String(255), nullable=False, default=""),
    Column("size_bytes", BigInteger, nullable=False, default=0),
    Column("kind", String(16), nullable=False, default="BASE"),
    Column("lineage", Text, nullable=False, default="{}"),  # JSON ModelLineage
    Column("source", Text, nullable=False, default=""),
    Column("base_model_id", String(64), nullable=True, index=True),
    Column("updated_at", UtcDateTime, nullable=True),
    # NULL: built in, seen by every project.
    Column("project_id", String(64), nullable=True, index=True),
    Index("ux_models_project_name", "project_id", "name", unique=True),
)

datasets = Table(
    "datasets",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("uri", Text, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("row_count", BigInteger, nullable=False),
    Column("format", String(32), nullable=False),
    Column("columns", Text, nullable=False),  # JSON list
    Column("created_at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False, default="READY"),
    Column("validation", Text, nullable=False, default="{}"),  # JSON report
    Column("prompt_input_column", String(255), nullable=False, default=""),
    Column("prompt_output_column", String(255), nullable=False, default=""),
    Column("parent_dataset_id", String(64), nullable=True),
    Column("project_id", String(64), nullable=True, index=True),
)

# One row per stored content file. Uploads and deletes lock it, so a delete never removes bytes that an
# upload of the same content is about to point a dataset at.
dataset_contents = Table(
    "dataset_contents",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("uri", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

methods = Table(
    "methods",
    metadata,
    # Internal key: the bare name for built-ins, "<project>/<name>" for added methods. Callers use `name`,
    # unique per project, so two projects may each add a method of the same name.
    Column("id", String(160), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("display_name", String(255), nullable=False),
    Column("description", Text, nullable=False),
    Column("training_type", String(32), nullable=False),
    Column("lifecycle", String(32), nullable=False),
    Column("parameters", Text, nullable=False),  # JSON list of ParamSpec
    Column("entrypoint", Text, nullable=False),
    Column("builtin", Boolean, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("stages", Text, nullable=False, default="{}"),  # JSON, added methods only
    # Deleted methods leave selection but keep their id, so jobs that used them still name them.
    Column("deleted_at", UtcDateTime, nullable=True),
    Column("project_id", String(64), nullable=True, index=True),
    Index("ux_methods_project_name", "project_id", "name", unique=True),
)

projects = Table(
    "projects",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("created_at", UtcDateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),  # user | service
    Column("secret_hash", String(64), nullable=False),  # sha256 of the secret; the secret is never stored
    Column("superuser", Boolean, nullable=False),
    Column("created_by", String(32), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
)

key_roles = Table(
    "key_roles",
    metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id"), primary_key=True),
    Column("project_id", String(64), ForeignKey("projects.id"), primary_key=True),
    Column("role", Integer, nullable=False),  # tuneforge_common.auth.Role
)

outbox = outbox_table(metadata)

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


async def list_page(
    engine: AsyncEngine,
    table: Table,
    requested_size: int,
    page_token: str,
    order_by: Any,
    conditions: list[Any] | None = None,
) -> tuple[list[Any], str]:
    size = page_size(requested_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    offset = decode_token(page_token)
    if "project_id" in table.c:
        conditions = [*(conditions or []), project_scope(table.c.project_id, shared=True)]
    query = select(table).where(*(conditions or [])).order_by(*order_by).offset(offset).limit(size + 1)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    next_token = encode_token(offset + size) if len(rows) > size else ""
    return list(rows[:size]), next_token


async def lock_content(conn: AsyncConnection, sha256: str, uri: str, size: int, now: Any) -> None:
    """Make sure the content row exists and hold its lock until the transaction ends."""
    insert = (postgres_insert if conn.dialect.name == "postgresql" else sqlite_insert)(dataset_contents)
    await conn.execute(insert.values(sha256=sha256, uri=uri, size_bytes=size, created_at=now).on_conflict_do_nothing())
    await conn.execute(select(dataset_contents.c.sha256).where(dataset_contents.c.sha256 == sha256).with_for_update())


async def get_row(engine: AsyncEngine, table: Table, row_id: str) -> Any | None:
    """The row if the caller's project may see it (another project's row is as absent as a missing one)."""
    query = select(table).where(table.c.id == row_id)
    if "project_id" in table.c:
        query = query.where(project_scope(table.c.project_id, shared=True))
    async with engine.connect() as conn:
        return (await conn.execute(query)).first()


async def get_method_row(engine: AsyncEngine, name: str) -> Any | None:
    """The method the caller means by `name`: its project's, else the built-in (added methods can't take a
    built-in's name, so a project-bound caller matches at most one)."""
    query = (
        select(methods)
        .where(methods.c.name == name, project_scope(methods.c.project_id, shared=True))
        .order_by(methods.c.project_id.is_(None), methods.c.project_id)
        .limit(1)
    )
    async with engine.connect() as conn:
        return (await conn.execute(query)).first()


async def count(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(table))).scalar_one()
