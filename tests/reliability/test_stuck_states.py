"""Jobs stuck on a live agent are reaped (PostgreSQL, the real agent gRPC protocol, two jobs service replicas reaping
the same database at once): a STARTING job whose agent heartbeats but never confirms the start is requeued (or
failed on its last attempt), a CANCELLING job whose agent never confirms the stop is cancelled, each exactly once,
with the reason stored in the job, its history and its outbox event; the agent's late reports are answered, never
applied and never block its stream."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from tests.integration.test_jobs_service import Clock, StaticCatalog, report
from tests.reliability.conftest import scale
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api, store
from tuneforge_jobs.lifecycle import JobState
from tuneforge_jobs.main import MIGRATIONS, reaper
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs
from tuneforge_trainer.agent import Reporter

START_TIMEOUT = 2.0
CANCEL_TIMEOUT = 2.0
STUCK_JOBS = scale(10, 100)


class Replicas:
    """Two jobs service replicas on one database; the first serves the agent protocol over gRPC."""

    first: Jobs
    second: Jobs
    agents: agent_pb2_grpc.AgentServiceStub


def replica(engine: Any, max_attempts: int, changes: Notifier | None = None, lease_ttl: int = 60) -> Jobs:
    return Jobs(
        engine=engine,
        catalog=StaticCatalog(),
        artifact_root="/a",
        subject_root="t",
        max_attempts=max_attempts,
        lease_ttl_seconds=lease_ttl,  # 60 by default: the agent stays alive, only the stuck-state timeouts move jobs
        heartbeat_interval_seconds=1,
        start_timeout_seconds=START_TIMEOUT,
        cancel_timeout_seconds=CANCEL_TIMEOUT,
        on_change=changes.notify if changes else None,
    )


@contextlib.asynccontextmanager
async def replicas(postgres_url: str, max_attempts: int = 3, lease_ttl: int = 60) -> AsyncIterator[Replicas]:
    engines = [make_engine(postgres_url), make_engine(postgres_url)]
    await migrate(engines[0], MIGRATIONS, "alembic_version_jobs")
    changes = Notifier()
    r = Replicas()
    r.first = replica(engines[0], max_attempts, changes, lease_ttl)
    r.second = replica(engines[1], max_attempts, lease_ttl=lease_ttl)
    server, port = await start_server(api.bindings(r.first, changes), "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    r.agents = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        yield r
    finally:
        await channel.close()
        await server.stop(None)
        for engine in engines:
            await engine.dispose()


class FakeAgent:
    """Speaks the agent protocol: registers, heartbeats (running nothing), takes assignments, and confirms only
    what the test tells it to."""

    def __init__(self, r: Replicas, slots: int = 1) -> None:
        self.r, self.slots, self.id = r, slots, ""
        self.stops: list[tuple[str, int, str]] = []
        self.reporter = Reporter(on_stop=lambda *stop: self.stops.append(stop))
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> FakeAgent:
        resources = apb.AgentResources(slots=self.slots)
        self.id = (
            await self.r.agents.RegisterAgent(apb.RegisterAgentRequest(name="fake", resources=resources))
        ).agent_id
        self.reporter.agent_id = self.id
        self.tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self.reporter.run_stream(self.r.agents))]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _beat(self) -> None:
        while True:
            await self.heartbeat()
            await asyncio.sleep(0.5)

    async def heartbeat(self, running: list[str] | None = None) -> list[str]:
        beat = await self.r.agents.Heartbeat(apb.HeartbeatRequest(agent_id=self.id, running_job_ids=running or []))
        return list(beat.cancel_job_ids)

    async def take(self, n: int) -> list[apb.JobAssignment]:
        """n assignments, which a lost message would leave unanswered just the same."""
        call = self.r.agents.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=self.id))
        got = [(await asyncio.wait_for(call.read(), 10)).assignment for _ in range(n)]
        call.cancel()
        return got

    async def drained(self) -> None:
        for _ in range(200):
            if not self.reporter.pending:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the agent's reports were not acknowledged")


@contextlib.asynccontextmanager
async def two_reapers(r: Replicas) -> AsyncIterator[None]:
    """Both replicas reap the same database at once, as two jobs services do."""
    tasks = [asyncio.create_task(reaper(r.first, 0.1)), asyncio.create_task(reaper(r.second, 0.1))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_states(jobs: Jobs, ids: list[str], states: set[str], within: float) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        rows = [await jobs.get(i) for i in ids]
        if all(row.state in states for row in rows):
            return rows
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {sorted({row.state for row in rows})}, waiting for {states}")
        await asyncio.sleep(0.1)


async def history(jobs: Jobs, job_id: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """The job's state history and its state-change events in the outbox."""
    async with jobs.engine.connect() as conn:
        outbox = [
            json.loads(row.payload)
            for row in await conn.execute(
                select(store.outbox.c.payload)
                .where(store.outbox.c.subject == "t.jobs.job.state_changed")
                .order_by(store.outbox.c.seq)
            )
        ]
    return list(await jobs.events(job_id, 0, 1000)), [o for o in outbox if o["job_id"] == job_id]


