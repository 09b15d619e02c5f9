"""Chat calls reach a deployment's agent over the inference stream it holds with one jobs replica: directly on
that replica, through the real NATS server from another one; a caller that goes away cancels the call on the
agent; an agent that drops its stream, or is connected nowhere, fails the call with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge_common.errors import Unavailable
from tuneforge_jobs.inference import ACK_STATUS, InferenceRouter


class FakeAgent:
    """An agent's side of the stream: answers each call with its body echoed in two chunks, or holds it."""

    def __init__(self, router: InferenceRouter, hold: bool = False) -> None:
        self.agent_id = f"agent-{uuid.uuid4().hex[:8]}"
        self.router = router
        self.hold = hold
        self.outgoing: asyncio.Queue[apb.ServeInferenceRequest | None] = asyncio.Queue()
        self.calls: list[apb.ServeInferenceResponse] = []
        self.cancelled: list[str] = []
        self.task: asyncio.Task | None = None

    async def requests(self) -> AsyncIterator[apb.ServeInferenceRequest]:
        while (item := await self.outgoing.get()) is not None:
            yield item

    async def run(self) -> None:
        async for call in self.router.serve_agent(self.agent_id, self.requests()):
            if call.cancel:
                self.cancelled.append(call.call_id)
                continue
            self.calls.append(call)
            if self.hold:
                continue
            for data, done in ((b"echo: ", False), (call.body, True)):
                chunk = apb.InferenceChunk(call_id=call.call_id, http_status=200, data=data, done=done)
                self.outgoing.put_nowait(apb.ServeInferenceRequest(chunk=chunk))

    async def __aenter__(self) -> FakeAgent:
        self.task = asyncio.create_task(self.run())
        for _ in range(100):  # attached (and subscribed, with NATS) once the router lists it
            if self.agent_id in self.router.links:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.outgoing.put_nowait(None)
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


async def answer(router: InferenceRouter, agent_id: str, body: bytes) -> tuple[int, bytes]:
    status, data = 0, b""
    async for chunk in router.call(agent_id, "job-1", body):
        if chunk.http_status != ACK_STATUS:
            status, data = chunk.http_status, data + chunk.data
    return status, data


@pytest.fixture
async def replicas(nats_url) -> AsyncIterator[tuple[InferenceRouter, InferenceRouter]]:
    holder, other = InferenceRouter(nats_url), InferenceRouter(nats_url, ack_timeout_s=1.0)
    await holder.start()
    await other.start()
    yield holder, other
    await holder.close()
    await other.close()


async def test_a_call_reaches_the_agent_on_its_own_replica_and_from_another_one_over_nats(replicas):
    holder, other = replicas
    async with FakeAgent(holder) as agent:
        assert await answer(holder, agent.agent_id, b'{"n": 1}') == (200, b'echo: {"n": 1}')
        assert await answer(other, agent.agent_id, b'{"n": 2}') == (200, b'echo: {"n": 2}')
        assert [c.body for c in agent.calls] == [b'{"n": 1}', b'{"n": 2}']
        assert all(c.job_id == "job-1" and c.path == "/v1/chat/completions" for c in agent.calls)
        assert holder.in_flight == {} and other.in_flight == {}


async def test_a_caller_that_goes_away_cancels_the_call_on_the_agent_locally_and_across_replicas(replicas):
    holder, other = replicas
    async with FakeAgent(holder, hold=True) as agent:
        for router in (holder, other):
            calls = router.call(agent.agent_id, "job-1", b"{}")
            waiting = asyncio.create_task(anext(calls))
            for _ in range(200):
                if len(agent.calls) == len(agent.cancelled) + 1:
                    break
                await asyncio.sleep(0.01)
            assert not waiting.done()  # held: no answer yet
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await calls.aclose()
            for _ in range(200):
                if len(agent.cancelled) == len(agent.calls):
                    break
                await asyncio.sleep(0.01)
        assert agent.cancelled == [c.call_id for c in agent.calls] and len(agent.calls) == 2


async def test_an_agent_that_drops_its_stream_mid_call_or_is_connected_nowhere_is_unavailable(replicas):
    holder, other = replicas
    agent = FakeAgent(holder, hold=True)
    async with agent:
        pending = asyncio.create_task(answer(holder, agent.agent_id, b"{}"))
        for _ in range(200):
            if agent.calls:
                break
            await asyncio.sleep(0.01)
    with pytest.raises(Unavailable, match="disconnected"):
        await pending
    with pytest.raises(Unavailable, match="not connected"):
        await answer(other, "agent-nowhere", b"{}")
    with pytest.raises(Unavailable, match="not connected"):
        await answer(InferenceRouter(), "agent-nowhere", b"{}")  # one replica without NATS
