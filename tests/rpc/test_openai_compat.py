"""The OpenAI-compatible /v1 API driven by the official `openai` client (unpatched, over an ASGI transport)
against in-process fake catalog and job services: files become datasets, fine-tuning jobs become TuneForge
jobs with the right method, parameters and validation dataset, lists page with OpenAI's cursor (jobs one
page per request), and errors come back in OpenAI's shape, with OpenAI's parameter names, as the client's
own exception classes. The real services behind the same API: tests/e2e/test_openai_client.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.protobuf import timestamp_pb2

from tests.rpc.test_gateway_catalog import FakeCatalog, Recorder, dataset
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2 as compb
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common import errors
from tuneforge_common.grpcutil import ServiceBinding, start_server, status_for
from tuneforge_gateway.app import create_app

KNOWN_MODELS = {"m-base"}


def ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


class Catalog(FakeCatalog):
    PAGE_MAX = 3  # the catalog's page size limit, small: the gateway must follow its pages

    async def ListModels(self, request: cpb.ListModelsRequest, context: Any) -> cpb.ListModelsResponse:
        await self.enter("ListModels", request, context)
        return cpb.ListModelsResponse(models=[compb.Model(id="m-1"), compb.Model(id="m-2")])

    async def ListDatasets(self, request: cpb.ListDatasetsRequest, context: Any) -> cpb.ListDatasetsResponse:
        """By created_at (newest first with newest_first), then id; after_dataset_id and offset tokens, as the
        catalog pages."""
        await self.enter("ListDatasets", request, context)
        sign = -1 if request.newest_first else 1
        ordered = sorted(self.listed, key=lambda d: (sign * d.create_time.seconds, d.id))
        if request.after_dataset_id:
            ids = [d.id for d in ordered]
            if request.after_dataset_id not in ids:
                refused = errors.InvalidArgument.for_field(
                    "after_dataset_id", f"no dataset {request.after_dataset_id!r}"
                )
                status = status_for(refused)
                await context.abort(status.code, status.details, status.trailing_metadata)
            ordered = ordered[ids.index(request.after_dataset_id) + 1 :]
        start, size = int(request.page_token or 0), min(request.page_size or 50, self.PAGE_MAX)
        more = start + size < len(ordered)
        return cpb.ListDatasetsResponse(
            datasets=ordered[start : start + size], next_page_token=str(start + size) if more else ""
        )


class StatefulJobs(Recorder, jobs_pb2_grpc.JobServiceServicer):
    """Keeps submitted jobs and walks them through the states a real service would; an agent's report
    (a metric point, a checkpoint) is added by the test through `report`."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, jpb.Job] = {}
        self.events: dict[str, list[jpb.JobEvent]] = {}
        self.points: dict[str, list[jpb.MetricPoint]] = {}
        self.checkpoints: dict[str, list[jpb.Checkpoint]] = {}

    def move(self, job_id: str, state: jpb.JobState.ValueType, reason: str = "") -> jpb.Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.NotFound(f"job {job_id!r} not found")
        events = self.events.setdefault(job_id, [])
        now = 1_700_000_000 + len(self.jobs) * 10 + len(events)
        events.append(jpb.JobEvent(seq=len(events) + 1, time=ts(now), from_state=job.state, to_state=state))
        job.state, job.state_reason = state, reason
        return job

    def report(self, job_id: str, step: int, loss: float) -> None:
        self.points.setdefault(job_id, []).append(
            jpb.MetricPoint(name="loss", step=step, value=loss, time=ts(2_000_000_000))
        )
        self.checkpoints.setdefault(job_id, []).append(
            jpb.Checkpoint(
                step=step, uri=f"/ckpt/{job_id}/{step}", metrics={"loss": loss}, create_time=ts(2_000_000_000)
            )
        )

    async def SubmitJob(self, request: jpb.SubmitJobRequest, context: Any) -> jpb.SubmitJobResponse:
        await self.enter("SubmitJob", request, context)
        if request.model_id not in KNOWN_MODELS:  # worded as the jobs service words it
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model_id: model {request.model_id!r} not found")
        job_id = f"j-{len(self.jobs) + 1}"
        self.jobs[job_id] = jpb.Job(
            id=job_id,
            model_id=request.model_id,
            dataset_id=request.dataset_id,
            validation_dataset_id=request.validation_dataset_id,
            method_id=request.method_id,
            parameters=request.parameters,
            labels=request.labels,
            name=request.name,
            create_time=ts(1_700_000_000 + len(self.jobs)),
        )
        self.move(job_id, jpb.JOB_STATE_QUEUED)
        return jpb.SubmitJobResponse(job=self.jobs[job_id])

    async def GetJob(self, request: jpb.GetJobRequest, context: Any) -> jpb.GetJobResponse:
        await self.enter("GetJob", request, context)
        if request.job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not found")
        return jpb.GetJobResponse(job=self.jobs[request.job_id])

    async def ListJobs(self, request: jpb.ListJobsRequest, context: Any) -> jpb.ListJobsResponse:
        """Newest first, from after_job_id on, page_size at a time (offset tokens), as the jobs service pages."""
        await self.enter("ListJobs", request, context)
        newest_first = sorted(self.jobs.values(), key=lambda j: j.create_time.seconds, reverse=True)
        if request.after_job_id:
            ids = [j.id for j in newest_first]
            if request.after_job_id not in ids:
                refused = errors.InvalidArgument.for_field("after_job_id", f"no job {request.after_job_id!r}")
                status = status_for(refused)
                await context.abort(status.code, status.details, status.trailing_metadata)
            newest_first = newest_first[ids.index(request.after_job_id) + 1 :]
        start = int(request.page_token or 0)
        size = request.page_size or 100
        more = start + size < len(newest_first)
        return jpb.ListJobsResponse(
            jobs=newest_first[start : start + size], next_page_token=str(start + size) if more else ""
        )

    async def PauseJob(self, request: jpb.PauseJobRequest, context: Any) -> jpb.PauseJobResponse:
        await self.enter("PauseJob", request, context)
        return jpb.PauseJobResponse(job=self.move(request.job_id, jpb.JOB_STATE_PAUSED))

    async def ResumeJob(self, request: jpb.ResumeJobRequest, context: Any) -> jpb.ResumeJobResponse:
        await self.enter("ResumeJob", request, context)
        return jpb.ResumeJobResponse(job=self.move(request.job_id, jpb.JOB_STATE_QUEUED))

    async def CancelJob(self, request: jpb.CancelJobRequest, context: Any) -> jpb.CancelJobResponse:
        await self.enter("CancelJob", request, context)
        return jpb.CancelJobResponse(job=self.move(request.job_id, jpb.JOB_STATE_CANCELLED, "cancelled by user"))

    async def ListJobEvents(self, request: jpb.ListJobEventsRequest, context: Any) -> jpb.ListJobEventsResponse:
        """Every transition, in any order: these tests read lists from their start (the real service's order and
        cursor are tested in tests/integration/test_metric_queries.py)."""
        await self.enter("ListJobEvents", request, context)
        return jpb.ListJobEventsResponse(events=self.events.get(request.job_id, []))

    async def ListJobMetrics(self, request: jpb.ListJobMetricsRequest, context: Any) -> jpb.ListJobMetricsResponse:
        await self.enter("ListJobMetrics", request, context)
        return jpb.ListJobMetricsResponse(points=self.points.get(request.job_id, []))

    async def ListCheckpoints(self, request: jpb.ListCheckpointsRequest, context: Any) -> jpb.ListCheckpointsResponse:
        await self.enter("ListCheckpoints", request, context)
        return jpb.ListCheckpointsResponse(checkpoints=self.checkpoints.get(request.job_id, []))


