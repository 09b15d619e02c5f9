"""Metric queries on real databases (SQLite and PostgreSQL): downsampled series, step ranges, comparisons.

The database does the downsampling (Jobs.metric_series); series.downsample is the reference it must match
exactly, point for point, on both engines. CompareJobs and ListJobMetrics also go through the real gRPC
servicer on an in-process server, and the gateway's routes through the real servicer behind them.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import pytest
from sqlalchemy import select, update

from tests.integration.test_jobs_service import StaticCatalog
from tuneforge.jobs.v1 import jobs_pb2 as pb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.errors import InvalidArgument, NotFound
from tuneforge_common.grpcutil import decode_error, start_server
from tuneforge_gateway.app import create_app
from tuneforge_jobs import api, series, store
from tuneforge_jobs.lifecycle import JobState
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs, Report, add_to_metric_blocks, rebuild_all_metric_blocks, rebuild_metric_blocks

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
Rows = list[tuple[str, int, float]]  # (name, step, value), in insertion order


@asynccontextmanager
async def jobs_on(url: str) -> AsyncIterator[Jobs]:
    engine = make_engine(url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    try:
        yield Jobs(engine=engine, catalog=StaticCatalog(), artifact_root="/a", subject_root="tuneforge")
    finally:
        await engine.dispose()


@pytest.fixture
async def jobs(database_url: str) -> AsyncIterator[Jobs]:
    async with jobs_on(database_url) as j:
        yield j


async def insert(jobs: Jobs, job_id: str, rows: Rows, attempt: int = 1) -> None:
    """Store points as reports do: the rows, and their rollup blocks kept up (for the job's attempt: a job not
    claimed yet is given it)."""
    async with jobs.engine.begin() as conn:
        jc = store.jobs.c
        await conn.execute(update(store.jobs).where(jc.id == job_id, jc.attempt < attempt).values(attempt=attempt))
        await conn.execute(
            store.metric_points.insert(),
            [dict(job_id=job_id, attempt=attempt, name=n, step=s, value=v, recorded_at=T0) for n, s, v in rows],
        )
        await add_to_metric_blocks(conn, [(job_id, attempt, n, s, v) for n, s, v in rows])


def training_curve(seed: int, steps: range, names: tuple[str, ...] = ("loss", "grad_norm", "learning_rate")) -> Rows:
    """Noisy curves as an agent reports them (every name at each step), with a spike in loss and grad_norm."""
    rng = random.Random(seed)
    rows: Rows = []
    for step in steps:
        for i, name in enumerate(names):
            value = 2.0 / (1 + step / 100) + i + rng.gauss(0, 0.05)
            if name in ("loss", "grad_norm") and step == steps[len(steps) // 3]:
                value = 50.0 + i
            rows.append((name, step, value))
    return rows


def reference(rows: Rows, name: str, max_points: int, lo: int, hi: int) -> list[series.SeriesPoint]:
    """What series.downsample makes of one name's points (stored order within a step)."""
    points = sorted(((s, v) for n, s, v in rows if n == name), key=lambda p: p[0])
    return series.downsample(points, max_points, lo, hi)


async def make_job(jobs: Jobs, **parameters: Any) -> str:
    return (await jobs.submit("m1", "d1", "sft-lora", parameters)).id


# -- Jobs.metric_series -----------------------------------------------------------------------------------------


async def test_downsampled_series_match_the_reference_point_for_point(jobs):
    job_id = await make_job(jobs)
    rows = training_curve(1, range(1, 3_001))
    rows += [("eval_loss", s, 1.0 / s) for s in range(100, 3_001, 100)]  # 30 points: short, comes back as is
    await insert(jobs, job_id, rows)

    got = await jobs.metric_series(job_id, [], 200)

    assert [s.name for s in got] == ["eval_loss", "grad_norm", "learning_rate", "loss"]  # all names, sorted
    for s in got:
        assert s.job_id == job_id
        assert s.points == reference(rows, s.name, 200, 1, 3_000)  # one step range for every series of a job
    loss = {s.name: s for s in got}["loss"].points
    assert 100 < len(loss) <= 200 and sum(p.count for p in loss) == 3_000
    assert max(p.max for p in loss) == 50.0  # the spike survives as its bucket's max
    eval_loss = {s.name: s for s in got}["eval_loss"].points
    assert [(p.step, p.count) for p in eval_loss] == [(s, 1) for s in range(100, 3_001, 100)]


async def test_a_step_range_bounds_the_points_and_the_buckets(jobs):
    job_id = await make_job(jobs)
    rows = training_curve(2, range(0, 5_000))
    await insert(jobs, job_id, rows)

    (loss,) = await jobs.metric_series(job_id, ["loss"], 50, min_step=1_000, max_step=1_999)
    assert loss.points == reference([r for r in rows if 1_000 <= r[1] <= 1_999], "loss", 50, 1_000, 1_999)
    # Buckets of 32 steps (20, rounded up to whole rollup blocks) aligned to multiples of 32: 1000..1023, ...
    assert [p.step for p in loss.points] == [*range(1_023, 2_000, 32), 1_999]
    assert [p.count for p in loss.points] == [24] + [32] * 30 + [16]

    # Only a lower bound: up to the last step. A range that holds nothing: an empty series, not an error.
    (tail,) = await jobs.metric_series(job_id, ["loss"], 10, min_step=4_900)
    assert tail.points == reference([r for r in rows if r[1] >= 4_900], "loss", 10, 4_900, 4_999)
    (none,) = await jobs.metric_series(job_id, ["loss"], 10, min_step=9_000)
    assert none.points == []


async def test_named_series_come_in_the_order_asked_and_unknown_names_are_empty(jobs):
    job_id = await make_job(jobs)
    await insert(jobs, job_id, training_curve(3, range(1, 101)))
    got = await jobs.metric_series(job_id, ["loss", "nope", "grad_norm", "loss"], 500)
    assert [(s.name, len(s.points)) for s in got] == [("loss", 100), ("nope", 0), ("grad_norm", 100)]
    assert all(p.count == 1 and p.min == p.max == p.value for p in got[0].points)


