"""A NUL character in any request string is the caller's mistake: both services refuse it with INVALID_ARGUMENT
naming the field, where PostgreSQL would otherwise fail on it as an internal error."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from tests.stack import catalog_and_jobs
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge_common.grpcutil import decode_error, nul_field


def test_nul_field_names_the_string_that_holds_the_nul():
    params = struct_pb2.Struct()
    params.update({"lora": {"targets": ["q_proj", "k\0proj"]}})
    assert nul_field(jpb.SubmitJobRequest(model_id="m", parameters=params)) == "parameters.lora.targets[1]"
    assert nul_field(jpb.CompareJobsRequest(job_ids=["a", "b\0"])) == "job_ids[1]"
    assert nul_field(jpb.SubmitJobRequest(labels={"team": "x\0"})) == "labels.team"
    assert nul_field(jpb.SubmitJobRequest(labels={"te\0am": "x"})) == "labels"
    resources = jpb.ResourceRequest(agent_labels={"zone": "\0"})
    assert nul_field(jpb.SubmitJobRequest(resources=resources)) == "resources.agent_labels.zone"
    clean = struct_pb2.Struct()
    clean.update({"lora": {"targets": ["q_proj", "k_proj"]}})
    assert nul_field(jpb.SubmitJobRequest(model_id="m", labels={"team": "search"}, parameters=clean)) is None


@pytest.mark.parametrize(
    "call,request_,field",
    [
        ("jobs.GetJob", jpb.GetJobRequest(job_id="job-\0"), "job_id"),
        ("jobs.CompareJobs", jpb.CompareJobsRequest(job_ids=["a", "b\0"]), "job_ids[1]"),
        ("jobs.ListJobs", jpb.ListJobsRequest(labels={"team": "\0"}), "labels.team"),
        ("catalog.GetModel", cpb.GetModelRequest(model_id="\0"), "model_id"),
        ("catalog.ListDatasets", cpb.ListDatasetsRequest(name_contains="a\0"), "name_contains"),
    ],
)
async def test_a_nul_in_a_request_string_is_invalid_argument_naming_the_field(
    postgres_url, second_postgres_url, tmp_path, call, request_, field
):
    async with catalog_and_jobs(postgres_url, second_postgres_url, tmp_path) as services:
        service, method = call.split(".")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await getattr(getattr(services, service), method)(request_, timeout=10)
    error = decode_error(failed.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field_violations == [(field, "must not contain NUL characters")]


async def test_an_upload_whose_metadata_holds_a_nul_is_invalid_argument(postgres_url, second_postgres_url, tmp_path):
    async def upload():
        yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name="chats\0"))
        yield cpb.UploadDatasetRequest(chunk=b'{"text": "hello"}\n')

    async with catalog_and_jobs(postgres_url, second_postgres_url, tmp_path) as services:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await services.catalog.UploadDataset(upload(), timeout=10)
        assert (await services.catalog.ListDatasets(cpb.ListDatasetsRequest(), timeout=10)).datasets == []
    error = decode_error(failed.value)
    assert (error.code, error.field_violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        [("metadata.name", "must not contain NUL characters")],
    )
