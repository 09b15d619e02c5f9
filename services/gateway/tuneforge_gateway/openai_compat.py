"""OpenAI-compatible fine-tuning API under /v1, for the official `openai` client and tools built on it.

Mapping onto TuneForge:

* A file is a catalog dataset and its id is the dataset id (no second id space); only purpose "fine-tune"
  is accepted. File status: VALIDATING -> "uploaded", READY -> "processed", INVALID -> "error".
* A fine-tuning job is a TuneForge job and its id is the job id. `model` is a catalog model id,
  `training_file` a dataset id and `validation_file` (optional) the dataset the job evaluates on (its
  eval_loss) instead of holding out a share of the training rows. Method "supervised" (the default) runs
  `sft-lora`, "dpo" runs `dpo`.
  Hyperparameters: n_epochs -> epochs, batch_size -> batch_size, beta -> beta, and
  learning_rate_multiplier -> learning_rate = the method's default learning rate x the multiplier;
  "auto" (or leaving one out) keeps the platform default. `seed` -> seed, `suffix` -> the job name,
  `metadata` -> job labels. An extension for what OpenAI's API cannot say: any other key of
  hyperparameters is a TuneForge parameter by name or alias (training_steps, save_steps, lora_rank, ...),
  checked by the method's schema like every parameter.
* fine_tuned_model is the job's output URI once it has succeeded (publish it to get a catalog model id).
* Lists take OpenAI's cursor (`after`: the last id of the previous page, `limit`), newest first. Jobs are
  read one page at a time from the jobs service (ListJobs after_job_id), never the whole list.
* Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the gateway's own
  gRPC -> HTTP status mapping (errors.py); code is the gRPC code's name in lower case ("not_found"), and
  param (and the message's leading field name) is the request's OpenAI name: "model", not "model_id".
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.common.v1 import common_pb2 as compb
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_common.grpcutil import decode_error
from tuneforge_common.methods import builtin_method

from .app import RPC_TIMEOUT_S, UPLOAD_TIMEOUT_S, Backends, every_page, to_struct, upload_requests
from .errors import (
    ApiError,
    api_error_handler,
    grpc_error_handler,
    openai_error,
    openai_error_responses,
    validation_error_handler,
)
from .schemas import model_body
from .uploads import UPLOAD_CHUNK

OWNER = "tuneforge"
METHOD_IDS = {"supervised": "sft-lora", "dpo": "dpo"}
METHOD_TYPES = {v: k for k, v in METHOD_IDS.items()}
FILE_STATUS = {
    compb.DATASET_STATUS_VALIDATING: "uploaded",
    compb.DATASET_STATUS_READY: "processed",
    compb.DATASET_STATUS_INVALID: "error",
}
JOB_STATUS = {
    jpb.JOB_STATE_QUEUED: "queued",
    jpb.JOB_STATE_STARTING: "running",
    jpb.JOB_STATE_RUNNING: "running",
    jpb.JOB_STATE_PAUSED: "paused",
    jpb.JOB_STATE_SUCCEEDED: "succeeded",
    jpb.JOB_STATE_FAILED: "failed",
    jpb.JOB_STATE_CANCELLING: "cancelled",
    jpb.JOB_STATE_CANCELLED: "cancelled",
}
# OpenAI hyperparameter name -> TuneForge parameter name (learning_rate_multiplier is computed, see above).
HYPERPARAMETERS = {"n_epochs": "epochs", "batch_size": "batch_size", "beta": "beta"}
# TuneForge field names in errors (a field violation, or the message's "field: ..." prefix) -> OpenAI params.
PARAMS = {
    "model_id": "model",
    "dataset_id": "training_file",
    "validation_dataset_id": "validation_file",
    "method_id": "method.type",
    "name": "suffix",
    "labels": "metadata",
    "after_job_id": "after",
    "parameters": "hyperparameters",  # the TuneForge parameters given as extra hyperparameters
    "parameters.seed": "seed",
    "parameters.learning_rate": "hyperparameters.learning_rate_multiplier",
    **{f"parameters.{name}": f"hyperparameters.{openai_name}" for openai_name, name in HYPERPARAMETERS.items()},
}
FIELD_PREFIX = re.compile(r"[a-z_][a-z0-9_.]*: ")
# Labels the compat layer writes itself; metadata keys may not use the prefix.
LABEL_PREFIX = "openai."


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


async def reshaped(request: Request, exc: Exception) -> JSONResponse:
    """The gateway's own error answer (its status mapping and message rules) in OpenAI's error shape."""
    if isinstance(exc, OpenAIError):
        return openai_error(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, grpc.aio.AioRpcError):
        native = await grpc_error_handler(request, exc)
    elif isinstance(exc, ApiError):
        native = await api_error_handler(request, exc)
    else:
        native = await validation_error_handler(request, exc)
    error = json.loads(bytes(native.body))["error"]
    message, param = openai_param(error["message"], error.get("field"))
    return openai_error(native.status_code, message, param, str(error["code"]).lower())


def openai_param(message: str, field: str | None) -> tuple[str, str | None]:
    """(message, param) in the OpenAI request's names. Services name the field in a violation or, for NOT_FOUND
    and FAILED_PRECONDITION, as the message's prefix ("dataset_id: dataset 'x' is INVALID")."""
    name = field
    if name is None and FIELD_PREFIX.match(message):
        name = message.split(": ", 1)[0]
    if name is None:
        return message, None
    head, _, rest = name.partition(".")
    param = PARAMS.get(name) or (f"{PARAMS[head]}.{rest}" if head in PARAMS and rest else name)
    if message.startswith(f"{name}: "):
        message = f"{param}: {message[len(name) + 2 :]}"
    return message, param