async def test_a_short_series_whose_steps_would_share_buckets_still_comes_back_raw(jobs):
    job_id = await make_job(jobs)
    # Four points in a range of 10,000 steps: with 5 buckets, steps 1 and 2 would share one; fewer than
    # max_points points are never merged.
    rows: Rows = [("loss", 1, 4.0), ("loss", 2, 3.0), ("loss", 5_000, 2.0), ("loss", 10_000, 1.0)]
    await insert(jobs, job_id, rows)
    (loss,) = await jobs.metric_series(job_id, [], 5)
    assert loss.points == [series.SeriesPoint.single(s, v) for _, s, v in rows]


async def resumed(jobs: Jobs, job_id: str, attempt: int, from_step: int) -> None:
    """The job's attempt resumed from a checkpoint, as a claim makes it, but the superseded points kept."""
    async with jobs.engine.begin() as conn:
        await conn.execute(
            update(store.jobs).where(store.jobs.c.id == job_id).values(attempt=attempt, resumed_from_step=from_step)
        )
        await rebuild_metric_blocks(conn, job_id, attempt, from_step)


async def test_a_resumed_jobs_series_follow_its_current_attempt(jobs):
    job_id = await make_job(jobs)
    first = [("loss", s, 10.0 + s) for s in range(1, 101)]
    # Attempt 2 resumed from the checkpoint at step 59 and has reached step 80; it reported step 59 again. Attempt
    # 1's points past step 59 (which resuming deletes) are superseded even where attempt 2 has not got to yet.
    second = [("loss", s, -float(s)) for s in range(59, 81)]
    await insert(jobs, job_id, first, attempt=1)
    await resumed(jobs, job_id, attempt=2, from_step=59)
    await insert(jobs, job_id, second, attempt=2)

    expected = [r for r in first if r[1] <= 59] + second
    (loss,) = await jobs.metric_series(job_id, ["loss"], 10)
    assert loss.points == reference(expected, "loss", 10, 1, 80)
    assert sum(p.count for p in loss.points) == 81
    (raw,) = await jobs.metric_series(job_id, ["loss"], 1_000)
    assert [(p.step, p.value) for p in raw.points] == [(s, v) for _, s, v in sorted(expected, key=lambda r: r[1])]
    # Where two attempts hold the bucket's last step, the value is the later attempt's.
    (one,) = await jobs.metric_series(job_id, ["loss"], 1, max_step=59)
    assert (one.points[0].step, one.points[0].value, one.points[0].count) == (59, -59.0, 60)


async def test_a_job_restarted_from_scratch_shows_only_its_new_attempt(jobs):
    job_id = await make_job(jobs)
    await insert(jobs, job_id, [("loss", s, 1.0) for s in range(1, 101)], attempt=1)
    await resumed(jobs, job_id, attempt=2, from_step=0)
    await insert(jobs, job_id, [("loss", s, 2.0) for s in range(1, 31)], attempt=2)
    (loss,) = await jobs.metric_series(job_id, [], 500)
    assert [(p.step, p.value) for p in loss.points] == [(s, 2.0) for s in range(1, 31)]


async def test_series_of_points_reported_by_an_agent(jobs):
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 1)
    job = await jobs.claim_next(agent)
    reports = [Report(job.id, job.attempt, 1, "state", T0, agent_id=agent, state=JobState.RUNNING)]
    for step in range(1, 301):
        values = {"loss": 3.0 - step / 100, "learning_rate": 1e-4}
        reports.append(Report(job.id, job.attempt, step + 1, "metric", T0, agent_id=agent, step=step, values=values))
    await jobs.apply_reports(reports)

    loss, lr = await jobs.metric_series(job.id, ["loss", "learning_rate"], 30)
    # Buckets of 11 steps from 0 (10 would make 31 buckets of steps 1..300: 0..9 up to 300..309).
    assert [p.step for p in loss.points] == [*range(10, 300, 11), 300]
    assert loss.points[0] == series.SeriesPoint(10, 3.0 - 10 / 100, 3.0 - 10 / 100, 3.0 - 1 / 100, 10)
    assert {p.value for p in lr.points} == {1e-4} and len(lr.points) == 28


async def test_the_raw_paged_mode_still_pages_and_honours_a_step_range(jobs):
    job_id = await make_job(jobs)
    await insert(jobs, job_id, training_curve(4, range(1, 51)))
    page = await jobs.metrics(job_id, ["loss"], 0, 10)
    assert [r.step for r in page] == list(range(1, 11))
    page = await jobs.metrics(job_id, ["loss"], page[-1].id, 10, min_step=20, max_step=24)
    assert [r.step for r in page] == [20, 21, 22, 23, 24]
    assert len(await jobs.metrics(job_id, [], 0, 1_000)) == 150


async def test_bad_requests_are_refused(jobs):
    job_id = await make_job(jobs)
    with pytest.raises(NotFound):
        await jobs.metric_series("job-nope", [], 10)
    for kwargs, field in [
        ({"max_points": 0}, "max_points"),
        ({"max_points": 10, "min_step": -1}, "min_step"),
        ({"max_points": 10, "min_step": 10, "max_step": 5}, "max_step"),
    ]:
        with pytest.raises(InvalidArgument) as exc:
            await jobs.metric_series(job_id, [], **kwargs)
        assert exc.value.violations[0].field == field


# -- the rollup blocks (metric_blocks) charts read ---------------------------------------------------------------


async def stored_blocks(jobs: Jobs, job_id: str) -> dict[tuple[str, int], series.SeriesPoint]:
    mb = store.metric_blocks.c
    async with jobs.engine.connect() as conn:
        rows = await conn.execute(select(store.metric_blocks).where(mb.job_id == job_id))
        return {(r.name, r.block): series.SeriesPoint(r.last_step, r.last_value, r.low, r.high, r.n) for r in rows}


