"""ModelLifecycleService and InferenceService gRPC surfaces, and the agent's ServeInference stream: decode,
call the use case, encode."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.jobs.v1 import inference_pb2 as ipb
from tuneforge.jobs.v1 import inference_pb2_grpc, lifecycle_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as pb  # noqa: F401  (Job in the annotations)
from tuneforge.jobs.v1 import lifecycle_pb2 as lpb
from tuneforge_common.errors import InvalidArgument
from tuneforge_common.grpcutil import ServiceBinding, map_errors
from tuneforge_common.paging import decode_token, encode_token, page_size, timestamp

from . import operations as ops
from .api import job_to_pb, resources_from_pb, resources_to_pb
from .inference import ACK_STATUS, InferenceRouter
from .model_lifecycle import ModelLifecycle
from .service import Jobs

MAX_PAGE = 1000
DEFAULT_PAGE = 100


def deployment_to_pb(row: Any) -> lpb.Deployment:
    resources = json.loads(row.resources or "{}")
    return lpb.Deployment(
        id=row.id,
        model_id=row.model_id,
        state=lpb.DeploymentState.Value(f"DEPLOYMENT_STATE_{ops.deployment_state(row.state)}"),
        state_reason=row.state_reason,
        agent_id=row.agent_id or "",
        request_count=row.request_count,
        error_count=row.error_count,
        create_time=timestamp(row.created_at),
        update_time=timestamp(row.updated_at),
        project_id=row.project_id or "",
        resources=resources_to_pb(resources),
        entrypoint=row.entrypoint,
        attempt=row.attempt,
    )


class ModelLifecycleServicer(lifecycle_pb2_grpc.ModelLifecycleServiceServicer):
    def __init__(self, lifecycle: ModelLifecycle) -> None:
        self.lifecycle = lifecycle

    @map_errors
    async def MergeModel(self, request: lpb.MergeModelRequest, context: Any) -> lpb.MergeModelResponse:
        quantize = ops.QUANTIZE_FLAGS[lpb.Quantization.Name(request.quantization)]
        row = await self.lifecycle.merge(
            request.model_id, request.name, request.description, quantize, resources_from_pb(request.resources)
        )
        return lpb.MergeModelResponse(job=job_to_pb(row))

    @map_errors
    async def EvaluateModel(self, request: lpb.EvaluateModelRequest, context: Any) -> lpb.EvaluateModelResponse:
        row = await self.lifecycle.evaluate(
            request.model_id,
            request.dataset_id,
            json_format.MessageToDict(request.parameters),
            resources_from_pb(request.resources),
            request.job_id,
        )
        return lpb.EvaluateModelResponse(job=job_to_pb(row))

    @map_errors
    async def ListEvaluations(self, request: lpb.ListEvaluationsRequest, context: Any) -> lpb.ListEvaluationsResponse:
        size, offset = page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE), decode_token(request.page_token)
        found = await self.lifecycle.evaluations(request.job_id, offset, size + 1)
        token = encode_token(offset + size) if len(found) > size else ""
        evaluations = [
            lpb.Evaluation(job=job_to_pb(row), metrics=metrics, generations=[lpb.Generation(**g) for g in generations])
            for row, metrics, generations in found[:size]
        ]
        return lpb.ListEvaluationsResponse(evaluations=evaluations, next_page_token=token)

    @map_errors
    async def DeployModel(self, request: lpb.DeployModelRequest, context: Any) -> lpb.DeployModelResponse:
        row = await self.lifecycle.deploy(
            request.model_id, json_format.MessageToDict(request.parameters), resources_from_pb(request.resources)
        )
        return lpb.DeployModelResponse(deployment=deployment_to_pb(row))

    @map_errors
    async def GetDeployment(self, request: lpb.GetDeploymentRequest, context: Any) -> lpb.GetDeploymentResponse:
        return lpb.GetDeploymentResponse(
            deployment=deployment_to_pb(await self.lifecycle.deployment(request.deployment_id))
        )

    @map_errors
    async def ListDeployments(self, request: lpb.ListDeploymentsRequest, context: Any) -> lpb.ListDeploymentsResponse:
        size, offset = page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE), decode_token(request.page_token)
        rows = await self.lifecycle.deployments(request.model_id, request.include_ended, offset, size + 1)
        token = encode_token(offset + size) if len(rows) > size else ""
        return lpb.ListDeploymentsResponse(
            deployments=[deployment_to_pb(r) for r in rows[:size]], next_page_token=token
        )

    @map_errors
    async def UndeployModel(self, request: lpb.UndeployModelRequest, context: Any) -> lpb.UndeployModelResponse:
        return lpb.UndeployModelResponse(
            deployment=deployment_to_pb(await self.lifecycle.undeploy(request.deployment_id))
        )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, lifecycle: ModelLifecycle, router: InferenceRouter) -> None:
        self.lifecycle = lifecycle
        self.router = router

    @map_errors
    async def CreateChatCompletion(
        self, request: ipb.CreateChatCompletionRequest, context: Any
    ) -> AsyncIterator[ipb.CreateChatCompletionResponse]:
        try:
            json.loads(request.body or b"{}")
        except ValueError:
            raise InvalidArgument.for_field("body", "is not JSON") from None
        deployment = await self.lifecycle.live_deployment(request.model)
        status, sent, counted = 0, False, False
        try:
            async for chunk in self.router.call(deployment.agent_id, deployment.id, request.body):
                if chunk.http_status == ACK_STATUS:
                    continue
                status = chunk.http_status
                if chunk.done:  # counted before the last bytes go out, so a caller that has them sees the count
                    counted = True
                    await self.lifecycle.count_call(deployment.id, failed=status >= 400)
                if chunk.data or (chunk.done and not sent):
                    sent = True
                    yield ipb.CreateChatCompletionResponse(http_status=status, data=chunk.data)
        finally:
            if status and not counted:  # the caller or the agent went away mid-answer
                await self.lifecycle.count_call(deployment.id, failed=True)


async def serve_inference(
    jobs: Jobs, router: InferenceRouter, request_iterator: AsyncIterator[apb.ServeInferenceRequest]
) -> AsyncIterator[apb.ServeInferenceResponse]:
    """AgentService.ServeInference: the first message says which agent this is (its own, as for reports)."""
    first = await anext(aiter(request_iterator), None)
    if first is None or first.WhichOneof("message") != "hello" or not first.hello.agent_id:
        raise InvalidArgument.for_field("hello.agent_id", "the stream starts with the agent's hello")
    await jobs.check_agent_caller(first.hello.agent_id)
    async for call in router.serve_agent(first.hello.agent_id, request_iterator):
        yield call


def bindings(lifecycle: ModelLifecycle, router: InferenceRouter) -> list[ServiceBinding]:
    return [
        ServiceBinding(
            lifecycle_pb2_grpc.add_ModelLifecycleServiceServicer_to_server,
            ModelLifecycleServicer(lifecycle),
            lpb.DESCRIPTOR.services_by_name["ModelLifecycleService"].full_name,
        ),
        ServiceBinding(
            inference_pb2_grpc.add_InferenceServiceServicer_to_server,
            InferenceServicer(lifecycle, router),
            ipb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        ),
    ]
