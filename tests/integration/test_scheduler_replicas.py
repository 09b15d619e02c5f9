"""Two replicas of the jobs service on one PostgreSQL database, 20 agents claiming 200 jobs at once.

Proves the scheduler's promises under real row locks: no job is handed out twice, every job lands on an
agent whose resources fit it (and never on a full one), and every job that fits some agent runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from google.protobuf import json_format
from sqlalchemy import select

from tests.integration.test_jobs_service import StaticCatalog
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge_common.db import make_engine, migrate
from tuneforge_jobs import store
from tuneforge_jobs.lifecycle import JobState
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.scheduler import AgentCapacity, AgentSnapshot, ResourceRequest, fits
from tuneforge_jobs.service import Jobs, Report

GIB = 1024**3
N_AGENTS = 20
N_JOBS = 200


@pytest.fixture
async def replicas(postgres_url) -> AsyncIterator[list[Jobs]]:
    """Two Jobs services, each with its own engine (connection pool), on one database."""
    engines = [make_engine(postgres_url), make_engine(postgres_url)]
    await migrate(engines[0], MIGRATIONS, "alembic_version_jobs")
    yield [
        Jobs(engine=e, catalog=StaticCatalog(), artifact_root="/artifacts", subject_root="tuneforge", max_attempts=2)
        for e in engines
    ]
    for e in engines:
        await e.dispose()


def resources_json(resources: apb.AgentResources) -> dict:
    """As the AgentService stores them (protobuf JSON: 64-bit numbers become strings)."""
    return json_format.MessageToDict(resources, preserving_proto_field_name=True)


@dataclass
class SimAgent:
    """A fake trainer agent: claims until nothing it could ever run is left, finishes each job quickly."""

    index: int
    resources: apb.AgentResources
    agent_id: str = ""
    running: dict[str, ResourceRequest] = field(default_factory=dict)
    claims: list[tuple[str, int, int]] = field(default_factory=list)  # (job id, attempt, replica)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # the agent's own view stays the service's view

    @property
    def capacity(self) -> AgentCapacity:
        return AgentCapacity.from_dict(resources_json(self.resources), self.resources.slots)


def make_agents(rng: random.Random) -> list[SimAgent]:
    agents = []
    for i in range(N_AGENTS):
        gpus = [0, 1, 2, 4, 8][i % 5]
        agents.append(
            SimAgent(
                i,
                apb.AgentResources(
                    gpu_count=gpus,
                    gpu_models=["NVIDIA A100-SXM4-80GB"] * gpus,
                    gpu_memory_bytes=[16, 24, 40, 80][i % 4] * GIB if gpus else 0,
                    cpu_count=32,
                    memory_bytes=256 * GIB,
                    labels={"zone": ["eu", "us"][i % 2], **({"pool": "spot"} if i % 3 == 0 else {})},
                    slots=1 + rng.randint(0, 3),
                ),
            )
        )
    return agents


def make_request(rng: random.Random) -> dict:
    """Mostly fitting requests; some ask for more GPUs or a zone no agent has, so they fit nowhere."""
    labels = rng.choice([{}, {}, {}, {"zone": "eu"}, {"zone": "us"}, {"pool": "spot"}, {"zone": "ap"}])
    return {
        "gpu_count": rng.choice([0, 0, 1, 1, 1, 2, 2, 4, 8, 16]),
        "min_gpu_memory_bytes": rng.choice([0, 0, 16 * GIB, 24 * GIB, 40 * GIB, 80 * GIB]),
        "agent_labels": labels,
    }


async def run_agent(agent: SimAgent, replicas: list[Jobs], rng: random.Random, finishing: set[asyncio.Task]) -> None:
    idle_misses = 0
    turn = agent.index
    while True:
        turn += 1
        replica = turn % len(replicas)  # every agent claims through both replicas in turn
        async with agent.lock:
            before = AgentSnapshot(agent.capacity, tuple(agent.running.values()))
            claimed = await replicas[replica].claim_next(agent.agent_id)
            if claimed is not None:
                request = ResourceRequest.from_json(claimed.resources)
                # What the claim saw is what this agent runs: the job must have fitted beside them.
                assert fits(request, before), (claimed.id, request, before)
                agent.running[claimed.id] = request
                agent.claims.append((claimed.id, claimed.attempt, replica))
        if claimed is not None:
            idle_misses = 0
            task = asyncio.create_task(finish(agent, claimed, replicas[rng.randrange(2)], rng.random() * 0.02))
            finishing.add(task)
            continue
        if not agent.running:
            # Idle and offered nothing: the queue only shrinks, so nothing will ever fit this agent. Ask once
            # more after a pause, in case a fitting row was locked by a claim that then rolled back.
            idle_misses += 1
            if idle_misses >= 2:
                return
        await asyncio.sleep(0.005)


async def finish(agent: SimAgent, job, replica: Jobs, delay: float) -> None:
    await asyncio.sleep(delay)
    now = dt.datetime.now(dt.UTC)
    reports = [
        Report(job.id, job.attempt, 1, "state", now, agent_id=agent.agent_id, state=JobState.RUNNING),
        Report(job.id, job.attempt, 2, "metric", now, agent_id=agent.agent_id, step=1, values={"loss": 1.0}),
        Report(job.id, job.attempt, 3, "state", now, agent_id=agent.agent_id, state=JobState.SUCCEEDED),
    ]
    async with agent.lock:
        for batch in (reports[:2], reports[2:]):
            acks = await replica.apply_reports(batch)
            assert acks[(job.id, job.attempt)] == batch[-1].seq and not acks.fenced
        del agent.running[job.id]


async def test_two_replicas_never_hand_a_job_out_twice_and_every_fitting_job_runs_on_an_agent_it_fits(replicas):
    rng = random.Random(20260101)
    agents = make_agents(rng)
    for agent in agents:
        replica = replicas[agent.index % 2]
        agent.agent_id, _ = await replica.register_agent(
            f"node-{agent.index}", resources_json(agent.resources), agent.resources.slots
        )
    requests: dict[str, ResourceRequest] = {}
    for i in range(N_JOBS):
        resources = make_request(rng)
        job = await replicas[i % 2].submit("m1", "d1", "sft-lora", {}, priority=rng.randint(-5, 5), resources=resources)
        requests[job.id] = ResourceRequest.from_dict(resources)
    fitting = {job_id for job_id, r in requests.items() if any(fits(r, AgentSnapshot(a.capacity)) for a in agents)}
    assert 100 < len(fitting) < N_JOBS  # the mix has both kinds

    started = time.perf_counter()
    finishing: set[asyncio.Task] = set()
    agents_done = asyncio.gather(*(run_agent(a, replicas, rng, finishing) for a in agents))
    while not agents_done.done():  # a failed finish would leave its agent waiting forever: fail fast instead
        await asyncio.wait([agents_done, *finishing], timeout=120, return_when=asyncio.FIRST_EXCEPTION)
        for task in [agents_done, *finishing]:
            if task.done() and task.exception() is not None:
                agents_done.cancel()
                raise task.exception()
        assert time.perf_counter() - started < 120, "agents did not drain the queue in 120 s"
    await asyncio.gather(*finishing)
    elapsed = time.perf_counter() - started
    claims = [c for a in agents for c in a.claims]
    print(
        f"\n{len(claims)} claims of {N_JOBS} jobs ({len(fitting)} fitting) by {N_AGENTS} agents over 2 replicas "
        f"in {elapsed:.2f}s ({len(claims) / elapsed:.0f} claims/s)"
    )

    # No job handed out twice: one claim per job, and exactly one STARTING transition per job and attempt.
    assert len(claims) == len({c[0] for c in claims}) == len(fitting)
    assert {c[0] for c in claims} == fitting
    assert {c[2] for c in claims} == {0, 1}  # both replicas handed out jobs
    async with replicas[0].engine.connect() as conn:
        starts = Counter(
            (r.job_id, r.attempt)
            for r in await conn.execute(
                select(store.job_events.c.job_id, store.job_events.c.attempt).where(
                    store.job_events.c.to_state == JobState.STARTING
                )
            )
        )
        rows = {r.id: r for r in await conn.execute(select(store.jobs))}
    assert set(starts.values()) == {1} and set(starts) == {(job_id, 1) for job_id in fitting}

    # Every job that fits some agent ran there to the end; each one ran on an agent that fits it; the rest wait.
    capacity = {a.agent_id: a.capacity for a in agents}
    for job_id, row in rows.items():
        if job_id in fitting:
            assert (row.state, row.attempt) == (JobState.SUCCEEDED, 1)
            assert fits(requests[job_id], AgentSnapshot(capacity[row.agent_id])), (job_id, row.agent_id)
        else:
            assert (row.state, row.attempt, row.agent_id) == (JobState.QUEUED, 0, None)
