"""HTTP/JSON + SSE API over the catalog and jobs gRPC services."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import grpc
from fastapi import Body, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from google.protobuf import field_mask_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from starlette import formparsers
from starlette import requests as starlette_requests
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneforge.auth.v1 import auth_pb2 as apb
from tuneforge.auth.v1 import auth_pb2_grpc
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2 as compb
from tuneforge.jobs.v1 import inference_pb2_grpc, jobs_pb2_grpc, lifecycle_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_common import methods
from tuneforge_common.grpcutil import MAX_MESSAGE_BYTES
from tuneforge_common.tls import TlsConfig, open_channel

from .credentials import CallerCredentials, backend_credentials
from .errors import (
    OPENAI_PREFIX,
    ApiError,
    api_error_handler,
    document_errors,
    error_responses,
    grpc_error_handler,
    http_error_handler,
    internal_error_handler,
    openai_error,
    validation_error_handler,
)
from .schemas import (
    DOUBLE,
    document_bodies,
    json_body,
    json_type,
    message_body,
    message_ref,
    message_schema,
    model_body,
    to_json,
)
from .uploads import UPLOAD_CHUNK, UploadSpool
from .watch_hub import Position, WatchFailed, WatchHub, WatchSettings, with_keepalive
from .web import mount_dashboard

RPC_TIMEOUT_S = 30.0
# An upload RPC carries the whole file and then waits for the catalog's validation (or its wait limit).
UPLOAD_TIMEOUT_S = 600.0
# A pass over a whole dataset (token counts, a split) of up to the size limit takes minutes, not seconds.
DATASET_PASS_TIMEOUT_S = 600.0
# Registering by Hub id downloads the weights while the request waits.
MODEL_FETCH_TIMEOUT_S = 3600.0
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
UPLOAD_TTL_S = 24 * 3600.0
# Room for the form fields and part headers around the file in a multipart body.
MULTIPART_OVERHEAD = 64 * 1024
# gRPC's 4 MiB default is too small for a large ListDatasets page; the services accept 64 MiB both ways.
# Keepalive pings on open calls (a long WatchJob stream) find a dead connection; every 5 minutes is the
# most often a gRPC server allows by default (grpc.http2.min_recv_ping_interval_without_data_ms), and
# none while idle, which a default server would answer with GOAWAY (too_many_pings).
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)
REQUESTS = Counter("tuneforge_gateway_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("tuneforge_gateway_request_seconds", "HTTP request latency", ["route"])
OPEN_STREAMS = Gauge("tuneforge_gateway_open_streams", "Server-Sent Events streams open now")


def streamed(media_type: str, description: str, item: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that streams its 200 body as `media_type` (made of `item`s, when given)."""
    content = {"itemSchema": item} if item else {"schema": {"type": "string"}}
    return {200: {"description": description, "content": {media_type: content}}}


# One Server-Sent Event of a job's stream: its kind, its JSON and the cursor to resume after it.
_UPDATES = [f.name for f in jpb.WatchJobResponse.DESCRIPTOR.oneofs_by_name["update"].fields]
JOB_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"enum": [*_UPDATES, "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string"},
    },
}
UPLOAD_HEADERS = {
    "Upload-Offset": {"description": "Bytes received so far", "schema": {"type": "integer"}},
    "Upload-Length": {"description": "Total bytes, once known", "schema": {"type": "integer"}},
}


# job_or_estimate's bodies: a stored job (201) with its estimate, or for a dry run (200) only the estimate.
JOB_WITH_ESTIMATE = message_body(jpb.Job, extra={"estimate": message_ref(jpb.JobEstimate)})
DRY_RUN = json_body(
    {
        "type": "object",
        "required": ["dry_run", "estimate"],
        "properties": {"dry_run": {"const": True}, "estimate": message_ref(jpb.JobEstimate)},
        "additionalProperties": False,
    },
    description="A dry run: its estimate",
)
# A new key, with its secret: no other answer carries it.
NEW_KEY = message_body(apb.ApiKey, extra={"secret": {"type": "string"}})
# GET /jobs/{job_id}/metrics: each metric's [step, value] pairs by name, and the points themselves: the raw points,
# or with max_points the buckets of each series, with their metric's name.
METRICS = json_type(
    {
        "type": "object",
        "required": ["job_id", "series", "points"],
        "properties": {
            "job_id": {"type": "string"},
            "series": {
                "type": "object",
                "additionalProperties": {
                    "type": "array",
                    # [step, value] as two numbers, not prefixItems [integer, number]: schemathesis 4.32 turns that
                    # into Draft 4's `items: [...]` and then validates the response with a Draft 2020-12 validator.
                    "items": {"type": "array", "items": DOUBLE, "minItems": 2, "maxItems": 2},
                },
            },
            "points": {
                "type": "array",
                "items": {
                    "anyOf": [
                        message_ref(jpb.MetricPoint),
                        message_schema(jpb.SeriesPoint, extra={"name": {"type": "string"}}),
                    ]
                },
            },
        },
        "additionalProperties": False,
    }
)


def job_or_estimate(resp: Any, response: Response) -> dict[str, Any]:
    """A stored job (201) with its estimate, or for a dry run (200) only the estimate."""
    estimate = to_json(resp.estimate)
    if not resp.HasField("job"):
        response.status_code = 200
        return {"dry_run": True, "estimate": estimate}
    return {**to_json(resp.job), "estimate": estimate}


def _enum_names(enum: Any, prefix: str, lower: bool = False) -> dict[str, Any]:
    """A proto enum's values by their HTTP name (as to_json writes them); "" is the UNSPECIFIED value."""
    names = {"": 0} | {v.name.removeprefix(prefix): v.number for v in enum.DESCRIPTOR.values if v.number}
    return {k.lower(): v for k, v in names.items()} if lower else names


MODEL_KINDS: dict[str, compb.ModelKind.ValueType] = _enum_names(compb.ModelKind, "MODEL_KIND_")
DATASET_STATUSES: dict[str, compb.DatasetStatus.ValueType] = _enum_names(compb.DatasetStatus, "DATASET_STATUS_")
DATASET_FORMATS: dict[str, compb.DatasetFormat.ValueType] = _enum_names(
    compb.DatasetFormat, "DATASET_FORMAT_", lower=True
)
JOB_STATES: dict[str, jpb.JobState.ValueType] = _enum_names(jpb.JobState, "JOB_STATE_")
JOB_KINDS: dict[str, jpb.JobKind.ValueType] = _enum_names(jpb.JobKind, "JOB_KIND_")
ROLES: dict[str, apb.Role.ValueType] = _enum_names(apb.Role, "ROLE_", lower=True)
PRINCIPAL_KINDS: dict[str, apb.PrincipalKind.ValueType] = _enum_names(apb.PrincipalKind, "PRINCIPAL_KIND_", lower=True)
E = TypeVar("E", bound=int)
# The largest values of the proto fields numbers land in, refused with a 400 beyond; an int64 field takes JSON's
# safe integers only (2**53 - 1, what a JavaScript client and JSON Schema validators hold exactly).
INT32_MAX, INT64_MAX = 2**31 - 1, 2**53 - 1