async def blocks_of_standing_points(jobs: Jobs, job_id: str) -> dict[tuple[str, int], series.SeriesPoint]:
    """The reference: series.roll_up of the points that stand (a resumed attempt's, and its predecessors' up to
    the step it resumed from), the later attempt's, then the later stored, last."""
    job = await jobs.get(job_id)
    mp = store.metric_points.c
    async with jobs.engine.connect() as conn:
        rows = await conn.execute(
            select(mp.name, mp.step, mp.value)
            .where(*Jobs._current_points(job), mp.step >= 0)
            .order_by(mp.attempt, mp.id)
        )
        points = [(job_id, r.name, r.step, r.value) for r in rows]
    return {(name, block): b for (_, name, block), b in series.roll_up(points).items()}


async def lose_agent(jobs: Jobs, agent_id: str) -> None:
    """The agent's lease lapsed long ago: the reaper requeues its job."""
    async with jobs.engine.begin() as conn:
        await conn.execute(
            update(store.agents)
            .where(store.agents.c.id == agent_id)
            .values(last_heartbeat_at=T0 - dt.timedelta(days=1))
        )
    assert await jobs.reap_lost_agents() == 1


async def test_rollup_blocks_equal_the_standing_points_after_report_batches_and_a_resume(jobs):
    rng = random.Random(21)
    job = await jobs.submit("m1", "d1", "sft-lora", {})
    agent, _ = await jobs.register_agent("a", {}, 1)
    claimed = await jobs.claim_next(agent)
    seq = 1
    await jobs.apply_reports([Report(job.id, 1, seq, "state", T0, agent_id=agent, state=JobState.RUNNING)])

    async def batch(attempt: int, agent_id: str, steps: list[int]) -> None:
        nonlocal seq
        reports = []
        for step in steps:
            seq += 1
            values = {"loss": rng.uniform(0, 3), "learning_rate": rng.choice([1e-4, 2e-4])}
            reports.append(Report(job.id, attempt, seq, "metric", T0, agent_id=agent_id, step=step, values=values))
        await jobs.apply_reports(reports)

    # Batches that split blocks, and steps reported again (the later value stands): blocks merge batch by batch.
    for steps in ([*range(0, 37)], [*range(37, 40), 39, 39], [*range(40, 120)], [119, 120, 121, 0]):
        await batch(1, agent, steps)
        assert await stored_blocks(jobs, job.id) == await blocks_of_standing_points(jobs, job.id)
    assert (await stored_blocks(jobs, job.id))[("loss", 2)].count == 16 + 2

    async with jobs.engine.begin() as conn:  # a checkpoint at step 90: block 5 holds steps 80..95
        await conn.execute(
            store.checkpoints.insert().values(
                job_id=job.id, step=90, attempt=1, uri="/c/90", metrics="{}", created_at=jobs.clock()
            )
        )
    await lose_agent(jobs, agent)
    agent_2, _ = await jobs.register_agent("b", {}, 1)
    claimed = await jobs.claim_next(agent_2)
    assert (claimed.attempt, claimed.resume_from_step) == (2, 90)
    blocks = await stored_blocks(jobs, job.id)
    assert blocks == await blocks_of_standing_points(jobs, job.id)
    assert max(block for _, block in blocks) == 5 and blocks[("loss", 5)].step == 90

    await jobs.apply_reports([Report(job.id, 2, seq + 1, "state", T0, agent_id=agent_2, state=JobState.RUNNING)])
    seq += 1
    await batch(2, agent_2, [*range(90, 200)])  # step 90 again, from attempt 2
    assert await stored_blocks(jobs, job.id) == await blocks_of_standing_points(jobs, job.id)
    job_row = await jobs.get(job.id)
    mp = store.metric_points.c
    async with jobs.engine.connect() as conn:
        rows = [
            (r.name, r.step, r.value)
            for r in await conn.execute(
                select(mp.name, mp.step, mp.value).where(*Jobs._current_points(job_row)).order_by(mp.attempt, mp.id)
            )
        ]
    for max_points in (5, 7, 12):  # buckets of 48, 32 and 32 steps: whole blocks
        for s in await jobs.metric_series(job.id, [], max_points):
            assert s.points == reference(rows, s.name, max_points, 0, 199), (s.name, max_points)


async def test_a_batch_of_an_attempt_superseded_meanwhile_adds_to_the_blocks_only_the_points_that_stand(jobs):
    # A report batch checks its job's attempt before it stores its points (on SQLite its transaction begins only
    # at its first write), and a claim may commit in between: of the late batch, the points at or before the
    # step attempt 2 resumed from stand (block 0), those past it do not (blocks 1 and 2).
    job_id = await make_job(jobs)
    await insert(jobs, job_id, [("loss", s, float(s)) for s in range(0, 41)])
    await resumed(jobs, job_id, attempt=2, from_step=20)
    await insert(jobs, job_id, [("loss", s, -1.0) for s in [*range(0, 16), *range(21, 36)]], attempt=1)
    assert await stored_blocks(jobs, job_id) == await blocks_of_standing_points(jobs, job_id)
    assert (await stored_blocks(jobs, job_id))[("loss", 0)].count == 32


async def test_rebuilding_every_jobs_rollups_makes_them_from_the_points_that_stand(jobs):
    # Points stored without their blocks, as a jobs service older than the blocks would, and blocks gone stale.
    fresh, resumed_one = await make_job(jobs), await make_job(jobs)
    await insert(jobs, resumed_one, [("loss", s, float(s)) for s in range(0, 60)])
    await resumed(jobs, resumed_one, attempt=2, from_step=40)
    await insert(jobs, resumed_one, [("loss", s, -float(s)) for s in range(41, 50)], attempt=2)
    async with jobs.engine.begin() as conn:
        for job_id in (fresh, resumed_one):
            await conn.execute(
                store.metric_points.insert(),
                [dict(job_id=job_id, attempt=2, name="acc", step=s, value=0.5, recorded_at=T0) for s in range(0, 70)],
            )
        await conn.execute(update(store.metric_blocks).where(store.metric_blocks.c.job_id == resumed_one).values(n=1))
    assert await rebuild_all_metric_blocks(jobs.engine) == 2
    for job_id in (fresh, resumed_one):
        assert await stored_blocks(jobs, job_id) == await blocks_of_standing_points(jobs, job_id) != {}