def seconds_past_timeout(event: Any, since: dt.datetime, timeout: float) -> float:
    return (event.recorded_at - since).total_seconds() - timeout


@pytest.mark.timeout(120)
async def test_starting_jobs_whose_live_agent_never_confirms_are_requeued_once_and_the_agent_is_told_to_stop(
    postgres_url, figures
):
    async with replicas(postgres_url) as r, FakeAgent(r, slots=STUCK_JOBS) as agent:
        ids = [(await r.first.submit("m1", "d1", "sft-lora", {})).id for _ in range(STUCK_JOBS)]
        assigned = await agent.take(STUCK_JOBS)
        assert sorted(a.job_id for a in assigned) == sorted(ids)
        started = {i: (await r.first.get(i)).attempt_started_at for i in ids}
        async with two_reapers(r):
            rows = await wait_states(r.first, ids, {"QUEUED"}, START_TIMEOUT + 30)
        late = []
        for row in rows:
            assert row.agent_id is None and row.attempt == 1
            assert f"agent {agent.id} never confirmed the start of attempt 1 within 2 s; requeued" == row.state_reason
            events, outbox = await history(r.first, row.id)
            # One move per job although two replicas reaped: exactly one STARTING -> QUEUED, in history and outbox.
            assert [(e.from_state, e.to_state) for e in events] == [
                (None, "QUEUED"),
                ("QUEUED", "STARTING"),
                ("STARTING", "QUEUED"),
            ]
            assert [(o["from"], o["to"], o["reason"]) for o in outbox][-1] == ("STARTING", "QUEUED", row.state_reason)
            assert len(outbox) == 3
            late.append(seconds_past_timeout(events[-1], started[row.id], START_TIMEOUT))
        assert min(late) >= 0  # never before its timeout
        # The agent lives on (it heartbeats): only the unconfirmed starts were taken from it.
        async with r.first.engine.connect() as conn:
            status = (await conn.execute(select(store.agents.c.status).where(store.agents.c.id == agent.id))).scalar()
        assert status == "ACTIVE"
        # Had it started one after all, its heartbeat is told to stop it and its reports are refused.
        job_id = ids[0]
        assert await agent.heartbeat([job_id]) == [job_id]
        agent.reporter.add(job_id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING, reason="pid 1"))
        await agent.drained()
        assert agent.stops and agent.stops[0][:2] == (job_id, 1) and "no longer runs on agent" in agent.stops[0][2]
        assert (await r.first.get(job_id)).state == "QUEUED"
        figures.record("stuck STARTING jobs reaped", STUCK_JOBS)
        figures.record("STARTING: timeout to requeued, worst", max(late), "s", goal="< 5 s")
        figures.record("STARTING: timeout to requeued, median", sorted(late)[len(late) // 2], "s", goal="< 1 s")


@pytest.mark.timeout(60)
async def test_an_unconfirmed_start_on_the_last_attempt_fails_the_job_with_the_reason(postgres_url):
    async with replicas(postgres_url, max_attempts=1) as r, FakeAgent(r) as agent:
        job = await r.first.submit("m1", "d1", "sft-lora", {})
        await agent.take(1)
        async with two_reapers(r):
            (row,) = await wait_states(r.first, [job.id], {"FAILED", "QUEUED"}, START_TIMEOUT + 30)
        assert row.state == "FAILED"
        assert "never confirmed the start of attempt 1" in row.state_reason and "attempt limit of 1" in row.state_reason
        events, _ = await history(r.first, job.id)
        assert [e.to_state for e in events].count("FAILED") == 1


@pytest.mark.timeout(120)
async def test_cancelling_jobs_whose_agent_never_confirms_the_stop_are_cancelled_once_and_the_agent_told_again(
    postgres_url, figures
):
    async with replicas(postgres_url) as r, FakeAgent(r, slots=STUCK_JOBS) as agent:
        ids = [(await r.first.submit("m1", "d1", "sft-lora", {})).id for _ in range(STUCK_JOBS)]
        await agent.take(STUCK_JOBS)
        for job_id in ids:  # started for real: the start is confirmed, so only the cancel can be stuck
            agent.reporter.add(job_id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING, reason="pid 1"))
        await agent.drained()
        async with two_reapers(r):
            await wait_states(r.first, ids, {"RUNNING"}, 10)
            await asyncio.sleep(START_TIMEOUT + 0.5)
            assert {(await r.first.get(i)).state for i in ids} == {"RUNNING"}  # a confirmed start is never reaped
            for job_id in ids:
                await r.first.cancel(job_id)
            rows = await wait_states(r.first, ids, {"CANCELLED"}, CANCEL_TIMEOUT + 30)
        late = []
        for row in rows:
            assert (
                row.state_reason
                == f"cancelled without confirmation: agent {agent.id} never confirmed the stop within 2 s"
            )
            events, outbox = await history(r.first, row.id)
            assert [e.to_state for e in events][-2:] == ["CANCELLING", "CANCELLED"]
            assert [o["to"] for o in outbox].count("CANCELLED") == 1
            late.append(seconds_past_timeout(events[-1], events[-2].recorded_at, CANCEL_TIMEOUT))
        assert min(late) >= 0
        # The agent, still alive and still running one, is told again to stop it.
        assert await agent.heartbeat([ids[0]]) == [ids[0]]
        # Its late outcome is kept in the log but does not reopen the job, and the reports after it are stored.
        agent.reporter.add(ids[0], 1, state=apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED, reason="completed"))
        agent.reporter.add(ids[0], 1, log=apb.LogReport(stream="stdout", text="after the end"))
        await agent.drained()
        assert not agent.stops
        assert (await r.first.get(ids[0])).state == "CANCELLED"
        lines = [line.text for line in await r.first.logs(ids[0], 0, 100)]
        assert "after the end" in lines
        assert any("reported SUCCEEDED (completed) after the job became CANCELLED" in line for line in lines)
        figures.record("stuck CANCELLING jobs reaped", STUCK_JOBS)
        figures.record("CANCELLING: timeout to cancelled, worst", max(late), "s", goal="< 5 s")