@pytest.fixture
async def backends() -> AsyncIterator[tuple[FakeCatalog, StatefulJobs, str]]:
    catalog, jobs = Catalog(), StatefulJobs()
    server, port = await start_server(
        [
            ServiceBinding(
                catalog_pb2_grpc.add_CatalogServiceServicer_to_server, catalog, "tuneforge.catalog.v1.CatalogService"
            ),
            ServiceBinding(jobs_pb2_grpc.add_JobServiceServicer_to_server, jobs, "tuneforge.jobs.v1.JobService"),
        ],
        "127.0.0.1",
        0,
    )
    yield catalog, jobs, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def client(backends, tmp_path) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(backends[2], backends[2], upload_dir=tmp_path / "spool")
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport) as http:
        yield openai.AsyncOpenAI(base_url="http://gw/v1", api_key="test", http_client=http, max_retries=0)


@pytest.fixture
def catalog(backends) -> FakeCatalog:
    return backends[0]


@pytest.fixture
def jobs(backends) -> StatefulJobs:
    return backends[1]


CHAT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


async def test_an_uploaded_file_is_a_catalog_dataset_with_the_same_id(client, catalog):
    uploaded = await client.files.create(file=("chats.jsonl", CHAT), purpose="fine-tune")
    assert (uploaded.object, uploaded.id, uploaded.purpose, uploaded.status) == (
        "file",
        "ds-1",
        "fine-tune",
        "processed",
    )
    assert uploaded.bytes == len(CHAT) and uploaded.filename == "chats.jsonl"
    assert b"".join(m.chunk for m in catalog.uploads[-1][1:]) == CHAT
    assert (await client.files.retrieve("ds-7")).id == "ds-7"
    listed = await client.files.list()
    assert [f.id for f in listed.data] == ["ds-1"]
    deleted = await client.files.delete("ds-1")
    assert deleted.deleted and catalog.last("DeleteDataset").dataset_id == "ds-1"


