"""Job operations on SQLite and PostgreSQL: dry run, copy, pause/resume, delete, labels, checkpoints, publish."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import func, select

from tests.integration.test_jobs_service import Clock, StaticCatalog, report
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.errors import FailedPrecondition, InvalidArgument, NotFound
from tuneforge_jobs import store
from tuneforge_jobs.lifecycle import JobState
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.service import Jobs, checkpoint_retention


@pytest.fixture
async def jobs(database_url, tmp_path):
    engine = make_engine(database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    yield Jobs(
        engine=engine,
        catalog=StaticCatalog(),
        artifact_root=str(tmp_path / "artifacts"),
        subject_root="tuneforge",
        max_attempts=3,
        lease_ttl_seconds=10,
        clock=Clock(),
    )
    await engine.dispose()


async def running(jobs: Jobs, **submit):
    job = await jobs.submit("m1", "d1", "sft-lora", submit.pop("parameters", {}), **submit)
    agent, _ = await jobs.register_agent("a", {}, 4)
    job = await jobs.claim_next(agent)
    await jobs.apply_report(agent, report(job, 1, "state", state=JobState.RUNNING))
    return await jobs.get(job.id), agent


async def test_submission_records_submitter_labels_resources_and_versions(jobs):
    job = await jobs.submit(
        "m1",
        "d1",
        "sft-lora",
        {"lora_rank": 4},
        labels={"team": "search", "exp": "a1"},
        resources={"gpu_count": 2, "min_gpu_memory_bytes": 40 << 30, "agent_labels": {"zone": "eu"}},
        submitted_by="alice",
    )
    assert (job.submitted_by, json.loads(job.labels), json.loads(job.resources)["gpu_count"]) == (
        "alice",
        {"exp": "a1", "team": "search"},
        2,
    )
    assert (job.method_version, job.catalog_version, job.total_steps) == ("v1", "model m1; dataset d1", 5)


async def test_bad_labels_and_resources_name_their_field(jobs):
    with pytest.raises(InvalidArgument) as exc:
        await jobs.submit("m1", "d1", "sft-lora", {}, labels={"": "x"}, resources={"gpu_count": 99})
    assert {v.field for v in exc.value.violations} == {"labels.", "resources.gpu_count"}


async def test_dry_run_stores_nothing_and_estimates_steps_tokens_and_time(jobs):
    finished, agent = await running(jobs, parameters={"max_steps": -1, "epochs": 1})
    jobs.clock.now += dt.timedelta(seconds=40)
    await jobs.apply_report(agent, report(finished, 2, "metric", step=20, values={"loss": 1.0}, total_steps=20))
    await jobs.apply_report(agent, report(finished, 3, "state", state=JobState.SUCCEEDED))
    job, estimate = await jobs.submit_job("m1", "d1", "sft-lora", {"max_steps": -1, "epochs": 2}, dry_run=True)
    assert job is None
    # 40 rows, batch 2 -> 20 steps an epoch; 2 epochs; 2 s a step from the finished job's 40 s for 20 steps.
    assert (estimate.total_steps, estimate.epochs, estimate.dataset_tokens) == (40, 2.0, 4000)
    assert estimate.estimated_seconds == pytest.approx(80.0)
    async with jobs.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(store.jobs))).scalar_one() == 1


async def test_copy_keeps_exact_parameters_and_applies_overrides_by_any_spelling(jobs):
    old = await jobs.submit("m1", "d1", "sft-lora", {"lora_rank": 16, "learning_rate": 0.001}, labels={"t": "x"})
    copy, _ = await jobs.copy(old.id, {"learning_rate": 0.0005}, name="lower lr")
    params = json.loads(copy.parameters)
    assert (params["lora_rank"], params["learning_rate"]) == (16, 0.0005)
    assert (copy.copied_from_job_id, copy.name, json.loads(copy.labels)) == (old.id, "lower lr", {"t": "x"})
    assert ("copied from " + old.id) in [r.reason for r in await jobs.events(copy.id, 0, 10)]


async def test_pausing_a_queued_job_is_immediate_and_resume_requeues_it(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    assert (await jobs.pause(job.id)).state == JobState.PAUSED
    with pytest.raises(FailedPrecondition, match="only queued or running"):
        await jobs.pause(job.id)
    assert (await jobs.resume(job.id)).state == JobState.QUEUED
    with pytest.raises(FailedPrecondition, match="only paused"):
        await jobs.resume(job.id)


async def test_pausing_a_running_job_asks_the_agent_and_its_stop_makes_it_paused(jobs):
    job, agent = await running(jobs)
    asked = await jobs.pause(job.id)
    assert (asked.state, asked.pause_requested) == (JobState.RUNNING, True)
    await jobs.apply_report(agent, report(asked, 2, "state", state=JobState.CANCELLED, reason="stopped"))
    paused = await jobs.get(job.id)
    assert (paused.state, paused.pause_requested, paused.agent_id) == (JobState.PAUSED, False, None)
    assert paused.run_seconds >= 0 and paused.attempt_started_at is None
    resumed = await jobs.resume(job.id)
    assert resumed.state == JobState.QUEUED
    assert resumed.max_attempts == resumed.attempt + jobs.max_attempts  # the pause used no attempt budget
    history = [(e.from_state, e.to_state) for e in await jobs.events(job.id, 0, 100)]
    assert history[-2:] == [("RUNNING", "PAUSED"), ("PAUSED", "QUEUED")]


async def test_only_finished_jobs_are_deleted_and_with_everything_they_stored(jobs, tmp_path):
    job, agent = await running(jobs)
    with pytest.raises(FailedPrecondition, match="terminate it first"):
        await jobs.delete(job.id)
    await jobs.apply_report(agent, report(job, 2, "metric", step=1, values={"loss": 1.0}))
    await jobs.apply_report(agent, report(job, 3, "log", text="hello"))
    await jobs.apply_report(agent, report(job, 4, "state", state=JobState.SUCCEEDED))
    output = tmp_path / "artifacts" / "jobs" / job.id / "output"
    output.mkdir(parents=True)
    (output / "adapter_config.json").write_text("{}")
    await jobs.delete(job.id)
    with pytest.raises(NotFound):
        await jobs.get(job.id)
    async with jobs.engine.connect() as conn:
        for table in (store.metric_points, store.log_lines, store.job_events):
            assert (await conn.execute(select(func.count()).select_from(table))).scalar_one() == 0
    assert not (tmp_path / "artifacts" / "jobs" / job.id).exists()


async def test_list_filters_by_every_given_label(jobs):
    a = await jobs.submit("m1", "d1", "sft-lora", {}, labels={"team": "search", "exp": "1"})
    await jobs.submit("m1", "d1", "sft-lora", {}, labels={"team": "search_x"})
    await jobs.submit("m1", "d1", "sft-lora", {}, labels={"team": "ads"})
    assert [j.id for j in await jobs.list_jobs(10, 0, labels={"team": "search"})] == [a.id]
    assert [j.id for j in await jobs.list_jobs(10, 0, labels={"team": "search", "exp": "1"})] == [a.id]
    assert await jobs.list_jobs(10, 0, labels={"team": "search", "exp": "2"}) == []


def test_retention_keeps_the_last_k_and_the_best():
    checkpoints = [(10, {"loss": 2.0}), (20, {"loss": 0.5}), (30, {"loss": 1.0}), (40, {"loss": 1.2})]
    assert checkpoint_retention(checkpoints, 2) == {30, 40, 20}
    with_eval = [(10, {"loss": 0.1, "eval_loss": 3.0}), (20, {"loss": 0.9, "eval_loss": 1.0}), (30, {"loss": 1})]
    assert checkpoint_retention(with_eval, 1) == {30, 20}  # best by eval_loss when there is one
    rewards = [(10, {"reward": 0.2, "loss": 0.1}), (20, {"reward": 0.9, "loss": 2.0}), (30, {"reward": 0.5})]
    assert checkpoint_retention(rewards, 1, "reward") == {30, 20}  # a reward: higher is better
    assert checkpoint_retention(rewards, 1, "eval_accuracy") == {30, 10}  # nobody has it: lowest loss


async def test_checkpoints_are_recorded_once_and_retained_with_their_files(jobs, tmp_path):
    job, agent = await running(jobs, parameters={"save_total_limit": 2})
    seq = 2
    for step, loss in [(10, 2.0), (20, 0.5), (30, 1.0), (40, 1.2), (40, 1.2)]:
        path = tmp_path / "artifacts" / "jobs" / job.id / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True, exist_ok=True)
        await jobs.apply_report(
            agent, report(job, seq, "checkpoint", step=step, output_uri=str(path), values={"loss": loss})
        )
        seq += 1
    kept = await jobs.checkpoints(job.id)
    assert [c.step for c in kept] == [20, 30, 40]
    remaining = sorted(p.name for p in (tmp_path / "artifacts" / "jobs" / job.id / "checkpoints").iterdir())
    assert remaining == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]


async def test_publishing_a_checkpoint_sends_its_lineage_to_the_catalog(jobs, tmp_path):
    job, agent = await running(jobs)
    uri = str(tmp_path / "ckpt-20")
    await jobs.apply_report(agent, report(job, 2, "checkpoint", step=20, output_uri=uri, values={"loss": 1.0}))
    assert await jobs.publish_checkpoint(job.id, 20, "support-bot-v1") == "model-published"
    name, sent_uri, kind, lineage = jobs.catalog.published
    assert (name, sent_uri, kind) == ("support-bot-v1", uri, "")
    assert lineage == {
        "base_model_id": "m1",
        "job_id": job.id,
        "checkpoint_step": 20,
        "method_id": "sft-lora",
        "dataset_id": "d1",
    }
    with pytest.raises(NotFound, match="no kept checkpoint at step 30"):
        await jobs.publish_checkpoint(job.id, 30, "x")
    fresh, _ = await running(jobs)
    with pytest.raises(FailedPrecondition, match="kept no checkpoint"):
        await jobs.publish_checkpoint(fresh.id, 0, "x")  # "the best" of nothing


async def test_publishing_without_a_step_takes_the_best_checkpoint_or_the_final_output_on_a_tie(jobs, tmp_path):
    job, agent = await running(jobs)
    for seq, (step, eval_loss) in enumerate(((10, 1.5), (20, 0.9), (30, 1.2)), start=2):
        values = {"loss": 2.0, "eval_loss": eval_loss}
        await jobs.apply_report(
            agent, report(job, seq, "checkpoint", step=step, output_uri=f"{tmp_path}/c{step}", values=values)
        )
    await jobs.publish_checkpoint(job.id, 0, "best-so-far")  # running: the best kept checkpoint
    assert jobs.catalog.published[1] == f"{tmp_path}/c20" and jobs.catalog.published[3]["checkpoint_step"] == 20
    await jobs.apply_report(agent, report(job, 5, "metric", step=40, values={"eval_loss": 0.9}, total_steps=40))
    await jobs.apply_report(agent, report(job, 6, "state", state=JobState.SUCCEEDED, output_uri=f"{tmp_path}/final"))
    await jobs.publish_checkpoint(job.id, 0, "final")  # as good as step 20: the final output wins the tie
    assert jobs.catalog.published[1] == f"{tmp_path}/final" and jobs.catalog.published[3]["checkpoint_step"] == 40


async def test_progress_carries_epoch_tokens_and_time(jobs):
    job, agent = await running(jobs)
    jobs.clock.now += dt.timedelta(seconds=30)
    values = {"loss": 1.0, "epoch": 0.5, "num_tokens": 1234.0}
    await jobs.apply_report(agent, report(job, 2, "metric", step=10, values=values, total_steps=40))
    job = await jobs.get(job.id)
    assert (job.epoch, job.tokens_seen, job.current_step) == (0.5, 1234, 10)
    from tuneforge_jobs.api import timing

    elapsed, remaining = timing(job, jobs.clock.now)
    assert (elapsed, remaining) == (30.0, 90.0)  # 3 s a step, 30 steps left