async def test_deleting_a_job_deletes_its_rollup_blocks(jobs):
    job_id, other = await make_job(jobs), await make_job(jobs)
    for j in (job_id, other):
        await insert(jobs, j, training_curve(7, range(0, 100)))
    await jobs.cancel(job_id)
    await jobs.delete(job_id)
    assert await stored_blocks(jobs, job_id) == {}
    assert await stored_blocks(jobs, other) == await blocks_of_standing_points(jobs, other) != {}


async def test_the_block_path_matches_the_reference_on_random_series(jobs):
    rng = random.Random(8)
    for _ in range(4):
        job_id = await make_job(jobs)
        rows: Rows = []
        for _ in range(3):  # batches, later ones reporting some steps again
            start = rng.randint(0, 3_000)
            population = range(start, start + rng.randint(200, 4_000))
            steps = sorted(rng.sample(population, k=rng.randint(100, min(800, len(population)))))
            batch = [(rng.choice(["loss", "acc"]), s, rng.choice([rng.uniform(-5, 5), 1.0])) for s in steps]
            rows += batch
            await insert(jobs, job_id, batch)
        assert await stored_blocks(jobs, job_id) == await blocks_of_standing_points(jobs, job_id)
        for _ in range(12):
            max_points = rng.choice([1, 2, rng.randint(3, 40), rng.randint(40, 300)])
            min_step = rng.choice([0, rng.randint(0, 4_000)])
            max_step = rng.choice([0, min_step + rng.randint(0, 5_000)])
            got = await jobs.metric_series(job_id, [], max_points, min_step, max_step)
            in_range = [r for r in rows if r[1] >= min_step and (not max_step or r[1] <= max_step)]
            if not in_range:
                assert all(s.points == [] for s in got)
                continue
            lo, hi = min(r[1] for r in in_range), max(r[1] for r in in_range)
            for s in got:
                assert s.points == reference(in_range, s.name, max_points, lo, hi), (max_points, min_step, max_step)


async def test_migrating_a_database_with_points_fills_their_rollup_blocks(database_url):
    engine = make_engine(database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs", revision="0008")
    jobs = Jobs(engine=engine, catalog=StaticCatalog(), artifact_root="/a", subject_root="tuneforge")
    try:
        plain, resumed_id = await make_job(jobs), await make_job(jobs)
        async with engine.begin() as conn:  # rows as reports stored them before revision 0009: no blocks
            await conn.execute(
                store.metric_points.insert(),
                [
                    dict(job_id=plain, attempt=1, name=n, step=s, value=v, recorded_at=T0)
                    for n, s, v in training_curve(6, range(0, 300))
                ]
                + [
                    dict(job_id=resumed_id, attempt=1, name="loss", step=s, value=float(s), recorded_at=T0)
                    for s in range(1, 100)
                ]
                # Attempt 2 resumed from step 40; attempt 1's steps past it were left (they no longer stand).
                + [
                    dict(job_id=resumed_id, attempt=2, name="loss", step=s, value=-float(s), recorded_at=T0)
                    for s in range(40, 60)
                ],
            )
            await conn.execute(
                update(store.jobs).where(store.jobs.c.id == resumed_id).values(attempt=2, resumed_from_step=40)
            )
        await migrate(engine, MIGRATIONS, "alembic_version_jobs")
        for job_id in (plain, resumed_id):
            blocks = await stored_blocks(jobs, job_id)
            assert blocks and blocks == await blocks_of_standing_points(jobs, job_id)
        # Steps 32..47: attempt 1's 32..40 (its 40 too: the checkpoint's step stands) and attempt 2's 40..47.
        assert (await stored_blocks(jobs, resumed_id))[("loss", 2)] == series.SeriesPoint(47, -47.0, -47.0, 40.0, 17)
        assert ("loss", 4) not in await stored_blocks(jobs, resumed_id)  # steps 64..79: only attempt 1's, past 40
    finally:
        await engine.dispose()


async def test_a_job_of_many_metric_names_charts_them_all(jobs):
    # Their step ranges are read in one statement of a few hundred names at a time.
    job_id = await make_job(jobs)
    rows: Rows = [(f"layer_{i:04}.grad_norm", s, float(i + s)) for i in range(450) for s in (i, i + 1)]
    await insert(jobs, job_id, rows)
    got = await jobs.metric_series(job_id, [], 10)
    assert len(got) == 450 and all(len(s.points) == 2 for s in got)
    assert got[-1].points[-1] == series.SeriesPoint.single(450, 449.0 + 450)


async def test_max_points_is_clamped_to_the_limit(jobs, monkeypatch):
    job_id = await make_job(jobs)
    await insert(jobs, job_id, [("loss", s, float(s)) for s in range(100)])
    monkeypatch.setattr(series, "MAX_POINTS_LIMIT", 10)
    (loss,) = await jobs.metric_series(job_id, [], 1_000_000)
    assert len(loss.points) == 10


async def test_both_engines_answer_the_same_for_the_same_data(tmp_path, postgres_url):
    rows = training_curve(5, range(0, 4_000, 3)) + [("eval_loss", s, s / 7) for s in range(0, 4_000, 250)]
    answers = []
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}", postgres_url):
        async with jobs_on(url) as jobs:
            job_id = await make_job(jobs)
            await insert(jobs, job_id, rows)
            answers.append(
                [
                    [(s.name, s.points) for s in await jobs.metric_series(job_id, [], 97)],
                    [(s.name, s.points) for s in await jobs.metric_series(job_id, ["grad_norm"], 13, 600, 2_100)],
                    [(s.name, s.points) for s in await jobs.metric_series(job_id, ["loss"], 5_000)],
                ]
            )
    assert answers[0] == answers[1]
    assert len(answers[0][0]) == 4 and len(answers[0][1][0][1]) == 13 and len(answers[0][2][0][1]) == 1_334


# -- over gRPC: CompareJobs, ListJobMetrics ---------------------------------------------------------------------


@pytest.fixture
async def stub(jobs: Jobs) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    changes = Notifier()
    server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield jobs_pb2_grpc.JobServiceStub(channel)
    await server.stop(None)