async def test_files_page_newest_or_oldest_first_after_a_file_reading_only_the_page(client, catalog):
    catalog.listed = [dataset(f"ds-{i}", create_time=ts(1_700_000_000 + i % 5)) for i in range(8)]  # ties by 5s
    oldest_first = [d.id for d in sorted(catalog.listed, key=lambda d: (d.create_time.seconds, d.id))]
    newest_first = [d.id for d in sorted(catalog.listed, key=lambda d: (-d.create_time.seconds, d.id))]

    everything = await client.files.list()
    assert [f.id for f in everything.data] == newest_first and not everything.has_more
    for limit in (1, 2, 3, 4, 7, 8):
        for order, expected in (("desc", newest_first), ("asc", oldest_first)):
            catalog.received.clear()
            first = await client.files.list(limit=limit, order=order)
            assert [f.id for f in first.data] == expected[:limit] and first.has_more == (limit < 8)
            # Pages of at most the catalog's size, only as many as the limit needs.
            sent = catalog.calls("ListDatasets")
            assert len(sent) == -(-limit // Catalog.PAGE_MAX)
            assert all(r.newest_first == (order == "desc") and r.after_dataset_id == "" for r in sent)
            assert sent[0].page_size == limit
            # The client's auto-paging follows `after` through every file.
            assert [f.id async for f in client.files.list(limit=limit, order=order)] == expected
    after = await client.files.list(after=newest_first[2], limit=2)
    assert [f.id for f in after.data] == newest_first[3:5] and after.has_more
    assert catalog.last("ListDatasets").after_dataset_id == newest_first[2]
    with pytest.raises(openai.BadRequestError) as raised:
        await client.files.list(after="ds-missing")
    assert (raised.value.param, raised.value.code) == ("after", "invalid_cursor")
    assert raised.value.body["message"] == "no item with id 'ds-missing' in this list"


async def test_job_events_ask_the_jobs_service_for_limit_plus_one_after_the_cursor(client, jobs):
    job = await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1")
    jobs.report(job.id, step=10, loss=0.5)
    await client.fine_tuning.jobs.list_events(job.id, limit=7)
    for method in ("ListJobEvents", "ListJobMetrics"):
        sent = jobs.last(method)
        assert (sent.newest_first, sent.page_size, sent.HasField("after")) == (True, 8, False)
    await client.fine_tuning.jobs.list_events(job.id, after=f"ftevent-{job.id}-step-10", limit=2)
    assert jobs.last("ListJobEvents").after == jpb.ActivityCursor(step=10)
    assert jobs.last("ListJobMetrics").after == jpb.ActivityCursor(step=10)
    await client.fine_tuning.jobs.list_events(job.id, after=f"ftevent-{job.id}-state-1")
    assert jobs.last("ListJobEvents").after == jpb.ActivityCursor(seq=1)
    calls = len(jobs.calls("ListJobEvents"))
    for after in (f"ftevent-{job.id}-step-x", f"ftevent-{job.id}-step-01", "ftevent-j-9-state-1", f"{job.id}-state-1"):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.fine_tuning.jobs.list_events(job.id, after=after)
        assert (raised.value.param, raised.value.code) == ("after", "invalid_cursor"), after
    assert len(jobs.calls("ListJobEvents")) == calls  # not the jobs service's to answer
    jobs.failures["ListJobEvents"] = errors.InvalidArgument.for_field("after", "no step 11 to list after")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.list_events(job.id, after=f"ftevent-{job.id}-step-11")
    assert (raised.value.param, raised.value.code) == ("after", "invalid_cursor")
    assert raised.value.body["message"] == f"no item with id 'ftevent-{job.id}-step-11' in this list"


async def test_a_purpose_other_than_fine_tune_is_a_400_naming_purpose(client, catalog):
    with pytest.raises(openai.BadRequestError) as raised:
        await client.files.create(file=("x.jsonl", CHAT), purpose="assistants")
    assert raised.value.param == "purpose" and raised.value.type == "invalid_request_error"
    assert not catalog.uploads


async def test_supervised_job_maps_hyperparameters_and_metadata_onto_an_sft_lora_job(client, jobs):
    job = await client.fine_tuning.jobs.create(
        model="m-base",
        training_file="ds-1",
        suffix="support",
        seed=7,
        hyperparameters={"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 2.0},
        metadata={"team": "search"},
    )
    sent = jobs.last("SubmitJob")
    assert sent.method_id == "sft-lora"
    assert dict(sent.parameters) == {"epochs": 3, "learning_rate": pytest.approx(4e-4), "seed": 7}
    assert dict(sent.labels) == {"team": "search", "openai.suffix": "support"}
    assert (job.object, job.status, job.model, job.training_file, job.seed) == (
        "fine_tuning.job",
        "queued",
        "m-base",
        "ds-1",
        7,
    )
    assert job.metadata == {"team": "search"} and job.method.type == "supervised"
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)
    assert job.fine_tuned_model is None and job.error is None


async def test_dpo_method_runs_the_dpo_method_with_its_beta(client, jobs):
    job = await client.fine_tuning.jobs.create(
        model="m-base",
        training_file="ds-1",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "learning_rate_multiplier": "auto"}}},
    )
    sent = jobs.last("SubmitJob")
    assert sent.method_id == "dpo" and dict(sent.parameters) == {"beta": pytest.approx(0.2)}
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == pytest.approx(0.2)