class OpenAIRoute(APIRoute):
    """Routes whose errors, including request validation, come back in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (grpc.aio.AioRpcError, ApiError, RequestValidationError, OpenAIError) as exc:
                return await reshaped(request, exc)

        return handle


class SupervisedHyperparameters(BaseModel):
    # OpenAI's names below; any other key is a TuneForge parameter (see the module's docstring).
    model_config = ConfigDict(extra="allow")
    batch_size: int | Literal["auto"] | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Literal["auto"] | None = None
    n_epochs: int | Literal["auto"] | None = None


class DpoHyperparameters(SupervisedHyperparameters):
    beta: float | Literal["auto"] | None = None


class SupervisedMethod(BaseModel):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(BaseModel):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class MethodBody(BaseModel):
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


# Job labels, as OpenAI limits metadata (16 pairs) within the jobs service's label limits; the compat layer's own
# labels take the openai. prefix.
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=rf"^(?!{re.escape(LABEL_PREFIX)})")],
        Annotated[str, StringConstraints(max_length=63)],
    ],
    Field(max_length=16),
]


class CreateJobBody(BaseModel):
    model_config = ConfigDict(extra="ignore", regex_engine="python-re")  # Metadata's pattern looks ahead
    model: str = Field(..., min_length=1, max_length=128)
    training_file: str = Field(..., min_length=1, max_length=128)
    validation_file: str | None = None
    # Kept as a job label, whose values are at most 63 characters (OpenAI allows 64).
    suffix: str | None = Field(None, max_length=63)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: DpoHyperparameters | None = None
    method: MethodBody | None = None
    metadata: Metadata | None = None


# -- the answers, in OpenAI's shapes: declared in the document only (schemas.model_body); the routes build dicts --


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIFile(Answer):
    """A file: a catalog dataset (file_object)."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int = Field(..., description="Unix time")
    filename: str
    purpose: Literal["fine-tune"]
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = Field(..., description="Why a file's status is error: its validation problems")


class ListFilesResponse(Answer):
    """A page of files."""

    object: Literal["list"]
    data: list[OpenAIFile]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeleteFileResponse(Answer):
    """A deleted file."""

    id: str
    object: Literal["file"]
    deleted: bool


class JobHyperparameters(Answer):
    """A job's hyperparameters by their OpenAI names: the job's resolved values, "auto" where it has none."""

    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float | Literal["auto"]
    # TuneForge's epochs, which may be fractional where OpenAI's are whole.
    n_epochs: float | Literal["auto"]
    beta: float | Literal["auto"] = Field("auto", description="Only for the dpo method")


