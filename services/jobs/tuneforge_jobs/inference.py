"""Chat completions routed to the agents that run deployments.

Agents dial in (GPU nodes sit behind NAT), so a deployment is reached over its agent's ServeInference
stream, which one replica of the jobs service holds. A call that reaches another replica goes to the holder
over NATS core subjects (outside the events stream's `tuneforge.>` subjects, so nothing of it is stored):
the holder acknowledges at once, then publishes the worker's chunks to the caller's inbox as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge_common.errors import Unavailable

log = logging.getLogger("tuneforge.jobs.inference")
SUBJECT_PREFIX = "_tuneforge.inference.agent."
ACK_STATUS = 0  # a chunk with this status only says the holder took the call
DEFAULT_PATH = "/v1/chat/completions"


def agent_subject(agent_id: str) -> str:
    return SUBJECT_PREFIX + agent_id


class AgentLink:
    """One agent's open inference stream: calls to send it, and the answer queue of each call in flight."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.outgoing: asyncio.Queue[apb.ServeInferenceResponse] = asyncio.Queue()
        self.calls: dict[str, asyncio.Queue[apb.InferenceChunk | None]] = {}

    def close(self) -> None:
        for answers in self.calls.values():
            answers.put_nowait(None)


class InferenceRouter:
    """Holds this replica's agent streams; sends a call to the stream that reaches the deployment's agent."""

    def __init__(self, nats_url: str = "", ack_timeout_s: float = 10.0) -> None:
        self.nats_url = nats_url
        self.ack_timeout_s = ack_timeout_s
        self.links: dict[str, AgentLink] = {}
        self.nc: Any = None
        self.in_flight: dict[str, int] = {}  # per serve job, calls this replica is relaying
        self._remote_calls: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        if self.nats_url:
            import nats

            self.nc = await nats.connect(self.nats_url, max_reconnect_attempts=-1, name="tuneforge-jobs-inference")

    async def close(self) -> None:
        for task in list(self._remote_calls.values()):
            task.cancel()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    # -- the agent's side -------------------------------------------------------------------------------

    async def serve_agent(
        self, agent_id: str, requests: AsyncIterator[apb.ServeInferenceRequest]
    ) -> AsyncIterator[apb.ServeInferenceResponse]:
        """The ServeInference stream of `agent_id` (already checked to be the caller): calls out, chunks in."""
        link = AgentLink(agent_id)
        replaced = self.links.get(agent_id)
        self.links[agent_id] = link
        if replaced is not None:
            replaced.close()  # the agent reconnected: calls on its old stream can't be answered any more
        subscription = None
        if self.nc is not None:

            async def from_replica(msg: Any) -> None:
                await self._from_replica(link, msg)

            subscription = await self.nc.subscribe(agent_subject(agent_id), cb=from_replica)
        reader = asyncio.create_task(self._read_chunks(link, requests))
        try:
            while True:
                next_call = asyncio.create_task(link.outgoing.get())
                done, _ = await asyncio.wait({next_call, reader}, return_when=asyncio.FIRST_COMPLETED)
                if next_call not in done:
                    next_call.cancel()
                    return  # the agent closed its side
                yield next_call.result()
        finally:
            reader.cancel()
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            if self.links.get(agent_id) is link:
                del self.links[agent_id]
            link.close()

    @staticmethod
    async def _read_chunks(link: AgentLink, requests: AsyncIterator[apb.ServeInferenceRequest]) -> None:
        async for message in requests:
            if message.WhichOneof("message") == "chunk":
                answers = link.calls.get(message.chunk.call_id)
                if answers is not None:
                    answers.put_nowait(message.chunk)

    # -- the caller's side ------------------------------------------------------------------------------

    async def call(
        self, agent_id: str, job_id: str, body: bytes, path: str = DEFAULT_PATH
    ) -> AsyncIterator[apb.InferenceChunk]:
        """The worker's answer to one call, chunk by chunk, the last one done; Unavailable when the agent is
        connected to no replica."""
        self.in_flight[job_id] = self.in_flight.get(job_id, 0) + 1
        try:
            link = self.links.get(agent_id)
            if link is not None:
                answer = self._local(link, job_id, body, path)
            elif self.nc is not None:
                answer = self._remote(agent_id, job_id, body, path)
            else:
                raise Unavailable("the deployment's agent is not connected; try again shortly")
            async for chunk in answer:
                yield chunk
        finally:
            self.in_flight[job_id] -= 1
            if not self.in_flight[job_id]:
                del self.in_flight[job_id]

    async def _local(self, link: AgentLink, job_id: str, body: bytes, path: str) -> AsyncIterator[apb.InferenceChunk]:
        call_id = uuid.uuid4().hex
        answers: asyncio.Queue[apb.InferenceChunk | None] = asyncio.Queue()
        link.calls[call_id] = answers
        link.outgoing.put_nowait(apb.ServeInferenceResponse(call_id=call_id, job_id=job_id, body=body, path=path))
        finished = False
        try:
            while not finished:
                chunk = await answers.get()
                if chunk is None:
                    raise Unavailable("the deployment's agent disconnected during the call")
                finished = chunk.done
                yield chunk
        finally:
            link.calls.pop(call_id, None)
            if not finished:  # the caller went away: the agent stops generating
                link.outgoing.put_nowait(apb.ServeInferenceResponse(call_id=call_id, job_id=job_id, cancel=True))

    async def _remote(self, agent_id: str, job_id: str, body: bytes, path: str) -> AsyncIterator[apb.InferenceChunk]:
        nc = self.nc
        inbox = nc.new_inbox()
        answers: asyncio.Queue[Any] = asyncio.Queue()
        subscription = await nc.subscribe(inbox, cb=answers.put)
        call = apb.ServeInferenceResponse(call_id=uuid.uuid4().hex, job_id=job_id, body=body, path=path)
        finished = False
        try:
            await nc.publish(agent_subject(agent_id), call.SerializeToString(), reply=inbox)
            try:
                ack = await asyncio.wait_for(answers.get(), self.ack_timeout_s)
            except TimeoutError:
                raise Unavailable("the deployment's agent is not connected; try again shortly") from None
            # No replica subscribed: the server answers at once with a "no responders" status and no data.
            if apb.InferenceChunk.FromString(ack.data).call_id != call.call_id:
                raise Unavailable("the deployment's agent is not connected; try again shortly")
            while not finished:
                chunk = apb.InferenceChunk.FromString((await answers.get()).data)
                finished = chunk.done
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
            if not finished:
                cancel = apb.ServeInferenceResponse(call_id=call.call_id, job_id=job_id, cancel=True)
                with contextlib.suppress(Exception):
                    await nc.publish(agent_subject(agent_id), cancel.SerializeToString())

    # -- calls from other replicas ---------------------------------------------------------------------

    async def _from_replica(self, link: AgentLink, msg: Any) -> None:
        call = apb.ServeInferenceResponse.FromString(msg.data)
        if call.cancel:
            task = self._remote_calls.pop(call.call_id, None)
            if task is not None:
                task.cancel()
            return
        if not msg.reply:
            return
        await self.nc.publish(
            msg.reply, apb.InferenceChunk(call_id=call.call_id, http_status=ACK_STATUS).SerializeToString()
        )
        task = asyncio.create_task(self._relay_for_replica(link, call, msg.reply))
        self._remote_calls[call.call_id] = task
        task.add_done_callback(lambda _: self._remote_calls.pop(call.call_id, None))

    async def _relay_for_replica(self, link: AgentLink, call: apb.ServeInferenceResponse, reply: str) -> None:
        try:
            async for chunk in self._local(link, call.job_id, call.body, call.path or DEFAULT_PATH):
                await self.nc.publish(reply, chunk.SerializeToString())
        except Unavailable as exc:
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
            done = apb.InferenceChunk(call_id=call.call_id, http_status=503, data=json.dumps(error).encode(), done=True)
            await self.nc.publish(reply, done.SerializeToString())