async def test_retrieve_list_with_cursor_events_checkpoints_and_state_changes(client, jobs):
    for _ in range(3):
        await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1")
    assert (await client.fine_tuning.jobs.retrieve("j-2")).id == "j-2"
    first = await client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ["j-3", "j-2"] and first.has_more
    rest = await client.fine_tuning.jobs.list(limit=2, after="j-2")
    assert [j.id for j in rest.data] == ["j-1"] and not rest.has_more

    jobs.report("j-1", step=10, loss=0.5)
    events = await client.fine_tuning.jobs.list_events("j-1")
    metrics = [e for e in events.data if e.type == "metrics"]
    assert metrics and metrics[0].data["step"] == 10 and metrics[0].data["train_loss"] == 0.5
    assert any(e.type == "message" and "queued" in e.message for e in events.data)
    checkpoints = await client.fine_tuning.jobs.checkpoints.list("j-1")
    assert [c.step_number for c in checkpoints.data] == [10]
    assert checkpoints.data[0].metrics.train_loss == 0.5 and checkpoints.data[0].fine_tuning_job_id == "j-1"
    assert (await client.fine_tuning.jobs.checkpoints.list("j-2")).data == []

    assert (await client.fine_tuning.jobs.pause("j-1")).status == "paused"
    assert (await client.fine_tuning.jobs.resume("j-1")).status == "queued"
    assert (await client.fine_tuning.jobs.cancel("j-1")).status == "cancelled"
    jobs.move("j-2", jpb.JOB_STATE_RUNNING)
    assert (await client.fine_tuning.jobs.retrieve("j-2")).status == "running"
    jobs.move("j-3", jpb.JOB_STATE_FAILED, "CUDA out of memory")
    failed = await client.fine_tuning.jobs.retrieve("j-3")
    assert failed.status == "failed" and failed.error.message == "CUDA out of memory"


