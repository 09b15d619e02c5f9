"""Inference for the deployments an agent runs, relayed over its own connection to the jobs service.

GPU nodes sit behind NAT, so nothing dials an inference worker: the agent holds one ServeInference stream
per session, the service sends calls on it, and the agent forwards each to the serve job's worker (an
OpenAI-compatible HTTP server on the node's loopback) and streams the worker's answer back as it comes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
import uuid
from collections.abc import Callable

import httpx

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc

log = logging.getLogger("tuneforge.agent.relay")
DEFAULT_PATH = "/v1/chat/completions"


def error_body(status: int, message: str, code: str) -> bytes:
    """An OpenAI-shaped error, for answers the worker could not give itself."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def _forget(calls: dict[str, asyncio.Task], call_id: str, _: asyncio.Task) -> None:
    calls.pop(call_id, None)


class InferenceRelay:
    """Forwards the service's calls to local workers. `worker_port(job_id)` is the port of the serve job's
    worker on this node, 0 while it has none (not started, not listening yet, or not a job of this agent)."""

    def __init__(self, worker_port: Callable[[str], int], connect_timeout: float = 10.0) -> None:
        self.worker_port = worker_port
        self.timeout = httpx.Timeout(connect=connect_timeout, read=None, write=60.0, pool=None)

    async def run_forever(self, stub: agent_pb2_grpc.AgentServiceStub, agent_id: str) -> None:
        """The stream, opened again after it fails: inference trouble never ends the agent's session (its
        trainings go on), it only delays answers."""
        backoff = 0.5
        while True:
            started = time.monotonic()
            try:
                await self.run_stream(stub, agent_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started > 30:
                    backoff = 0.5
                delay = backoff * (0.5 + random.random())
                log.warning("inference stream to the jobs service ended (%s); reopening in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)

    async def run_stream(self, stub: agent_pb2_grpc.AgentServiceStub, agent_id: str) -> None:
        outgoing: asyncio.Queue[apb.ServeInferenceRequest] = asyncio.Queue()
        outgoing.put_nowait(apb.ServeInferenceRequest(hello=apb.InferenceHello(agent_id=agent_id)))
        calls: dict[str, asyncio.Task] = {}

        async def requests():
            while True:
                yield await outgoing.get()

        stream = stub.ServeInference(requests())
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                async for call in stream:
                    if call.cancel:
                        task = calls.pop(call.call_id, None)
                        if task is not None:
                            task.cancel()
                        continue
                    task = asyncio.create_task(self._forward(client, call, outgoing))
                    calls[call.call_id] = task
                    task.add_done_callback(functools.partial(_forget, calls, call.call_id))
        finally:
            for task in calls.values():
                task.cancel()
            await asyncio.gather(*calls.values(), return_exceptions=True)
            stream.cancel()
        raise ConnectionError("inference stream ended")

    async def _forward(
        self, client: httpx.AsyncClient, call: apb.ServeInferenceResponse, outgoing: asyncio.Queue
    ) -> None:
        def send(status: int, data: bytes, done: bool) -> None:
            chunk = apb.InferenceChunk(call_id=call.call_id, http_status=status, data=data, done=done)
            outgoing.put_nowait(apb.ServeInferenceRequest(chunk=chunk))

        port = self.worker_port(call.job_id)
        if not port:
            send(
                503, error_body(503, "the model's inference worker is not ready on its agent", "model_not_ready"), True
            )
            return
        url = f"http://127.0.0.1:{port}{call.path or DEFAULT_PATH}"
        status = 502
        try:
            headers = {"content-type": "application/json", "x-request-id": call.call_id or uuid.uuid4().hex}
            async with client.stream("POST", url, content=call.body, headers=headers) as resp:
                status = resp.status_code
                async for data in resp.aiter_raw():
                    send(status, data, False)
            send(status, b"", True)
        except httpx.HTTPError as exc:
            log.warning("inference call %s for job %s failed: %s", call.call_id, call.job_id, exc)
            send(502, error_body(502, "the model's inference worker did not answer", "worker_unreachable"), True)
