"""The jobs service as seen by the catalog: how many unfinished jobs use a model or dataset."""

from __future__ import annotations

import grpc

from tuneforge.jobs.v1 import jobs_pb2 as pb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common.auth import service_credentials
from tuneforge_common.errors import Unavailable
from tuneforge_common.tls import TlsConfig, open_channel

UNFINISHED = [
    pb.JOB_STATE_QUEUED,
    pb.JOB_STATE_STARTING,
    pb.JOB_STATE_RUNNING,
    pb.JOB_STATE_CANCELLING,
    pb.JOB_STATE_PAUSED,
]


class GrpcJobs:
    def __init__(self, address: str, tls: TlsConfig | None = None, service_token: str = "") -> None:
        self.channel = open_channel(address, tls=tls, interceptors=service_credentials(service_token))
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def active_jobs_using(self, *, model_id: str = "", dataset_id: str = "") -> int:
        request = pb.ListJobsRequest(states=UNFINISHED, model_id=model_id, dataset_id=dataset_id, page_size=1000)
        try:
            return len((await self.stub.ListJobs(request, timeout=10)).jobs)
        except grpc.aio.AioRpcError:
            # Fail closed: deleting something a running job needs is worse than refusing for a while.
            raise Unavailable("the jobs service is unreachable; can't tell whether a job uses it") from None
