"""A job's own validation dataset through the real catalog and jobs services (gRPC, PostgreSQL): checked as a
training dataset is, stored with the job, handed to the agent, kept by copies, refused beside validation_ratio,
and protected from deletion while the job needs it. Also ListJobs' after_job_id cursor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from tests.helpers import chat_jsonl
from tests.stack import SEED_MODEL_ID, Services, catalog_and_jobs
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.common.v1 import common_pb2
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_common.grpcutil import decode_error

QA = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-qa.jsonl"
PAIRS = b'{"prompt": "hi", "chosen": "Hello!", "rejected": "Go away."}\n'


@pytest.fixture
async def services(postgres_url, second_postgres_url, tmp_path) -> AsyncIterator[Services]:
    async with catalog_and_jobs(postgres_url, second_postgres_url, tmp_path) as started:
        yield started


async def upload(s: Services, name: str, data: bytes) -> common_pb2.Dataset:
    async def requests():
        yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name=name))
        yield cpb.UploadDatasetRequest(chunk=data)

    return (await s.catalog.UploadDataset(requests(), timeout=20)).dataset


def submit_request(dataset_id: str, validation_id: str, method_id: str = "sft-lora", **params) -> jpb.SubmitJobRequest:
    parameters = struct_pb2.Struct()
    parameters.update(params)
    return jpb.SubmitJobRequest(
        model_id=SEED_MODEL_ID,
        dataset_id=dataset_id,
        method_id=method_id,
        validation_dataset_id=validation_id,
        parameters=parameters,
    )


async def refused(s: Services, request: jpb.SubmitJobRequest) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.jobs.SubmitJob(request, timeout=10)
    error = decode_error(exc.value)
    return error.code, error.message, [f for f, _ in error.field_violations]


async def assignment_for(s: Services) -> apb.JobAssignment:
    channel = grpc.aio.insecure_channel(s.jobs_address)
    agents = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        agent_id = (await agents.RegisterAgent(apb.RegisterAgentRequest(name="n1"), timeout=5)).agent_id
        call = agents.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=agent_id))
        message = await asyncio.wait_for(call.read(), 10)
        call.cancel()
        return message.assignment
    finally:
        await channel.close()


async def test_a_validation_dataset_is_stored_with_the_job_sent_to_the_agent_and_kept_or_cleared_by_a_copy(services):
    train = await upload(services, "train", chat_jsonl(8))
    validation = await upload(services, "validation", chat_jsonl(2))
    job = (await services.jobs.SubmitJob(submit_request(train.id, validation.id), timeout=10)).job
    assert (job.dataset_id, job.validation_dataset_id) == (train.id, validation.id)
    assert (await services.jobs.GetJob(jpb.GetJobRequest(job_id=job.id), timeout=5)).job.validation_dataset_id == (
        validation.id
    )
    assigned = await assignment_for(services)
    assert (assigned.job_id, assigned.dataset_uri, assigned.validation_dataset_uri) == (
        job.id,
        train.uri,
        validation.uri,
    )
    copy = (await services.jobs.CopyJob(jpb.CopyJobRequest(job_id=job.id), timeout=10)).job
    assert copy.validation_dataset_id == validation.id
    other = await upload(services, "other-validation", chat_jsonl(3))
    request = jpb.CopyJobRequest(job_id=job.id, validation_dataset_id=other.id)
    assert (await services.jobs.CopyJob(request, timeout=10)).job.validation_dataset_id == other.id
    cleared = jpb.CopyJobRequest(job_id=job.id, clear_validation_dataset=True)
    assert (await services.jobs.CopyJob(cleared, timeout=10)).job.validation_dataset_id == ""
    both = jpb.CopyJobRequest(job_id=job.id, clear_validation_dataset=True, validation_dataset_id=other.id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await services.jobs.CopyJob(both, timeout=10)
    assert decode_error(refused.value).field_violations[0][0] == "clear_validation_dataset"
    plain = (await services.jobs.SubmitJob(submit_request(train.id, ""), timeout=10)).job
    assert plain.validation_dataset_id == ""


async def test_a_validation_dataset_with_validation_ratio_is_invalid_argument_naming_validation_ratio(services):
    train = await upload(services, "train", chat_jsonl(8))
    validation = await upload(services, "validation", chat_jsonl(2))
    # val_size is an alias: the check runs on the resolved parameters.
    code, message, fields = await refused(services, submit_request(train.id, validation.id, val_size=0.2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["parameters.validation_ratio"]
    assert "validation_ratio" in message and validation.id in message
    assert (await services.jobs.ListJobs(jpb.ListJobsRequest(), timeout=5)).jobs == []


async def test_a_validation_dataset_is_checked_as_the_training_dataset_is(services):
    train = await upload(services, "train", chat_jsonl(8))
    bad = await upload(services, "bad", chat_jsonl(2) + b"not json\n")
    code, message, _ = await refused(services, submit_request(train.id, bad.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message == f"validation_dataset_id: dataset {bad.id!r} is INVALID (1 problems); only READY datasets train"

    pairs = await upload(services, "pairs", PAIRS)
    code, message, _ = await refused(services, submit_request(train.id, pairs.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message.startswith("validation_dataset_id: method 'sft-lora' trains on ") and "is preference" in message

    code, message, _ = await refused(services, submit_request(train.id, "ds-missing"))
    assert code == grpc.StatusCode.NOT_FOUND and message.startswith("validation_dataset_id:")

    # custom01 runs a DeepExtension-style script that evaluates on nothing: it would not know the flag.
    qa = await upload(services, "qa", QA.read_bytes())
    code, message, _ = await refused(services, submit_request(qa.id, qa.id, method_id="custom01"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "does not evaluate on a validation set" in message

    more_pairs = await upload(services, "more-pairs", PAIRS * 2)
    job = (await services.jobs.SubmitJob(submit_request(pairs.id, more_pairs.id, method_id="dpo"), timeout=10)).job
    assert job.validation_dataset_id == more_pairs.id


async def test_a_dataset_an_unfinished_job_validates_on_cannot_be_deleted(services):
    train = await upload(services, "train", chat_jsonl(8))
    validation = await upload(services, "validation", chat_jsonl(2))
    job = (await services.jobs.SubmitJob(submit_request(train.id, validation.id), timeout=10)).job
    listed = await services.jobs.ListJobs(jpb.ListJobsRequest(dataset_id=validation.id), timeout=5)
    assert [j.id for j in listed.jobs] == [job.id]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await services.catalog.DeleteDataset(cpb.DeleteDatasetRequest(dataset_id=validation.id), timeout=10)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await services.jobs.CancelJob(jpb.CancelJobRequest(job_id=job.id), timeout=5)
    await services.catalog.DeleteDataset(cpb.DeleteDatasetRequest(dataset_id=validation.id), timeout=10)


async def test_list_jobs_after_a_job_id_continues_newest_first_without_reading_the_earlier_pages(services):
    train = await upload(services, "train", chat_jsonl(4))
    ids = [(await services.jobs.SubmitJob(submit_request(train.id, ""), timeout=10)).job.id for _ in range(5)]
    newest_first = ids[::-1]
    first = await services.jobs.ListJobs(jpb.ListJobsRequest(page_size=2), timeout=5)
    assert [j.id for j in first.jobs] == newest_first[:2] and first.next_page_token
    after = await services.jobs.ListJobs(jpb.ListJobsRequest(page_size=2, after_job_id=first.jobs[-1].id), timeout=5)
    assert [j.id for j in after.jobs] == newest_first[2:4] and after.next_page_token
    rest = await services.jobs.ListJobs(
        jpb.ListJobsRequest(page_size=2, after_job_id=first.jobs[-1].id, page_token=after.next_page_token), timeout=5
    )
    assert [j.id for j in rest.jobs] == newest_first[4:] and not rest.next_page_token
    last = await services.jobs.ListJobs(jpb.ListJobsRequest(after_job_id=newest_first[-1]), timeout=5)
    assert last.jobs == [] and not last.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await services.jobs.ListJobs(jpb.ListJobsRequest(after_job_id="job-missing"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in decode_error(exc.value).field_violations] == ["after_job_id"]