@pytest.mark.timeout(60)
async def test_a_running_report_that_arrives_after_a_terminate_neither_reopens_the_job_nor_blocks_the_stream(
    postgres_url,
):
    # A terminate took the STARTING job to CANCELLING while the agent's RUNNING was on its way: before the fix the
    # RUNNING failed the whole report batch, on every resend, and no report of that agent was stored again.
    async with replicas(postgres_url) as r, FakeAgent(r) as agent:
        job = await r.first.submit("m1", "d1", "sft-lora", {})
        await agent.take(1)
        await r.first.cancel(job.id)
        agent.reporter.add(job.id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING, reason="pid 1"))
        agent.reporter.add(job.id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_CANCELLED, reason="terminated"))
        await agent.drained()
        row = await r.first.get(job.id)
        assert (row.state, row.state_reason) == ("CANCELLED", "terminated")


@pytest.mark.timeout(60)
async def test_a_pause_asked_of_an_agent_that_never_answers_leaves_no_job_stuck(postgres_url):
    # A pause is asked of the agent (pause_requested); an agent that never confirms the start, or dies, can't answer
    # it. The one with a checkpoint is PAUSED (and resumable), the one without is requeued with the pause dropped.
    async with replicas(postgres_url, lease_ttl=4) as r, two_reapers(r):
        async with FakeAgent(r, slots=2) as agent:
            running = await r.first.submit("m1", "d1", "sft-lora", {})
            starting = await r.first.submit("m1", "d1", "sft-lora", {})
            await agent.take(2)
            agent.reporter.add(running.id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING, reason="pid 1"))
            agent.reporter.add(running.id, 1, checkpoint=apb.CheckpointReport(step=4, uri="/a/checkpoint-4"))
            await agent.drained()
            await r.first.pause(running.id)
            await r.first.pause(starting.id)
            (requeued,) = await wait_states(r.first, [starting.id], {"QUEUED", "PAUSED"}, START_TIMEOUT + 30)
            assert requeued.state == "QUEUED" and not requeued.pause_requested
            assert "never confirmed the start of attempt 1" in requeued.state_reason
            assert "the pause was dropped: no checkpoint saved yet" in requeued.state_reason
            assert (await r.first.get(running.id)).state == "RUNNING"  # its agent lives and confirmed: not reaped
        # The agent is gone (its heartbeats stop) before it answered the pause.
        (paused,) = await wait_states(r.first, [running.id], {"PAUSED", "QUEUED", "FAILED"}, 30)
        assert (paused.state, paused.agent_id, paused.pause_requested) == ("PAUSED", None, False)
        assert paused.state_reason == "agent lost while pausing; paused at the latest checkpoint"
        await r.first.resume(running.id)
        assert (await r.first.get(running.id)).state == "QUEUED"


