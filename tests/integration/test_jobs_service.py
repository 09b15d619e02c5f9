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
from tuneforge_jobs.notify import Notifier
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


async def test_a_log_line_or_metric_name_holding_a_nul_is_stored_with_a_replacement_not_refused(jobs):
    # A script's output is not the caller's input: PostgreSQL's text can't hold NUL, so one such line would
    # otherwise fail its batch and every resend of it, stalling the job's reports.
    await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 1)
    job = await jobs.claim_next(agent)
    assert await jobs.apply_report(agent, report(job, 1, "log", stream="std\0err", text="bad\0byte")) == 1
    assert await jobs.apply_report(agent, report(job, 2, "metric", step=1, values={"lo\0ss": 1.0})) == 2
    [line] = await jobs.logs(job.id, 0, 100)
    assert (line.stream, line.text) == ("std\ufffderr", "bad\ufffdbyte")
    [point] = await jobs.metrics(job.id, [], 0, 100)
    assert point.name == "lo\ufffdss"


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


async def test_reports_of_an_attempt_that_lost_its_job_are_refused_with_stop_and_nothing_is_stored(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    a1, _ = await jobs.register_agent("a1", {}, 1)
    first = await jobs.claim_next(a1)
    await jobs.apply_report(a1, report(first, 1, "log", text="before the lease lapsed"))
    jobs.clock.now += dt.timedelta(seconds=11)
    await jobs.reap_lost_agents()
    # Requeued: the stale agent keeps reporting, first under its old id, then under the id it got back.
    acks = await jobs.apply_reports([report(first, 2, "log", agent_id=a1, text="stale")])
    assert acks[(job.id, 1)] == 2 and "no longer runs on agent" in acks.fenced[(job.id, 1)]
    a1_again, resumed = await jobs.register_agent("a1", {}, 1, resume_agent_id=a1)
    assert not resumed
    acks = await jobs.apply_reports([report(first, 3, "metric", agent_id=a1_again, step=9, values={"loss": 0.1})])
    assert (job.id, 1) in acks.fenced
    # Handed to another agent: attempt 1's outcome is refused, acknowledged up to its last seq so it is not resent.
    a2, _ = await jobs.register_agent("a2", {}, 1)
    await jobs.claim_next(a2)
    acks = await jobs.apply_reports(
        [
            report(first, 4, "log", agent_id=a1_again, text="stale"),
            report(first, 5, "state", agent_id=a1_again, state=JobState.SUCCEEDED),
        ]
    )
    assert acks == {(job.id, 1): 5} and "superseded by attempt 2" in acks.fenced[(job.id, 1)]
    job = await jobs.get(job.id)
    assert (job.state, job.attempt, job.agent_id, job.current_step) == (JobState.STARTING, 2, a2, 0)
    assert [line.text for line in await jobs.logs(job.id, 0, 100)] == ["before the lease lapsed"]
    assert await jobs.metrics(job.id, [], 0, 100) == []
    async with jobs.engine.connect() as conn:
        last_seq = (await conn.execute(select(store.report_acks.c.last_seq))).scalars().all()
    assert last_seq == [1]  # the fenced reports moved nothing
    # A resend of an already stored report from the stale attempt is refused too.
    assert (job.id, 1) in (await jobs.apply_reports([report(first, 1, "log", agent_id=a1, text="x")])).fenced


async def test_the_live_attempt_is_not_fenced_and_a_deleted_job_fences_instead_of_failing_the_stream(jobs):
    await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 1)
    job = await jobs.claim_next(agent)
    acks = await jobs.apply_reports([report(job, 1, "log", agent_id=agent, text="ok")])
    assert acks == {(job.id, 1): 1} and not acks.fenced
    acks = await jobs.apply_reports([Report("job-gone", 1, 1, "log", dt.datetime.now(dt.UTC), agent_id=agent)])
    assert acks.fenced == {("job-gone", 1): "job job-gone no longer exists"}


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


async def add_checkpoint(jobs: Jobs, job_id: str, step: int, attempt: int) -> str:
    uri = f"/artifacts/jobs/{job_id}/checkpoints/checkpoint-{step}"
    async with jobs.engine.begin() as conn:
        await conn.execute(
            store.checkpoints.insert().values(
                job_id=job_id, step=step, attempt=attempt, uri=uri, metrics="{}", created_at=jobs.clock()
            )
        )
    return uri


