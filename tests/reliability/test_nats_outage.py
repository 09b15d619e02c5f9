"""NATS stopped mid-run (issue 11): state changes keep committing, the outbox catches up, each event arrives once.

A private nats-server process with its own JetStream store directory (the shared server is never stopped), the
jobs service in-process as tuneforge_jobs.main wires it (Jobs over a fresh PostgreSQL database, its gRPC API on a
real port, the outbox publisher task), and a fake agent speaking the real agent protocol over gRPC (register,
heartbeats, the assignment stream, numbered and acknowledged reports). Jobs are submitted, taken, run, finished
and cancelled before, during and after the outage; NATS is SIGTERMed for scale(5, 30) seconds and started again on
the same port and store directory.

No service consumes the event stream today (the gateway follows jobs over WatchJob, and the jobs service's
inference routing uses core NATS request/reply, not these events), so the consumer checked here is the contract
any consumer gets: each event once, by its id and by Nats-Msg-Id, in commit order per job, none missing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from sqlalchemy import func, select, update

from tests.integration.test_jobs_service import StaticCatalog
from tests.reliability.conftest import scale
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as pb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.events import OutboxPublisher
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api, store
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs
from tuneforge_trainer.agent import Reporter

NATS_SERVER = str(Path(sys.executable).parent / "nats-server")
OUTAGE_SECONDS = scale(5, 30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateNats:
    """A nats-server process of the test's own, stopped and started again on the same port and store."""

    def __init__(self, store_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.store_dir = store_dir
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)


@dataclass
class FakeAgent:
    """An agent over the real protocol that reports what the test tells it to, at once."""

    agents: agent_pb2_grpc.AgentServiceStub
    agent_id: str = ""
    reporter: Reporter = field(default_factory=Reporter)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def start(self) -> None:
        registered = await self.agents.RegisterAgent(
            apb.RegisterAgentRequest(name="fake", resources=apb.AgentResources(slots=1000)), timeout=5
        )
        self.agent_id = self.reporter.agent_id = registered.agent_id
        self.tasks = [
            asyncio.create_task(self.reporter.run_stream(self.agents)),
            asyncio.create_task(self._assignments()),
            asyncio.create_task(self._heartbeats()),
        ]

    async def _assignments(self) -> None:
        async for msg in self.agents.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=self.agent_id)):
            await self.inbox.put(msg)

    async def _heartbeats(self) -> None:
        while True:
            await self.agents.Heartbeat(apb.HeartbeatRequest(agent_id=self.agent_id), timeout=5)
            await asyncio.sleep(1)

    async def next(self, kind: str, job_id: str) -> Any:
        msg = await asyncio.wait_for(self.inbox.get(), 10)
        assert msg.WhichOneof("work") == kind and getattr(msg, kind).job_id == job_id, msg
        return getattr(msg, kind)

    def report(self, job_id: str, attempt: int, **report: Any) -> None:
        self.reporter.add(job_id, attempt, **report)

    async def settled(self) -> None:
        """Every report stored and acknowledged by the service."""
        for _ in range(200):
            if not self.reporter.pending:
                return
            for task in self.tasks:
                if task.done():
                    task.result()  # a stream that ended says why
            await asyncio.sleep(0.02)
        raise AssertionError("reports not acknowledged")

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class Service:
    jobs: Jobs
    publisher: OutboxPublisher
    api: jobs_pb2_grpc.JobServiceStub
    agent: FakeAgent