def choices(names: dict[str, Any]) -> str:
    return ", ".join(name for name in names if name)


def one_of(names: dict[str, Any]) -> dict[str, Any]:
    """json_schema_extra for a parameter that enum_value reads: its names ("" for none; any case is taken)."""
    return {"enum": list(names)}


def enum_value(names: dict[str, E], given: str, field: str) -> E:
    """An HTTP enum name (any case) as its proto value; empty means unspecified, an unknown name is a 400."""
    for name, value in names.items():
        if name.lower() == given.strip().lower():
            return value
    raise ApiError(400, "INVALID_ARGUMENT", f"unknown {field} {given!r}; one of: {choices(names)}", field=field)


async def upload_requests(
    metadata: cpb.DatasetUploadMetadata, chunks: AsyncIterator[bytes]
) -> AsyncIterator[cpb.UploadDatasetRequest]:
    """UploadDataset's client stream: the metadata first, then the content chunk by chunk."""
    yield cpb.UploadDatasetRequest(metadata=metadata)
    async for chunk in chunks:
        yield cpb.UploadDatasetRequest(chunk=chunk)


def attachment_name(name: str, fallback: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or fallback
    return stem if stem.endswith(".jsonl") else f"{stem}.jsonl"


def to_struct(values: dict[str, Any], field: str) -> struct_pb2.Struct:
    """A JSON object as a protobuf Struct, whose numbers are doubles: an integer beyond a double's range is a 400
    naming where it is (it raised OverflowError, a 500)."""
    if (path := beyond_double(values, field)) is not None:
        raise ApiError(400, "INVALID_ARGUMENT", "a number beyond a double's range (about 1.8e308)", field=path)
    if (path := too_deep(values, field, STRUCT_MAX_DEPTH)) is not None:
        # protobuf refuses to write a message nested past 100 levels (a Struct level is two): a 500 otherwise.
        raise ApiError(400, "INVALID_ARGUMENT", f"nested more than {STRUCT_MAX_DEPTH} levels deep", field=path)
    if (path := lone_surrogate(values, field)) is not None:
        # JSON's \ud800 escapes decode to text UTF-8 cannot encode, and protobuf strings are UTF-8: a 500 otherwise.
        raise ApiError(400, "INVALID_ARGUMENT", "holds a lone UTF-16 surrogate, which is not valid Unicode", field=path)
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def beyond_double(value: Any, path: str) -> str | None:
    """The path of the first integer in `value` too large for a double, or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (found := beyond_double(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}")) is not None:
            return found
    return None


STRUCT_MAX_DEPTH = 32


def refuse_nul(**fields: str) -> None:
    """A 400 naming the first of these request fields that holds a NUL (the catalog would name the field of its
    own request, metadata.<field>, for an upload)."""
    for field, value in fields.items():
        if "\0" in value:
            raise ApiError(400, "INVALID_ARGUMENT", "must not contain NUL characters", field=field)


def _children(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        yield from ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list):
        yield from ((f"{path}[{i}]", item) for i, item in enumerate(value))


def too_deep(value: Any, path: str, levels: int) -> str | None:
    """The path of the first list or object nested more than `levels` deep in `value`, or None."""
    if not isinstance(value, dict | list):
        return None
    if levels == 0:
        return path
    return next((found for where, item in _children(value, path) if (found := too_deep(item, where, levels - 1))), None)


def lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or object key) in `value` holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict) and any(lone_surrogate(key, path) for key in value):
        return path
    return next((found for where, item in _children(value, path) if (found := lone_surrogate(item, where))), None)


async def every_page(call: Any, request_for: Callable[[str], Any], items: str) -> list[Any]:
    """Follow next_page_token to the end of a gRPC list call."""
    collected: list[Any] = []
    token = ""
    while True:
        resp = await call(request_for(token), timeout=RPC_TIMEOUT_S)
        collected += getattr(resp, items)
        token = resp.next_page_token
        if not token:
            return collected


def method_definition_schema() -> dict[str, Any]:
    """The JSON Schema of an added method's definition, built from the rules methods.validate_custom_method
    applies; the catalog's validation stays the judge (what a lifecycle requires is beyond a schema)."""
    stage = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"file": {"type": "string", "pattern": "[.]py$"}, "env": {"type": "string"}},
    }
    spellings = [*methods.STAGES, *(name.replace("_", "-") for name in methods.STAGES if "_" in name)]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "training_type", "lifecycle", "stages"],
        "properties": {
            "name": {
                "type": "string",
                "pattern": f"^{methods.METHOD_NAME_RE.pattern}$",
                "not": {"enum": sorted(methods.BUILTIN_IDS)},
            },
            "display_name": {"type": "string", "maxLength": methods.MAX_DISPLAY_NAME},
            "description": {"type": "string", "maxLength": methods.MAX_DESCRIPTION},
            "training_type": {"enum": list(methods.TRAINING_TYPES)},
            "lifecycle": {"enum": list(methods.LIFECYCLES)},
            "deployment_environment": {"enum": list(methods.DEPLOYMENT_ENVIRONMENTS)},
            "stages": {
                "type": "object",
                "required": ["training"],
                "propertyNames": {"enum": spellings},
                "additionalProperties": stage,
            },
            "parameters": {"type": "array", "items": {"type": "object"}, "description": "Parameter specs"},
        },
    }


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer is a number without a fraction (2.0 is one); true, false and "2" are not."""
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    return value


# The body models are strict (no "1" for a number, no 1 for a string or a bool), but an integer may be 2.0.
JsonInt = Annotated[int, Field(strict=False), BeforeValidator(_json_integer)]
# A name the services take: not blank.
Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"\S")]
# Job and agent labels, within the jobs service's limits.
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=63)]
Labels = Annotated[dict[LabelKey, Annotated[str, StringConstraints(max_length=63)]], Field(max_length=32)]


class SubmitJobBody(BaseModel):
    model_config = ConfigDict(strict=True)
    model_id: str = Field(..., description="Catalog model id", min_length=1, max_length=128)
    dataset_id: str = Field(..., description="Catalog dataset id", min_length=1, max_length=128)
    validation_dataset_id: str = Field(
        "", description="Optional dataset to evaluate on instead of holding out validation_ratio", max_length=128
    )
    method_id: str = Field("sft-lora", description="Training method id", min_length=1, max_length=128)
    parameters: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters by name or alias")
    priority: JsonInt = Field(0, ge=-1000, le=1000)
    name: str = Field("", max_length=255)
    labels: Labels = Field(default_factory=dict, description="Free-form key/value labels to filter by")
    resources: ResourceBody = Field(default_factory=lambda: ResourceBody())
    dry_run: bool = Field(False, description="Only validate and estimate; nothing is stored")


class ResourceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    gpu_count: JsonInt = Field(0, ge=0, le=64)
    min_gpu_memory_bytes: JsonInt = Field(0, ge=0, le=INT64_MAX)
    agent_labels: Labels = Field(default_factory=dict, description="Labels the agent must carry")


class CopyJobBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    parameter_overrides: dict[str, Any] = Field(default_factory=dict, description="Over the old job's parameters")
    dataset_id: str = Field("", max_length=128)
    validation_dataset_id: str = Field(
        "", description="Another dataset to evaluate on; empty keeps the old job's", max_length=128
    )
    clear_validation_dataset: bool = Field(
        False, description="Evaluate without the old job's validation dataset (not with validation_dataset_id)"
    )
    model_id: str = Field("", max_length=128)
    name: str = Field("", max_length=255)
    dry_run: bool = False


class CreateProjectBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # As the catalog checks it (keys.PROJECT_NAME).
    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
    )


class CreateKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name = Field(..., description="Who or what holds the key")
    kind: str = Field(
        "user",
        description="user (a person) or service (a program)",
        json_schema_extra={"enum": [kind for kind in PRINCIPAL_KINDS if kind]},
    )
    roles: dict[
        Annotated[str, StringConstraints(min_length=1)],
        Annotated[str, Field(json_schema_extra={"enum": [role for role in ROLES if role]})],
    ] = Field(default_factory=dict, description="project id -> viewer, member or admin")
    superuser: bool = Field(False, description="Admin of every project; only a superuser may grant it")


# Text for people, as long as the catalog keeps it (its MAX_DESCRIPTION).
Description = Annotated[str, StringConstraints(max_length=64 * 1024)]


class PublishCheckpointBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    step: JsonInt = Field(
        0,
        ge=0,
        le=INT64_MAX,
        description="A kept checkpoint's step; 0 or absent: the best of the kept checkpoints and the final output "
        "(by eval_loss, else loss)",
    )
    name: Name
    description: Description = ""


# A model tag, as the catalog takes it (spaces around it are dropped).
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"\S")]


class RegisterModelBody(BaseModel):
    """Exactly one of path, uri and hub_id says where the model comes from."""

    model_config = ConfigDict(extra="forbid", strict=True)
    path: str = Field("", description="A Hugging Face format directory on the catalog's machine")
    uri: str = Field("", description="An fsspec URI in the artifact store")
    hub_id: str = Field("", description="A Hugging Face Hub id, fetched into the artifact store")
    name: Name
    description: Description = ""
    tags: list[Tag] = Field(default_factory=list)
    license: str = Field("", max_length=255)


class UpdateModelBody(BaseModel):
    """Only the keys present change: at least one."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})
    name: Name = Field("", description="Not blank: a model keeps a name")
    description: Description = ""
    tags: list[Tag] = Field(default_factory=list)
    license: str = Field("", max_length=255)


class SplitDatasetBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    validation_ratio: float = Field(..., gt=0, le=0.5, description="Share of rows for validation, in (0, 0.5]")
    seed: JsonInt = Field(0, ge=-INT64_MAX, le=INT64_MAX, description="The same seed gives the same split")


class CreateUploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name
    description: Description = ""
    format: str = Field(
        "", description="Validate as this format; empty detects it", json_schema_extra=one_of(DATASET_FORMATS)
    )
    prompt_input_column: str = ""
    prompt_output_column: str = ""
    size: Annotated[JsonInt, Field(ge=0, le=INT64_MAX)] | None = Field(None, description="Total bytes, if known")


class UploadState(BaseModel):
    """A resumable upload, as the gateway keeps it (uploads.Upload)."""

    model_config = ConfigDict(extra="forbid")
    upload_id: str
    name: str
    description: str
    format: str = Field(..., description="As given, in lower case; empty detects it")
    prompt_input_column: str
    prompt_output_column: str
    size: int | None = Field(..., description="Total bytes, once known")
    offset: int = Field(..., description="Bytes received so far")
    created_at: float = Field(..., description="Unix time")
    updated_at: float = Field(..., description="Unix time of the last chunk")
    complete: bool = Field(..., description="Every byte is there: the upload can be completed")


class Health(BaseModel):
    """Whether the backends serve."""

    model_config = ConfigDict(extra="forbid")
    status: Literal["ok", "degraded"]
    services: dict[str, str] = Field(..., description="Each backend's health: SERVING, NOT_SERVING, UNREACHABLE...")


HEALTH: dict[int | str, dict[str, Any]] = {503: {"description": "A backend is not serving", "model": Health}}


class StrictMultiPartParser(formparsers.MultiPartParser):
    """Starlette's multipart parser, refusing a form field that is not valid in its charset (UTF-8): Starlette
    decodes it as Latin-1 instead, so invalid bytes were stored as other text (b"\\xff\\xfe" as "ÿþ")."""

    def on_part_end(self) -> None:
        # Starlette's internals: should a release rename them, the check is skipped rather than failing every form.
        part, charset = getattr(self, "_current_part", None), getattr(self, "_charset", "utf-8")
        if part is not None and getattr(part, "file", None) is None:
            try:
                bytes(getattr(part, "data", b"")).decode(charset)
            except (UnicodeDecodeError, LookupError):
                name = getattr(part, "field_name", "?")
                raise formparsers.MultiPartException(f"the form field {name!r} is not valid {charset}") from None
        super().on_part_end()


# Request.form() builds its parser from this module's name for it.
starlette_requests.MultiPartParser = StrictMultiPartParser  # type: ignore[misc]


class _BodyOverLimit(Exception):
    pass


class UploadSizeLimit:
    """Refuse a multipart upload (POST to `path`) whose body passes `limit` bytes, with a 413.

    A body with a Content-Length is refused by it before any of it is read. A body without one (chunked)
    is counted as it is read and cut off with the 413 at the first message that passes the limit, which
    never reaches the form parser: no more than `limit` bytes are ever spooled. The app's own answer to
    the cut-off body (FastAPI's 400 for a form it could not finish reading) is dropped for the 413.
    """

    def __init__(self, app: ASGIApp, path: str, limit: int, shown: int) -> None:
        self.app, self.path, self.limit = app, path, limit
        self.message = f"a dataset upload is limited to {shown} bytes"

    def refuse(self) -> JSONResponse:
        """The 413 in the error shape of the API the path belongs to (OpenAI's for /v1/files), naming the file."""
        if self.path.startswith(OPENAI_PREFIX):
            return openai_error(413, self.message, "file", "resource_exhausted")
        return ApiError(413, "RESOURCE_EXHAUSTED", self.message, field="file").response()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self.refuse()(scope, receive, send)
            return
        received = 0
        over = started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise _BodyOverLimit
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await self.refuse()(scope, receive, send)