class JobError(Answer):
    code: str
    message: str
    param: str | None


class MethodHyperparameters(Answer):
    hyperparameters: JobHyperparameters


class SupervisedJobMethod(Answer):
    type: Literal["supervised"]
    supervised: MethodHyperparameters


class DpoJobMethod(Answer):
    type: Literal["dpo"]
    dpo: MethodHyperparameters


class FineTuningJob(Answer):
    """A fine-tuning job: a TuneForge job (job_object)."""

    id: str
    object: Literal["fine_tuning.job"]
    model: str
    created_at: int = Field(..., description="Unix time")
    finished_at: int | None = Field(..., description="Unix time, once the job has finished")
    fine_tuned_model: str | None = Field(..., description="The job's output URI, once it has succeeded")
    organization_id: str
    result_files: list[str]
    status: Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]
    validation_file: str | None
    training_file: str
    hyperparameters: JobHyperparameters
    trained_tokens: int | None
    error: JobError | None
    seed: int | None
    metadata: dict[str, str] | None
    method: SupervisedJobMethod | DpoJobMethod = Field(..., discriminator="type")
    estimated_finish: int | None = Field(..., description="Unix time, while the job runs and an estimate exists")
    suffix: str | None


class ListFineTuningJobsResponse(Answer):
    """A page of fine-tuning jobs, newest first."""

    object: Literal["list"]
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(Answer):
    """A state change ("message") or one logged step's metrics ("metrics")."""

    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int = Field(..., description="Unix time")
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, float] = Field(..., description="A metrics event's step and metric values; empty otherwise")


class ListFineTuningJobEventsResponse(Answer):
    """A page of a job's events, newest first."""

    object: Literal["list"]
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(Answer):
    """A kept checkpoint of a job."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int = Field(..., description="Unix time")
    fine_tuned_model_checkpoint: str = Field(..., description="The checkpoint's URI")
    step_number: int
    metrics: dict[str, float] = Field(..., description="The step and the metrics at that step")
    fine_tuning_job_id: str


class ListFineTuningJobCheckpointsResponse(Answer):
    """A page of a job's checkpoints, latest step first."""

    object: Literal["list"]
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


class OpenAIModel(Answer):
    """A catalog model."""

    id: str
    object: Literal["model"]
    created: int = Field(..., description="Unix time")
    owned_by: str


class ListModelsResponse(Answer):
    """Every model."""

    object: Literal["list"]
    data: list[OpenAIModel]


def seconds(ts: Any) -> int:
    return int(ts.seconds)


def seconds_or_none(ts: Any) -> int | None:
    return int(ts.seconds) or None


def file_object(dataset: compb.Dataset) -> dict[str, Any]:
    problems = "; ".join(f"line {p.line}: {p.message}" for p in dataset.validation.problems)
    return {
        "id": dataset.id,
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": seconds(dataset.create_time),
        "filename": dataset.name,
        "purpose": "fine-tune",
        "status": FILE_STATUS.get(dataset.status, "uploaded"),
        "status_details": problems or None,
    }


def method_type(method_id: str) -> str:
    return METHOD_TYPES.get(method_id, "dpo" if method_id.startswith("dpo") else "supervised")


def job_hyperparameters(job: jpb.Job) -> dict[str, Any]:
    params: dict[str, Any] = dict(job.parameters)
    found: dict[str, Any] = {}
    for openai_name, name in HYPERPARAMETERS.items():
        if name in params:
            value = params[name]
            found[openai_name] = int(value) if isinstance(value, float) and value.is_integer() else value
    base = default_learning_rate(job.method_id)
    if "learning_rate" in params and base:
        found["learning_rate_multiplier"] = params["learning_rate"] / base
    defaults = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    if method_type(job.method_id) == "dpo":
        defaults["beta"] = "auto"
    return defaults | found


