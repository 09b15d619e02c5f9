"""HTTP/JSON + SSE API over the catalog and jobs gRPC services."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import jobs_pb2_grpc

from .errors import ApiError, api_error_handler, grpc_error_handler, validation_error_handler

RPC_TIMEOUT_S = 30.0
UPLOAD_CHUNK = 1024 * 1024
REQUESTS = Counter("tuneforge_gateway_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("tuneforge_gateway_request_seconds", "HTTP request latency", ["route"])


def to_json(message: Any) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _tidy(message.DESCRIPTOR, data)


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_ENUM_PREFIXES = ("JOB_STATE_", "DATASET_FORMAT_", "PARAMETER_TYPE_")


def _tidy(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """HTTP-friendly JSON: 64-bit integers as numbers, enum names without their type prefix (null when unset),
    and integral parameter values as integers (protobuf Struct carries every number as a double)."""
    for fd in descriptor.fields:
        if fd.name not in data:
            continue
        value = data[fd.name]
        if fd.type in _INT64:
            data[fd.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif fd.type == FieldDescriptor.TYPE_ENUM and isinstance(value, str):
            if value.endswith("_UNSPECIFIED"):
                data[fd.name] = None
                continue
            for prefix in _ENUM_PREFIXES:
                value = value.removeprefix(prefix)
            data[fd.name] = value.lower() if fd.enum_type.name in ("DatasetFormat", "ParameterType") else value
        elif fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Struct":
            data[fd.name] = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in value.items()}
        elif fd.message_type is not None and not fd.message_type.full_name.startswith("google.protobuf"):
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict):
                    _tidy(fd.message_type, item)
    return data


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


class SubmitJobBody(BaseModel):
    model_id: str = Field(..., description="Catalog model id", min_length=1, max_length=128)
    dataset_id: str = Field(..., description="Catalog dataset id", min_length=1, max_length=128)
    method_id: str = Field("sft-lora", description="Training method id", min_length=1, max_length=128)
    parameters: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters by name or alias")
    priority: int = Field(0, ge=-1000, le=1000)
    name: str = Field("", max_length=255)


class Backends:
    def __init__(self, catalog_address: str, jobs_address: str) -> None:
        self.catalog_channel = grpc.aio.insecure_channel(catalog_address)
        self.jobs_channel = grpc.aio.insecure_channel(jobs_address)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self.catalog_channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.jobs_channel)

    async def close(self) -> None:
        await self.catalog_channel.close()
        await self.jobs_channel.close()


def create_app(catalog_address: str, jobs_address: str) -> FastAPI:
    backends: Backends | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal backends
        backends = Backends(catalog_address, jobs_address)
        yield
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

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        route = request.scope.get("route")
        with LATENCY.labels(getattr(route, "path", "other")).time():
            response = await call_next(request)
        route = request.scope.get("route")
        REQUESTS.labels(request.method, getattr(route, "path", "other"), response.status_code).inc()
        return response

    @app.get("/healthz")
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

    @app.get("/api/v1/models")
    async def list_models(page_size: int = Query(0, ge=0, le=500), page_token: str = "") -> dict:
        return to_json(
            await be().catalog.ListModels(
                cpb.ListModelsRequest(page_size=page_size, page_token=page_token), timeout=RPC_TIMEOUT_S
            )
        )

    @app.get("/api/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        return to_json(
            (await be().catalog.GetModel(cpb.GetModelRequest(model_id=model_id), timeout=RPC_TIMEOUT_S)).model
        )

    @app.get("/api/v1/methods")
    async def list_methods(page_size: int = Query(0, ge=0, le=500), page_token: str = "") -> dict:
        return to_json(
            await be().catalog.ListMethods(
                cpb.ListMethodsRequest(page_size=page_size, page_token=page_token), timeout=RPC_TIMEOUT_S
            )
        )

    @app.get("/api/v1/methods/{method_id}")
    async def get_method(method_id: str) -> dict:
        return to_json(
            (await be().catalog.GetMethod(cpb.GetMethodRequest(method_id=method_id), timeout=RPC_TIMEOUT_S)).method
        )

    @app.get("/api/v1/datasets")
    async def list_datasets(page_size: int = Query(0, ge=0, le=500), page_token: str = "") -> dict:
        return to_json(
            await be().catalog.ListDatasets(
                cpb.ListDatasetsRequest(page_size=page_size, page_token=page_token), timeout=RPC_TIMEOUT_S
            )
        )

    @app.get("/api/v1/datasets/{dataset_id}")
    async def get_dataset(dataset_id: str) -> dict:
        return to_json(
            (await be().catalog.GetDataset(cpb.GetDatasetRequest(dataset_id=dataset_id), timeout=RPC_TIMEOUT_S)).dataset
        )

    @app.post("/api/v1/datasets", status_code=201)
    async def upload_dataset(
        file: UploadFile = File(..., description="JSONL file"),
        name: str = Form("", max_length=255),
        description: str = Form(""),
    ) -> dict:
        dataset_name = name or (file.filename or "").rsplit("/", 1)[-1] or "dataset"

        async def requests() -> AsyncIterator[cpb.UploadDatasetRequest]:
            yield cpb.UploadDatasetRequest(
                metadata=cpb.DatasetUploadMetadata(name=dataset_name, description=description)
            )
            while chunk := await file.read(UPLOAD_CHUNK):
                yield cpb.UploadDatasetRequest(chunk=chunk)

        resp = await be().catalog.UploadDataset(requests(), timeout=600)
        return to_json(resp.dataset)

    # -- jobs -----------------------------------------------------------------

    @app.post("/api/v1/jobs", status_code=201)
    async def submit_job(body: SubmitJobBody) -> dict:
        params = struct_pb2.Struct()
        params.update(body.parameters)
        resp = await be().jobs.SubmitJob(
            jpb.SubmitJobRequest(
                model_id=body.model_id,
                dataset_id=body.dataset_id,
                method_id=body.method_id,
                parameters=params,
                priority=body.priority,
                name=body.name,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        return to_json(resp.job)

    @app.get("/api/v1/jobs")
    async def list_jobs(page_size: int = Query(0, ge=0, le=1000), page_token: str = "") -> dict:
        return to_json(
            await be().jobs.ListJobs(
                jpb.ListJobsRequest(page_size=page_size, page_token=page_token), timeout=RPC_TIMEOUT_S
            )
        )

    @app.get("/api/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict:
        return to_json((await be().jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @app.post("/api/v1/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> dict:
        return to_json((await be().jobs.CancelJob(jpb.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)).job)

    @app.get("/api/v1/jobs/{job_id}/history")
    async def job_history(job_id: str, page_size: int = Query(0, ge=0, le=1000), page_token: str = "") -> dict:
        """The job's state transitions, oldest first."""
        return to_json(
            await be().jobs.ListJobEvents(
                jpb.ListJobEventsRequest(job_id=job_id, page_size=page_size, page_token=page_token),
                timeout=RPC_TIMEOUT_S,
            )
        )

    @app.get("/api/v1/jobs/{job_id}/metrics")
    async def job_metrics(job_id: str, name: list[str] = Query(default=[])) -> dict:
        points = [
            to_json(p)
            for p in await every_page(
                be().jobs.ListJobMetrics,
                lambda token: jpb.ListJobMetricsRequest(job_id=job_id, names=name, page_size=1000, page_token=token),
                "points",
            )
        ]
        series: dict[str, list[list[float]]] = {}
        for p in points:
            series.setdefault(p["name"], []).append([int(p["step"]), p["value"]])
        return {"job_id": job_id, "series": series, "points": points}

    @app.get("/api/v1/jobs/{job_id}/logs")
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

    @app.get("/api/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events of state changes, metric points and log lines; resumes at Last-Event-ID."""
        cursor = request.headers.get("last-event-id", "")
        # Fail before the stream starts if the job does not exist, so the client gets a 404.
        await be().jobs.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)

        async def stream() -> AsyncIterator[str]:
            call = be().jobs.WatchJob(jpb.WatchJobRequest(job_id=job_id, after_cursor=cursor))
            try:
                async for update in call:
                    kind = update.WhichOneof("update")
                    data = json.dumps(to_json(getattr(update, kind)))
                    yield f"id: {update.cursor}\nevent: {kind}\ndata: {data}\n\n"
            except grpc.aio.AioRpcError as err:
                yield f"event: error\ndata: {json.dumps({'code': err.code().name})}\n\n"
            finally:
                call.cancel()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app