def points_of(s: pb.MetricSeries) -> list[series.SeriesPoint]:
    return [series.SeriesPoint(p.step, p.value, p.min, p.max, p.count) for p in s.points]


async def three_jobs(jobs: Jobs) -> tuple[list[str], list[Rows]]:
    ids = [
        await make_job(jobs, lora_rank=8, learning_rate=2e-4, seed=1),
        await make_job(jobs, lora_rank=16, learning_rate=2e-4),
        await make_job(jobs, lora_rank=8, learning_rate=1e-4, seed=1),
    ]
    data = [
        training_curve(10, range(1, 1_001)) + [("eval_loss", s, 0.5) for s in range(100, 1_001, 100)],
        training_curve(11, range(1, 2_001)),
        training_curve(12, range(500, 1_501), names=("loss", "grad_norm")),
    ]
    for job_id, rows in zip(ids, data, strict=True):
        await insert(jobs, job_id, rows)
    return ids, data


async def test_compare_jobs_lists_differing_parameters_and_aligned_series(jobs, stub):
    ids, data = await three_jobs(jobs)
    order = [ids[2], ids[0], ids[1]]  # answers follow the request's order
    resp = await stub.CompareJobs(pb.CompareJobsRequest(job_ids=order, max_points=100), timeout=10)

    assert [j.id for j in resp.jobs] == order
    diffs = {d.name: [_plain(v) for v in d.values] for d in resp.differing_parameters}
    assert diffs == {"learning_rate": [1e-4, 2e-4, 2e-4], "lora_rank": [8, 8, 16], "seed": [1, 1, None]}
    assert [d.name for d in resp.differing_parameters] == ["learning_rate", "lora_rank", "seed"]

    # Without names: the metrics all three have (not learning_rate or eval_loss), one series per job.
    assert [m.name for m in resp.metrics] == ["grad_norm", "loss"]
    by_job = {job_id: rows for job_id, rows in zip(ids, data, strict=True)}
    for metric in resp.metrics:
        assert [s.job_id for s in metric.series] == order
        for s in metric.series:
            assert s.name == metric.name
            # One step range for all (1..2000, the union), so bucket b covers the same steps in every job.
            assert points_of(s) == reference(by_job[s.job_id], metric.name, 100, 1, 2_000)
    loss = {s.job_id: points_of(s) for s in resp.metrics[1].series}
    width = series.bucket_width(1, 2_000, 100)
    assert width == 32  # 20 steps a bucket, rounded up to whole rollup blocks
    edges = {job_id: {series.bucket_of(p.step, width) for p in pts} for job_id, pts in loss.items()}
    assert edges[ids[1]] == set(range(63))
    assert edges[ids[0]] == set(range(32)) and edges[ids[2]] == set(range(15, 47))