def job_object(job: jpb.Job) -> dict[str, Any]:
    hyperparameters = job_hyperparameters(job)
    kind = method_type(job.method_id)
    status = JOB_STATUS.get(job.state, "queued")
    error = None
    if status == "failed":
        error = {"code": "job_failed", "message": job.state_reason or "the job failed", "param": None}
    labels = dict(job.labels)
    seed: Any = job.parameters["seed"] if "seed" in job.parameters else None
    remaining = int(job.remaining_seconds)
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "model": job.model_id,
        "created_at": seconds(job.create_time),
        "finished_at": seconds_or_none(job.end_time) if status in ("succeeded", "failed", "cancelled") else None,
        "fine_tuned_model": job.output_uri or None if status == "succeeded" else None,
        "organization_id": OWNER,
        "result_files": [],
        "status": status,
        "validation_file": job.validation_dataset_id or None,
        "training_file": job.dataset_id,
        "hyperparameters": hyperparameters,
        "trained_tokens": job.tokens_seen if status == "succeeded" else None,
        "error": error,
        "seed": int(seed) if seed is not None else None,
        "metadata": {k: v for k, v in labels.items() if not k.startswith(LABEL_PREFIX)} or None,
        "method": {"type": kind, kind: {"hyperparameters": hyperparameters}},
        "estimated_finish": seconds(job.update_time) + remaining if status == "running" and remaining else None,
        "suffix": labels.get(f"{LABEL_PREFIX}suffix"),
    }


def default_learning_rate(method_id: str) -> float:
    method = builtin_method(method_id)
    if method is None:
        return 0.0
    found = next((f for f in dataclasses.fields(method.params) if f.name == "learning_rate"), None)
    return float(found.default) if found is not None and isinstance(found.default, int | float) else 0.0


def training_parameters(body: CreateJobBody) -> tuple[str, dict[str, Any]]:
    """(method id, TuneForge parameters) from the body's method or its top-level hyperparameters."""
    hyper: SupervisedHyperparameters | None = body.hyperparameters
    kind = "supervised"
    if body.method is not None:
        kind = body.method.type
        if kind not in METHOD_IDS:
            raise OpenAIError(400, f"method.type must be one of {', '.join(METHOD_IDS)}", "method.type")
        chosen = body.method.dpo if kind == "dpo" else body.method.supervised
        if chosen is not None:
            hyper = chosen.hyperparameters
    method_id = METHOD_IDS[kind]
    params: dict[str, Any] = {}
    for openai_name, name in HYPERPARAMETERS.items():
        value = getattr(hyper, openai_name, None) if hyper is not None else None
        if value is None or value == "auto":
            continue
        if openai_name == "beta" and kind != "dpo":
            raise OpenAIError(400, "beta applies to the dpo method only", "hyperparameters.beta")
        params[name] = value
    multiplier = hyper.learning_rate_multiplier if hyper is not None else None
    if multiplier is not None and multiplier != "auto":
        if multiplier <= 0:
            raise OpenAIError(400, "learning_rate_multiplier must be > 0", "hyperparameters.learning_rate_multiplier")
        params["learning_rate"] = default_learning_rate(method_id) * multiplier
    if body.seed is not None:
        params["seed"] = body.seed
    extra = dict(hyper.model_extra or {}) if hyper is not None else {}
    if taken := sorted({*HYPERPARAMETERS.values(), "learning_rate", "seed"} & set(extra)):
        # Set through OpenAI's own fields, which would otherwise be silently overridden (or override).
        raise OpenAIError(400, f"{taken[0]} is set through its OpenAI field here", f"hyperparameters.{taken[0]}")
    return method_id, params | extra


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """OpenAI cursor paging over items already in list order: those after the one with id `after`."""
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise OpenAIError(400, f"no item with id {after!r} in this list", "after", "invalid_cursor")
        start = ids.index(after) + 1
    return items[start : start + limit], start + limit < len(items)