class Backends:
    def __init__(
        self, catalog_address: str, jobs_address: str, *, tls: TlsConfig | None = None, service_token: str = ""
    ) -> None:
        credentials = backend_credentials(service_token)
        self.catalog_channel = open_channel(catalog_address, tls=tls, options=CHANNEL_OPTIONS, interceptors=credentials)
        self.jobs_channel = open_channel(jobs_address, tls=tls, options=CHANNEL_OPTIONS, interceptors=credentials)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self.catalog_channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.catalog_channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.jobs_channel)
        self.lifecycle = lifecycle_pb2_grpc.ModelLifecycleServiceStub(self.jobs_channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.jobs_channel)

    async def close(self) -> None:
        await self.catalog_channel.close()
        await self.jobs_channel.close()


def create_app(
    catalog_address: str,
    jobs_address: str,
    *,
    upload_dir: str | os.PathLike[str] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    upload_ttl_s: float = UPLOAD_TTL_S,
    watch: WatchSettings | None = None,
    tls: TlsConfig | None = None,
    service_token: str = "",
    web_dir: str | os.PathLike[str] | None = None,
) -> FastAPI:
    backends: Backends | None = None
    hub: WatchHub | None = None
    spool = UploadSpool(
        Path(upload_dir or Path(tempfile.gettempdir()) / "tuneforge-uploads"), max_upload_bytes, upload_ttl_s
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal backends, hub
        backends = Backends(catalog_address, jobs_address, tls=tls, service_token=service_token)
        # One WatchJob call per watched job, shared by its SSE watchers (watch_hub.py).
        hub = WatchHub(backends.jobs.WatchJob, watch)
        yield
        await hub.close()
        await backends.close()

    def be() -> Backends:
        assert backends is not None
        return backends

    app = FastAPI(
        title="TuneForge",
        version="0.1.0",
        lifespan=lifespan,
        description="Fine-tune language models on your own GPU nodes.",
    )
    app.add_exception_handler(grpc.aio.AioRpcError, grpc_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    document_errors(app)
    document_bodies(app)

    app.add_middleware(
        UploadSizeLimit, path="/api/v1/datasets", limit=max_upload_bytes + MULTIPART_OVERHEAD, shown=max_upload_bytes
    )
    app.add_middleware(
        UploadSizeLimit, path="/v1/files", limit=max_upload_bytes + MULTIPART_OVERHEAD, shown=max_upload_bytes
    )
    app.add_middleware(CallerCredentials)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        route = request.scope.get("route")
        with LATENCY.labels(getattr(route, "path", "other")).time():
            response = await call_next(request)
        route = request.scope.get("route")
        REQUESTS.labels(request.method, getattr(route, "path", "other"), response.status_code).inc()
        return response

    @app.get("/healthz", response_model=model_body(Health), responses=HEALTH)
    async def healthz() -> JSONResponse:
        status = {}
        for name, channel in (("catalog", be().catalog_channel), ("jobs", be().jobs_channel)):
            try:
                resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
                status[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.aio.AioRpcError:
                status[name] = "UNREACHABLE"
        ok = all(v == "SERVING" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "services": status}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- catalog --------------------------------------------------------------

    @app.post(
        "/api/v1/models",
        response_model=message_body(compb.Model),
        responses=error_responses(400, 404, 409),
        status_code=201,
    )
    async def register_model(body: RegisterModelBody) -> dict:
        sources = {k: v for k in ("path", "uri", "hub_id") if (v := getattr(body, k))}
        if len(sources) != 1:
            raise ApiError(400, "INVALID_ARGUMENT", "give exactly one of path, uri and hub_id", field="source")
        request = cpb.RegisterModelRequest(
            name=body.name, description=body.description, tags=body.tags, license=body.license, **sources
        )
        return to_json((await be().catalog.RegisterModel(request, timeout=MODEL_FETCH_TIMEOUT_S)).model)

    @app.get("/api/v1/models", response_model=message_body(cpb.ListModelsResponse), responses=error_responses(400))
    async def list_models(
        page_size: int = Query(0, ge=0, le=500),
        page_token: str = "",
        kind: str = Query("", description="The model kind (any case)", json_schema_extra=one_of(MODEL_KINDS)),
        tag: str = "",
        name_contains: str = "",
    ) -> dict:
        request = cpb.ListModelsRequest(
            page_size=page_size,
            page_token=page_token,
            kind=enum_value(MODEL_KINDS, kind, "kind"),
            tag=tag,
            name_contains=name_contains,
        )
        return to_json(await be().catalog.ListModels(request, timeout=RPC_TIMEOUT_S))

    @app.get("/api/v1/models/{model_id}", response_model=message_body(compb.Model), responses=error_responses(404))
    async def get_model(model_id: str) -> dict:
        return to_json(
            (await be().catalog.GetModel(cpb.GetModelRequest(model_id=model_id), timeout=RPC_TIMEOUT_S)).model
        )

    @app.patch(
        "/api/v1/models/{model_id}", response_model=message_body(compb.Model), responses=error_responses(400, 404, 409)
    )
    async def update_model(model_id: str, body: UpdateModelBody) -> dict:
        changes = body.model_dump(exclude_unset=True)
        # Named as this body names them (the catalog's violations say model.<field>, its request's names).
        refuse_nul(**{k: v for k, v in changes.items() if isinstance(v, str)})
        refuse_nul(**{f"tags[{i}]": tag for i, tag in enumerate(changes.get("tags", []))})
        if not changes:
            raise ApiError(
                400, "INVALID_ARGUMENT", "give at least one of name, description, tags, license", field="body"
            )
        request = cpb.UpdateModelRequest(
            model_id=model_id, model=compb.Model(**changes), update_mask=field_mask_pb2.FieldMask(paths=list(changes))
        )
        return to_json((await be().catalog.UpdateModel(request, timeout=RPC_TIMEOUT_S)).model)

    @app.delete(
        "/api/v1/models/{model_id}", responses=error_responses(404, 409), status_code=204, response_class=Response
    )
    async def delete_model(model_id: str) -> Response:
        await be().catalog.DeleteModel(cpb.DeleteModelRequest(model_id=model_id), timeout=RPC_TIMEOUT_S)
        return Response(status_code=204)

    @app.get("/api/v1/methods", response_model=message_body(cpb.ListMethodsResponse), responses=error_responses(400))
    async def list_methods(page_size: int = Query(0, ge=0, le=500), page_token: str = "") -> dict:
        return to_json(
            await be().catalog.ListMethods(
                cpb.ListMethodsRequest(page_size=page_size, page_token=page_token), timeout=RPC_TIMEOUT_S
            )
        )

    @app.get(
        "/api/v1/methods/{method_id}", response_model=message_body(compb.TrainingMethod), responses=error_responses(404)
    )
    async def get_method(method_id: str) -> dict:
        return to_json(
            (await be().catalog.GetMethod(cpb.GetMethodRequest(method_id=method_id), timeout=RPC_TIMEOUT_S)).method
        )

    @app.post(
        "/api/v1/methods",
        response_model=message_body(compb.TrainingMethod),
        responses=error_responses(400, 409),
        status_code=201,
    )
    async def create_method(
        definition: dict[str, Any] = Body(
            ..., description="The method as seed 003 gives it", json_schema_extra=method_definition_schema()
        ),
    ) -> dict:
        # Admin-only once auth lands: require the admin role here.
        request = cpb.CreateMethodRequest(definition=to_struct(definition, "definition"))
        return to_json((await be().catalog.CreateMethod(request, timeout=RPC_TIMEOUT_S)).method)

    @app.delete(
        "/api/v1/methods/{method_id}", responses=error_responses(404, 409), status_code=204, response_class=Response
    )
    async def delete_method(method_id: str) -> Response:
        # Admin-only once auth lands: require the admin role here.
        await be().catalog.DeleteMethod(cpb.DeleteMethodRequest(method_id=method_id), timeout=RPC_TIMEOUT_S)
        return Response(status_code=204)

    @app.get("/api/v1/datasets", response_model=message_body(cpb.ListDatasetsResponse), responses=error_responses(400))
    async def list_datasets(
        page_size: int = Query(0, ge=0, le=500),
        page_token: str = "",
        status: str = Query("", description="Validation status (any case)", json_schema_extra=one_of(DATASET_STATUSES)),
        format: str = Query("", description="Dataset format (any case)", json_schema_extra=one_of(DATASET_FORMATS)),
        name_contains: str = "",
    ) -> dict:
        request = cpb.ListDatasetsRequest(
            page_size=page_size,
            page_token=page_token,
            status=enum_value(DATASET_STATUSES, status, "status"),
            format=enum_value(DATASET_FORMATS, format, "format"),
            name_contains=name_contains,
        )
        return to_json(await be().catalog.ListDatasets(request, timeout=RPC_TIMEOUT_S))

    @app.get(
        "/api/v1/datasets/{dataset_id}", response_model=message_body(compb.Dataset), responses=error_responses(404)
    )
    async def get_dataset(dataset_id: str) -> dict:
        return to_json(
            (await be().catalog.GetDataset(cpb.GetDatasetRequest(dataset_id=dataset_id), timeout=RPC_TIMEOUT_S)).dataset
        )

    @app.delete(
        "/api/v1/datasets/{dataset_id}", responses=error_responses(404, 409), status_code=204, response_class=Response
    )
    async def delete_dataset(dataset_id: str) -> Response:
        await be().catalog.DeleteDataset(cpb.DeleteDatasetRequest(dataset_id=dataset_id), timeout=RPC_TIMEOUT_S)
        return Response(status_code=204)

    @app.get(
        "/api/v1/datasets/{dataset_id}/content",
        response_class=StreamingResponse,
        responses=streamed("application/x-ndjson", "The dataset's JSONL") | error_responses(404),
    )
    async def download_dataset(dataset_id: str) -> StreamingResponse:
        """The stored JSONL, streamed from the catalog as it arrives."""
        dataset = (
            await be().catalog.GetDataset(cpb.GetDatasetRequest(dataset_id=dataset_id), timeout=RPC_TIMEOUT_S)
        ).dataset
        call = be().catalog.DownloadDataset(cpb.DownloadDatasetRequest(dataset_id=dataset_id))
        # Read the first chunk before the response starts, so a failure is still an HTTP error status.
        first = await call.read()

        async def content() -> AsyncIterator[bytes]:
            # A failure past this point aborts the connection: the client sees a cut body, never a short "file".
            try:
                message = first
                while message is not grpc.aio.EOF:
                    yield message.chunk
                    message = await call.read()
            finally:
                call.cancel()

        filename = attachment_name(dataset.name, dataset_id)
        return StreamingResponse(
            content(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @app.get(
        "/api/v1/datasets/{dataset_id}/preview",
        response_model=message_body(cpb.PreviewDatasetResponse),
        responses=error_responses(400, 404),
    )
    async def preview_dataset(dataset_id: str, limit: int = Query(10, ge=1, le=100)) -> dict:
        request = cpb.PreviewDatasetRequest(dataset_id=dataset_id, limit=limit)
        return to_json(await be().catalog.PreviewDataset(request, timeout=RPC_TIMEOUT_S))

    @app.get(
        "/api/v1/datasets/{dataset_id}/stats",
        response_model=message_body(cpb.GetDatasetStatsResponse),
        responses=error_responses(400, 404, 409),
    )
    async def dataset_stats(
        dataset_id: str,
        model_id: str = Query("", description="Whose tokenizer counts the tokens"),
        max_seq_length: int = Query(
            0, ge=0, le=INT32_MAX, description="Count rows longer than this; 0 skips the count"
        ),
    ) -> dict:
        request = cpb.GetDatasetStatsRequest(dataset_id=dataset_id, model_id=model_id, max_seq_length=max_seq_length)
        return to_json(await be().catalog.GetDatasetStats(request, timeout=DATASET_PASS_TIMEOUT_S))

    @app.post(
        "/api/v1/datasets/{dataset_id}/split",
        response_model=message_body(cpb.SplitDatasetResponse),
        responses=error_responses(400, 404, 409),
        status_code=201,
    )
    async def split_dataset(dataset_id: str, body: SplitDatasetBody) -> dict:
        request = cpb.SplitDatasetRequest(dataset_id=dataset_id, validation_ratio=body.validation_ratio, seed=body.seed)
        return to_json(await be().catalog.SplitDataset(request, timeout=DATASET_PASS_TIMEOUT_S))

    @app.post(
        "/api/v1/datasets",
        response_model=message_body(compb.Dataset),
        responses=error_responses(400, 413),
        status_code=201,
    )
    async def upload_dataset(
        file: UploadFile = File(..., description="JSONL file, not empty", json_schema_extra={"minLength": 1}),
        name: str = Form("", max_length=255),
        description: str = Form("", max_length=64 * 1024),
        format: str = Form(
            "", description="Validate as this format; empty detects it", json_schema_extra=one_of(DATASET_FORMATS)
        ),
        prompt_input_column: str = Form("", description="Prompt column for the columns format"),
        prompt_output_column: str = Form("", description="Answer column for the columns format"),
    ) -> dict:
        """Multipart upload, forwarded to the catalog in chunks (the file is never held in memory whole)."""
        refuse_nul(
            name=name,
            description=description,
            prompt_input_column=prompt_input_column,
            prompt_output_column=prompt_output_column,
        )
        metadata = cpb.DatasetUploadMetadata(
            name=name or (file.filename or "").rsplit("/", 1)[-1] or "dataset",
            description=description,
            format=enum_value(DATASET_FORMATS, format, "format"),
            prompt_input_column=prompt_input_column,
            prompt_output_column=prompt_output_column,
        )

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await file.read(UPLOAD_CHUNK):
                yield chunk

        resp = await be().catalog.UploadDataset(upload_requests(metadata, chunks()), timeout=UPLOAD_TIMEOUT_S)
        return to_json(resp.dataset)

    # -- resumable uploads (protocol in uploads.py) ---------------------------

    async def signed_in() -> None:
        """The gateway keeps uploads itself, so it has the catalog check the key before it takes any bytes."""
        await be().auth.WhoAmI(apb.WhoAmIRequest(), timeout=RPC_TIMEOUT_S)

    async def may_upload() -> None:
        """Spooling bytes is the first half of adding a dataset, so it needs what adding one needs (the member
        role in the project acted in): a viewer's key must not fill the gateway's disk."""
        principal = (await be().auth.WhoAmI(apb.WhoAmIRequest(), timeout=RPC_TIMEOUT_S)).principal
        role = max(
            (r.role for r in principal.key.roles if r.project_id == principal.project_id), default=apb.ROLE_UNSPECIFIED
        )
        # No key id: the services run without keys (or the gateway's own token), so there are no roles.
        if principal.key.id and not principal.key.superuser and role < apb.ROLE_MEMBER:
            raise ApiError(
                403,
                "PERMISSION_DENIED",
                f"uploading a dataset needs the member role in project {principal.project_id!r}",
            )

    keyed = [Depends(signed_in)]
    writing = [Depends(may_upload)]

    @app.post(
        "/api/v1/uploads",
        response_model=model_body(UploadState),
        dependencies=writing,
        responses=error_responses(400, 413),
        status_code=201,
    )
    async def create_upload(body: CreateUploadBody, response: Response) -> dict:
        enum_value(DATASET_FORMATS, body.format, "format")
        # Checked now, not when the upload is completed and the catalog would name them as metadata.<field>.
        refuse_nul(**body.model_dump(include={"name", "description", "prompt_input_column", "prompt_output_column"}))
        upload = spool.create(
            body.name,
            body.description,
            body.format.strip().lower(),
            body.prompt_input_column,
            body.prompt_output_column,
            body.size,
        )
        response.headers["Location"] = f"/api/v1/uploads/{upload.upload_id}"
        return upload.to_json()

    @app.put(
        "/api/v1/uploads/{upload_id}",
        response_model=model_body(UploadState),
        dependencies=writing,
        responses=error_responses(400, 404, 409, 413),
        openapi_extra={
            "parameters": [
                {
                    "name": "Content-Range",
                    "in": "header",
                    "required": True,
                    "description": "bytes START-END/TOTAL (END inclusive; TOTAL may be *)",
                    "schema": {"type": "string", "pattern": r"^bytes [0-9]+-[0-9]+/([0-9]+|\*)$"},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
        },
    )
    async def append_upload(upload_id: str, request: Request) -> JSONResponse:
        """Append the body at `Content-Range: bytes START-END/TOTAL`; START must be the offset received so far."""
        upload = await spool.append(upload_id, request.headers.get("content-range"), request.stream())
        return JSONResponse(upload.to_json(), headers=upload.headers())

    @app.head(
        "/api/v1/uploads/{upload_id}",
        dependencies=keyed,
        response_class=Response,
        responses=error_responses(404) | {200: {"description": "No body", "headers": UPLOAD_HEADERS}},
    )
    async def upload_offset(upload_id: str) -> Response:
        return Response(headers=spool.get(upload_id).headers())

    @app.get(
        "/api/v1/uploads/{upload_id}",
        response_model=model_body(UploadState),
        dependencies=keyed,
        responses=error_responses(404),
    )
    async def get_upload(upload_id: str) -> JSONResponse:
        upload = spool.get(upload_id)
        return JSONResponse(upload.to_json(), headers=upload.headers())

    @app.post(
        "/api/v1/uploads/{upload_id}/complete",
        response_model=message_body(compb.Dataset),
        dependencies=keyed,
        responses=error_responses(400, 404, 409, 413),
        status_code=201,
    )
    async def complete_upload(upload_id: str) -> dict:
        async with spool.completing(upload_id) as (upload, chunks):
            metadata = cpb.DatasetUploadMetadata(
                name=upload.name,
                description=upload.description,
                format=enum_value(DATASET_FORMATS, upload.format, "format"),
                prompt_input_column=upload.prompt_input_column,
                prompt_output_column=upload.prompt_output_column,
            )
            resp = await be().catalog.UploadDataset(upload_requests(metadata, chunks), timeout=UPLOAD_TIMEOUT_S)
        return to_json(resp.dataset)

    @app.delete(
        "/api/v1/uploads/{upload_id}",
        dependencies=keyed,
        responses=error_responses(404, 409),
        status_code=204,
        response_class=Response,
    )
    async def delete_upload(upload_id: str) -> Response:
        spool.delete(upload_id)
        return Response(status_code=204)

    # -- who is calling: projects and API keys ----------------------------------

    @app.get("/api/v1/whoami", response_model=message_body(apb.Principal), responses=error_responses())
    async def whoami() -> dict:
        """The caller's key (never its secret), roles and the project this request acts in."""
        return to_json((await be().auth.WhoAmI(apb.WhoAmIRequest(), timeout=RPC_TIMEOUT_S)).principal)

    @app.get("/api/v1/projects", response_model=message_body(apb.ListProjectsResponse), responses=error_responses(400))
    async def list_projects(page_size: int = Query(0, ge=0, le=500), page_token: str = "") -> dict:
        request = apb.ListProjectsRequest(page_size=page_size, page_token=page_token)
        return to_json(await be().auth.ListProjects(request, timeout=RPC_TIMEOUT_S))

    @app.post(
        "/api/v1/projects",
        response_model=message_body(apb.Project),
        responses=error_responses(400, 409),
        status_code=201,
    )
    async def create_project(body: CreateProjectBody) -> dict:
        request = apb.CreateProjectRequest(name=body.name)
        return to_json((await be().auth.CreateProject(request, timeout=RPC_TIMEOUT_S)).project)

    @app.get("/api/v1/keys", response_model=message_body(apb.ListApiKeysResponse), responses=error_responses(400))
    async def list_keys(
        page_size: int = Query(0, ge=0, le=500), page_token: str = "", include_revoked: bool = False
    ) -> dict:
        request = apb.ListApiKeysRequest(page_size=page_size, page_token=page_token, include_revoked=include_revoked)
        return to_json(await be().auth.ListApiKeys(request, timeout=RPC_TIMEOUT_S))

    @app.post("/api/v1/keys", response_model=NEW_KEY, responses=error_responses(400, 404, 409), status_code=201)
    async def create_key(body: CreateKeyBody) -> dict:
        """The new key's `secret` is in this response only; store it now."""
        request = apb.CreateApiKeyRequest(
            name=body.name,
            kind=enum_value(PRINCIPAL_KINDS, body.kind, "kind"),
            roles=[
                apb.ProjectRole(project_id=project, role=enum_value(ROLES, role, f"roles.{project}"))
                for project, role in body.roles.items()
            ],
            superuser=body.superuser,
        )
        resp = await be().auth.CreateApiKey(request, timeout=RPC_TIMEOUT_S)
        return {**to_json(resp.key), "secret": resp.secret}

    @app.delete("/api/v1/keys/{key_id}", response_model=message_body(apb.ApiKey), responses=error_responses(404, 409))
    async def revoke_key(key_id: str) -> dict:
        resp = await be().auth.RevokeApiKey(apb.RevokeApiKeyRequest(key_id=key_id), timeout=RPC_TIMEOUT_S)
        return to_json(resp.key)

    # -- jobs -----------------------------------------------------------------

    @app.post(
        "/api/v1/jobs",
        response_model=JOB_WITH_ESTIMATE,
        responses=DRY_RUN | error_responses(400, 404, 409),
        status_code=201,
    )
    async def submit_job(body: SubmitJobBody, response: Response) -> dict:
        params = to_struct(body.parameters, "parameters")
        resp = await be().jobs.SubmitJob(
            jpb.SubmitJobRequest(
                model_id=body.model_id,
                dataset_id=body.dataset_id,
                validation_dataset_id=body.validation_dataset_id,
                method_id=body.method_id,
                parameters=params,
                priority=body.priority,
                name=body.name,
                labels=body.labels,
                resources=jpb.ResourceRequest(**body.resources.model_dump()),
                dry_run=body.dry_run,
            ),
            # A dry run counts the dataset's tokens: a pass over it.
            timeout=DATASET_PASS_TIMEOUT_S if body.dry_run else RPC_TIMEOUT_S,
        )
        return job_or_estimate(resp, response)

    @app.post(
        "/api/v1/jobs/{job_id}/copy",
        response_model=JOB_WITH_ESTIMATE,
        responses=DRY_RUN | error_responses(400, 404, 409),
        status_code=201,
    )
    async def copy_job(job_id: str, body: CopyJobBody, response: Response) -> dict:
        overrides = to_struct(body.parameter_overrides, "parameter_overrides")
        request = jpb.CopyJobRequest(
            job_id=job_id,
            parameter_overrides=overrides,
            dataset_id=body.dataset_id,
            validation_dataset_id=body.validation_dataset_id,
            clear_validation_dataset=body.clear_validation_dataset,
            model_id=body.model_id,
            name=body.name,
            dry_run=body.dry_run,
        )
        return job_or_estimate(await be().jobs.CopyJob(request, timeout=RPC_TIMEOUT_S), response)

    @app.post("/api/v1/jobs/{job_id}/pause", response_model=message_body(jpb.Job), responses=error_responses(404, 409))
    async def pause_job(job_id: str) -> dict:
        return to_json((await be().jobs.PauseJob(jpb.PauseJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @app.post("/api/v1/jobs/{job_id}/resume", response_model=message_body(jpb.Job), responses=error_responses(404, 409))
    async def resume_job(job_id: str) -> dict:
        return to_json((await be().jobs.ResumeJob(jpb.ResumeJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @app.delete("/api/v1/jobs/{job_id}", responses=error_responses(404, 409), status_code=204, response_class=Response)
    async def delete_job(job_id: str) -> None:
        await be().jobs.DeleteJob(jpb.DeleteJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)

    @app.get(
        "/api/v1/jobs/{job_id}/checkpoints",
        response_model=message_body(jpb.ListCheckpointsResponse),
        responses=error_responses(404),
    )
    async def list_checkpoints(job_id: str) -> dict:
        request = jpb.ListCheckpointsRequest(job_id=job_id)
        return to_json(await be().jobs.ListCheckpoints(request, timeout=RPC_TIMEOUT_S))

    @app.post(
        "/api/v1/jobs/{job_id}/publish",
        response_model=message_body(jpb.PublishCheckpointResponse),
        responses=error_responses(400, 404, 409),
        status_code=201,
    )
    async def publish_checkpoint(job_id: str, body: PublishCheckpointBody) -> dict:
        request = jpb.PublishCheckpointRequest(
            job_id=job_id, step=body.step, name=body.name, description=body.description
        )
        resp = await be().jobs.PublishCheckpoint(request, timeout=RPC_TIMEOUT_S)
        return {"model_id": resp.model_id}

    @app.get("/api/v1/jobs", response_model=message_body(jpb.ListJobsResponse), responses=error_responses(400))
    async def list_jobs(
        page_size: int = Query(0, ge=0, le=1000),
        page_token: str = "",
        state: list[str] = Query(
            default=[],
            description="Job states (any case); repeat for several",
            json_schema_extra={"items": one_of(JOB_STATES)},
        ),
        model_id: str = "",
        dataset_id: str = "",
        method_id: str = "",
        label: list[str] = Query(
            default=[],
            description="key=value; repeat for several (all must match)",
            json_schema_extra={"items": {"type": "string", "pattern": "^[^=]+="}},
        ),
        kind: list[str] = Query(
            default=[],
            description="train (the default), merge, evaluate, serve (any case); repeat for several",
            json_schema_extra={"items": one_of(JOB_KINDS)},
        ),
    ) -> dict:
        labels = {}
        for pair in label:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ApiError(400, "INVALID_ARGUMENT", f"label must be key=value, got {pair!r}", field="label")
            labels[key] = value
        request = jpb.ListJobsRequest(
            page_size=page_size,
            page_token=page_token,
            states=[enum_value(JOB_STATES, s, "state") for s in state if s],
            model_id=model_id,
            dataset_id=dataset_id,
            method_id=method_id,
            labels=labels,
            kinds=[enum_value(JOB_KINDS, k, "kind") for k in kind if k],
        )
        return to_json(await be().jobs.ListJobs(request, timeout=RPC_TIMEOUT_S))

    # Before /api/v1/jobs/{job_id}, which would otherwise take "compare" for a job id.
    @app.get(
        "/api/v1/jobs/compare",
        response_model=message_body(jpb.CompareJobsResponse),
        responses=error_responses(400, 404),
    )
    async def compare_jobs(
        job_id: list[Annotated[str, StringConstraints(min_length=1)]] = Query(
            ...,
            min_length=2,
            max_length=20,
            description="2 to 20 different jobs in the order to show them; repeat it",
            json_schema_extra={"uniqueItems": True},
        ),
        name: list[str] = Query(default=[], description="Metrics to align; repeat for several; none: those all have"),
        max_points: int = Query(0, ge=0, le=10_000, description="Buckets per series; 0: the service's default"),
    ) -> dict:
        """The parameters that differ (one value per job, null where a job lacks it) and, per metric, one
        downsampled series per job, all over one step range so that their buckets line up."""
        request = jpb.CompareJobsRequest(job_ids=job_id, metric_names=name, max_points=max_points)
        found = to_json(await be().jobs.CompareJobs(request, timeout=RPC_TIMEOUT_S))
        for difference in found["differing_parameters"]:  # Value carries numbers as doubles, as Struct does
            difference["values"] = [
                int(v) if isinstance(v, float) and v.is_integer() else v for v in difference["values"]
            ]
        return found

    @app.get("/api/v1/jobs/{job_id}", response_model=message_body(jpb.Job), responses=error_responses(404))
    async def get_job(job_id: str) -> dict:
        return to_json((await be().jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @app.post("/api/v1/jobs/{job_id}/cancel", response_model=message_body(jpb.Job), responses=error_responses(404, 409))
    async def cancel_job(job_id: str) -> dict:
        return to_json((await be().jobs.CancelJob(jpb.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @app.get(
        "/api/v1/jobs/{job_id}/history",
        response_model=message_body(jpb.ListJobEventsResponse),
        responses=error_responses(400, 404),
    )
    async def job_history(job_id: str, page_size: int = Query(0, ge=0, le=1000), page_token: str = "") -> dict:
        """The job's state transitions, oldest first."""
        return to_json(
            await be().jobs.ListJobEvents(
                jpb.ListJobEventsRequest(job_id=job_id, page_size=page_size, page_token=page_token),
                timeout=RPC_TIMEOUT_S,
            )
        )

    @app.get("/api/v1/jobs/{job_id}/metrics", response_model=METRICS, responses=error_responses(400, 404))
    async def job_metrics(
        job_id: str,
        name: list[str] = Query(default=[], description="Only these metrics; repeat for several; none: all"),
        max_points: int = Query(
            0, ge=0, le=10_000, description="Downsample each series to at most this many buckets; 0: every point"
        ),
        min_step: int = Query(0, ge=0, le=INT64_MAX, description="Only points from this step on"),
        max_step: int = Query(0, ge=0, le=INT64_MAX, description="Only points up to this step; 0: no bound"),
    ) -> dict:
        """Each metric's points as [step, value] pairs under `series` (for charts), and the points themselves.

        With max_points the service downsamples every series to equal-width step buckets aligned to multiples of
        the width (above 16 steps a multiple of 16), all over one step range; a point is then the last one of its
        bucket and carries the bucket's min, max and count, so spikes show.
        """
        if max_points:
            request = jpb.ListJobMetricsRequest(
                job_id=job_id, names=name, max_points=max_points, min_step=min_step, max_step=max_step
            )
            found = (await be().jobs.ListJobMetrics(request, timeout=RPC_TIMEOUT_S)).series
            return {
                "job_id": job_id,
                "series": {s.name: [[p.step, p.value] for p in s.points] for s in found},
                "points": [{"name": s.name, **to_json(p)} for s in found for p in s.points],
            }
        points = [
            to_json(p)
            for p in await every_page(
                be().jobs.ListJobMetrics,
                lambda token: jpb.ListJobMetricsRequest(
                    job_id=job_id, names=name, page_size=1000, page_token=token, min_step=min_step, max_step=max_step
                ),
                "points",
            )
        ]
        series: dict[str, list[list[float]]] = {}
        for p in points:
            series.setdefault(p["name"], []).append([int(p["step"]), p["value"]])
        return {"job_id": job_id, "series": series, "points": points}

    @app.get(
        "/api/v1/jobs/{job_id}/logs",
        response_model=message_body(jpb.ListJobLogsResponse),
        responses=error_responses(400, 404) | {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def job_logs(
        job_id: str,
        format: str = Query("json", pattern="^(json|text)$"),
        page_size: int = Query(0, ge=0, le=1000),
        page_token: str = "",
    ) -> Any:
        if format == "text":
            lines = await every_page(
                be().jobs.ListJobLogs,
                lambda token: jpb.ListJobLogsRequest(job_id=job_id, page_size=1000, page_token=token),
                "lines",
            )
            return PlainTextResponse("".join(f"{line.text}\n" for line in lines))
        return to_json(
            await be().jobs.ListJobLogs(
                jpb.ListJobLogsRequest(job_id=job_id, page_size=page_size, page_token=page_token), timeout=RPC_TIMEOUT_S
            )
        )

    @app.get(
        "/api/v1/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses=streamed("text/event-stream", "Server-Sent Events", JOB_EVENT) | error_responses(400, 404),
    )
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events of state changes, metric points and log lines; resumes after Last-Event-ID.

        All watchers of a job share one WatchJob stream to the jobs service (watch_hub.py); each event's id is
        the cursor to resume after it, and a `: keepalive` comment goes out after each quiet interval. The
        stream ends after the job reaches a terminal state: the `job` event in that state is the last one, after
        every point and line of the job, so a client may close there.
        """
        try:
            start = Position.parse(request.headers.get("last-event-id", ""))
        except ValueError:
            raise ApiError(400, "INVALID_ARGUMENT", "Last-Event-ID is not an event id of this stream") from None
        # Fail before the stream starts if the job does not exist, so the client gets a 404; this call, with the
        # caller's own credentials, is also what authorises this watcher to read the shared stream.
        await be().jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        assert hub is not None
        deliveries = with_keepalive(hub.watch(job_id, start), hub.settings.keepalive_s)

        async def stream() -> AsyncIterator[str]:
            OPEN_STREAMS.inc()
            try:
                async for delivery in deliveries:
                    if delivery is None:
                        yield ": keepalive\n\n"
                        continue
                    data = json.dumps(to_json(getattr(delivery.update, delivery.kind)))
                    yield f"id: {delivery.cursor}\nevent: {delivery.kind}\ndata: {data}\n\n"
            except WatchFailed as failed:
                yield f"event: error\ndata: {json.dumps({'code': failed.code.name})}\n\n"
            finally:
                OPEN_STREAMS.dec()
                await deliveries.aclose()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    from .lifecycle_routes import chat_router, lifecycle_router  # import this module's helpers, as openai_compat
    from .openai_compat import openai_router  # imports this module's helpers, so not at the top

    app.include_router(lifecycle_router(be))
    app.include_router(openai_router(be))
    app.include_router(chat_router(be))
    mount_dashboard(app, web_dir)  # last: the dashboard's `/` and `/ui/assets/` come after every API route
    return app
