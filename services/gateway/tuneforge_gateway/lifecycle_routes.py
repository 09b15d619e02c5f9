"""The model lifecycle over HTTP: merge (complete), evaluate and deploy (live) a model, the deployments, and
OpenAI's /v1/chat/completions against a live model (streaming and not)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.jobs.v1 import inference_pb2 as ipb
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import lifecycle_pb2 as lpb

from .app import RPC_TIMEOUT_S, Backends, Name, ResourceBody, to_struct
from .errors import error_responses
from .openai_compat import OpenAIError, OpenAIRoute, openai_error_responses
from .schemas import message_body, model_body, to_json

# A completion may generate for minutes on a slow node; the worker's own limits (max_tokens) bound it.
CHAT_TIMEOUT_S = 900.0
QUANTIZATIONS = {"none": lpb.QUANTIZATION_NONE, "8bit": lpb.QUANTIZATION_INT8, "4bit": lpb.QUANTIZATION_NF4}


class MergeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name | Literal[""] = Field("", description="The complete model's name; default <model name>-complete")
    description: str = Field("", max_length=4000)
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Also save a bitsandbytes 8-bit or 4-bit copy (needs a GPU: set resources.gpu_count)"
    )
    resources: ResourceBody = Field(default_factory=lambda: ResourceBody())


class EvaluateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    dataset_id: str = Field(..., min_length=1, max_length=128, description="A READY dataset to evaluate on")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="max_samples, max_seq_length, batch_size, num_generations, max_new_tokens, precision",
    )
    resources: ResourceBody = Field(default_factory=lambda: ResourceBody())
    job_id: str = Field("", max_length=128, description="The training job it evaluates; default: the model's")


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    parameters: dict[str, Any] = Field(default_factory=dict, description="max_model_len, precision, engine")
    resources: ResourceBody = Field(default_factory=lambda: ResourceBody())


def _resources(body: ResourceBody) -> jpb.ResourceRequest:
    return jpb.ResourceRequest(**body.model_dump())


def lifecycle_router(be: Callable[[], Backends]) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["lifecycle"])

    @router.post(
        "/models/{model_id}/merge",
        status_code=201,
        response_model=message_body(jpb.Job),
        responses=error_responses(400, 404, 409),
    )
    async def merge_model(model_id: str, body: Annotated[MergeBody | None, Body()] = None) -> dict:
        """Merge a customized model's adapter into its base (a merge job); the complete model is published when
        the job succeeds (the job's result_model_id)."""
        body = body or MergeBody()
        request = lpb.MergeModelRequest(
            model_id=model_id,
            name=body.name,
            description=body.description,
            quantization=QUANTIZATIONS[body.quantization],
            resources=_resources(body.resources),
        )
        return to_json((await be().lifecycle.MergeModel(request, timeout=RPC_TIMEOUT_S)).job)

    @router.post(
        "/models/{model_id}/evaluate",
        status_code=201,
        response_model=message_body(jpb.Job),
        responses=error_responses(400, 404, 409),
    )
    async def evaluate_model(model_id: str, body: EvaluateBody) -> dict:
        """Loss, perplexity and sample generations of the model over a dataset (an evaluation job)."""
        request = lpb.EvaluateModelRequest(
            model_id=model_id,
            dataset_id=body.dataset_id,
            parameters=to_struct(body.parameters, "parameters"),
            resources=_resources(body.resources),
            job_id=body.job_id,
        )
        return to_json((await be().lifecycle.EvaluateModel(request, timeout=RPC_TIMEOUT_S)).job)

    @router.get(
        "/jobs/{job_id}/evaluations",
        response_model=message_body(lpb.ListEvaluationsResponse),
        responses=error_responses(400, 404),
    )
    async def list_evaluations(job_id: str, page_size: int = Query(0, ge=0, le=1000), page_token: str = "") -> dict:
        """The training's evaluations, newest first, with their metrics and sample generations."""
        request = lpb.ListEvaluationsRequest(job_id=job_id, page_size=page_size, page_token=page_token)
        return to_json(await be().lifecycle.ListEvaluations(request, timeout=RPC_TIMEOUT_S))

    @router.post(
        "/models/{model_id}/deploy",
        status_code=201,
        response_model=message_body(lpb.Deployment),
        responses=error_responses(400, 404, 409),
    )
    async def deploy_model(model_id: str, body: Annotated[DeployBody | None, Body()] = None) -> dict:
        """Start an inference worker for the model on an agent; it is live once the worker listens."""
        body = body or DeployBody()
        request = lpb.DeployModelRequest(
            model_id=model_id, parameters=to_struct(body.parameters, "parameters"), resources=_resources(body.resources)
        )
        return to_json((await be().lifecycle.DeployModel(request, timeout=RPC_TIMEOUT_S)).deployment)

    @router.get(
        "/deployments", response_model=message_body(lpb.ListDeploymentsResponse), responses=error_responses(400)
    )
    async def list_deployments(
        page_size: int = Query(0, ge=0, le=1000),
        page_token: str = "",
        model_id: str = "",
        include_ended: bool = Query(False, description="Stopped and failed deployments too"),
    ) -> dict:
        request = lpb.ListDeploymentsRequest(
            page_size=page_size, page_token=page_token, model_id=model_id, include_ended=include_ended
        )
        return to_json(await be().lifecycle.ListDeployments(request, timeout=RPC_TIMEOUT_S))

    @router.get(
        "/deployments/{deployment_id}", response_model=message_body(lpb.Deployment), responses=error_responses(404)
    )
    async def get_deployment(deployment_id: str) -> dict:
        request = lpb.GetDeploymentRequest(deployment_id=deployment_id)
        return to_json((await be().lifecycle.GetDeployment(request, timeout=RPC_TIMEOUT_S)).deployment)

    @router.delete(
        "/deployments/{deployment_id}", response_model=message_body(lpb.Deployment), responses=error_responses(404)
    )
    async def undeploy_model(deployment_id: str) -> dict:
        """Stop the deployment's worker and free its agent (the deployment is STOPPING, then STOPPED)."""
        request = lpb.UndeployModelRequest(deployment_id=deployment_id)
        return to_json((await be().lifecycle.UndeployModel(request, timeout=RPC_TIMEOUT_S)).deployment)

    return router


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None


class ChatCompletionBody(BaseModel):
    """What the gateway checks itself; the worker checks the rest (max_tokens, temperature, ...) as OpenAI does."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1, max_length=128, description="A deployed model's id")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False


class _Open(BaseModel):
    # A worker (an added method's inference file, vLLM) may add fields of its own.
    model_config = ConfigDict(extra="allow")


class ChatUsage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(_Open):
    role: str
    content: str | None = None


class ChatCompletionChoice(_Open):
    index: int
    message: ChatCompletionMessage
    finish_reason: str | None = None


class ChatCompletion(_Open):
    """A non-streamed answer; a streamed one is `chat.completion.chunk` events, then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: ChatUsage | None = None


def _chat_error(err: grpc.aio.AioRpcError, model: str) -> Exception:
    code = err.code()
    if code == grpc.StatusCode.NOT_FOUND:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return OpenAIError(404, message, "model", "model_not_found")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return OpenAIError(400, err.details() or "the model is not live", "model", "model_not_live")
    return err  # the usual mapping (401, 403, 503, ...)


def chat_router(be: Callable[[], Backends]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

    @router.post(
        "/chat/completions",
        response_model=model_body(ChatCompletion),
        responses={
            **openai_error_responses(400, 404),
            200: {
                "description": "A chat.completion object, or with stream a text/event-stream of chunks",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
        },
    )
    async def create_chat_completion(body: ChatCompletionBody, request: Request) -> Response:
        raw = await request.body()  # relayed as sent: OpenAI's parameters are the worker's to read
        call = be().inference.CreateChatCompletion(
            ipb.CreateChatCompletionRequest(model=body.model, body=raw), timeout=CHAT_TIMEOUT_S
        )
        try:
            first = await anext(aiter(call), None)
        except grpc.aio.AioRpcError as err:
            raise _chat_error(err, body.model) from None
        if first is None:
            raise OpenAIError(502, "the model's worker gave no answer", None, "server_error")
        if body.stream and first.http_status == 200:

            async def relay() -> AsyncIterator[bytes]:
                yield first.data
                try:
                    async for message in call:
                        yield message.data
                except grpc.aio.AioRpcError as err:  # the agent went away mid-answer: say so in the stream
                    error = {"error": {"message": err.details(), "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n".encode()

            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)
        rest = [message.data async for message in call]
        return Response(b"".join([first.data, *rest]), status_code=first.http_status, media_type="application/json")

    return router