@pytest.fixture
async def service(postgres_url: str, tmp_path: Path, event_names: tuple[str, str]) -> AsyncIterator[Any]:
    nats_server = PrivateNats(tmp_path / "jetstream", tmp_path / "nats.log")
    nats_server.start()
    stream, root = event_names
    engine = make_engine(postgres_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    publisher = OutboxPublisher(engine, store.outbox, nats_server.url, stream, root, poll_interval=0.05)
    changes = Notifier()
    jobs = Jobs(
        engine=engine,
        catalog=StaticCatalog(),
        artifact_root="/a",
        subject_root=root,
        on_event=publisher.notify,
        on_change=changes.notify,
    )
    publisher.start()
    server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    agent = FakeAgent(agent_pb2_grpc.AgentServiceStub(channel))
    await agent.start()
    try:
        yield nats_server, Service(jobs, publisher, jobs_pb2_grpc.JobServiceStub(channel), agent)
    finally:
        await agent.stop()
        await channel.close()
        await server.stop(None)
        await publisher.stop()
        await engine.dispose()
        nats_server.stop()


async def unpublished(jobs: Jobs) -> int:
    async with jobs.engine.connect() as conn:
        query = select(func.count()).select_from(store.outbox).where(store.outbox.c.published_at.is_(None))
        return int((await conn.execute(query)).scalar_one())


async def outbox_rows(jobs: Jobs) -> list[Any]:
    async with jobs.engine.connect() as conn:
        return list((await conn.execute(select(store.outbox).order_by(store.outbox.c.seq))).all())


async def drained(jobs: Jobs, within: float) -> float:
    """Seconds until the outbox has nothing left to publish."""
    started = time.monotonic()
    while await unpublished(jobs):
        assert time.monotonic() - started < within, f"{await unpublished(jobs)} events still unpublished"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def lifecycle(s: Service, n: int) -> tuple[str, list[float]]:
    """One job through its states over the API and the agent protocol: submitted, taken, running, a metric
    point, then finished (every third one cancelled by its user instead). Returns its id and the API calls'
    latencies: each must answer at once, whether NATS is up or not."""
    latencies: list[float] = []

    async def call(rpc: Any, request: Any) -> Any:
        started = time.monotonic()
        answer = await rpc(request, timeout=10)
        latencies.append(time.monotonic() - started)
        return answer

    job = (await call(s.api.SubmitJob, pb.SubmitJobRequest(model_id="m1", dataset_id="d1", method_id="sft-lora"))).job
    assignment = await s.agent.next("assignment", job.id)
    s.agent.report(job.id, assignment.attempt, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING))
    s.agent.report(job.id, assignment.attempt, metric=apb.MetricReport(step=1, values={"loss": 1.0}, total_steps=5))
    await s.agent.settled()
    if n % 3 == 2:
        await call(s.api.CancelJob, pb.CancelJobRequest(job_id=job.id))
        await s.agent.next("cancellation", job.id)
        s.agent.report(job.id, assignment.attempt, state=apb.StateReport(state=apb.REPORTED_STATE_CANCELLED))
        expected = pb.JOB_STATE_CANCELLED
    else:
        s.agent.report(job.id, assignment.attempt, state=apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED))
        expected = pb.JOB_STATE_SUCCEEDED
    await s.agent.settled()
    answer = (await call(s.api.GetJob, pb.GetJobRequest(job_id=job.id))).job
    assert answer.state == expected
    return job.id, latencies