async def test_lost_agent_job_resumes_from_latest_checkpoint_without_doubled_metric_points(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    a1, _ = await jobs.register_agent("a1", {}, 1)
    first = await jobs.claim_next(a1)
    assert (first.resume_from_uri, first.resume_from_step) == ("", 0)
    assert first.checkpoint_uri == f"/artifacts/jobs/{job.id}/checkpoints"
    assert first.attempt_started_at == jobs.clock.now
    seq = 0
    for step in range(1, 7):
        seq += 1
        await jobs.apply_report(a1, report(first, seq, "metric", step=step, values={"loss": 10.0 - step}))
    await add_checkpoint(jobs, job.id, 2, 1)
    latest = await add_checkpoint(jobs, job.id, 4, 1)
    jobs.clock.now += dt.timedelta(seconds=11)  # heartbeats stop after step 6
    assert await jobs.reap_lost_agents() == 1
    requeued = await jobs.get(job.id)
    assert (requeued.state, requeued.attempt, requeued.agent_id) == (JobState.QUEUED, 1, None)
    assert requeued.run_seconds == 11.0  # the lost attempt's time still counts

    a2, _ = await jobs.register_agent("a2", {}, 1)
    second = await jobs.claim_next(a2)
    assert (second.attempt, second.resume_from_uri, second.resume_from_step) == (2, latest, 4)
    assert (second.resumed_from_step, second.current_step) == (4, 4)
    events = await jobs.events(job.id, 0, 100)
    assert events[-1].reason == f"assigned to agent {a2}; resumes from step 4"
    # Steps 5 and 6 of attempt 1 are gone: attempt 2 reports them again, and each step is stored once.
    for step in (5, 6):
        await jobs.apply_report(a2, report(second, step - 4, "metric", step=step, values={"loss": 5.5 - step}))
    points = [(p.step, p.attempt) for p in await jobs.metrics(job.id, ["loss"], 0, 100)]
    assert sorted(points) == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]


async def test_a_lost_agents_job_asked_to_pause_is_paused_at_its_checkpoint_or_else_requeued(jobs):
    with_checkpoint = await jobs.submit("m1", "d1", "sft-lora", {})
    without = await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 2)
    await jobs.claim_next(agent)
    await jobs.claim_next(agent)
    await jobs.pause(with_checkpoint.id)
    await jobs.pause(without.id)
    # A pause reaches the agent as a stop that saves a checkpoint first; a terminate as a plain one.
    assert sorted(await jobs.cancelling_jobs(agent)) == sorted([(with_checkpoint.id, True), (without.id, True)])
    await add_checkpoint(jobs, with_checkpoint.id, 3, 1)
    jobs.clock.now += dt.timedelta(seconds=11)
    assert await jobs.reap_lost_agents() == 2
    paused, requeued = await jobs.get(with_checkpoint.id), await jobs.get(without.id)
    assert (paused.state, paused.agent_id, paused.pause_requested) == (JobState.PAUSED, None, False)
    assert (requeued.state, requeued.agent_id, requeued.pause_requested) == (JobState.QUEUED, None, False)
    assert "no checkpoint" in requeued.state_reason


async def test_a_cancelled_job_is_a_plain_stop_for_its_agent(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 1)
    await jobs.claim_next(agent)
    await jobs.cancel(job.id)
    assert await jobs.cancelling_jobs(agent) == [(job.id, False)]


