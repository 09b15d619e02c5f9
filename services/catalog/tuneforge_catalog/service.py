"""Catalog use cases: each takes its dependencies explicitly and runs one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tuneforge_common import auth
from tuneforge_common import methods as method_defs
from tuneforge_common.artifacts import ArtifactStore
from tuneforge_common.auth import Role
from tuneforge_common.db import new_id, owning_project, utcnow
from tuneforge_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from tuneforge_common.events import write_event
from tuneforge_common.params import ParamSpec, resolve_parameters, specs_from_dataclass

from . import datasets as rules
from . import store
from .models import inspect_adapter_dir, inspect_model_dir, is_adapter_dir
from .tokens import TokenCounter

log = logging.getLogger(__name__)
READ_CHUNK = 1024 * 1024
MAX_NAME = 255
# A description is text for people, not a payload: 64 KiB of it is plenty (10 MB ones were stored as given).
MAX_DESCRIPTION = 64 * 1024
MODEL_UPDATABLE = ("name", "description", "tags", "license")


class JobsPort(Protocol):
    """What the catalog asks the jobs service before deleting something a job may need."""

    async def active_jobs_using(self, *, model_id: str = "", dataset_id: str = "") -> int: ...


def _check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidArgument.for_field("name", "is required")
    if len(name) > MAX_NAME:
        raise InvalidArgument.for_field("name", f"must be at most {MAX_NAME} characters")
    return name


def _check_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION:
        raise InvalidArgument.for_field("description", f"must be at most {MAX_DESCRIPTION} characters")
    return description


def _check_license(license: str) -> str:
    if len(license) > MAX_NAME:
        raise InvalidArgument.for_field("license", f"must be at most {MAX_NAME} characters")
    return license.strip()


def _check_tags(tags: list[str]) -> list[str]:
    cleaned = []
    for i, tag in enumerate(tags):
        tag = tag.strip()
        if not tag or len(tag) > 64:
            raise InvalidArgument.for_field(f"tags[{i}]", "must be 1 to 64 characters")
        if tag not in cleaned:
            cleaned.append(tag)
    return cleaned


def _iter_lines(fs: Any, path: str, max_bytes: int) -> Iterator[bytes]:
    with fs.open(path, "rb") as fh:
        yield from rules.read_lines(fh, max_bytes)


@contextlib.asynccontextmanager
async def _unique(message: str) -> AsyncIterator[None]:
    """Two requests racing for one name: the check before the insert can't see the other's row, the
    database's unique constraint does; the loser gets ALREADY_EXISTS, not an internal error."""
    try:
        yield
    except IntegrityError:
        raise AlreadyExists(message) from None


def _same_project(table: Any) -> Any:
    """Names are unique per project: the rows of the project a new row would belong to."""
    project = owning_project()
    return table.c.project_id.is_(None) if project is None else table.c.project_id == project


def _named(name: str) -> Any:
    """Ids of the models called `name` in the project a new model would belong to."""
    return select(store.models.c.id).where(store.models.c.name == name, _same_project(store.models))


def _may_change(row: Any, what: str, needed: Role = Role.MEMBER) -> None:
    """Changing needs `needed` in the row's project; built-in (shared) rows only a superuser changes."""
    caller = auth.current()
    caller.require(needed, f"changing {what}")
    if row.project_id is None and not caller.superuser:
        raise PermissionDenied(f"{what} is built in and shared by every project; only a superuser changes it")


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _rows(fs: Any, path: str, max_bytes: int) -> Iterator[dict[str, Any]]:
    """The rows of a READY dataset (validated, so every line is a JSON object)."""
    for raw in _iter_lines(fs, path, max_bytes):
        if isinstance(raw, rules.OverlongLine):
            raise FailedPrecondition("the dataset has a line over the current line limit; upload it again")
        if raw.strip():
            yield json.loads(raw)


def _progress_logger(what: str) -> type:
    """A tqdm that writes each 10% of a download to the service log instead of a terminal bar."""
    import io

    from tqdm.auto import tqdm

    class LoggedProgress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            self._logged_decile = -1

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.total:
                decile = int(10 * self.n / self.total)
                if decile > self._logged_decile:
                    self._logged_decile = decile
                    log.info("fetching %s: %s %d%%", what, self.desc or "files", 10 * decile)
            return shown

    return LoggedProgress