def listing(data: list[dict[str, Any]], has_more: bool, ids: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if ids:
        result |= {"first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
    return result


def _invalid_cursor(after: str) -> OpenAIError:
    return OpenAIError(400, f"no item with id {after!r} in this list", "after", "invalid_cursor")


def _refused_cursor(exc: grpc.aio.AioRpcError, field: str) -> bool:
    """Whether a list call refused its cursor field (an item the caller can't list after)."""
    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return False
    return any(name == field for name, _ in decode_error(exc).field_violations)


async def _files_after(backends: Backends, after: str, limit: int, newest_first: bool) -> tuple[list[Any], bool]:
    """The first `limit` datasets after the one with id `after` (by created_at, then id), and whether more follow:
    the catalog's pages (at most its page size each) until `limit`, the last page's token saying if there is more."""
    datasets: list[Any] = []
    token = ""
    while True:
        request = cpb.ListDatasetsRequest(
            page_size=limit - len(datasets), page_token=token, newest_first=newest_first, after_dataset_id=after
        )
        try:
            resp = await backends.catalog.ListDatasets(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if _refused_cursor(exc, "after_dataset_id"):
                raise _invalid_cursor(after) from None
            raise
        datasets += resp.datasets
        token = resp.next_page_token
        if not token or len(datasets) >= limit:
            return datasets[:limit], bool(token) or len(datasets) > limit


_EVENT_KEY = re.compile(r"(state|step)-(0|-?[1-9][0-9]*)")


def _activity_cursor(job_id: str, after: str) -> jpb.ActivityCursor | None:
    """The job's activity item an event id names: ftevent-<job>-state-<seq> a state change, ftevent-<job>-step-<step>
    a step's metrics. Whether the job has it, the jobs service says."""
    if not after:
        return None
    prefix = f"ftevent-{job_id}-"
    found = _EVENT_KEY.fullmatch(after[len(prefix) :]) if after.startswith(prefix) else None
    if found is None or not -(2**63) <= int(found[2]) < 2**63:
        raise _invalid_cursor(after)
    key = int(found[2])
    return jpb.ActivityCursor(seq=key) if found[1] == "state" else jpb.ActivityCursor(step=key)


async def _newest_first(
    call: Any, request_for: Callable[[str], Any], items: str, enough: Callable[[list[Any]], bool], after: str
) -> list[Any]:
    """Pages of a jobs service list read newest first until `enough` of it or its end; a refused `after` is
    OpenAI's invalid cursor."""
    collected: list[Any] = []
    token = ""
    while True:
        try:
            resp = await call(request_for(token), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if _refused_cursor(exc, "after"):
                raise _invalid_cursor(after) from None
            raise
        collected += getattr(resp, items)
        token = resp.next_page_token
        if not token or enough(collected):
            return collected


def openai_router(be: Callable[[], Backends]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

    # -- files ----------------------------------------------------------------

    @router.post("/files", response_model=model_body(OpenAIFile), responses=openai_error_responses(400, 413))
    async def create_file(
        file: UploadFile = File(..., description="JSONL, not empty", json_schema_extra={"minLength": 1}),
        purpose: str = Form(..., json_schema_extra={"enum": ["fine-tune"]}),
    ) -> dict:
        if purpose != "fine-tune":
            raise OpenAIError(400, f"purpose {purpose!r} is not supported; only 'fine-tune'", "purpose")
        metadata = cpb.DatasetUploadMetadata(name=(file.filename or "").rsplit("/", 1)[-1] or "file.jsonl")

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await file.read(UPLOAD_CHUNK):
                yield chunk

        resp = await be().catalog.UploadDataset(upload_requests(metadata, chunks()), timeout=UPLOAD_TIMEOUT_S)
        return file_object(resp.dataset)

    @router.get("/files", response_model=model_body(ListFilesResponse), responses=openai_error_responses(400))
    async def list_files(
        purpose: str = "",
        after: str = "",
        limit: int = Query(10_000, ge=1, le=10_000),
        order: str = Query("desc", pattern="^(asc|desc)$", description="By creation time: asc or desc"),
    ) -> dict:
        if purpose and purpose != "fine-tune":
            return listing([], False, ids=True)
        # The catalog sorts and starts after the cursor; only `limit` datasets are read, a page at a time.
        datasets, more = await _files_after(be(), after, limit, newest_first=order != "asc")
        return listing([file_object(d) for d in datasets], more, ids=True)

    @router.get("/files/{file_id}", response_model=model_body(OpenAIFile), responses=openai_error_responses(404))
    async def retrieve_file(file_id: str) -> dict:
        resp = await be().catalog.GetDataset(cpb.GetDatasetRequest(dataset_id=file_id), timeout=RPC_TIMEOUT_S)
        return file_object(resp.dataset)

    @router.delete(
        "/files/{file_id}", response_model=model_body(DeleteFileResponse), responses=openai_error_responses(404, 409)
    )
    async def delete_file(file_id: str) -> dict:
        await be().catalog.DeleteDataset(cpb.DeleteDatasetRequest(dataset_id=file_id), timeout=RPC_TIMEOUT_S)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- fine-tuning jobs -----------------------------------------------------

    @router.post(
        "/fine_tuning/jobs", response_model=model_body(FineTuningJob), responses=openai_error_responses(400, 404, 409)
    )
    async def create_job(body: CreateJobBody) -> dict:
        method_id, params = training_parameters(body)
        labels = dict(body.metadata or {})
        if bad := next((k for k in labels if k.startswith(LABEL_PREFIX)), None):
            raise OpenAIError(400, f"metadata keys may not start with {LABEL_PREFIX!r}: {bad!r}", "metadata")
        if body.suffix:
            labels[f"{LABEL_PREFIX}suffix"] = body.suffix
        struct = to_struct(params, "parameters")  # named as the jobs service would: reshaped to OpenAI params
        resp = await be().jobs.SubmitJob(
            jpb.SubmitJobRequest(
                model_id=body.model,
                dataset_id=body.training_file,
                validation_dataset_id=body.validation_file or "",
                method_id=method_id,
                parameters=struct,
                name=f"{body.model}:{body.suffix}" if body.suffix else "",
                labels=labels,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        return job_object(resp.job)

    @router.get(
        "/fine_tuning/jobs",
        response_model=model_body(ListFineTuningJobsResponse),
        responses=openai_error_responses(400),
    )
    async def list_jobs(after: str = "", limit: int = Query(20, ge=1, le=1000)) -> dict:
        # One page from the jobs service, which lists newest first and starts after a job id as OpenAI's cursor does.
        request = jpb.ListJobsRequest(page_size=limit, after_job_id=after)
        resp = await be().jobs.ListJobs(request, timeout=RPC_TIMEOUT_S)
        return listing([job_object(j) for j in resp.jobs], bool(resp.next_page_token))

    @router.get(
        "/fine_tuning/jobs/{job_id}", response_model=model_body(FineTuningJob), responses=openai_error_responses(404)
    )
    async def retrieve_job(job_id: str) -> dict:
        return job_object((await be().jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @router.post(
        "/fine_tuning/jobs/{job_id}/cancel",
        response_model=model_body(FineTuningJob),
        responses=openai_error_responses(404, 409),
    )
    async def cancel_job(job_id: str) -> dict:
        resp = await be().jobs.CancelJob(jpb.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        return job_object(resp.job)

    @router.post(
        "/fine_tuning/jobs/{job_id}/pause",
        response_model=model_body(FineTuningJob),
        responses=openai_error_responses(404, 409),
    )
    async def pause_job(job_id: str) -> dict:
        return job_object((await be().jobs.PauseJob(jpb.PauseJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @router.post(
        "/fine_tuning/jobs/{job_id}/resume",
        response_model=model_body(FineTuningJob),
        responses=openai_error_responses(404, 409),
    )
    async def resume_job(job_id: str) -> dict:
        resp = await be().jobs.ResumeJob(jpb.ResumeJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        return job_object(resp.job)

    @router.get(
        "/fine_tuning/jobs/{job_id}/events",
        response_model=model_body(ListFineTuningJobEventsResponse),
        responses=openai_error_responses(400, 404),
    )
    async def job_events(job_id: str, after: str = "", limit: int = Query(20, ge=1, le=10_000)) -> dict:
        """State changes as "message" events and each logged step's metrics as one "metrics" event, newest first:
        by created_at, and within one second the steps first, by step, then the state changes, by seq.

        The jobs service lists each part of the job's activity in that order after the `after` event (the
        job's ActivityCursor); only the first limit + 1 of each are read, and merged here."""
        await be().jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        cursor = _activity_cursor(job_id, after)
        transitions = await _newest_first(
            be().jobs.ListJobEvents,
            lambda token: jpb.ListJobEventsRequest(
                job_id=job_id, newest_first=True, after=cursor, page_size=limit + 1, page_token=token
            ),
            "events",
            lambda found: len(found) > limit,
            after,
        )
        points = await _newest_first(
            be().jobs.ListJobMetrics,
            lambda token: jpb.ListJobMetricsRequest(
                job_id=job_id, newest_first=True, after=cursor, page_size=limit + 1, page_token=token
            ),
            "points",
            lambda found: len({p.step for p in found}) > limit,  # a page holds whole steps
            after,
        )
        # (-created_at, 0 for a state change or 1 for a step, seq or step): the list's order (ActivityCursor's).
        events: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
        for e in transitions:
            old, new = JOB_STATUS.get(e.from_state), JOB_STATUS.get(e.to_state, "queued")
            text = f"Job changed from {old} to {new}" if old else f"Job is {new}"
            text += f": {e.reason}" if e.reason else ""
            event = {
                "id": f"ftevent-{job_id}-state-{e.seq}",
                "object": "fine_tuning.job.event",
                "created_at": seconds(e.time),
                "level": "error" if new == "failed" else "info",
                "message": text,
                "type": "message",
                "data": {},
            }
            events.append(((-seconds(e.time), 0, e.seq), event))
        by_step: dict[int, dict[str, Any]] = {}
        created: dict[int, int] = {}
        for p in points:
            by_step.setdefault(p.step, {"step": p.step})[p.name] = p.value
            created[p.step] = max(created.get(p.step, 0), seconds(p.time))
        for step, data in by_step.items():
            if "loss" in data and "train_loss" not in data:
                data["train_loss"] = data["loss"]
            event = {
                "id": f"ftevent-{job_id}-step-{step}",
                "object": "fine_tuning.job.event",
                "created_at": created[step],
                "level": "info",
                "message": f"Step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in data.items() if k != "step"),
                "type": "metrics",
                "data": data,
            }
            events.append(((-created[step], 1, step), event))
        ordered = [event for _, event in sorted(events, key=lambda pair: pair[0])]
        return listing(ordered[:limit], len(ordered) > limit)

    @router.get(
        "/fine_tuning/jobs/{job_id}/checkpoints",
        response_model=model_body(ListFineTuningJobCheckpointsResponse),
        responses=openai_error_responses(400, 404),
    )
    async def job_checkpoints(job_id: str, after: str = "", limit: int = Query(10, ge=1, le=1000)) -> dict:
        resp = await be().jobs.ListCheckpoints(jpb.ListCheckpointsRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        checkpoints = []
        for c in sorted(resp.checkpoints, key=lambda c: c.step, reverse=True):
            metrics: dict[str, Any] = {"step": c.step, **dict(c.metrics)}
            if "loss" in metrics and "train_loss" not in metrics:
                metrics["train_loss"] = metrics["loss"]
            checkpoints.append(
                {
                    "id": f"ftckpt-{job_id}-{c.step}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": seconds(c.create_time),
                    "fine_tuned_model_checkpoint": c.uri,
                    "step_number": c.step,
                    "metrics": metrics,
                    "fine_tuning_job_id": job_id,
                }
            )
        data, more = page(checkpoints, after, limit)
        return listing(data, more, ids=True)

    # -- models ---------------------------------------------------------------

    def model_object(model: compb.Model) -> dict[str, Any]:
        return {"id": model.id, "object": "model", "created": seconds(model.create_time), "owned_by": OWNER}

    @router.get("/models", response_model=model_body(ListModelsResponse), responses=openai_error_responses())
    async def list_models() -> dict:
        models = await every_page(
            be().catalog.ListModels, lambda token: cpb.ListModelsRequest(page_size=1000, page_token=token), "models"
        )
        return {"object": "list", "data": [model_object(m) for m in models]}

    @router.get(
        "/models/{model_id:path}", response_model=model_body(OpenAIModel), responses=openai_error_responses(404)
    )
    async def retrieve_model(model_id: str) -> dict:
        resp = await be().catalog.GetModel(cpb.GetModelRequest(model_id=model_id), timeout=RPC_TIMEOUT_S)
        return model_object(resp.model)

    return router