async def test_heartbeat_stops_jobs_the_agent_still_runs_but_no_longer_owns(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    old, _ = await jobs.register_agent("a", {}, 1)
    await jobs.claim_next(old)
    assert await jobs.heartbeat(old, [job.id]) == []
    jobs.clock.now += dt.timedelta(seconds=11)
    await jobs.reap_lost_agents()
    new, _ = await jobs.register_agent("a", {}, 1, resume_agent_id=old)
    assert await jobs.heartbeat(new, [job.id, "job-unknown"]) == [job.id, "job-unknown"]


async def test_claims_pass_over_jobs_that_do_not_fit_the_agent(jobs):
    gib = 1024**3
    big = await jobs.submit("m1", "d1", "sft-lora", {}, priority=9, resources={"gpu_count": 2})
    eu = await jobs.submit(
        "m1", "d1", "sft-lora", {}, priority=5, resources={"gpu_count": 1, "agent_labels": {"zone": "eu"}}
    )
    cpu = await jobs.submit("m1", "d1", "sft-lora", {}, priority=0)
    us_gpu = {"gpu_count": 1, "gpu_memory_bytes": str(80 * gib), "labels": {"zone": "us"}}
    agent, _ = await jobs.register_agent("us-1gpu", us_gpu, 2)
    assert (await jobs.claim_next(agent)).id == cpu.id  # backfilled past the two it cannot run
    assert await jobs.claim_next(agent) is None
    eu_gpus = {"gpu_count": 2, "gpu_memory_bytes": str(80 * gib), "labels": {"zone": "eu"}}
    eu_agent, _ = await jobs.register_agent("eu-2gpu", eu_gpus, 2)
    assert (await jobs.claim_next(eu_agent)).id == big.id
    assert await jobs.claim_next(eu_agent) is None  # a slot is free, but both GPUs are taken
    assert (await jobs.get(eu.id)).state == JobState.QUEUED


async def test_only_a_new_job_or_a_freed_slot_wakes_every_agents_assignment_loop(jobs):
    # A claim or a start frees no slot and queues nothing: waking every agent's loop for it made 100 agents claim
    # again in vain for each (bench/bench_scheduler.py). The job's own watchers are still woken.
    changes = Notifier()
    jobs.on_change = changes.notify
    everyone = changes.ticket()
    queued = await jobs.submit("m1", "d1", "sft-lora", {})
    assert everyone.is_set()
    agent, _ = await jobs.register_agent("a", {}, 1)
    everyone, watchers = changes.ticket(), changes.ticket(queued.id)
    job = await jobs.claim_next(agent)
    assert watchers.is_set() and not everyone.is_set()
    await jobs.apply_report(agent, report(job, 1, "state", state=JobState.RUNNING))
    assert not everyone.is_set()
    await jobs.apply_report(agent, report(job, 2, "state", state=JobState.SUCCEEDED, output_uri="/out"))
    assert everyone.is_set()


async def test_a_claim_takes_the_best_job_not_locked_by_another_claim(postgres_url):
    engine = make_engine(postgres_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    jobs = Jobs(engine=engine, catalog=StaticCatalog(), artifact_root="/a", subject_root="tuneforge", clock=Clock())
    try:
        ranked = []
        for priority in (3, 2, 1):
            ranked.append(await jobs.submit("m1", "d1", "sft-lora", {}, priority=priority))
        agent, _ = await jobs.register_agent("a", {}, 3)
        async with engine.begin() as other:  # another replica in the middle of claiming the best job
            await other.execute(select(store.jobs).where(store.jobs.c.id == ranked[0].id).with_for_update())
            assert (await jobs.claim_next(agent)).id == ranked[1].id
        assert (await jobs.claim_next(agent)).id == ranked[0].id
        assert (await jobs.claim_next(agent)).id == ranked[2].id
    finally:
        await engine.dispose()


async def test_a_checkpoint_dropped_in_a_rolled_back_batch_keeps_its_files_when_a_later_batch_commits(jobs, tmp_path):
    await jobs.submit("m1", "d1", "sft-lora", {"save_total_limit": 1})
    agent, _ = await jobs.register_agent("a", {}, 1)
    job = await jobs.claim_next(agent)
    first, second = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    for directory in (first, second):
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(b"w")
    await jobs.apply_reports([report(job, 1, "checkpoint", agent_id=agent, step=1, output_uri=str(first))])
    naive = Report(job.id, 1, 3, "metric", dt.datetime.now(), agent_id=agent, step=2, values={"loss": 1.0})
    with pytest.raises(ValueError):  # the checkpoint of step 2 dropped step 1's, then the batch failed
        await jobs.apply_reports([report(job, 2, "checkpoint", agent_id=agent, step=2, output_uri=str(second)), naive])
    await jobs.apply_reports([report(job, 2, "log", agent_id=agent, text="another batch commits")])
    assert [c.step for c in await jobs.checkpoints(job.id)] == [1]
    assert first.exists(), "the rolled-back drop removed the files of a checkpoint that is still listed"
    await jobs.apply_reports([report(job, 3, "checkpoint", agent_id=agent, step=2, output_uri=str(second))])
    assert [c.step for c in await jobs.checkpoints(job.id)] == [2]
    assert not first.exists() and second.exists()