@dataclass
class Catalog:
    engine: AsyncEngine
    artifacts: ArtifactStore
    subject_root: str
    max_dataset_bytes: int
    jobs: JobsPort | None = None
    max_line_chars: int = 4000
    validation_wait_seconds: float = 30.0
    on_event: Callable[[], None] | None = None  # called after a commit that wrote an outbox row
    _background: set[asyncio.Task] = field(default_factory=set)

    @property
    def _line_bytes(self) -> int:
        return rules.max_line_bytes(self.max_line_chars)

    def _subject(self, entity: str, event: str) -> str:
        return f"{self.subject_root}.catalog.{entity}.{event}"

    def _notify(self) -> None:
        if self.on_event:
            self.on_event()

    async def _active_jobs(self, **kwargs: str) -> int:
        if self.jobs is None:
            raise Unavailable("the jobs service is not configured; can't tell whether a job uses it")
        return await self.jobs.active_jobs_using(**kwargs)

    # -- methods --------------------------------------------------------------

    async def sync_builtin_methods(self) -> None:
        """Upsert the built-in methods so their schema follows the installed code."""
        try:
            await self._sync_builtin_methods()
        except IntegrityError:  # a replica starting at the same moment inserted them first: update instead
            await self._sync_builtin_methods()

    async def _sync_builtin_methods(self) -> None:
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
                    deleted_at=None,
                )
                existing = (await conn.execute(select(store.methods.c.id).where(store.methods.c.id == m.id))).first()
                if existing:
                    await conn.execute(store.methods.update().where(store.methods.c.id == m.id).values(**values))
                else:
                    await conn.execute(store.methods.insert().values(id=m.id, name=m.id, created_at=utcnow(), **values))

    async def get_method(self, method_id: str) -> Any:
        row = await store.get_method_row(self.engine, method_id)
        if row is None or row.deleted_at is not None:
            raise NotFound(f"method {method_id!r} not found")
        return row

    async def resolve_parameters(self, method_id: str, given: dict[str, Any]) -> dict[str, Any]:
        row = await self.get_method(method_id)
        specs = [ParamSpec.from_json(s) for s in json.loads(row.parameters)]
        return resolve_parameters(specs, given, method_id=method_id)

    async def create_method(self, definition: dict[str, Any]) -> Any:
        """An added method (seed 003): the files per stage are checked before anything is stored."""
        auth.current().require(Role.ADMIN, "adding a training method")
        violations = method_defs.validate_custom_method(definition)
        if violations:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations)
        method_id = definition["name"].strip()
        specs = method_defs.custom_method_specs(definition)
        stages = method_defs.custom_method_stages(definition)  # saving env defaults to the training env
        project = owning_project()
        m = store.methods.c
        # Only this project's names are taken (built-ins' are refused above): another project's is invisible here.
        taken = select(m.id).where(m.name == method_id, or_(m.project_id == project, m.project_id.is_(None)))
        async with _unique(f"a method named {method_id!r} exists"), self.engine.begin() as conn:
            if (await conn.execute(taken)).first():
                raise AlreadyExists(f"a method named {method_id!r} exists (names stay taken after deletion)")
            await conn.execute(
                store.methods.insert().values(
                    id=method_id if project is None else f"{project}/{method_id}",
                    name=method_id,
                    display_name=definition.get("display_name") or method_id,
                    description=definition.get("description", ""),
                    training_type=definition["training_type"],
                    lifecycle=definition["lifecycle"],
                    parameters=json.dumps([s.to_json() for s in specs]),
                    entrypoint=stages["training"]["file"],
                    builtin=False,
                    stages=json.dumps(stages),
                    created_at=utcnow(),
                    project_id=project,
                )
            )
            event = {"method_id": method_id, "project_id": project or ""}
            await write_event(conn, store.outbox, self._subject("method", "created"), event)
        self._notify()
        return await self.get_method(method_id)

    async def delete_method(self, method_id: str) -> None:
        row = await self.get_method(method_id)
        if row.builtin:
            raise FailedPrecondition(f"method {method_id!r} is built in and can't be deleted")
        _may_change(row, f"method {method_id!r}", Role.ADMIN)
        async with self.engine.begin() as conn:
            await conn.execute(update(store.methods).where(store.methods.c.id == row.id).values(deleted_at=utcnow()))
            event = {"method_id": method_id, "project_id": row.project_id or ""}
            await write_event(conn, store.outbox, self._subject("method", "deleted"), event)
        self._notify()

    # -- models ---------------------------------------------------------------

    async def register_model_dir(self, path: Path, name: str, description: str = "", builtin: bool = False) -> Any:
        """Seed a model from a local directory; idempotent (built-ins by id, so renaming one is harmless)."""
        key = store.models.c.id if builtin else store.models.c.name
        async with self.engine.connect() as conn:
            existing = (await conn.execute(select(store.models).where(key == name))).first()
        if existing:
            return existing
        return await self.register_model(
            "path", str(path), name, description, [], "", model_id=name if builtin else "", builtin=builtin
        )

    async def register_model(
        self,
        source_kind: str,
        source: str,
        name: str,
        description: str = "",
        tags: list[str] | None = None,
        license: str = "",
        *,
        model_id: str = "",
        builtin: bool = False,
    ) -> Any:
        auth.current().require(Role.MEMBER, "registering a model")
        name, tags, license = _check_name(name), _check_tags(tags or []), _check_license(license)
        description = _check_description(description)
        if not source.strip():
            raise InvalidArgument.for_field(source_kind or "source", "is required")
        model_id = model_id or new_id("model")
        async with self.engine.connect() as conn:  # before any download: a taken name costs nothing
            if (await conn.execute(_named(name))).first():
                raise AlreadyExists(f"a model named {name!r} exists")
        fetched = scratch_copy = False  # files we wrote: removed if the model is refused / once inspected
        if source_kind == "path":
            local, uri = Path(source), str(await asyncio.to_thread(Path(source).resolve))
        elif source_kind == "uri":
            local, uri, scratch_copy = await asyncio.to_thread(self._local_copy_of_uri, source, model_id)
        elif source_kind == "hub_id":
            local = await asyncio.to_thread(self._fetch_from_hub, source, model_id)
            uri, fetched = str(local), True
        else:
            raise InvalidArgument.for_field("source", "give one of path, uri or hub_id")
        try:
            if not await asyncio.to_thread(local.is_dir):
                raise InvalidArgument.for_field(source_kind, f"{source} is not a directory")
            info = await asyncio.to_thread(inspect_model_dir, local, source_kind)
            now = utcnow()
            async with _unique(f"a model named {name!r} exists"), self.engine.begin() as conn:
                if (await conn.execute(_named(name))).first():
                    raise AlreadyExists(f"a model named {name!r} exists")
                await conn.execute(
                    store.models.insert().values(
                        project_id=owning_project(),
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
                        created_at=now,
                        updated_at=now,
                        tags=json.dumps(tags),
                        license=license,
                        size_bytes=info.size_bytes,
                        kind="BASE",
                        lineage="{}",
                        source=f"hf://{source}" if source_kind == "hub_id" else source,
                    )
                )
                await write_event(
                    conn, store.outbox, self._subject("model", "registered"), {"model_id": model_id, "name": name}
                )
        except BaseException:
            if fetched:  # nothing half-written: a refused model leaves no files behind
                await asyncio.to_thread(shutil.rmtree, local, True)
            raise
        finally:
            if scratch_copy:
                await asyncio.to_thread(shutil.rmtree, local, True)
        self._notify()
        return await self.get_model(model_id)

    def _local_copy_of_uri(self, uri: str, model_id: str) -> tuple[Path, str, bool]:
        """(directory to inspect, URI to record, whether the directory is a scratch copy) for a model
        under the artifact store's root; a remote store's model is inspected from a scratch copy."""
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(uri)
            store_fs = self.artifacts.fs
        except (ValueError, ImportError) as exc:
            raise InvalidArgument.for_field("uri", f"unsupported URI ({exc})") from None
        if type(fs) is not type(store_fs) or not _inside(path, self.artifacts.path_of(self.artifacts.root)):
            # Only the store: a catalog that fetched any URL would let users make it call anywhere.
            raise InvalidArgument.for_field("uri", f"must be inside the artifact store ({self.artifacts.root})")
        if not fs.isdir(path):
            raise InvalidArgument.for_field("uri", f"{uri} is not a directory in the artifact store")
        if self.artifacts.is_local:
            return Path(path), path, False  # recorded as a plain path: runners and tokenizers take paths
        scratch = Path(self.artifacts.scratch_dir()) / f"inspect-{model_id}"
        fs.get(path.rstrip("/") + "/", str(scratch) + "/", recursive=True)
        return scratch, uri, True

    def _fetch_from_hub(self, hub_id: str, model_id: str) -> Path:
        target = Path(self.artifacts.path_of(self.artifacts.uri("models", model_id)))
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(
                repo_id=hub_id,
                local_dir=target,
                tqdm_class=_progress_logger(hub_id),
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "tokenizer*"],
            )
        except ImportError:
            raise FailedPrecondition("fetching from the Hugging Face Hub needs the huggingface_hub package") from None
        except Exception as exc:
            log.warning("hub fetch of %s failed: %s", hub_id, exc)
            shutil.rmtree(target, ignore_errors=True)
            from huggingface_hub import errors as hub_errors

            if isinstance(exc, hub_errors.HFValidationError):
                raise InvalidArgument.for_field("hub_id", f"{hub_id!r} is not a valid Hub id (owner/name)") from None
            if isinstance(exc, hub_errors.GatedRepoError):
                raise FailedPrecondition(
                    f"{hub_id!r} is gated on the Hub: accept its license and give the catalog a token (HF_TOKEN)"
                ) from None
            if isinstance(exc, (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError)):
                raise NotFound(f"hub_id: {hub_id!r} is not on the Hugging Face Hub (or is private)") from None
            raise Unavailable(
                f"could not fetch {hub_id!r} from the Hugging Face Hub ({type(exc).__name__}); if this machine "
                "has no internet access, download the model elsewhere and register its directory with `path`"
            ) from None
        return target

    async def publish_model(self, name: str, description: str, uri: str, kind: str, lineage: dict[str, Any]) -> Any:
        auth.current().require(Role.MEMBER, "publishing a model")
        """A trained checkpoint as a model: an adapter is CUSTOMIZED, a full model COMPLETE (kind "" infers it).
        The base model must exist and the checkpoint must be in the artifact store."""
        name, description = _check_name(name), _check_description(description)
        base = await self.get_model(str(lineage.get("base_model_id") or ""))
        local = Path(self.artifacts.path_of(uri))
        if not self.artifacts.is_local or not _inside(str(local), self.artifacts.path_of(self.artifacts.root)):
            where = self.artifacts.root
            raise InvalidArgument.for_field("uri", f"must be a checkpoint in the artifact store ({where})")
        if not await asyncio.to_thread(local.is_dir):
            raise InvalidArgument.for_field("uri", f"{uri} is not a directory")
        adapter = await asyncio.to_thread(is_adapter_dir, local)
        kind = kind or ("CUSTOMIZED" if adapter else "COMPLETE")
        if kind == "CUSTOMIZED":
            if not adapter:
                raise InvalidArgument.for_field(
                    "uri", "a CUSTOMIZED model is an adapter; adapter_config.json is missing"
                )
            found = await asyncio.to_thread(inspect_adapter_dir, local)
            info = dict(
                architecture=base.architecture,
                parameter_count=found.parameter_count,
                context_length=base.context_length,
                dtype=base.dtype,
                has_chat_template=found.has_chat_template or base.has_chat_template,
                size_bytes=found.size_bytes,
            )
        elif kind == "COMPLETE":
            model = await asyncio.to_thread(inspect_model_dir, local, "uri")
            info = dict(
                architecture=model.architecture,
                parameter_count=model.parameter_count,
                context_length=model.context_length,
                dtype=model.dtype,
                has_chat_template=model.has_chat_template,
                size_bytes=model.size_bytes,
            )
        else:
            raise InvalidArgument.for_field("kind", "a published model is CUSTOMIZED or COMPLETE")
        model_id, now = new_id("model"), utcnow()
        async with _unique(f"a model named {name!r} exists"), self.engine.begin() as conn:
            if (await conn.execute(_named(name))).first():
                raise AlreadyExists(f"a model named {name!r} exists")
            await conn.execute(
                store.models.insert().values(
                    project_id=owning_project(),
                    id=model_id,
                    name=name,
                    description=description,
                    uri=str(local),
                    builtin=False,
                    created_at=now,
                    updated_at=now,
                    tags="[]",
                    license=base.license,
                    kind=kind,
                    lineage=json.dumps(lineage),
                    base_model_id=base.id,
                    source=f"job {lineage.get('job_id', '')} step {lineage.get('checkpoint_step', 0)}",
                    **info,
                )
            )
            await write_event(
                conn,
                store.outbox,
                self._subject("model", "published"),
                {"model_id": model_id, "name": name, "kind": kind, **lineage},
            )
        self._notify()
        return await self.get_model(model_id)

    async def get_model(self, model_id: str) -> Any:
        row = await store.get_row(self.engine, store.models, model_id)
        if row is None:
            raise NotFound(f"model {model_id!r} not found")
        return row

    async def list_models(self, page_size: int, page_token: str, kind: str, tag: str, name_contains: str) -> Any:
        conditions = []
        if kind:
            conditions.append(store.models.c.kind == kind)
        if tag:
            # Tags are a JSON list; match the quoted element so "chat" doesn't match "chatty".
            conditions.append(store.models.c.tags.contains(json.dumps(tag), autoescape=True))
        if name_contains:
            conditions.append(func.lower(store.models.c.name).contains(name_contains.lower(), autoescape=True))
        return await store.list_page(
            self.engine, store.models, page_size, page_token, [store.models.c.created_at, store.models.c.id], conditions
        )

    async def update_model(self, model_id: str, changes: dict[str, Any]) -> Any:
        unknown = [k for k in changes if k not in MODEL_UPDATABLE]
        if unknown:
            raise InvalidArgument.for_field(
                "update_mask", f"can't update {', '.join(unknown)}; updatable: {', '.join(MODEL_UPDATABLE)}"
            )
        values: dict[str, Any] = {}
        if "name" in changes:
            values["name"] = _check_name(changes["name"])
        if "description" in changes:
            values["description"] = _check_description(changes["description"])
        if "tags" in changes:
            values["tags"] = json.dumps(_check_tags(list(changes["tags"])))
        if "license" in changes:
            values["license"] = _check_license(changes["license"])
        _may_change(await self.get_model(model_id), f"model {model_id!r}")
        if not values:
            return await self.get_model(model_id)
        async with _unique(f"a model named {values.get('name')!r} exists"), self.engine.begin() as conn:
            if "name" in values:
                same_name = (
                    store.models.c.name == values["name"],
                    store.models.c.id != model_id,
                    _same_project(store.models),
                )
                clash = await conn.execute(select(store.models.c.id).where(*same_name))
                if clash.first():
                    raise AlreadyExists(f"a model named {values['name']!r} exists")
            await conn.execute(
                update(store.models).where(store.models.c.id == model_id).values(updated_at=utcnow(), **values)
            )
            await write_event(conn, store.outbox, self._subject("model", "updated"), {"model_id": model_id})
        self._notify()
        return await self.get_model(model_id)

    async def delete_model(self, model_id: str) -> None:
        model = await self.get_model(model_id)
        if model.builtin:
            raise FailedPrecondition(f"model {model_id!r} is built in and can't be deleted")
        _may_change(model, f"model {model_id!r}")
        async with self.engine.connect() as conn:
            published = (
                await conn.execute(
                    select(func.count()).select_from(store.models).where(store.models.c.base_model_id == model_id)
                )
            ).scalar_one()
        if published:
            raise FailedPrecondition(f"model {model_id!r} is the base of {published} published model(s)")
        active = await self._active_jobs(model_id=model_id)
        if active:
            raise FailedPrecondition(f"model {model_id!r} is used by {active} unfinished job(s)")
        async with self.engine.begin() as conn:
            await conn.execute(delete(store.models).where(store.models.c.id == model_id))
            await write_event(conn, store.outbox, self._subject("model", "deleted"), {"model_id": model_id})
        fetched_into = self.artifacts.path_of(self.artifacts.uri("models", model_id))
        if _inside(model.uri, fetched_into):  # fetched from the Hub by us; registered directories are the user's
            await asyncio.to_thread(shutil.rmtree, fetched_into, True)
        self._notify()

    # -- datasets -------------------------------------------------------------

    async def get_dataset(self, dataset_id: str) -> Any:
        row = await store.get_row(self.engine, store.datasets, dataset_id)
        if row is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return row

    async def list_datasets(
        self,
        page_size: int,
        page_token: str,
        status: str,
        fmt: str,
        name_contains: str,
        newest_first: bool = False,
        after_dataset_id: str = "",
    ) -> tuple[list[Any], str]:
        """Oldest first (newest first with newest_first), then by id; after_dataset_id starts the list after
        that dataset, as a cursor of ids does (one the caller cannot see is refused like a missing one)."""
        d = store.datasets.c
        conditions = []
        if after_dataset_id:
            after = await store.get_row(self.engine, store.datasets, after_dataset_id)
            if after is None:
                raise InvalidArgument.for_field("after_dataset_id", f"no dataset {after_dataset_id!r} to list after")
            beyond = d.created_at < after.created_at if newest_first else d.created_at > after.created_at
            conditions.append(or_(beyond, and_(d.created_at == after.created_at, d.id > after_dataset_id)))
        if status:
            conditions.append(d.status == status)
        if fmt:
            conditions.append(d.format == fmt)
        if name_contains:
            conditions.append(func.lower(d.name).contains(name_contains.lower(), autoescape=True))
        order = [d.created_at.desc() if newest_first else d.created_at, d.id]
        return await store.list_page(self.engine, store.datasets, page_size, page_token, order, conditions)

    async def upload_dataset(
        self,
        name: str,
        description: str,
        chunks: AsyncIterator[bytes],
        declared_format: str = "",
        prompt_input_column: str = "",
        prompt_output_column: str = "",
    ) -> Any:
        """Stream to a temporary file while hashing, store content-addressed, then validate.

        Over the size limit nothing is stored. Otherwise the dataset is kept with its validation report
        (READY or INVALID), so a user can read what to fix; the answer waits for validation up to a bound.
        """
        auth.current().require(Role.MEMBER, "uploading a dataset")
        name, description = _check_name(name), _check_description(description)
        if declared_format and declared_format not in rules.FORMATS:
            raise InvalidArgument.for_field("format", f"must be one of {', '.join(rules.FORMATS)}")
        if len(prompt_input_column) > MAX_NAME or len(prompt_output_column) > MAX_NAME:
            field_name = "prompt_input_column" if len(prompt_input_column) > MAX_NAME else "prompt_output_column"
            raise InvalidArgument.for_field(field_name, f"must be at most {MAX_NAME} characters")
        digest = hashlib.sha256()
        size = 0
        scratch = await asyncio.to_thread(self.artifacts.scratch_dir)
        fd, tmp_path = tempfile.mkstemp(prefix="upload-", suffix=".jsonl", dir=scratch)
        dataset_id = new_id("ds")
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
            async with self.engine.begin() as conn:
                uri = await self._keep_content(conn, sha, size, tmp_path)
                await conn.execute(
                    store.datasets.insert().values(
                        project_id=owning_project(),
                        id=dataset_id,
                        name=name,
                        description=description,
                        uri=uri,
                        sha256=sha,
                        size_bytes=size,
                        row_count=0,
                        format=declared_format,
                        columns="[]",
                        created_at=utcnow(),
                        status="VALIDATING",
                        validation="{}",
                        prompt_input_column=prompt_input_column,
                        prompt_output_column=prompt_output_column,
                    )
                )
                await write_event(conn, store.outbox, self._subject("dataset", "uploaded"), {"dataset_id": dataset_id})
        finally:
            with contextlib.suppress(FileNotFoundError):  # stored by rename, or refused
                os.unlink(tmp_path)
        self._notify()
        task = self.start_validation(dataset_id)
        # shield: a slow validation outlives the wait and finishes in the background.
        await asyncio.wait({asyncio.shield(task)}, timeout=self.validation_wait_seconds)
        return await self.get_dataset(dataset_id)

    async def _keep_content(self, conn: Any, sha: str, size: int, local_path: str) -> str:
        """Store content once per sha256 while holding its row lock (deletes of the same content wait)."""
        uri = self.artifacts.uri("datasets", "sha256", f"{sha}.jsonl")
        await store.lock_content(conn, sha, uri, size, utcnow())
        if not await asyncio.to_thread(self.artifacts.exists, uri):  # same bytes, same content: stored once
            await asyncio.to_thread(self.artifacts.adopt_file, local_path, uri)
        return uri

    def clean_scratch(self, older_than_seconds: float = 24 * 3600) -> int:
        """Remove spooled uploads and splits a process died holding (anything this old is abandoned)."""
        scratch = self.artifacts.scratch_dir()
        cutoff, removed = time.time() - older_than_seconds, 0
        for entry in os.scandir(scratch):
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                removed += 1
        return removed

    def start_validation(self, dataset_id: str) -> asyncio.Task:
        task = asyncio.create_task(self.validate_dataset(dataset_id), name=f"validate-{dataset_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def resume_validations(self) -> None:
        """Datasets left VALIDATING by a process that died are validated again at start."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(store.datasets.c.id).where(store.datasets.c.status == "VALIDATING"))
            pending = [r.id for r in rows]
        for dataset_id in pending:
            self.start_validation(dataset_id)

    async def validate_dataset(self, dataset_id: str) -> None:
        row = await self.get_dataset(dataset_id)

        def run() -> rules.ValidationReport:
            import fsspec

            fs, path = fsspec.core.url_to_fs(row.uri)
            return rules.validate_jsonl(
                _iter_lines(fs, path, self._line_bytes),
                declared_format=row.format,
                max_line_chars=self.max_line_chars,
                prompt_input_column=row.prompt_input_column,
                prompt_output_column=row.prompt_output_column,
            )

        try:
            report = await asyncio.to_thread(run)
        except FileNotFoundError:
            report = rules.ValidationReport()
            report.add(0, "", "the stored content is missing; upload the file again", 1)
        except OSError:
            log.exception("validation of %s could not read its content", dataset_id)
            return  # the store may be back later: stays VALIDATING, retried at the next start
        except Exception:
            log.exception("validation of %s failed", dataset_id)
            report = rules.ValidationReport()
            report.add(0, "", "the file could not be validated (an internal error, logged by the catalog)", 1)
        status = "READY" if report.valid else "INVALID"
        async with self.engine.begin() as conn:
            await conn.execute(
                update(store.datasets)
                .where(store.datasets.c.id == dataset_id, store.datasets.c.status == "VALIDATING")
                .values(
                    status=status,
                    row_count=report.row_count,
                    format=report.format or row.format,
                    columns=json.dumps(report.columns),
                    validation=json.dumps(report.to_json()),
                    # Columns detected from the rows (question/answer...) are kept so jobs and stats use them.
                    prompt_input_column=report.prompt_input_column,
                    prompt_output_column=report.prompt_output_column,
                )
            )
            await write_event(
                conn,
                store.outbox,
                self._subject("dataset", "validated"),
                {"dataset_id": dataset_id, "status": status, "problem_count": report.problem_count},
            )
        self._notify()

    async def delete_dataset(self, dataset_id: str) -> None:
        row = await self.get_dataset(dataset_id)
        _may_change(row, f"dataset {dataset_id!r}")
        active = await self._active_jobs(dataset_id=dataset_id)
        if active:
            raise FailedPrecondition(f"dataset {dataset_id!r} is used by {active} unfinished job(s)")
        async with self.engine.begin() as conn:
            # Lock the content first: an upload of the same bytes either sees this delete or is seen by it.
            await store.lock_content(conn, row.sha256, row.uri, row.size_bytes, utcnow())
            await conn.execute(delete(store.datasets).where(store.datasets.c.id == dataset_id))
            shared = (
                await conn.execute(
                    select(func.count()).select_from(store.datasets).where(store.datasets.c.sha256 == row.sha256)
                )
            ).scalar_one()
            await write_event(conn, store.outbox, self._subject("dataset", "deleted"), {"dataset_id": dataset_id})
            if not shared:  # content-addressed: other datasets with the same bytes keep the file
                await conn.execute(delete(store.dataset_contents).where(store.dataset_contents.c.sha256 == row.sha256))
                await asyncio.to_thread(self._remove_content, row.uri)
        self._notify()

    def _remove_content(self, uri: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.artifacts.fs.rm(self.artifacts.path_of(uri))

    async def download_dataset(self, dataset_id: str) -> AsyncIterator[bytes]:
        row = await self.get_dataset(dataset_id)
        fh = await asyncio.to_thread(self.artifacts.fs.open, self.artifacts.path_of(row.uri), "rb")
        try:
            while chunk := await asyncio.to_thread(fh.read, READ_CHUNK):
                yield chunk
        finally:
            await asyncio.to_thread(fh.close)

    async def preview_dataset(self, dataset_id: str, limit: int) -> list[dict[str, Any]]:
        if not 0 <= limit <= 100:
            raise InvalidArgument.for_field("limit", "must be between 0 and 100")
        row = await self.get_dataset(dataset_id)

        def read() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            for raw in _iter_lines(self.artifacts.fs, self.artifacts.path_of(row.uri), self._line_bytes):
                if len(rows) >= (limit or 10):
                    break
                if isinstance(raw, rules.OverlongLine):
                    continue
                try:
                    value = json.loads(raw)
                except (ValueError, UnicodeDecodeError, RecursionError):  # an INVALID dataset's bad lines
                    continue
                if isinstance(value, dict):
                    rows.append(value)
            return rows

        return await asyncio.to_thread(read)

    async def dataset_stats(self, dataset_id: str, model_id: str, max_seq_length: int) -> dict[str, Any]:
        row = await self.get_dataset(dataset_id)
        self._require_ready(row)
        model = await self.get_model(model_id)
        if max_seq_length < 0:
            raise InvalidArgument.for_field("max_seq_length", "must not be negative")

        def count() -> dict[str, Any]:
            counter = TokenCounter(Path(model.uri), model_id)
            columns = (row.prompt_input_column, row.prompt_output_column)
            rows = _rows(self.artifacts.fs, self.artifacts.path_of(row.uri), self._line_bytes)
            counts = list(counter.count_all(rows, row.format, *columns))
            return rules.token_stats(counts, max_seq_length or None)

        return await asyncio.to_thread(count)

    @staticmethod
    def _require_ready(row: Any) -> None:
        if row.status != "READY":
            raise FailedPrecondition(f"dataset {row.id!r} is {row.status}, not READY")

    async def split_dataset(self, dataset_id: str, validation_ratio: float, seed: int) -> tuple[Any, Any]:
        row = await self.get_dataset(dataset_id)
        _may_change(row, f"dataset {dataset_id!r}")
        self._require_ready(row)
        try:
            train_idx, val_idx = rules.split_indices(row.row_count, validation_ratio, seed)
        except ValueError as exc:
            raise InvalidArgument.for_field("validation_ratio", str(exc)) from None
        validation_rows = set(val_idx)

        def write_parts(tmp: str) -> list[tuple[str, str, int, int]]:
            """Both parts written and hashed in one streaming pass: (path, sha256, size, rows)."""
            paths = [os.path.join(tmp, "train.jsonl"), os.path.join(tmp, "validation.jsonl")]
            digests, sizes = [hashlib.sha256(), hashlib.sha256()], [0, 0]
            with open(paths[0], "wb") as train, open(paths[1], "wb") as val:
                index = 0
                for raw in _iter_lines(self.artifacts.fs, self.artifacts.path_of(row.uri), self._line_bytes):
                    if isinstance(raw, rules.OverlongLine):
                        raise FailedPrecondition("the dataset has a line over the current line limit")
                    if not raw.strip():
                        continue
                    line = raw if raw.endswith(b"\n") else raw + b"\n"
                    part = 1 if index in validation_rows else 0
                    (val if part else train).write(line)
                    digests[part].update(line)
                    sizes[part] += len(line)
                    index += 1
            rows = (len(train_idx), len(val_idx))
            return [(paths[i], digests[i].hexdigest(), sizes[i], rows[i]) for i in (0, 1)]

        scratch = await asyncio.to_thread(self.artifacts.scratch_dir)
        ids = []
        with tempfile.TemporaryDirectory(prefix="split-", dir=scratch) as tmp:
            parts = await asyncio.to_thread(write_parts, tmp)
            async with self.engine.begin() as conn:
                for suffix, (path, sha, size, rows) in zip(("train", "validation"), parts, strict=True):
                    uri = await self._keep_content(conn, sha, size, path)
                    part_id = new_id("ds")
                    ids.append(part_id)
                    await conn.execute(
                        store.datasets.insert().values(
                            project_id=row.project_id,
                            id=part_id,
                            name=f"{row.name[: MAX_NAME - len(suffix) - 1]}-{suffix}",
                            description=f"{suffix} split of {row.id} (ratio {validation_ratio}, seed {seed})",
                            uri=uri,
                            sha256=sha,
                            size_bytes=size,
                            row_count=rows,
                            format=row.format,
                            columns=row.columns,
                            created_at=utcnow(),
                            status="READY",
                            validation=json.dumps({"problems": [], "problem_count": 0}),
                            prompt_input_column=row.prompt_input_column,
                            prompt_output_column=row.prompt_output_column,
                            parent_dataset_id=row.id,
                        )
                    )
                    await write_event(conn, store.outbox, self._subject("dataset", "created"), {"dataset_id": part_id})
        self._notify()
        return await self.get_dataset(ids[0]), await self.get_dataset(ids[1])

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
