"""Catalog and jobs services talking over real gRPC on PostgreSQL: what a job uses can't be deleted,
and a dataset that failed validation can't cost GPU time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from tests.helpers import chat_jsonl, write_fake_model_dir
from tests.stack import Services, catalog_and_jobs
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.common.v1 import common_pb2
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_common.grpcutil import decode_error


@pytest.fixture
async def services(postgres_url, second_postgres_url, tmp_path) -> AsyncIterator[Services]:
    async with catalog_and_jobs(postgres_url, second_postgres_url, tmp_path) as started:
        yield started


async def upload(s: Services, name: str, data: bytes) -> common_pb2.Dataset:
    async def requests():
        yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name=name))
        yield cpb.UploadDatasetRequest(chunk=data)

    return (await s.catalog.UploadDataset(requests(), timeout=20)).dataset


async def submit(s: Services, dataset_id: str) -> jpb.Job:
    request = jpb.SubmitJobRequest(model_id="tiny-test", dataset_id=dataset_id, method_id="sft-lora")
    return (await s.jobs.SubmitJob(request, timeout=10)).job


async def code_and_details(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call(request, timeout=10)
    return exc.value.code(), decode_error(exc.value).message


async def test_a_job_on_an_invalid_dataset_is_refused_naming_it(services):
    bad = await upload(services, "bad", chat_jsonl(2) + b"not json\n")
    assert bad.status == common_pb2.DATASET_STATUS_INVALID
    code, details = await code_and_details(
        services.jobs.SubmitJob, jpb.SubmitJobRequest(model_id="tiny-test", dataset_id=bad.id, method_id="sft-lora")
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"dataset {bad.id!r} is INVALID (1 problems)" in details
    assert (await services.jobs.ListJobs(jpb.ListJobsRequest(), timeout=5)).jobs == []


async def test_a_method_refuses_a_dataset_in_a_format_it_cannot_train_on(services):
    chat = await upload(services, "chat", chat_jsonl(2))
    code, details = await code_and_details(
        services.jobs.SubmitJob, jpb.SubmitJobRequest(model_id="tiny-test", dataset_id=chat.id, method_id="dpo")
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == f"dataset_id: method 'dpo' trains on preference datasets; dataset {chat.id!r} is chat"
    pairs = await upload(services, "pairs", b'{"prompt": "hi", "chosen": "Hello!", "rejected": "Go away."}\n')
    request = jpb.SubmitJobRequest(model_id="tiny-test", dataset_id=pairs.id, method_id="dpo")
    assert (await services.jobs.SubmitJob(request, timeout=10)).job.method_id == "dpo"
    request = jpb.SubmitJobRequest(model_id="tiny-test", dataset_id=pairs.id, method_id="custom01")
    assert (await services.jobs.SubmitJob(request, timeout=10)).job.method_id == "custom01"  # its code decides


async def test_what_an_unfinished_job_uses_cannot_be_deleted_until_it_ends(services, tmp_path):
    dataset = await upload(services, "good", chat_jsonl(3))
    job = await submit(services, dataset.id)
    code, details = await code_and_details(
        services.catalog.DeleteDataset, cpb.DeleteDatasetRequest(dataset_id=dataset.id)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "used by 1 unfinished job(s)" in details
    path = write_fake_model_dir(tmp_path / "other")
    other = (await services.catalog.RegisterModel(cpb.RegisterModelRequest(path=str(path), name="other"))).model
    await services.jobs.SubmitJob(
        jpb.SubmitJobRequest(model_id=other.id, dataset_id=dataset.id, method_id="sft-lora"), timeout=10
    )
    code, _ = await code_and_details(services.catalog.DeleteModel, cpb.DeleteModelRequest(model_id=other.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    for listed in (await services.jobs.ListJobs(jpb.ListJobsRequest(dataset_id=dataset.id), timeout=5)).jobs:
        await services.jobs.CancelJob(jpb.CancelJobRequest(job_id=listed.id), timeout=5)
    await services.catalog.DeleteModel(cpb.DeleteModelRequest(model_id=other.id), timeout=10)
    await services.catalog.DeleteDataset(cpb.DeleteDatasetRequest(dataset_id=dataset.id), timeout=10)
    kept = (await services.jobs.GetJob(jpb.GetJobRequest(job_id=job.id), timeout=5)).job
    assert kept.dataset_id == dataset.id  # the job keeps its record of what it used


async def test_list_jobs_filters_by_state_and_inputs(services):
    dataset = await upload(services, "good", chat_jsonl(3))
    first, second = await submit(services, dataset.id), await submit(services, dataset.id)
    await services.jobs.CancelJob(jpb.CancelJobRequest(job_id=first.id), timeout=5)
    queued = await services.jobs.ListJobs(jpb.ListJobsRequest(states=[jpb.JOB_STATE_QUEUED]), timeout=5)
    assert [j.id for j in queued.jobs] == [second.id]
    by_method = await services.jobs.ListJobs(jpb.ListJobsRequest(method_id="dpo"), timeout=5)
    assert by_method.jobs == []
    everything = await services.jobs.ListJobs(jpb.ListJobsRequest(dataset_id=dataset.id, model_id="tiny-test"))
    assert {j.id for j in everything.jobs} == {first.id, second.id}


async def test_a_jobs_column_mapping_defaults_to_the_datasets_and_the_user_can_override_it(services):
    async def requests():
        meta = cpb.DatasetUploadMetadata(name="qa", prompt_input_column="q", prompt_output_column="a")
        yield cpb.UploadDatasetRequest(metadata=meta)
        yield cpb.UploadDatasetRequest(chunk=b'{"q": "2+2?", "a": "4", "note": "x"}\n')

    dataset = (await services.catalog.UploadDataset(requests(), timeout=20)).dataset
    job = await submit(services, dataset.id)
    assert (job.parameters["prompt_input_column"], job.parameters["prompt_output_column"]) == ("q", "a")
    params = struct_pb2.Struct()
    params.update({"PromptOutputColumn": "note"})  # DeepExtension's spelling, an alias
    request = jpb.SubmitJobRequest(model_id="tiny-test", dataset_id=dataset.id, method_id="sft-lora", parameters=params)
    overridden = (await services.jobs.SubmitJob(request, timeout=10)).job
    assert overridden.parameters["prompt_output_column"] == "note"


async def test_a_job_keeps_its_method_after_the_method_is_deleted(services):
    definition = struct_pb2.Struct()
    definition.update(
        {
            "name": "team-sft",
            "training_type": "chat",
            "lifecycle": "customized",
            "stages": {"training": {"file": "team/train.py", "env": "team"}},
        }
    )
    await services.catalog.CreateMethod(cpb.CreateMethodRequest(definition=definition), timeout=10)
    dataset = await upload(services, "good", chat_jsonl(3))
    request = jpb.SubmitJobRequest(model_id="tiny-test", dataset_id=dataset.id, method_id="team-sft")
    job = (await services.jobs.SubmitJob(request, timeout=10)).job
    await services.catalog.DeleteMethod(cpb.DeleteMethodRequest(method_id="team-sft"), timeout=10)
    kept = (await services.jobs.GetJob(jpb.GetJobRequest(job_id=job.id), timeout=5)).job
    assert (kept.method_id, kept.parameters["lora_rank"]) == ("team-sft", 8)
    code, _ = await code_and_details(services.jobs.SubmitJob, request)
    assert code == grpc.StatusCode.NOT_FOUND  # no longer selectable


async def test_delete_fails_closed_when_the_jobs_service_is_down(services):
    dataset = await upload(services, "good", chat_jsonl(3))
    await services.jobs_server.stop(None)
    code, details = await code_and_details(
        services.catalog.DeleteDataset, cpb.DeleteDatasetRequest(dataset_id=dataset.id)
    )
    assert code == grpc.StatusCode.UNAVAILABLE and "jobs service is unreachable" in details
    assert (await services.catalog.GetDataset(cpb.GetDatasetRequest(dataset_id=dataset.id))).dataset.id == dataset.id
