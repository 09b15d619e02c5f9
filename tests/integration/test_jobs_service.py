"""Jobs use cases against real databases (SQLite and PostgreSQL): submit, claim, report, reap, cancel."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from tuneforge_common.db import make_engine, migrate
from tuneforge_common.errors import FailedPrecondition, NotFound
from tuneforge_jobs import store
from tuneforge_jobs.lifecycle import JobState
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.service import CatalogInputs, Jobs, Report


class StaticCatalog:
    """The catalog port with fixed answers; unknown ids are NOT_FOUND as the real one says."""

    async def resolve_inputs(
        self,
        model_id: str,
        dataset_id: str,
        method_id: str,
        parameters: dict[str, Any],
        base: dict[str, Any] | None = None,
    ) -> CatalogInputs:
        if model_id != "m1":
            raise NotFound(f"model_id: model {model_id!r} not found")
        resolved = {"max_steps": 5, "batch_size": 2, **(base or {}), **parameters}
        return CatalogInputs(
            "/models/m1",
            "/data/d1.jsonl",
            "tuneforge_trainer.methods.sft_lora",
            resolved,
            method_version="v1",
            catalog_version="model m1; dataset d1",
            dataset_rows=40,
        )

    async def dataset_tokens(self, dataset_id: str, model_id: str, max_seq_length: int) -> tuple[int, int]:
        return 4000, 3

    async def publish_model(self, name: str, description: str, uri: str, kind: str, lineage: dict[str, Any]) -> str:
        self.published = (name, uri, kind, lineage)
        return "model-published"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
async def jobs(database_url) -> AsyncIterator[Jobs]:
    engine = make_engine(database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    yield Jobs(
        engine=engine,
        catalog=StaticCatalog(),
        artifact_root="/artifacts",
        subject_root="tuneforge",
        max_attempts=2,
        lease_ttl_seconds=10,
        clock=Clock(),
    )
    await engine.dispose()


async def events(jobs: Jobs) -> list[tuple[str, str]]:
    import json

    async with jobs.engine.connect() as conn:
        rows = (await conn.execute(select(store.outbox).order_by(store.outbox.c.seq))).all()
    return [(json.loads(r.payload)["from"], json.loads(r.payload)["to"]) for r in rows]


def report(job, seq: int, kind: str, **kw) -> Report:
    return Report(job.id, job.attempt, seq, kind, dt.datetime.now(dt.UTC), **kw)


async def test_job_runs_queued_to_succeeded_with_one_event_per_transition(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {"lora_rank": 4})
    assert job.state == JobState.QUEUED
    agent, _ = await jobs.register_agent("a", {}, 1)
    job = await jobs.claim_next(agent)
    assert (job.state, job.attempt, job.agent_id) == (JobState.STARTING, 1, agent)
    await jobs.apply_report(agent, report(job, 1, "state", state=JobState.RUNNING))
    await jobs.apply_report(agent, report(job, 2, "metric", step=1, values={"loss": 2.5}, total_steps=4))
    await jobs.apply_report(agent, report(job, 3, "log", stream="stdout", text="hello"))
    await jobs.apply_report(agent, report(job, 4, "state", state=JobState.SUCCEEDED, output_uri="/out"))
    job = await jobs.get(job.id)
    assert (job.state, job.output_uri, job.current_step, job.total_steps) == (JobState.SUCCEEDED, "/out", 1, 4)
    assert await events(jobs) == [
        (None, "QUEUED"),
        ("QUEUED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]


async def test_resent_reports_are_stored_once(jobs):
    await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 1)
    job = await jobs.claim_next(agent)
    acks = []
    for _ in range(3):  # the agent reconnects and resends what it had not seen acknowledged
        acks.append(await jobs.apply_report(agent, report(job, 1, "metric", step=1, values={"loss": 1.0})))
        acks.append(await jobs.apply_report(agent, report(job, 2, "log", text="line")))
    assert acks == [1, 2, 2, 2, 2, 2]  # the answer is always the highest sequence stored
    assert len(await jobs.metrics(job.id, [], 0, 100)) == 1
    assert len(await jobs.logs(job.id, 0, 100)) == 1


async def test_concurrent_claims_never_hand_one_job_to_two_agents(jobs):
    for _ in range(3):
        await jobs.submit("m1", "d1", "sft-lora", {})
    agents = [(await jobs.register_agent(f"a{i}", {}, 1))[0] for i in range(6)]
    results = await asyncio.gather(*(jobs.claim_next(a) for a in agents), return_exceptions=True)
    claimed = [r.id for r in results if r is not None and not isinstance(r, BaseException)]
    assert len(claimed) == len(set(claimed)) <= 3
    async with jobs.engine.connect() as conn:
        starting = (
            await conn.execute(select(func.count()).select_from(store.jobs).where(store.jobs.c.state == "STARTING"))
        ).scalar_one()
    assert starting == len(claimed)


async def test_priority_then_age_decides_the_next_job(jobs):
    old_low = await jobs.submit("m1", "d1", "sft-lora", {}, priority=0)
    jobs.clock.now += dt.timedelta(seconds=1)
    high = await jobs.submit("m1", "d1", "sft-lora", {}, priority=5)
    agent, _ = await jobs.register_agent("a", {}, 2)
    assert (await jobs.claim_next(agent)).id == high.id
    assert (await jobs.claim_next(agent)).id == old_low.id
    assert await jobs.claim_next(agent) is None  # both slots busy, queue empty


async def test_lost_agent_job_is_requeued_then_fails_past_the_attempt_limit(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    for attempt in (1, 2):
        agent, _ = await jobs.register_agent(f"a{attempt}", {}, 1)
        claimed = await jobs.claim_next(agent)
        assert claimed.attempt == attempt
        jobs.clock.now += dt.timedelta(seconds=11)  # heartbeats stop
        assert await jobs.reap_lost_agents() == 1
    job = await jobs.get(job.id)
    assert job.state == JobState.FAILED and "attempt limit of 2" in job.state_reason
    with pytest.raises(NotFound):
        await jobs.heartbeat(agent)  # a lost agent must register again


async def test_reports_from_a_superseded_attempt_are_ignored(jobs):
    await jobs.submit("m1", "d1", "sft-lora", {})
    a1, _ = await jobs.register_agent("a1", {}, 1)
    first = await jobs.claim_next(a1)
    jobs.clock.now += dt.timedelta(seconds=11)
    await jobs.reap_lost_agents()
    a2, _ = await jobs.register_agent("a2", {}, 1)
    await jobs.claim_next(a2)
    await jobs.apply_report(a1, report(first, 1, "state", state=JobState.SUCCEEDED))
    assert (await jobs.get(first.id)).state == JobState.STARTING


async def test_cancel_of_a_queued_job_is_immediate_and_of_a_running_one_goes_via_cancelling(jobs):
    queued = await jobs.submit("m1", "d1", "sft-lora", {})
    assert (await jobs.cancel(queued.id)).state == JobState.CANCELLED
    running = await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 1)
    await jobs.claim_next(agent)
    assert (await jobs.cancel(running.id)).state == JobState.CANCELLING
    assert await jobs.heartbeat(agent) == [running.id]
    job = await jobs.get(running.id)
    await jobs.apply_report(agent, report(job, 1, "state", state=JobState.CANCELLED))
    assert (await jobs.get(running.id)).state == JobState.CANCELLED
    with pytest.raises(FailedPrecondition):
        await jobs.cancel(running.id)


async def test_unknown_model_is_not_found_and_nothing_is_stored(jobs):
    with pytest.raises(NotFound, match="model_id"):
        await jobs.submit("nope", "d1", "sft-lora", {})
    assert await jobs.list_jobs(10, 0) == []


async def test_a_reconnecting_agent_keeps_its_lease_and_jobs_but_not_after_it_lapsed(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    agent, resumed = await jobs.register_agent("a", {}, 1)
    assert not resumed
    await jobs.claim_next(agent)
    jobs.clock.now += dt.timedelta(seconds=5)
    assert await jobs.register_agent("a", {}, 1, resume_agent_id=agent) == (agent, True)
    jobs.clock.now += dt.timedelta(seconds=8)  # 13 s after the claim, 8 s after the renewal
    assert await jobs.reap_lost_agents() == 0
    assert (await jobs.get(job.id)).agent_id == agent
    jobs.clock.now += dt.timedelta(seconds=11)
    assert await jobs.reap_lost_agents() == 1
    new_id, resumed = await jobs.register_agent("a", {}, 1, resume_agent_id=agent)
    assert new_id != agent and not resumed
    assert (await jobs.get(job.id)).state == JobState.QUEUED
