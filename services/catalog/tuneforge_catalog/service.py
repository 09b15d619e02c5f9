"""Catalog use cases: each takes its dependencies explicitly and runs one transaction."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tuneforge_common import methods as method_defs
from tuneforge_common.artifacts import ArtifactStore
from tuneforge_common.db import new_id, utcnow
from tuneforge_common.errors import InvalidArgument, NotFound, ResourceExhausted
from tuneforge_common.events import write_event
from tuneforge_common.params import ParamSpec, resolve_parameters, specs_from_dataclass

from . import store
from .datasets import DatasetStats, inspect_jsonl
from .models import inspect_model_dir


@dataclass
class Catalog:
    engine: AsyncEngine
    artifacts: ArtifactStore
    subject_root: str
    max_dataset_bytes: int
    on_event: Any = None  # called after a commit that wrote an outbox row

    def _subject(self, entity: str, event: str) -> str:
        return f"{self.subject_root}.catalog.{entity}.{event}"

    def _notify(self) -> None:
        if self.on_event:
            self.on_event()

    # -- methods --------------------------------------------------------------

    async def sync_builtin_methods(self) -> None:
        """Upsert the built-in methods so their schema follows the installed code."""
        async with self.engine.begin() as conn:
            for m in method_defs.BUILTIN_METHODS:
                values = dict(
                    display_name=m.display_name,
                    description=m.description,
                    training_type=m.training_type,
                    lifecycle=m.lifecycle,
                    entrypoint=m.entrypoint,
                    builtin=True,
                    parameters=json.dumps([s.to_json() for s in specs_from_dataclass(m.params)]),
                )
                existing = (await conn.execute(select(store.methods.c.id).where(store.methods.c.id == m.id))).first()
                if existing:
                    await conn.execute(store.methods.update().where(store.methods.c.id == m.id).values(**values))
                else:
                    await conn.execute(store.methods.insert().values(id=m.id, created_at=utcnow(), **values))

    async def get_method(self, method_id: str) -> Any:
        row = await store.get_row(self.engine, store.methods, method_id)
        if row is None:
            raise NotFound(f"method {method_id!r} not found")
        return row

    async def resolve_parameters(self, method_id: str, given: dict[str, Any]) -> dict[str, Any]:
        row = await self.get_method(method_id)
        specs = [ParamSpec.from_json(s) for s in json.loads(row.parameters)]
        return resolve_parameters(specs, given)

    # -- models ---------------------------------------------------------------

    async def register_model_dir(self, path: Path, name: str, description: str = "", builtin: bool = False) -> Any:
        """Register a local Hugging Face directory; idempotent by name for seeded models."""
        info = await asyncio.to_thread(inspect_model_dir, path)
        uri = str(await asyncio.to_thread(path.resolve))
        async with self.engine.begin() as conn:
            existing = (await conn.execute(select(store.models).where(store.models.c.name == name))).first()
            if existing:
                return existing
            model_id = name if builtin else new_id("model")
            await conn.execute(
                store.models.insert().values(
                    id=model_id,
                    name=name,
                    description=description,
                    uri=uri,
                    architecture=info.architecture,
                    parameter_count=info.parameter_count,
                    context_length=info.context_length,
                    dtype=info.dtype,
                    has_chat_template=info.has_chat_template,
                    builtin=builtin,
                    created_at=utcnow(),
                )
            )
            await write_event(
                conn, store.outbox, self._subject("model", "registered"), {"model_id": model_id, "name": name}
            )
        self._notify()
        return await store.get_row(self.engine, store.models, model_id)

    async def get_model(self, model_id: str) -> Any:
        row = await store.get_row(self.engine, store.models, model_id)
        if row is None:
            raise NotFound(f"model {model_id!r} not found")
        return row

    # -- datasets -------------------------------------------------------------

    async def get_dataset(self, dataset_id: str) -> Any:
        row = await store.get_row(self.engine, store.datasets, dataset_id)
        if row is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return row

    def _validate_and_store(self, tmp_path: str, uri: str) -> DatasetStats:
        with open(tmp_path, "rb") as fh:
            stats = inspect_jsonl(fh)
        if not self.artifacts.exists(uri):  # same bytes, same content: stored once
            self.artifacts.put_file_atomic(tmp_path, uri)
        return stats

    async def upload_dataset(self, name: str, description: str, chunks: AsyncIterator[bytes]) -> Any:
        """Stream to a temporary file while hashing, validate, then store content-addressed.

        Nothing is written to the store or the database unless the whole upload is valid.
        """
        name = name.strip()
        if not name:
            raise InvalidArgument.for_field("name", "is required")
        if len(name) > 255:
            raise InvalidArgument.for_field("name", "must be at most 255 characters")
        digest = hashlib.sha256()
        size = 0
        fd, tmp_path = tempfile.mkstemp(prefix="tuneforge-upload-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_dataset_bytes:
                        raise ResourceExhausted(f"dataset exceeds the upload limit of {self.max_dataset_bytes} bytes")
                    digest.update(chunk)
                    await asyncio.to_thread(fh.write, chunk)
            if size == 0:
                raise InvalidArgument.for_field("content", "upload is empty")
            sha = digest.hexdigest()
            uri = self.artifacts.uri("datasets", "sha256", f"{sha}.jsonl")
            stats = await asyncio.to_thread(self._validate_and_store, tmp_path, uri)
        finally:
            os.unlink(tmp_path)
        dataset_id = new_id("ds")
        async with self.engine.begin() as conn:
            await conn.execute(
                store.datasets.insert().values(
                    id=dataset_id,
                    name=name,
                    description=description,
                    uri=uri,
                    sha256=sha,
                    size_bytes=size,
                    row_count=stats.row_count,
                    format=stats.format,
                    columns=json.dumps(stats.columns),
                    created_at=utcnow(),
                )
            )
            await write_event(
                conn,
                store.outbox,
                self._subject("dataset", "created"),
                {"dataset_id": dataset_id, "name": name, "row_count": stats.row_count},
            )
        self._notify()
        return await self.get_dataset(dataset_id)
