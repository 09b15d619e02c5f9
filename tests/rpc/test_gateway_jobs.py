"""Gateway job routes against an in-process fake JobService: dry run, copy, pause/resume, delete, checkpoints,
publish and label filters reach gRPC with the right fields and come back with the right statuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.rpc.test_gateway_catalog import Recorder
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common import errors
from tuneforge_common.grpcutil import ServiceBinding, start_server
from tuneforge_gateway.app import create_app

ESTIMATE = jpb.JobEstimate(dataset_rows=40, total_steps=20, epochs=1.0, estimated_seconds=60.0)


class Jobs(Recorder, jobs_pb2_grpc.JobServiceServicer):
    async def SubmitJob(self, request: jpb.SubmitJobRequest, context: Any) -> jpb.SubmitJobResponse:
        await self.enter("SubmitJob", request, context)
        job = None if request.dry_run else jpb.Job(id="j-new", state=jpb.JOB_STATE_QUEUED)
        return jpb.SubmitJobResponse(job=job, estimate=ESTIMATE)

    async def CopyJob(self, request: jpb.CopyJobRequest, context: Any) -> jpb.CopyJobResponse:
        await self.enter("CopyJob", request, context)
        return jpb.CopyJobResponse(job=jpb.Job(id="j-copy", copied_from_job_id=request.job_id), estimate=ESTIMATE)

    async def PauseJob(self, request: jpb.PauseJobRequest, context: Any) -> jpb.PauseJobResponse:
        await self.enter("PauseJob", request, context)
        return jpb.PauseJobResponse(job=jpb.Job(id=request.job_id, state=jpb.JOB_STATE_PAUSED))

    async def ResumeJob(self, request: jpb.ResumeJobRequest, context: Any) -> jpb.ResumeJobResponse:
        await self.enter("ResumeJob", request, context)
        return jpb.ResumeJobResponse(job=jpb.Job(id=request.job_id, state=jpb.JOB_STATE_QUEUED))

    async def DeleteJob(self, request: jpb.DeleteJobRequest, context: Any) -> jpb.DeleteJobResponse:
        await self.enter("DeleteJob", request, context)
        return jpb.DeleteJobResponse()

    async def ListCheckpoints(self, request: jpb.ListCheckpointsRequest, context: Any) -> jpb.ListCheckpointsResponse:
        await self.enter("ListCheckpoints", request, context)
        return jpb.ListCheckpointsResponse(checkpoints=[jpb.Checkpoint(step=20, uri="/c/20", metrics={"loss": 0.5})])

    async def PublishCheckpoint(
        self, request: jpb.PublishCheckpointRequest, context: Any
    ) -> jpb.PublishCheckpointResponse:
        await self.enter("PublishCheckpoint", request, context)
        return jpb.PublishCheckpointResponse(model_id="model-7")

    async def GetJob(self, request: jpb.GetJobRequest, context: Any) -> jpb.GetJobResponse:
        await self.enter("GetJob", request, context)
        return jpb.GetJobResponse(job=jpb.Job(id=request.job_id, state=jpb.JOB_STATE_RUNNING))

    async def WatchJob(self, request: jpb.WatchJobRequest, context: Any) -> AsyncIterator[jpb.WatchJobResponse]:
        await self.enter("WatchJob", request, context)
        self.watching.set()
        await self.release.wait()  # the stream stays open until the test lets it end
        yield jpb.WatchJobResponse(cursor="e2.m0.l0", job=jpb.Job(id=request.job_id, state=jpb.JOB_STATE_SUCCEEDED))

    async def ListJobs(self, request: jpb.ListJobsRequest, context: Any) -> jpb.ListJobsResponse:
        await self.enter("ListJobs", request, context)
        return jpb.ListJobsResponse()


@pytest.fixture
async def jobs() -> AsyncIterator[Jobs]:
    fake = Jobs()
    fake.watching, fake.release = asyncio.Event(), asyncio.Event()
    binding = ServiceBinding(jobs_pb2_grpc.add_JobServiceServicer_to_server, fake, "tuneforge.jobs.v1.JobService")
    server, port = await start_server([binding], "127.0.0.1", 0)
    fake.address = f"127.0.0.1:{port}"
    yield fake
    await server.stop(None)


@pytest.fixture
async def http(jobs: Jobs, tmp_path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(jobs.address, jobs.address, upload_dir=tmp_path / "spool")
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_submit_forwards_labels_resources_and_returns_the_job_with_its_estimate(http, jobs):
    body = {
        "model_id": "m",
        "dataset_id": "d",
        "labels": {"team": "search"},
        "resources": {"gpu_count": 2, "min_gpu_memory_bytes": 1000, "agent_labels": {"zone": "eu"}},
    }
    resp = await http.post("/api/v1/jobs", json=body)
    assert resp.status_code == 201 and resp.json()["id"] == "j-new"
    assert resp.json()["estimate"]["total_steps"] == 20
    sent = jobs.last("SubmitJob")
    assert (dict(sent.labels), sent.resources.gpu_count, dict(sent.resources.agent_labels)) == (
        {"team": "search"},
        2,
        {"zone": "eu"},
    )


async def test_a_dry_run_answers_200_with_only_the_estimate(http, jobs):
    resp = await http.post("/api/v1/jobs", json={"model_id": "m", "dataset_id": "d", "dry_run": True})
    assert resp.status_code == 200
    assert resp.json()["dry_run"] is True and resp.json()["estimate"]["estimated_seconds"] == 60.0
    assert jobs.last("SubmitJob").dry_run


async def test_unknown_resource_keys_are_refused(http):
    resp = await http.post("/api/v1/jobs", json={"model_id": "m", "dataset_id": "d", "resources": {"gpus": 1}})
    assert resp.status_code in (400, 422)


async def test_copy_pause_resume_delete_checkpoints_and_publish_reach_the_service(http, jobs):
    resp = await http.post("/api/v1/jobs/j-1/copy", json={"parameter_overrides": {"learning_rate": 0.001}})
    assert resp.status_code == 201 and resp.json()["copied_from_job_id"] == "j-1"
    assert dict(jobs.last("CopyJob").parameter_overrides) == {"learning_rate": 0.001}
    assert (await http.post("/api/v1/jobs/j-1/pause")).json()["state"] == "PAUSED"
    assert (await http.post("/api/v1/jobs/j-1/resume")).json()["state"] == "QUEUED"
    assert (await http.delete("/api/v1/jobs/j-1")).status_code == 204
    checkpoints = (await http.get("/api/v1/jobs/j-1/checkpoints")).json()["checkpoints"]
    assert checkpoints[0]["metrics"] == {"loss": 0.5}
    resp = await http.post("/api/v1/jobs/j-1/publish", json={"step": 20, "name": "bot-v1"})
    assert resp.status_code == 201 and resp.json() == {"model_id": "model-7"}
    assert (jobs.last("PublishCheckpoint").step, jobs.last("PublishCheckpoint").name) == (20, "bot-v1")


async def test_deleting_a_running_job_is_409(http, jobs):
    jobs.failures["DeleteJob"] = errors.FailedPrecondition("job is RUNNING; only finished jobs can be deleted")
    resp = await http.delete("/api/v1/jobs/j-1")
    assert resp.status_code == 409 and "only finished jobs" in resp.json()["error"]["message"]


async def test_list_jobs_passes_label_filters_and_refuses_a_malformed_one(http, jobs):
    assert (await http.get("/api/v1/jobs", params=[("label", "team=search"), ("label", "exp=1")])).status_code == 200
    assert dict(jobs.last("ListJobs").labels) == {"team": "search", "exp": "1"}
    resp = await http.get("/api/v1/jobs", params={"label": "nokey"})
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "label"


def open_streams(metrics_text: str) -> float:
    line = next(x for x in metrics_text.splitlines() if x.startswith("tuneforge_gateway_open_streams "))
    return float(line.split()[1])


async def test_metrics_count_the_open_event_streams(http, jobs):
    before = open_streams((await http.get("/metrics")).text)

    async def watch() -> str:
        async with http.stream("GET", "/api/v1/jobs/j1/events", headers={"Last-Event-ID": "e1.m0.l0"}) as resp:
            assert resp.status_code == 200
            return "".join([chunk async for chunk in resp.aiter_text()])

    task = asyncio.create_task(watch())
    await asyncio.wait_for(jobs.watching.wait(), 5)
    assert open_streams((await http.get("/metrics")).text) == before + 1
    jobs.release.set()
    body = await asyncio.wait_for(task, 5)
    assert "id: e2.m0.l0" in body and "event: job" in body
    assert jobs.last("WatchJob").after_cursor == "e1.m0.l0"  # the reconnect resumes where it left off
    assert open_streams((await http.get("/metrics")).text) == before