def _plain(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind == "null_value" else getattr(value, kind)


async def test_compare_jobs_with_named_metrics_keeps_a_series_for_a_job_without_it(jobs, stub):
    ids, data = await three_jobs(jobs)
    resp = await stub.CompareJobs(pb.CompareJobsRequest(job_ids=ids, metric_names=["eval_loss", "loss"]), timeout=10)
    assert [m.name for m in resp.metrics] == ["eval_loss", "loss"]
    eval_loss = resp.metrics[0].series
    assert [len(s.points) for s in eval_loss] == [10, 0, 0]
    # max_points 0 means the default number of buckets.
    assert [len(s.points) for s in resp.metrics[1].series] == [
        len(reference(rows, "loss", series.DEFAULT_MAX_POINTS, 1, 2_000)) for rows in data
    ]


async def test_compare_jobs_refuses_bad_requests_with_the_right_codes(jobs, stub):
    ids, _ = await three_jobs(jobs)
    cases = [
        ([ids[0]], grpc.StatusCode.INVALID_ARGUMENT),
        ([], grpc.StatusCode.INVALID_ARGUMENT),
        ([ids[0], ids[0]], grpc.StatusCode.INVALID_ARGUMENT),
        ([ids[0], ""], grpc.StatusCode.INVALID_ARGUMENT),
        ([f"job-{i}" for i in range(21)], grpc.StatusCode.INVALID_ARGUMENT),
        ([ids[0], "job-missing"], grpc.StatusCode.NOT_FOUND),
    ]
    for job_ids, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.CompareJobs(pb.CompareJobsRequest(job_ids=job_ids), timeout=10)
        err = decode_error(exc.value)
        assert err.code == code, job_ids
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert [f for f, _ in err.field_violations] == ["job_ids"]
    assert "job-missing" in exc.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.CompareJobs(pb.CompareJobsRequest(job_ids=ids, max_points=-1), timeout=10)
    assert decode_error(exc.value).field_violations[0][0] == "max_points"


async def test_list_job_metrics_answers_series_with_max_points_and_raw_pages_without(jobs, stub):
    job_id = await make_job(jobs)
    rows = training_curve(6, range(1, 1_001))
    await insert(jobs, job_id, rows)

    req = pb.ListJobMetricsRequest(job_id=job_id, names=["loss"], max_points=40, min_step=101, max_step=900)
    resp = await stub.ListJobMetrics(req, timeout=10)
    assert not resp.points and not resp.next_page_token
    assert [(s.job_id, s.name) for s in resp.series] == [(job_id, "loss")]
    assert points_of(resp.series[0]) == reference([r for r in rows if 101 <= r[1] <= 900], "loss", 40, 101, 900)

    raw = await stub.ListJobMetrics(
        pb.ListJobMetricsRequest(job_id=job_id, names=["loss"], page_size=5, min_step=10), timeout=10
    )
    assert [p.step for p in raw.points] == [10, 11, 12, 13, 14] and raw.next_page_token and not raw.series

    for req, field in [
        (pb.ListJobMetricsRequest(job_id=job_id, max_points=-5), "max_points"),
        (pb.ListJobMetricsRequest(job_id=job_id, max_points=5, min_step=9, max_step=3), "max_step"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ListJobMetrics(req, timeout=10)
        assert decode_error(exc.value).field_violations[0][0] == field
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ListJobMetrics(pb.ListJobMetricsRequest(job_id="job-nope", max_points=5), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


# -- the gateway's routes, through the real servicer -------------------------------------------------------------


@pytest.fixture
async def http(jobs: Jobs) -> AsyncIterator[httpx.AsyncClient]:
    server, port = await start_server(api.bindings(jobs, Notifier()), "127.0.0.1", 0)
    app = create_app(f"127.0.0.1:{port}", f"127.0.0.1:{port}", upload_dir=None)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c
    await server.stop(None)


async def test_gateway_compare_route_is_not_taken_for_a_job_id(jobs, http):
    ids, data = await three_jobs(jobs)
    resp = await http.get("/api/v1/jobs/compare", params={"job_id": ids[:2], "name": ["loss"], "max_points": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [j["id"] for j in body["jobs"]] == ids[:2]
    assert body["differing_parameters"] == [
        {"name": "lora_rank", "values": [8, 16]},
        {"name": "seed", "values": [1, None]},
    ]
    (loss,) = body["metrics"]
    assert loss["name"] == "loss" and [s["job_id"] for s in loss["series"]] == ids[:2]
    first = loss["series"][0]["points"][0]
    expected = reference(data[0], "loss", 10, 1, 2_000)[0]
    assert first == {
        "step": expected.step,
        "value": expected.value,
        "min": expected.min,
        "max": expected.max,
        "count": expected.count,
    }

    resp = await http.get("/api/v1/jobs/compare", params={"job_id": [ids[0], "job-missing"]})
    assert resp.status_code == 404 and "job-missing" in resp.json()["error"]["message"]
    # One id: the gateway refuses it itself (its OpenAPI document says 2 to 20), naming its own query parameter.
    resp = await http.get("/api/v1/jobs/compare", params={"job_id": ids[0]})
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "job_id"


async def test_gateway_metrics_route_downsamples_with_max_points(jobs, http):
    job_id = await make_job(jobs)
    rows = training_curve(7, range(1, 2_001))
    await insert(jobs, job_id, rows)

    resp = await http.get(f"/api/v1/jobs/{job_id}/metrics", params={"name": "loss", "max_points": 20})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = reference(rows, "loss", 20, 1, 2_000)
    assert body["series"] == {"loss": [[p.step, p.value] for p in expected]}
    assert body["points"][0] == {
        "name": "loss",
        "step": expected[0].step,
        "value": expected[0].value,
        "min": expected[0].min,
        "max": expected[0].max,
        "count": expected[0].count,
    }

    ranged = await http.get(
        f"/api/v1/jobs/{job_id}/metrics", params={"name": "loss", "min_step": 1_990, "max_step": 1_995}
    )
    assert [s for s, _ in ranged.json()["series"]["loss"]] == [1_990, 1_991, 1_992, 1_993, 1_994, 1_995]
    assert ranged.json()["points"][0]["name"] == "loss"  # the raw mode keeps its shape

    bad = await http.get(f"/api/v1/jobs/{job_id}/metrics", params={"max_points": -1})
    assert bad.status_code == 400


# -- the job's activity newest first: ListJobEvents / ListJobMetrics newest_first, the OpenAI events' pages -----


def at(offset_s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=offset_s)


async def transition(jobs: Jobs, job_id: str, frm: str | None, to: str, offset_s: float, attempt: int = 1) -> None:
    async with jobs.engine.begin() as conn:
        await conn.execute(
            store.job_events.insert().values(
                job_id=job_id, from_state=frm, to_state=to, attempt=attempt, reason=f"to {to}", recorded_at=at(offset_s)
            )
        )


async def report(jobs: Jobs, job_id: str, step: int, offset_s: float, attempt: int = 1, **values: float) -> None:
    """One agent report of a step's metrics: every point of it at one time, as the report batch stores them."""
    async with jobs.engine.begin() as conn:
        await conn.execute(
            store.metric_points.insert(),
            [
                dict(job_id=job_id, attempt=attempt, name=n, step=step, value=v, recorded_at=at(offset_s))
                for n, v in values.items()
            ],
        )


async def resumed_job(jobs: Jobs) -> str:
    """A job with state changes and steps sharing seconds (several steps a second, a step whose eval lands in a
    later second than its training loss), whose agent was lost at step 12 and which resumed from the checkpoint
    at step 8 in attempt 2, reporting step 8 again, and succeeded in the second of its last step."""
    job_id = await make_job(jobs)
    async with jobs.engine.begin() as conn:  # the submit's QUEUED transition, at T0 + 0.2s
        await conn.execute(
            update(store.job_events).where(store.job_events.c.job_id == job_id).values(recorded_at=at(0.2))
        )
    await transition(jobs, job_id, "QUEUED", "STARTING", 1.5)
    await transition(jobs, job_id, "STARTING", "RUNNING", 1.7)
    for step in range(1, 13):
        await report(jobs, job_id, step, 2 + 0.3 * step, loss=3.0 - step / 10, learning_rate=1e-4)
        if step % 5 == 0:
            await report(jobs, job_id, step, 2.5 + 0.3 * step, eval_loss=2.0 - step / 10)
    await transition(jobs, job_id, "RUNNING", "QUEUED", 5.8)
    await transition(jobs, job_id, "QUEUED", "STARTING", 6.0, attempt=2)
    async with jobs.engine.begin() as conn:  # as claiming attempt 2 does
        mp = store.metric_points.c
        await conn.execute(store.metric_points.delete().where(mp.job_id == job_id, mp.attempt < 2, mp.step > 8))
        await conn.execute(update(store.jobs).where(store.jobs.c.id == job_id).values(attempt=2, resumed_from_step=8))
    await transition(jobs, job_id, "STARTING", "RUNNING", 6.1, attempt=2)
    await report(jobs, job_id, 8, 6.3, attempt=2, loss=-8.0)
    for step in range(9, 31):
        await report(jobs, job_id, step, 6.3 + 0.25 * (step - 8), attempt=2, loss=2.0 - step / 100, learning_rate=1e-5)
        if step % 5 == 0:
            await report(jobs, job_id, step, 6.4 + 0.25 * (step - 8), attempt=2, eval_loss=1.0 - step / 100)
    await transition(jobs, job_id, "RUNNING", "SUCCEEDED", 11.9, attempt=2)
    return job_id


async def events_as_the_gateway_built_them(jobs: Jobs, job_id: str) -> list[dict[str, Any]]:
    """The reference: the gateway's events as it made them when it read every transition and point, newest first:
    the latest second first, within one second the transitions (by seq), then the steps (by step)."""
    from tuneforge_gateway.openai_compat import JOB_STATUS, seconds

    async with jobs.engine.connect() as conn:
        je, mp = store.job_events.c, store.metric_points.c
        transitions = [
            api.event_to_pb(r)
            for r in await conn.execute(select(store.job_events).where(je.job_id == job_id).order_by(je.id))
        ]
        points = [
            api.metric_to_pb(r)
            for r in await conn.execute(select(store.metric_points).where(mp.job_id == job_id).order_by(mp.id))
        ]
    events: list[tuple[tuple[int, int], dict[str, Any]]] = []
    for e in transitions:
        old, new = JOB_STATUS.get(e.from_state), JOB_STATUS.get(e.to_state, "queued")
        text = f"Job changed from {old} to {new}" if old else f"Job is {new}"
        text += f": {e.reason}" if e.reason else ""
        event = {
            "id": f"ftevent-{job_id}-state-{e.seq}",
            "object": "fine_tuning.job.event",
            "created_at": seconds(e.time),
            "level": "error" if new == "failed" else "info",
            "message": text,
            "type": "message",
            "data": {},
        }
        events.append(((-seconds(e.time), 0, e.seq), event))
    by_step: dict[int, dict[str, Any]] = {}
    created: dict[int, int] = {}
    for p in points:
        by_step.setdefault(p.step, {"step": p.step})[p.name] = p.value
        created[p.step] = max(created.get(p.step, 0), seconds(p.time))
    for step, data in by_step.items():
        if "loss" in data and "train_loss" not in data:
            data["train_loss"] = data["loss"]
        event = {
            "id": f"ftevent-{job_id}-step-{step}",
            "object": "fine_tuning.job.event",
            "created_at": created[step],
            "level": "info",
            "message": f"Step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in data.items() if k != "step"),
            "type": "metrics",
            "data": data,
        }
        events.append(((-created[step], 1, step), event))
    return [event for _, event in sorted(events, key=lambda pair: pair[0])]


async def pages_of_events(http: httpx.AsyncClient, job_id: str, limit: int) -> list[list[dict[str, Any]]]:
    """Every page of the OpenAI events list, each after the last id of the one before, as the client pages."""
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        resp = await http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages.append(body["data"])
        assert len(body["data"]) <= limit
        if not body["has_more"]:
            return pages
        assert len(body["data"]) == limit
        params["after"] = body["data"][-1]["id"]


async def test_openai_events_page_after_any_event_as_one_big_page_and_as_the_gateway_built_them(jobs, http):
    job_id = await resumed_job(jobs)
    expected = await events_as_the_gateway_built_them(jobs, job_id)
    assert len(expected) == 7 + 30  # every state change, and steps 1..30 once each (step 8: attempt 2's value)
    assert {e["created_at"] for e in expected if e["type"] == "message"} & {
        e["created_at"] for e in expected if e["type"] == "metrics"
    }, "state changes share seconds with steps"
    (everything,) = await pages_of_events(http, job_id, 10_000)
    assert everything == expected
    step_8 = next(e for e in everything if e["id"] == f"ftevent-{job_id}-step-8")
    assert step_8["data"] == {"step": 8, "loss": -8.0, "learning_rate": 1e-4, "train_loss": -8.0}

    for limit in (1, 2, 3, 4, 7, 36, 37):
        pages = await pages_of_events(http, job_id, limit)
        assert [e for page in pages for e in page] == expected, limit
        assert len(pages) == -(-len(expected) // limit)

    # After any event: exactly the rest of the list.
    for i, event in enumerate(expected):
        resp = await http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": event["id"], "limit": 5})
        assert resp.json()["data"] == expected[i + 1 : i + 6], event["id"]
        assert resp.json()["has_more"] == (i + 6 < len(expected))


async def test_openai_events_refuse_an_event_the_job_does_not_have_as_an_invalid_cursor(jobs, http):
    job_id = await resumed_job(jobs)
    other = await make_job(jobs)
    for after in (
        f"ftevent-{job_id}-step-31",  # no such step
        f"ftevent-{job_id}-state-99",
        f"ftevent-{job_id}-state-{1 + 7}",  # the other job's first transition
        f"ftevent-{other}-state-1",
        f"ftevent-{job_id}-step-08",
        f"ftevent-{job_id}-step-{2**63}",
        f"ftevent-{job_id}-steps-1",
        "nope",
    ):
        resp = await http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": after})
        assert resp.status_code == 400, (after, resp.text)
        error = resp.json()["error"]
        assert (error["param"], error["code"]) == ("after", "invalid_cursor"), after
        assert error["message"] == f"no item with id {after!r} in this list"
    missing = await http.get("/v1/fine_tuning/jobs/job-nope/events", params={"after": "nope"})
    assert missing.status_code == 404


async def test_list_job_events_newest_first_pages_and_starts_after_an_item_of_either_kind(jobs, stub):
    job_id = await resumed_job(jobs)
    expected = await events_as_the_gateway_built_them(jobs, job_id)
    seqs = [int(e["id"].rsplit("-", 1)[1]) for e in expected if e["type"] == "message"]
    assert seqs == [7, 5, 6, 4, 2, 3, 1]  # the latest second first; within one second by seq
    got, token = [], ""
    while True:
        request = pb.ListJobEventsRequest(job_id=job_id, newest_first=True, page_size=2, page_token=token)
        resp = await stub.ListJobEvents(request, timeout=10)
        got += [e.seq for e in resp.events]
        token = resp.next_page_token
        if not token:
            break
    assert got == seqs
    # After an item of the activity: the transitions that follow it there, whichever kind it is.
    for i, event in enumerate(expected):
        kind, key = event["id"].rsplit("-", 2)[1:]
        after = pb.ActivityCursor(seq=int(key)) if kind == "state" else pb.ActivityCursor(step=int(key))
        resp = await stub.ListJobEvents(pb.ListJobEventsRequest(job_id=job_id, newest_first=True, after=after))
        rest = [int(e["id"].rsplit("-", 1)[1]) for e in expected[i + 1 :] if e["type"] == "message"]
        assert [e.seq for e in resp.events] == rest, event["id"]
    # The stored order stays the default.
    plain = await stub.ListJobEvents(pb.ListJobEventsRequest(job_id=job_id), timeout=10)
    assert [e.seq for e in plain.events] == sorted(seqs)


async def test_list_job_metrics_newest_first_gives_whole_steps_after_an_item_of_either_kind(jobs, stub):
    job_id = await resumed_job(jobs)
    expected = await events_as_the_gateway_built_them(jobs, job_id)
    steps = [e["data"]["step"] for e in expected if e["type"] == "metrics"]
    got: list[list[pb.MetricPoint]] = []
    token = ""
    while True:
        request = pb.ListJobMetricsRequest(job_id=job_id, newest_first=True, page_size=3, page_token=token)
        resp = await stub.ListJobMetrics(request, timeout=10)
        page_steps = list(dict.fromkeys(p.step for p in resp.points))
        assert len(page_steps) == (3 if resp.next_page_token else len(page_steps))
        for step in page_steps:
            got.append([p for p in resp.points if p.step == step])
        token = resp.next_page_token
        if not token:
            break
    assert [points[0].step for points in got] == steps
    step_8 = next(points for points in got if points[0].step == 8)
    assert [(p.attempt, p.name, p.value) for p in step_8] == [
        (1, "loss", 3.0 - 0.8),
        (1, "learning_rate", 1e-4),
        (2, "loss", -8.0),
    ]
    for i, event in enumerate(expected):
        kind, key = event["id"].rsplit("-", 2)[1:]
        after = pb.ActivityCursor(seq=int(key)) if kind == "state" else pb.ActivityCursor(step=int(key))
        resp = await stub.ListJobMetrics(pb.ListJobMetricsRequest(job_id=job_id, newest_first=True, after=after))
        rest = [e["data"]["step"] for e in expected[i + 1 :] if e["type"] == "metrics"]
        assert list(dict.fromkeys(p.step for p in resp.points)) == rest, event["id"]
    # Names and a step range select the points; a step's time is then its selected points' latest.
    evals = await stub.ListJobMetrics(
        pb.ListJobMetricsRequest(job_id=job_id, newest_first=True, names=["eval_loss"], min_step=6, max_step=25)
    )
    assert [(p.step, p.name) for p in evals.points] == [(s, "eval_loss") for s in (25, 20, 15, 10)]


async def test_newest_first_leaves_out_points_a_resumed_attempt_superseded(jobs, stub):
    job_id = await make_job(jobs)
    for step in range(1, 11):
        await report(jobs, job_id, step, step, attempt=1, loss=float(step))
    await resumed(jobs, job_id, attempt=2, from_step=4)  # attempt 1's steps 5..10 stand no more (not deleted here)
    for step in range(4, 7):
        await report(jobs, job_id, step, 20 + step, attempt=2, loss=-float(step))
    resp = await stub.ListJobMetrics(pb.ListJobMetricsRequest(job_id=job_id, newest_first=True), timeout=10)
    assert [(p.step, p.attempt, p.value) for p in resp.points] == [
        (6, 2, -6.0),
        (5, 2, -5.0),
        (4, 1, 4.0),  # both attempts hold step 4 (the checkpoint's), by attempt: the last one stands
        (4, 2, -4.0),
        (3, 1, 3.0),
        (2, 1, 2.0),
        (1, 1, 1.0),
    ]
    # Attempt 1's step 7 is not the job's any more: no place to list after.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ListJobMetrics(
            pb.ListJobMetricsRequest(job_id=job_id, newest_first=True, after=pb.ActivityCursor(step=7)), timeout=10
        )
    assert decode_error(exc.value).field_violations[0][0] == "after"


async def test_newest_first_requests_are_checked(jobs, stub):
    job_id = await resumed_job(jobs)
    cases = [
        (stub.ListJobEvents, pb.ListJobEventsRequest(job_id=job_id, after=pb.ActivityCursor(seq=1)), "after"),
        (stub.ListJobEvents, pb.ListJobEventsRequest(job_id=job_id, newest_first=True, page_token="x"), "page_token"),
        (
            stub.ListJobEvents,
            pb.ListJobEventsRequest(job_id=job_id, newest_first=True, after=pb.ActivityCursor(seq=99)),
            "after",
        ),
        (stub.ListJobMetrics, pb.ListJobMetricsRequest(job_id=job_id, after=pb.ActivityCursor(step=1)), "after"),
        (stub.ListJobMetrics, pb.ListJobMetricsRequest(job_id=job_id, newest_first=True, max_points=5), "newest_first"),
        (stub.ListJobMetrics, pb.ListJobMetricsRequest(job_id=job_id, newest_first=True, min_step=-1), "min_step"),
        (
            stub.ListJobMetrics,
            pb.ListJobMetricsRequest(job_id=job_id, newest_first=True, after=pb.ActivityCursor(step=31)),
            "after",
        ),
    ]
    for call, request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(request, timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert decode_error(exc.value).field_violations[0][0] == field, request
    for call, request in (
        (stub.ListJobEvents, pb.ListJobEventsRequest(job_id="job-nope", newest_first=True)),
        (stub.ListJobMetrics, pb.ListJobMetricsRequest(job_id="job-nope", newest_first=True)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(request, timeout=10)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    # A job without points: no steps, and no step to list after.
    empty = await make_job(jobs)
    resp = await stub.ListJobMetrics(pb.ListJobMetricsRequest(job_id=empty, newest_first=True), timeout=10)
    assert not resp.points and not resp.next_page_token