async def test_unknown_model_job_and_file_are_404s_in_openai_shape(client, catalog):
    with pytest.raises(openai.NotFoundError) as raised:
        await client.fine_tuning.jobs.create(model="nope", training_file="ds-1")
    assert raised.value.code == "not_found" and raised.value.param == "model"
    assert raised.value.body["message"] == "model: model 'nope' not found"  # the service's field, OpenAI's name
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve("j-missing")
    catalog.failures["GetDataset"] = errors.NotFound("dataset 'ds-x' not found")
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve("ds-x")
    catalog.failures["GetModel"] = errors.NotFound("model 'nope' not found")
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_a_validation_file_is_the_jobs_validation_dataset_and_reported_back(client, jobs):
    job = await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1", validation_file="ds-2")
    sent = jobs.last("SubmitJob")
    assert (sent.dataset_id, sent.validation_dataset_id) == ("ds-1", "ds-2")
    assert "validation_ratio" not in sent.parameters  # the platform default (0): nothing held out besides
    assert (job.training_file, job.validation_file) == ("ds-1", "ds-2")
    assert (await client.fine_tuning.jobs.retrieve(job.id)).validation_file == "ds-2"
    plain = await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1")
    assert jobs.last("SubmitJob").validation_dataset_id == "" and plain.validation_file is None


async def test_a_refused_validation_file_is_an_error_naming_validation_file(client, jobs):
    jobs.failures["SubmitJob"] = errors.FailedPrecondition(
        "validation_dataset_id: dataset 'ds-2' is INVALID (1 problems); only READY datasets train"
    )
    with pytest.raises(openai.APIStatusError) as raised:
        await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1", validation_file="ds-2")
    assert raised.value.status_code == 409 and raised.value.param == "validation_file"
    assert raised.value.body["message"] == (
        "validation_file: dataset 'ds-2' is INVALID (1 problems); only READY datasets train"
    )
    jobs.failures["SubmitJob"] = errors.InvalidArgument.for_field("parameters.epochs", "must be at most 100")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1", hyperparameters={"n_epochs": 500})
    assert raised.value.param == "hyperparameters.n_epochs"


async def test_other_hyperparameters_are_tuneforge_parameters_and_their_errors_name_them(client, jobs):
    job = await client.fine_tuning.jobs.create(
        model="m-base",
        training_file="ds-1",
        hyperparameters={"n_epochs": 2, "training_steps": 5, "save_steps": 2},
    )
    assert dict(jobs.last("SubmitJob").parameters) == {"epochs": 2, "training_steps": 5, "save_steps": 2}
    assert job.hyperparameters.n_epochs == 2
    with pytest.raises(openai.BadRequestError) as raised:  # learning_rate_multiplier says it
        await client.fine_tuning.jobs.create(
            model="m-base",
            training_file="ds-1",
            hyperparameters={"learning_rate": 0.1},
        )
    assert raised.value.param == "hyperparameters.learning_rate"
    assert len(jobs.calls("SubmitJob")) == 1
    jobs.failures["SubmitJob"] = errors.InvalidArgument.for_field("parameters.lora_rank", "must be at least 1")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.create(
            model="m-base",
            training_file="ds-1",
            hyperparameters={"lora_rank": 0},
        )
    assert raised.value.param == "hyperparameters.lora_rank"


async def test_the_job_list_reads_one_page_from_the_jobs_service_per_request(client, jobs):
    for _ in range(5):
        await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1")
    page = await client.fine_tuning.jobs.list(limit=2, after="j-4")
    assert [j.id for j in page.data] == ["j-3", "j-2"] and page.has_more
    sent = jobs.calls("ListJobs")
    assert len(sent) == 1 and (sent[0].page_size, sent[0].after_job_id, sent[0].page_token) == (2, "j-4", "")
    last = await client.fine_tuning.jobs.list(limit=2, after="j-2")
    assert [j.id for j in last.data] == ["j-1"] and not last.has_more
    # The client's own auto-paging follows `after` through every job, newest first.
    assert [j.id async for j in client.fine_tuning.jobs.list(limit=2)] == ["j-5", "j-4", "j-3", "j-2", "j-1"]
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.list(after="j-missing")
    assert raised.value.param == "after"


async def test_a_bad_body_is_a_400_naming_the_field(client, jobs):
    with pytest.raises(openai.BadRequestError) as raised:
        await client.fine_tuning.jobs.create(model="m-base", training_file="ds-1", seed=-1)
    assert raised.value.param == "seed"
    assert not jobs.calls("SubmitJob")


async def test_models_come_from_the_catalog(client):
    models = await client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [
        ("m-1", "model", "tuneforge"),
        ("m-2", "model", "tuneforge"),
    ]
    assert (await client.models.retrieve("m-1")).id == "m-1"