async def read_stream(url: str, stream: str, subject_root: str) -> list[Any]:
    """Every message in the stream, in stream order, through a fresh pull consumer."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        total = (await js.stream_info(stream)).state.messages
        sub = await js.pull_subscribe(f"{subject_root}.>", stream=stream)
        messages: list[Any] = []
        while len(messages) < total:
            messages += await sub.fetch(min(256, total - len(messages)), timeout=5)
        for m in messages:
            await m.ack()
        return messages
    finally:
        await nc.close()


@pytest.mark.timeout(300)
async def test_a_nats_outage_loses_no_state_change_and_every_event_arrives_once_in_order(service, event_names, figures):
    nats_server, s = service
    stream, root = event_names

    # Before: a long job starts and runs; a short one completes. The events reach the stream.
    long_job = (await s.api.SubmitJob(pb.SubmitJobRequest(model_id="m1", dataset_id="d1", method_id="sft-lora"))).job
    long_attempt = (await s.agent.next("assignment", long_job.id)).attempt
    s.agent.report(long_job.id, long_attempt, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING))
    job_ids = [long_job.id, (await lifecycle(s, 0))[0]]
    await drained(s.jobs, 30)
    seq_before_outage = (await outbox_rows(s.jobs))[-1].seq

    # The outage: NATS is stopped; the long job reports on, and jobs keep being submitted, run and finished.
    nats_server.stop()
    down_at = time.monotonic()
    latencies: list[float] = []
    step, n = 1, 1
    while time.monotonic() - down_at < OUTAGE_SECONDS:
        job_id, took = await lifecycle(s, n)
        job_ids.append(job_id)
        latencies += took
        step, n = step + 1, n + 1
        s.agent.report(long_job.id, long_attempt, metric=apb.MetricReport(step=step, values={"loss": 1.0 / step}))
        await asyncio.sleep(0.2)
    rows = await outbox_rows(s.jobs)
    committed_during = [r for r in rows if r.seq > seq_before_outage]
    assert committed_during and all(r.published_at is None for r in committed_during)
    nats_server.start()
    outage = time.monotonic() - down_at
    catch_up = await drained(s.jobs, 60)

    # After: the long job finishes, one more job runs.
    s.agent.report(long_job.id, long_attempt, state=apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED))
    await s.agent.settled()
    job_ids.append((await lifecycle(s, 0))[0])
    await drained(s.jobs, 30)

    rows = await outbox_rows(s.jobs)
    messages = await read_stream(nats_server.url, stream, root)
    bodies = [json.loads(m.data) for m in messages]
    ids = [b["id"] for b in bodies]
    duplicates = len(ids) - len(set(ids))
    lost = {r.event_id for r in rows} - set(ids)
    assert duplicates == 0 and not lost
    assert [m.headers["Nats-Msg-Id"] for m in messages] == ids
    assert len(messages) == len(rows)
    # Per job, the stream holds the job's transitions in the order they committed, and they are its history.
    for job_id in job_ids:
        committed = [json.loads(r.payload)["to"] for r in rows if json.loads(r.payload)["job_id"] == job_id]
        delivered = [b["to"] for b in bodies if b["job_id"] == job_id]
        history = (await s.api.ListJobEvents(pb.ListJobEventsRequest(job_id=job_id), timeout=5)).events
        assert delivered == committed == [pb.JobState.Name(e.to_state).removeprefix("JOB_STATE_") for e in history]
        assert committed[-1] in ("SUCCEEDED", "CANCELLED")
    assert (await s.api.GetJob(pb.GetJobRequest(job_id=long_job.id), timeout=5)).job.current_step == step

    # A publisher that crashed after sending but before marking its rows sends them all again, across the
    # server restart: JetStream drops every one by its Nats-Msg-Id (the duplicate window survives the restart).
    async with s.jobs.engine.begin() as conn:
        await conn.execute(update(store.outbox).values(published_at=None))
    s.publisher.notify()
    await drained(s.jobs, 60)
    assert len(await read_stream(nats_server.url, stream, root)) == len(rows)

    figures.record("NATS outage", outage, "s", goal=f"{OUTAGE_SECONDS} s")
    figures.record("events committed during the outage", len(committed_during), goal="> 0, none blocked")
    figures.record("slowest API call during the outage", max(latencies), "s", goal="< 2 s")
    figures.record("seconds from NATS back to the outbox drained", catch_up, "s", goal="< 15 s")
    figures.record("events delivered", len(messages), goal=f"= {len(rows)} committed")
    figures.record("duplicate deliveries", duplicates, goal="0")
    figures.record("events lost", len(lost), goal="0")
    # The publisher goes back to NATS when its client reconnects, not after a backoff grown during the outage.
    assert catch_up < 15.0
    # A call waiting on NATS would take the JetStream publish timeout (5 s) or hang; PostgreSQL answers in ms.
    assert max(latencies) < 4.0, "an API call waited on NATS"