async def test_the_default_timeouts_reap_exactly_when_they_run_out_on_either_engine(database_url):
    # A fixed clock on SQLite (the embedded default) and PostgreSQL: not a second early, and at once when due.
    engine = make_engine(database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    clock = Clock()
    jobs = Jobs(engine=engine, catalog=StaticCatalog(), artifact_root="/a", subject_root="t", clock=clock)
    try:
        submitted = await jobs.submit("m1", "d1", "sft-lora", {})
        agent, _ = await jobs.register_agent("a", {}, 1)
        await jobs.claim_next(agent)
        clock.now += dt.timedelta(seconds=jobs.start_timeout_seconds - 1)
        assert await jobs.reap_stuck_jobs() == 0
        clock.now += dt.timedelta(seconds=1)
        assert await jobs.reap_stuck_jobs() == 1
        assert (await jobs.get(submitted.id)).state == JobState.QUEUED
        job = await jobs.claim_next(agent)
        assert job.attempt == 2
        await jobs.apply_report(agent, report(job, 1, "state", state=JobState.RUNNING))
        clock.now += dt.timedelta(hours=1)  # RUNNING for an hour: nothing to reap
        assert await jobs.reap_stuck_jobs() == 0
        await jobs.cancel(job.id)
        clock.now += dt.timedelta(seconds=jobs.cancel_timeout_seconds - 1)
        assert await jobs.reap_stuck_jobs() == 0
        clock.now += dt.timedelta(seconds=1)
        assert await jobs.reap_stuck_jobs() == 1
        assert (await jobs.get(job.id)).state == JobState.CANCELLED
        assert await jobs.reap_stuck_jobs() == 0
    finally:
        await engine.dispose()
