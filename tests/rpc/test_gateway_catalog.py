"""The gateway's catalog routes (and the jobs list filters) against fake in-process gRPC services on port 0.

The fakes record every request they receive and answer with canned messages or with the status a real
service would send (built by the services' own error mapper), so these tests pin what each HTTP route forwards,
how filters, enums and update masks are built, how gRPC codes become HTTP statuses, and both upload paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from tuneforge.auth.v1 import auth_pb2, auth_pb2_grpc
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2 as compb
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common import errors
from tuneforge_common.grpcutil import ServiceBinding, start_server, status_for
from tuneforge_common.paging import struct
from tuneforge_gateway.app import MULTIPART_OVERHEAD, UPLOAD_CHUNK, create_app


class Recorder:
    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []
        # Method name -> the domain error to answer it with (through the services' real mapper).
        self.failures: dict[str, errors.DomainError] = {}
        # Method name -> a bare status, as gRPC itself reports a transport failure (no status details).
        self.transport_failures: dict[str, tuple[grpc.StatusCode, str]] = {}

    async def enter(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.received.append((method, request))
        if (error := self.failures.get(method)) is not None:
            status = status_for(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
        if (bare := self.transport_failures.get(method)) is not None:
            await context.abort(*bare)

    def calls(self, method: str) -> list[Any]:
        return [request for name, request in self.received if name == method]

    def last(self, method: str) -> Any:
        calls = self.calls(method)
        assert calls, f"{method} was never called"
        return calls[-1]


def dataset(dataset_id: str = "ds-1", **fields: Any) -> compb.Dataset:
    base: dict[str, Any] = dict(id=dataset_id, name="support chats", status=compb.DATASET_STATUS_READY)
    return compb.Dataset(**(base | fields))


class FakeCatalog(Recorder, catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self) -> None:
        super().__init__()
        self.content = b""
        self.uploads: list[list[cpb.UploadDatasetRequest]] = []
        self.listed: list[compb.Dataset] = [dataset(format=compb.DATASET_FORMAT_CHAT)]  # ListDatasets' answer

    async def RegisterModel(self, request: cpb.RegisterModelRequest, context: Any) -> cpb.RegisterModelResponse:
        await self.enter("RegisterModel", request, context)
        return cpb.RegisterModelResponse(
            model=compb.Model(id="m-1", name=request.name, kind=compb.MODEL_KIND_BASE, parameter_count=7_000_000_000)
        )

    async def ListModels(self, request: cpb.ListModelsRequest, context: Any) -> cpb.ListModelsResponse:
        await self.enter("ListModels", request, context)
        return cpb.ListModelsResponse(
            models=[compb.Model(id="m-1", kind=compb.MODEL_KIND_CUSTOMIZED), compb.Model(id="m-2")],
            next_page_token="page-2",
        )

    async def GetModel(self, request: cpb.GetModelRequest, context: Any) -> cpb.GetModelResponse:
        await self.enter("GetModel", request, context)
        return cpb.GetModelResponse(model=compb.Model(id=request.model_id))

    async def UpdateModel(self, request: cpb.UpdateModelRequest, context: Any) -> cpb.UpdateModelResponse:
        await self.enter("UpdateModel", request, context)
        model = compb.Model(id=request.model_id, kind=compb.MODEL_KIND_BASE)
        request.update_mask.MergeMessage(request.model, model)
        return cpb.UpdateModelResponse(model=model)

    async def DeleteModel(self, request: cpb.DeleteModelRequest, context: Any) -> cpb.DeleteModelResponse:
        await self.enter("DeleteModel", request, context)
        return cpb.DeleteModelResponse()

    async def ListDatasets(self, request: cpb.ListDatasetsRequest, context: Any) -> cpb.ListDatasetsResponse:
        await self.enter("ListDatasets", request, context)
        return cpb.ListDatasetsResponse(datasets=self.listed)

    async def GetDataset(self, request: cpb.GetDatasetRequest, context: Any) -> cpb.GetDatasetResponse:
        await self.enter("GetDataset", request, context)
        return cpb.GetDatasetResponse(dataset=dataset(request.dataset_id))

    async def DeleteDataset(self, request: cpb.DeleteDatasetRequest, context: Any) -> cpb.DeleteDatasetResponse:
        await self.enter("DeleteDataset", request, context)
        return cpb.DeleteDatasetResponse()

    async def DownloadDataset(
        self, request: cpb.DownloadDatasetRequest, context: Any
    ) -> AsyncIterator[cpb.DownloadDatasetResponse]:
        await self.enter("DownloadDataset", request, context)
        for start in range(0, len(self.content), 1000):
            yield cpb.DownloadDatasetResponse(chunk=self.content[start : start + 1000])

    async def PreviewDataset(self, request: cpb.PreviewDatasetRequest, context: Any) -> cpb.PreviewDatasetResponse:
        await self.enter("PreviewDataset", request, context)
        return cpb.PreviewDatasetResponse(rows=[struct({"text": "hello", "n": 1}), struct({"text": "bye", "n": 2.5})])

    async def GetDatasetStats(self, request: cpb.GetDatasetStatsRequest, context: Any) -> cpb.GetDatasetStatsResponse:
        await self.enter("GetDatasetStats", request, context)
        return cpb.GetDatasetStatsResponse(
            row_count=40,
            min_tokens=12,
            mean_tokens=33.5,
            p50_tokens=30,
            p95_tokens=60,
            max_tokens=70,
            total_tokens=1340,
        )

    async def SplitDataset(self, request: cpb.SplitDatasetRequest, context: Any) -> cpb.SplitDatasetResponse:
        await self.enter("SplitDataset", request, context)
        return cpb.SplitDatasetResponse(
            train=dataset("ds-train", parent_dataset_id=request.dataset_id, row_count=36),
            validation=dataset("ds-val", parent_dataset_id=request.dataset_id, row_count=4),
        )

    async def UploadDataset(self, request_iterator: Any, context: Any) -> cpb.UploadDatasetResponse:
        messages = [message async for message in request_iterator]
        self.uploads.append(messages)
        await self.enter("UploadDataset", messages, context)
        meta = messages[0].metadata
        content = b"".join(m.chunk for m in messages[1:])
        problems = []
        for line, row in enumerate(content.splitlines(), start=1):
            try:
                json.loads(row)
            except ValueError:
                problems.append(compb.ValidationProblem(line=line, message="not valid JSON"))
        return cpb.UploadDatasetResponse(
            dataset=dataset(
                name=meta.name,
                format=meta.format,
                size_bytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                status=compb.DATASET_STATUS_INVALID if problems else compb.DATASET_STATUS_READY,
                validation=compb.DatasetValidation(problems=problems, problem_count=len(problems)),
            )
        )

    async def CreateMethod(self, request: cpb.CreateMethodRequest, context: Any) -> cpb.CreateMethodResponse:
        await self.enter("CreateMethod", request, context)
        return cpb.CreateMethodResponse(method=compb.TrainingMethod(id=str(request.definition["name"])))

    async def DeleteMethod(self, request: cpb.DeleteMethodRequest, context: Any) -> cpb.DeleteMethodResponse:
        await self.enter("DeleteMethod", request, context)
        return cpb.DeleteMethodResponse()


class FakeJobs(Recorder, jobs_pb2_grpc.JobServiceServicer):
    async def ListJobs(self, request: jpb.ListJobsRequest, context: Any) -> jpb.ListJobsResponse:
        await self.enter("ListJobs", request, context)
        return jpb.ListJobsResponse(jobs=[jpb.Job(id="j-1", state=jpb.JOB_STATE_RUNNING)])


@dataclass
class Backend:
    catalog: FakeCatalog
    jobs: FakeJobs
    address: str


class SignedIn(auth_pb2_grpc.AuthServiceServicer):
    """The caller is known (the gateway asks before it keeps an upload's bytes)."""

    async def WhoAmI(self, request: auth_pb2.WhoAmIRequest, context: Any) -> auth_pb2.WhoAmIResponse:
        return auth_pb2.WhoAmIResponse(principal=auth_pb2.Principal(project_id="default"))


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    catalog, jobs = FakeCatalog(), FakeJobs()
    server, port = await start_server(
        [
            ServiceBinding(
                auth_pb2_grpc.add_AuthServiceServicer_to_server, SignedIn(), "tuneforge.auth.v1.AuthService"
            ),
            ServiceBinding(
                catalog_pb2_grpc.add_CatalogServiceServicer_to_server, catalog, "tuneforge.catalog.v1.CatalogService"
            ),
            ServiceBinding(jobs_pb2_grpc.add_JobServiceServicer_to_server, jobs, "tuneforge.jobs.v1.JobService"),
        ],
        "127.0.0.1",
        0,
    )
    yield Backend(catalog, jobs, f"127.0.0.1:{port}")
    await server.stop(None)


@asynccontextmanager
async def gateway(backend: Backend, spool: Path, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """One gateway process's worth of app: its own lifespan (gRPC channels) over the given spool directory."""
    app = create_app(backend.address, backend.address, upload_dir=spool, **options)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def http(backend: Backend, spool: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(backend, spool) as client:
        yield client


def error_of(resp: httpx.Response) -> dict[str, Any]:
    return resp.json()["error"]


def jsonl(rows: int, width: int = 60) -> bytes:
    return b"".join(json.dumps({"text": f"row {i} " + "x" * width}).encode() + b"\n" for i in range(rows))


# -- models --------------------------------------------------------------------------------------------------


async def test_register_model_forwards_the_one_source_and_answers_201(http, backend):
    body = {"hub_id": "Qwen/Qwen2.5-0.5B", "name": "qwen", "description": "d", "tags": ["a", "b"], "license": "mit"}
    resp = await http.post("/api/v1/models", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["kind"] == "BASE" and resp.json()["parameter_count"] == 7_000_000_000
    sent = backend.catalog.last("RegisterModel")
    assert sent.WhichOneof("source") == "hub_id" and sent.hub_id == "Qwen/Qwen2.5-0.5B"
    assert (sent.name, sent.description, list(sent.tags), sent.license) == ("qwen", "d", ["a", "b"], "mit")


@pytest.mark.parametrize("sources", [{}, {"path": "/m", "uri": "file:///m"}, {"path": "/m", "hub_id": "a/b"}])
async def test_register_model_needs_exactly_one_source(http, backend, sources):
    resp = await http.post("/api/v1/models", json={"name": "m", **sources})
    assert resp.status_code == 400 and error_of(resp)["field"] == "source"
    assert backend.catalog.calls("RegisterModel") == []


async def test_register_model_with_an_unknown_key_is_a_400_naming_it(http, backend):
    resp = await http.post("/api/v1/models", json={"path": "/m", "name": "m", "weights": "big"})
    assert resp.status_code == 400 and error_of(resp)["field"] == "weights"
    assert backend.catalog.calls("RegisterModel") == []


@pytest.mark.parametrize(
    "kind,value",
    [
        ("BASE", compb.MODEL_KIND_BASE),
        ("customized", compb.MODEL_KIND_CUSTOMIZED),
        ("Complete", compb.MODEL_KIND_COMPLETE),
        ("LIVE", compb.MODEL_KIND_LIVE),
    ],
)
async def test_list_models_filters_map_to_the_request_and_the_kind_enum(http, backend, kind, value):
    params = {"kind": kind, "tag": "chat", "name_contains": "qw", "page_size": 5, "page_token": "t1"}
    resp = await http.get("/api/v1/models", params=params)
    assert resp.status_code == 200, resp.text
    sent = backend.catalog.last("ListModels")
    assert (sent.kind, sent.tag, sent.name_contains, sent.page_size, sent.page_token) == (value, "chat", "qw", 5, "t1")
    body = resp.json()
    assert [m["kind"] for m in body["models"]] == ["CUSTOMIZED", None]  # unset enum is null
    assert body["next_page_token"] == "page-2"


async def test_list_models_without_filters_sends_unspecified(http, backend):
    assert (await http.get("/api/v1/models")).status_code == 200
    sent = backend.catalog.last("ListModels")
    assert (sent.kind, sent.tag, sent.name_contains) == (compb.MODEL_KIND_UNSPECIFIED, "", "")


async def test_an_unknown_model_kind_is_a_400_naming_kind(http, backend):
    resp = await http.get("/api/v1/models", params={"kind": "MERGED"})
    assert resp.status_code == 400 and error_of(resp)["field"] == "kind"
    assert "BASE" in error_of(resp)["message"]
    assert backend.catalog.calls("ListModels") == []


@pytest.mark.parametrize(
    "body,paths",
    [
        ({"name": "renamed"}, ["name"]),
        ({"description": "new", "tags": ["x", "y"]}, ["description", "tags"]),
        ({"license": "", "tags": []}, ["tags", "license"]),  # clearing a field is still a change
    ],
)
async def test_patch_model_builds_the_update_mask_from_the_keys_present(http, backend, body, paths):
    resp = await http.patch("/api/v1/models/m-1", json=body)
    assert resp.status_code == 200, resp.text
    sent = backend.catalog.last("UpdateModel")
    assert sent.model_id == "m-1" and sorted(sent.update_mask.paths) == sorted(paths)
    for key, value in body.items():
        assert (list(getattr(sent.model, key)) if key == "tags" else getattr(sent.model, key)) == value
        assert resp.json()[key] == value


async def test_patch_model_with_an_unknown_key_is_a_400_naming_it(http, backend):
    resp = await http.patch("/api/v1/models/m-1", json={"name": "x", "owner": "me"})
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["field"] == "owner"
    assert backend.catalog.calls("UpdateModel") == []


async def test_patch_model_with_no_keys_is_a_400(http, backend):
    resp = await http.patch("/api/v1/models/m-1", json={})
    assert resp.status_code == 400
    assert backend.catalog.calls("UpdateModel") == []


async def test_delete_model_is_204_and_a_model_in_use_is_409(http, backend):
    resp = await http.delete("/api/v1/models/m-1")
    assert resp.status_code == 204 and resp.content == b""
    assert backend.catalog.last("DeleteModel").model_id == "m-1"
    backend.catalog.failures["DeleteModel"] = errors.FailedPrecondition("job j-1 uses model m-1")
    resp = await http.delete("/api/v1/models/m-1")
    assert resp.status_code == 409
    assert error_of(resp) == {"code": "FAILED_PRECONDITION", "message": "job j-1 uses model m-1", "field": None}


# -- error mapping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error,status",
    [
        (errors.NotFound("no model m-9"), 404),
        (errors.InvalidArgument.for_field("model_id", "too long"), 400),
        (errors.FailedPrecondition("in use"), 409),
        (errors.AlreadyExists("exists"), 409),
        (errors.ResourceExhausted("too big"), 413),
        (errors.Unavailable("jobs service down"), 503),
    ],
)
async def test_grpc_codes_become_http_statuses(http, backend, error, status):
    backend.catalog.failures["GetModel"] = error
    resp = await http.get("/api/v1/models/m-9")
    assert resp.status_code == status
    assert error_of(resp)["code"] == status_for(error).code.name


async def test_a_services_own_unavailable_message_reaches_the_client(http, backend):
    backend.catalog.failures["RegisterModel"] = errors.Unavailable("could not fetch 'org/model' from the Hub")
    resp = await http.post("/api/v1/models", json={"hub_id": "org/model", "name": "m"})
    assert resp.status_code == 503 and error_of(resp)["message"] == "could not fetch 'org/model' from the Hub"


async def test_a_transport_failure_is_a_generic_503_without_grpc_internals(http, backend):
    backend.catalog.transport_failures["GetModel"] = (
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; ipv4:10.0.0.1:50051",
    )
    resp = await http.get("/api/v1/models/m-1")
    assert resp.status_code == 503 and error_of(resp)["message"] == "a backend service is unavailable"


async def test_a_list_response_over_grpcs_4_mib_default_reaches_the_client(http, backend):
    description = "d" * (6 * 1024 * 1024)  # one ListDatasets page of 6 MiB: over gRPC's default receive limit
    backend.catalog.listed = [dataset("ds-big", description=description), dataset("ds-2")]
    resp = await http.get("/api/v1/datasets")
    assert resp.status_code == 200, resp.text[:200]
    assert [(d["id"], len(d["description"])) for d in resp.json()["datasets"]] == [
        ("ds-big", len(description)),
        ("ds-2", 0),
    ]


async def test_a_message_over_the_grpc_limit_is_a_generic_502_not_a_413_with_transport_text(http, backend):
    # What gRPC itself reports when a message passes a channel's limit: RESOURCE_EXHAUSTED without status details.
    backend.catalog.transport_failures["ListDatasets"] = (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "CLIENT: Received message larger than max (70000000 vs. 67108864)",
    )
    resp = await http.get("/api/v1/datasets")
    assert resp.status_code == 502
    assert error_of(resp) == {
        "code": "RESOURCE_EXHAUSTED",
        "message": "a backend response was too large",
        "field": None,
    }
    assert "67108864" not in resp.text


async def test_a_services_own_resource_exhausted_is_still_a_413_with_its_message(http, backend):
    backend.catalog.failures["ListDatasets"] = errors.ResourceExhausted("too many datasets requested")
    resp = await http.get("/api/v1/datasets")
    assert resp.status_code == 413
    assert error_of(resp) == {"code": "RESOURCE_EXHAUSTED", "message": "too many datasets requested", "field": None}


async def test_invalid_argument_carries_its_field_violations(http, backend):
    backend.catalog.failures["CreateMethod"] = errors.InvalidArgument(
        "stages: missing files",
        [
            errors.FieldViolation("stages.training.file", "is required"),
            errors.FieldViolation("stages.saving.file", "is required"),
        ],
    )
    resp = await http.post("/api/v1/methods", json={"name": "my-method"})
    assert resp.status_code == 400
    assert error_of(resp)["field"] == "stages.training.file"
    assert error_of(resp)["field_violations"] == [
        {"field": "stages.training.file", "description": "is required"},
        {"field": "stages.saving.file", "description": "is required"},
    ]


# -- datasets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status,format,status_value,format_value",
    [
        ("READY", "chat", compb.DATASET_STATUS_READY, compb.DATASET_FORMAT_CHAT),
        ("invalid", "prompt_completion", compb.DATASET_STATUS_INVALID, compb.DATASET_FORMAT_PROMPT_COMPLETION),
        ("VALIDATING", "preference", compb.DATASET_STATUS_VALIDATING, compb.DATASET_FORMAT_PREFERENCE),
        ("", "text", compb.DATASET_STATUS_UNSPECIFIED, compb.DATASET_FORMAT_TEXT),
        ("", "instruction", compb.DATASET_STATUS_UNSPECIFIED, compb.DATASET_FORMAT_INSTRUCTION),
        ("", "columns", compb.DATASET_STATUS_UNSPECIFIED, compb.DATASET_FORMAT_COLUMNS),
        ("", "PROMPT_ANSWER", compb.DATASET_STATUS_UNSPECIFIED, compb.DATASET_FORMAT_PROMPT_ANSWER),
    ],
)
async def test_list_datasets_filters_map_to_status_and_format_enums(
    http, backend, status, format, status_value, format_value
):
    resp = await http.get("/api/v1/datasets", params={"status": status, "format": format, "name_contains": "sup"})
    assert resp.status_code == 200, resp.text
    sent = backend.catalog.last("ListDatasets")
    assert (sent.status, sent.format, sent.name_contains) == (status_value, format_value, "sup")
    assert resp.json()["datasets"][0] | {"status": "READY", "format": "chat"} == resp.json()["datasets"][0]


@pytest.mark.parametrize("param", ["status", "format"])
async def test_an_unknown_dataset_filter_value_is_a_400_naming_it(http, backend, param):
    resp = await http.get("/api/v1/datasets", params={param: "sharegpt"})
    assert resp.status_code == 400 and error_of(resp)["field"] == param
    assert backend.catalog.calls("ListDatasets") == []


async def test_delete_dataset_is_204_and_a_dataset_in_use_is_409(http, backend):
    assert (await http.delete("/api/v1/datasets/ds-1")).status_code == 204
    assert backend.catalog.last("DeleteDataset").dataset_id == "ds-1"
    backend.catalog.failures["DeleteDataset"] = errors.FailedPrecondition("job j-1 uses it")
    assert (await http.delete("/api/v1/datasets/ds-1")).status_code == 409


async def test_download_streams_the_stored_content_as_an_ndjson_attachment(http, backend):
    backend.catalog.content = jsonl(100)  # several DownloadDataset chunks
    resp = await http.get("/api/v1/datasets/ds-1/content")
    assert resp.status_code == 200
    assert resp.content == backend.catalog.content
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert resp.headers["content-disposition"] == 'attachment; filename="support_chats.jsonl"'
    assert backend.catalog.last("DownloadDataset").dataset_id == "ds-1"


@pytest.mark.parametrize("failing", ["GetDataset", "DownloadDataset"])
async def test_download_of_a_missing_dataset_is_404_before_any_content(http, backend, failing):
    backend.catalog.failures[failing] = errors.NotFound("no dataset ds-9")
    resp = await http.get("/api/v1/datasets/ds-9/content")
    assert resp.status_code == 404 and error_of(resp)["message"] == "no dataset ds-9"


async def test_preview_forwards_the_limit_and_returns_rows(http, backend):
    resp = await http.get("/api/v1/datasets/ds-1/preview", params={"limit": 2})
    assert resp.status_code == 200
    assert backend.catalog.last("PreviewDataset").limit == 2
    assert resp.json() == {"rows": [{"text": "hello", "n": 1}, {"text": "bye", "n": 2.5}]}
    assert (await http.get("/api/v1/datasets/ds-1/preview", params={"limit": 1000})).status_code == 400


async def test_stats_forward_model_and_max_seq_length(http, backend):
    resp = await http.get("/api/v1/datasets/ds-1/stats", params={"model_id": "tiny-chat", "max_seq_length": 512})
    assert resp.status_code == 200
    sent = backend.catalog.last("GetDatasetStats")
    assert (sent.dataset_id, sent.model_id, sent.max_seq_length) == ("ds-1", "tiny-chat", 512)
    assert resp.json()["row_count"] == 40 and resp.json()["total_tokens"] == 1340  # int64 as JSON numbers


async def test_split_forwards_ratio_and_seed_and_answers_201_with_both_parts(http, backend):
    resp = await http.post("/api/v1/datasets/ds-1/split", json={"validation_ratio": 0.1, "seed": 7})
    assert resp.status_code == 201, resp.text
    sent = backend.catalog.last("SplitDataset")
    assert (sent.dataset_id, sent.validation_ratio, sent.seed) == ("ds-1", 0.1, 7)
    body = resp.json()
    assert (body["train"]["id"], body["validation"]["id"]) == ("ds-train", "ds-val")
    assert body["train"]["parent_dataset_id"] == "ds-1"


async def test_split_without_a_ratio_is_a_400_naming_it(http, backend):
    resp = await http.post("/api/v1/datasets/ds-1/split", json={"seed": 7})
    assert resp.status_code == 400 and error_of(resp)["field"] == "validation_ratio"


# -- multipart upload ------------------------------------------------------------------------------------


async def test_multipart_upload_arrives_as_metadata_then_chunks_that_rebuild_the_file(http, backend):
    data = jsonl(40_000)  # ~3.5 MiB: several 1 MiB chunks
    resp = await http.post(
        "/api/v1/datasets",
        files={"file": ("qa.jsonl", data, "application/x-ndjson")},
        data={
            "name": "qa",
            "description": "pairs",
            "format": "columns",
            "prompt_input_column": "question",
            "prompt_output_column": "answer",
        },
    )
    assert resp.status_code == 201, resp.text
    messages = backend.catalog.uploads[-1]
    assert messages[0].WhichOneof("payload") == "metadata"
    assert messages[0].metadata == cpb.DatasetUploadMetadata(
        name="qa",
        description="pairs",
        format=compb.DATASET_FORMAT_COLUMNS,
        prompt_input_column="question",
        prompt_output_column="answer",
    )
    chunks = [m.chunk for m in messages[1:]]
    assert all(m.WhichOneof("payload") == "chunk" for m in messages[1:])
    assert len(chunks) >= 3 and max(len(c) for c in chunks) <= UPLOAD_CHUNK
    assert b"".join(chunks) == data
    body = resp.json()
    assert (body["status"], body["format"], body["size_bytes"]) == ("READY", "columns", len(data))
    assert body["sha256"] == hashlib.sha256(data).hexdigest()


async def test_multipart_upload_without_a_name_is_named_after_the_file_and_detects_the_format(http, backend):
    resp = await http.post("/api/v1/datasets", files={"file": ("dir/chats.jsonl", jsonl(3))})
    assert resp.status_code == 201
    meta = backend.catalog.uploads[-1][0].metadata
    assert (meta.name, meta.format) == ("chats.jsonl", compb.DATASET_FORMAT_UNSPECIFIED)
    assert resp.json()["format"] is None


async def test_an_invalid_upload_is_201_with_its_validation_report(http, backend):
    resp = await http.post("/api/v1/datasets", files={"file": ("bad.jsonl", b'{"text": "ok"}\nnot json\n')})
    assert resp.status_code == 201
    body = resp.json()
    assert body["status"] == "INVALID"
    assert body["validation"] == {
        "problems": [{"line": 2, "field": "", "message": "not valid JSON"}],
        "problem_count": 1,
    }


async def test_multipart_upload_with_an_unknown_format_is_a_400_naming_format(http, backend):
    resp = await http.post("/api/v1/datasets", files={"file": ("a.jsonl", jsonl(3))}, data={"format": "sharegpt"})
    assert resp.status_code == 400 and error_of(resp)["field"] == "format"
    assert backend.catalog.uploads == []


async def test_multipart_upload_the_catalog_finds_too_large_is_413(http, backend):
    backend.catalog.failures["UploadDataset"] = errors.ResourceExhausted("datasets are limited to 4096 bytes")
    resp = await http.post("/api/v1/datasets", files={"file": ("a.jsonl", jsonl(100))})
    assert resp.status_code == 413
    assert error_of(resp) == {
        "code": "RESOURCE_EXHAUSTED",
        "message": "datasets are limited to 4096 bytes",
        "field": None,
    }


async def test_multipart_upload_over_the_gateway_limit_is_413_before_reaching_the_catalog(backend, spool):
    async with gateway(backend, spool, max_upload_bytes=10_000) as http:
        resp = await http.post("/api/v1/datasets", files={"file": ("a.jsonl", b"x" * 200_000)})
    assert resp.status_code == 413 and error_of(resp)["code"] == "RESOURCE_EXHAUSTED"
    assert backend.catalog.uploads == []


BOUNDARY = "tuneforge-test-boundary"


def chunked_multipart(content: list[bytes], sent: list[int]) -> AsyncIterator[bytes]:
    """A multipart body with one file part, streamed chunk by chunk (no Content-Length: chunked encoding).

    `sent` gets the size of every content chunk as the server pulls it.
    """

    async def body() -> AsyncIterator[bytes]:
        yield (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/x-ndjson\r\n\r\n"
        ).encode()
        for chunk in content:
            sent.append(len(chunk))
            yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    return body()


CHUNKED_HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def test_a_chunked_multipart_upload_over_the_limit_is_413_as_soon_as_it_passes_the_limit(backend, spool):
    limit = 200_000
    line = jsonl(1, width=10_000)
    content = [line * 10] * 640  # ~64 MB if it were read to the end
    sent: list[int] = []
    async with gateway(backend, spool, max_upload_bytes=limit) as http:
        request = http.build_request("POST", "/api/v1/datasets", content=chunked_multipart(content, sent))
        request.headers.update(CHUNKED_HEADERS)
        assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
        resp = await http.send(request)
    assert resp.status_code == 413
    message = f"a dataset upload is limited to {limit} bytes"
    assert error_of(resp) == {
        "code": "RESOURCE_EXHAUSTED",
        "message": message,
        "field": "file",
        "field_violations": [{"field": "file", "description": message}],
    }
    assert backend.catalog.uploads == []
    # Reading stopped at the first chunk past the limit (plus the multipart allowance): nothing more was spooled.
    assert sum(sent[:-1]) <= limit + MULTIPART_OVERHEAD < sum(sent) and len(sent) < len(content)


async def test_a_chunked_multipart_upload_under_the_limit_reaches_the_catalog_whole(backend, spool):
    data = jsonl(2_000)
    content = [data[i : i + 7_000] for i in range(0, len(data), 7_000)]
    sent: list[int] = []
    async with gateway(backend, spool, max_upload_bytes=len(data)) as http:
        resp = await http.post("/api/v1/datasets", content=chunked_multipart(content, sent), headers=CHUNKED_HEADERS)
    assert resp.status_code == 201, resp.text
    assert b"".join(m.chunk for m in backend.catalog.uploads[-1][1:]) == data
    assert resp.json()["size_bytes"] == len(data) and len(sent) == len(content)


# -- resumable upload ------------------------------------------------------------------------------------


async def start_upload(http: httpx.AsyncClient, **body: Any) -> str:
    resp = await http.post("/api/v1/uploads", json={"name": "chats", **body})
    assert resp.status_code == 201, resp.text
    assert resp.json()["offset"] == 0 and resp.headers["location"] == f"/api/v1/uploads/{resp.json()['upload_id']}"
    return resp.json()["upload_id"]


async def put_chunk(
    http: httpx.AsyncClient, upload_id: str, data: bytes, start: int, total: int | str
) -> httpx.Response:
    end = start + len(data) - 1
    return await http.put(
        f"/api/v1/uploads/{upload_id}", content=data, headers={"Content-Range": f"bytes {start}-{end}/{total}"}
    )


async def test_resumable_upload_survives_a_gateway_restart_and_completes(backend, spool):
    data = jsonl(30_000)  # ~2.6 MiB
    half = len(data) // 2
    async with gateway(backend, spool) as first:
        upload_id = await start_upload(first, format="chat", description="d", size=len(data))
        resp = await put_chunk(first, upload_id, data[:half], 0, len(data))
        assert resp.status_code == 200 and resp.json()["offset"] == half
    assert sorted(p.name for p in spool.iterdir()) == [f"{upload_id}.json", f"{upload_id}.part"]

    async with gateway(backend, spool) as second:  # a new gateway process over the same spool directory
        head = await second.head(f"/api/v1/uploads/{upload_id}")
        assert head.status_code == 200
        assert (head.headers["upload-offset"], head.headers["upload-length"]) == (str(half), str(len(data)))
        resp = await put_chunk(second, upload_id, data[half:], half, len(data))
        assert resp.status_code == 200 and resp.json()["complete"] is True
        assert backend.catalog.uploads == []  # nothing reaches the catalog before complete
        done = await second.post(f"/api/v1/uploads/{upload_id}/complete")
        assert done.status_code == 201, done.text
        assert (await second.get(f"/api/v1/uploads/{upload_id}")).status_code == 404

    messages = backend.catalog.uploads[-1]
    assert messages[0].metadata == cpb.DatasetUploadMetadata(
        name="chats", description="d", format=compb.DATASET_FORMAT_CHAT
    )
    chunks = [m.chunk for m in messages[1:]]
    assert len(chunks) >= 3 and max(map(len, chunks)) <= UPLOAD_CHUNK and b"".join(chunks) == data
    assert done.json()["sha256"] == hashlib.sha256(data).hexdigest() and done.json()["status"] == "READY"
    assert list(spool.iterdir()) == []  # the spool is deleted once the catalog has the dataset


async def test_a_chunk_at_the_wrong_offset_is_409_with_the_expected_offset(http, backend):
    upload_id = await start_upload(http)
    data = jsonl(10)
    assert (await put_chunk(http, upload_id, data[:100], 0, "*")).status_code == 200
    for start in (50, 0, 150):  # overlapping, a replay of the accepted chunk, a gap
        resp = await put_chunk(http, upload_id, data[start : start + 50], start, "*")
        assert resp.status_code == 409, start
        assert error_of(resp)["expected_offset"] == 100 and resp.headers["upload-offset"] == "100"
        assert error_of(resp)["code"] == "FAILED_PRECONDITION"
    resp = await http.get(f"/api/v1/uploads/{upload_id}")
    assert resp.json()["offset"] == 100 and resp.json()["size"] is None


async def test_completing_before_every_byte_arrived_is_409(http, backend):
    upload_id = await start_upload(http, size=1000)
    assert (await put_chunk(http, upload_id, b"x" * 400, 0, 1000)).status_code == 200
    resp = await http.post(f"/api/v1/uploads/{upload_id}/complete")
    assert resp.status_code == 409 and error_of(resp)["expected_offset"] == 400
    assert backend.catalog.uploads == []


async def test_a_chunk_cut_short_keeps_what_arrived_and_the_upload_resumes_from_there(http, backend):
    data = jsonl(20)
    upload_id = await start_upload(http)
    # The header promises the whole file; the body stops at 300 bytes (as a dropped connection would).
    resp = await http.put(
        f"/api/v1/uploads/{upload_id}", content=data[:300], headers={"Content-Range": f"bytes 0-{len(data) - 1}/*"}
    )
    assert resp.status_code == 400 and error_of(resp)["expected_offset"] == 300
    assert (await http.head(f"/api/v1/uploads/{upload_id}")).headers["upload-offset"] == "300"
    assert (await put_chunk(http, upload_id, data[300:], 300, len(data))).status_code == 200
    assert (await http.post(f"/api/v1/uploads/{upload_id}/complete")).status_code == 201
    assert b"".join(m.chunk for m in backend.catalog.uploads[-1][1:]) == data


async def test_a_body_longer_than_its_content_range_is_400(http, backend):
    upload_id = await start_upload(http)
    resp = await http.put(f"/api/v1/uploads/{upload_id}", content=b"x" * 100, headers={"Content-Range": "bytes 0-9/*"})
    assert resp.status_code == 400 and error_of(resp)["field"] == "Content-Range"


@pytest.mark.parametrize("header", [None, "bytes 0-9", "bytes 9-0/10", "bytes 0-10/10", "items 0-9/10"])
async def test_a_chunk_without_a_valid_content_range_is_400_naming_it(http, backend, header):
    upload_id = await start_upload(http)
    headers = {"Content-Range": header} if header else {}
    resp = await http.put(f"/api/v1/uploads/{upload_id}", content=b"x" * 10, headers=headers)
    assert resp.status_code == 400 and error_of(resp)["field"] == "Content-Range"


async def test_resumable_upload_over_the_limit_is_413_before_the_bytes_are_taken(backend, spool):
    async with gateway(backend, spool, max_upload_bytes=1000) as http:
        resp = await http.post("/api/v1/uploads", json={"name": "big", "size": 1001})
        assert resp.status_code == 413 and error_of(resp)["code"] == "RESOURCE_EXHAUSTED"
        upload_id = await start_upload(http)
        assert (await put_chunk(http, upload_id, b"x" * 600, 0, "*")).status_code == 200
        resp = await put_chunk(http, upload_id, b"x" * 600, 600, "*")
        assert resp.status_code == 413
        assert (await http.head(f"/api/v1/uploads/{upload_id}")).headers["upload-offset"] == "600"


async def test_a_failed_complete_keeps_the_spool_for_a_retry(http, backend, spool):
    upload_id = await start_upload(http)
    data = jsonl(5)
    assert (await put_chunk(http, upload_id, data, 0, len(data))).status_code == 200
    backend.catalog.failures["UploadDataset"] = errors.Unavailable("catalog restarting")
    assert (await http.post(f"/api/v1/uploads/{upload_id}/complete")).status_code == 503
    del backend.catalog.failures["UploadDataset"]
    resp = await http.post(f"/api/v1/uploads/{upload_id}/complete")
    assert resp.status_code == 201 and resp.json()["size_bytes"] == len(data)
    assert list(spool.iterdir()) == []


async def test_a_chunk_while_another_request_holds_the_upload_is_409(http, spool):
    upload_id = await start_upload(http)
    # Another gateway process sharing the spool directory is writing this upload.
    with (spool / f"{upload_id}.part").open("rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        resp = await put_chunk(http, upload_id, b"x" * 10, 0, "*")
        assert resp.status_code == 409 and error_of(resp)["code"] == "ABORTED"
        assert (await http.post(f"/api/v1/uploads/{upload_id}/complete")).status_code == 409
    assert (await put_chunk(http, upload_id, b"x" * 10, 0, "*")).status_code == 200


async def test_a_deleted_upload_is_gone(http, backend, spool):
    upload_id = await start_upload(http)
    assert (await http.delete(f"/api/v1/uploads/{upload_id}")).status_code == 204
    assert list(spool.iterdir()) == []
    assert (await http.head(f"/api/v1/uploads/{upload_id}")).status_code == 404
    assert (await put_chunk(http, upload_id, b"x", 0, 1)).status_code == 404


@pytest.mark.parametrize("upload_id", ["nope", "0" * 32, "..%2F..%2Fetc%2Fpasswd"])
async def test_an_unknown_upload_is_404(http, upload_id):
    assert (await http.get(f"/api/v1/uploads/{upload_id}")).status_code == 404
    assert (await http.post(f"/api/v1/uploads/{upload_id}/complete")).status_code == 404


async def test_a_resumable_upload_with_an_unknown_format_is_a_400_naming_format(http, spool):
    resp = await http.post("/api/v1/uploads", json={"name": "a", "format": "sharegpt"})
    assert resp.status_code == 400 and error_of(resp)["field"] == "format"
    assert list(spool.iterdir()) == []


async def test_abandoned_uploads_expire(backend, spool):
    async with gateway(backend, spool, upload_ttl_s=0) as http:
        stale = await start_upload(http)
        await start_upload(http)  # creating an upload sweeps the expired ones
        assert (await http.get(f"/api/v1/uploads/{stale}")).status_code == 404


# -- methods and jobs ------------------------------------------------------------------------------------


async def test_create_method_sends_the_definition_as_a_struct_and_answers_201(http, backend):
    definition = {
        "name": "my-sft",
        "training_type": "chat",
        "stages": {"training": {"file": "train.py", "python": "/envs/a/bin/python"}},
        "parameters": [{"name": "lora_rank", "type": "int", "default": 8}],
    }
    resp = await http.post("/api/v1/methods", json=definition)
    assert resp.status_code == 201, resp.text
    assert resp.json()["id"] == "my-sft"
    sent = json_format.MessageToDict(backend.catalog.last("CreateMethod").definition)
    assert sent == definition | {"parameters": [{"name": "lora_rank", "type": "int", "default": 8.0}]}


async def test_delete_method_is_204_and_a_builtin_one_is_409(http, backend):
    assert (await http.delete("/api/v1/methods/my-sft")).status_code == 204
    assert backend.catalog.last("DeleteMethod").method_id == "my-sft"
    backend.catalog.failures["DeleteMethod"] = errors.FailedPrecondition("built-in methods can't be deleted")
    assert (await http.delete("/api/v1/methods/sft-lora")).status_code == 409


async def test_list_jobs_filters_map_to_states_and_ids(http, backend):
    resp = await http.get(
        "/api/v1/jobs",
        params=[("state", "RUNNING"), ("state", "queued"), ("model_id", "m"), ("dataset_id", "d"), ("method_id", "x")],
    )
    assert resp.status_code == 200, resp.text
    sent = backend.jobs.last("ListJobs")
    assert list(sent.states) == [jpb.JOB_STATE_RUNNING, jpb.JOB_STATE_QUEUED]
    assert (sent.model_id, sent.dataset_id, sent.method_id) == ("m", "d", "x")
    assert resp.json()["jobs"][0]["state"] == "RUNNING"


async def test_list_jobs_with_an_unknown_state_is_a_400_naming_state(http, backend):
    resp = await http.get("/api/v1/jobs", params={"state": "DONE"})
    assert resp.status_code == 400 and error_of(resp)["field"] == "state"
    assert backend.jobs.calls("ListJobs") == []
