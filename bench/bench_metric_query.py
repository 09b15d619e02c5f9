"""Chart queries on a 1M-point job: downsampled in the database vs fetching the raw rows (the baseline).

Loads one job of `--names` metrics x `--steps` steps (5 x 200,000 = 1,000,000 points, by COPY) into a fresh
PostgreSQL database, with their rollup blocks (metric_blocks, which the service keeps up as reports are stored:
built here after the COPY, as migration 0009 builds them for stored points), then times `Jobs.metric_series`
(what the jobs service's ListJobMetrics with max_points runs, under the gateway's
GET /api/v1/jobs/{id}/metrics?max_points=...) for every name and for one name over a step range, `--reps` times
each, against fetching the same raw rows those answers summarise. Each series is
downsampled to at most `--max-points` buckets: 1,500 by default, the issue's chart size (the Details page asks
5,000 at present; pass --max-points 5000 to measure that). Prints p50/p95 in ms and the ratio
baseline/downsampled (how many times faster the chart query is). The goal: p95 < 200 ms for the chart of every
name of the 1M-point job.

    python bench/bench_metric_query.py [--steps 200000] [--names 5] [--max-points 1500] [--reps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from _support import (  # bench/ is the script's directory, so first on sys.path
    Figure,
    FixedCatalog,
    add_figures_argument,
    jobs_database,
    write_figures,
)
from sqlalchemy import func, select, text

from tuneforge_jobs import series, store
from tuneforge_jobs.service import Jobs, rebuild_metric_blocks

BENCH = "bench_metric_query"
MAX_POINTS = 1500  # the chart: at most 1,500 points per series
P95_GOAL_MS = 200.0
NAMES = ["loss", "learning_rate", "grad_norm", "epoch", "reward", "kl", "eval_loss", "reward_std"]


async def timed(fn: Callable[[], Awaitable[Any]], reps: int) -> tuple[list[float], Any]:
    await fn()  # warm: plans, buffers
    samples, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = await fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, result


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def load(pg_url: str, job_id: str, names: list[str], steps: int) -> float:
    """COPY the points in (name-interleaved by step, as agents report them); returns seconds."""
    rng = random.Random(7)
    now = dt.datetime.now(dt.UTC)
    conn = await asyncpg.connect(pg_url)
    started = time.perf_counter()
    try:
        batch: list[tuple[Any, ...]] = []
        for step in range(1, steps + 1):
            for i, name in enumerate(names):
                value = 1.0 / math.sqrt(step) + i + rng.random() * 0.01
                if name == "loss" and step == steps // 3:
                    value = 1000.0  # one spike: a downsampled chart must still show it
                batch.append((job_id, 1, name, step, value, now))
            if len(batch) >= 200_000:
                await conn.copy_records_to_table(
                    "metric_points",
                    records=batch,
                    columns=["job_id", "attempt", "name", "step", "value", "recorded_at"],
                )
                batch = []
        if batch:
            await conn.copy_records_to_table(
                "metric_points", records=batch, columns=["job_id", "attempt", "name", "step", "value", "recorded_at"]
            )
        await conn.execute("VACUUM ANALYZE metric_points")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def run(admin_url: str, steps: int, n_names: int, max_points: int, reps: int, base_reps: int) -> list[Figure]:
    async with jobs_database(admin_url) as (pg_url, engine):
        jobs = Jobs(engine=engine, catalog=FixedCatalog(), artifact_root="/a", subject_root="bench")
        job = await jobs.submit("m", "d", "sft-lora", {})
        names = NAMES[:n_names]
        load_s = await load(pg_url, job.id, names, steps)
        total = steps * len(names)
        print(f"loaded {total:,} points ({len(names)} names x {steps:,} steps) in {load_s:.1f}s by COPY")
        # COPY bypasses the service, which keeps the rollup blocks up as it stores points: build them here (as
        # migration 0009 does for the points stored before it).
        started = time.perf_counter()
        async with engine.begin() as conn:
            await rebuild_metric_blocks(conn, job.id, 1, 0)
            await conn.execute(text("ANALYZE metric_blocks"))  # as autovacuum would soon (the load's VACUUM ANALYZE)
            blocks = (await conn.execute(select(func.count()).select_from(store.metric_blocks))).scalar_one()
        print(f"rolled up into {blocks:,} blocks of {series.BLOCK_STEPS} steps in {time.perf_counter() - started:.1f}s")

        lo, hi = steps // 4, steps // 4 + steps // 2  # one name, the middle half of its steps
        mp = store.metric_points

        async def raw(query: Any) -> list[Any]:
            async with engine.connect() as conn:
                # The planner settings the service's query runs under, so only the downsampling differs.
                await conn.exec_driver_sql(
                    "SELECT set_config('plan_cache_mode', 'force_custom_plan', true), set_config('jit', 'off', true)"
                )
                return list((await conn.execute(query)).all())

        cases = [
            (
                f"all {len(names)} names, max_points={max_points}",
                lambda: jobs.metric_series(job.id, [], max_points),
                select(mp.c.name, mp.c.step, mp.c.value).where(mp.c.job_id == job.id).order_by(mp.c.name, mp.c.step),
            ),
            (
                f"loss, steps {lo:,}..{hi:,}, max_points={max_points}",
                lambda: jobs.metric_series(job.id, ["loss"], max_points, lo, hi),
                select(mp.c.step, mp.c.value)
                .where(mp.c.job_id == job.id, mp.c.name == "loss", mp.c.step >= lo, mp.c.step <= hi)
                .order_by(mp.c.step),
            ),
        ]
        rows_out = []
        for label, query_fn, baseline_query in cases:
            samples, result = await timed(query_fn, reps)
            base_samples, base_rows = await timed(lambda q=baseline_query: raw(q), base_reps)
            buckets = sum(len(s.points) for s in result)
            spike = max(p.max for s in result if s.name == "loss" for p in s.points)
            rows_out.append((label, samples, buckets, base_samples, len(base_rows), spike))

        print("\n| query | reps | rows out | p50 ms | p95 ms | baseline: raw rows | reps | p50 ms | p95 ms | ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, samples, buckets, base, base_n, _ in rows_out:
            ratio = statistics.median(base) / statistics.median(samples)
            print(
                f"| {label} | {len(samples)} | {buckets:,} | {pct(samples, 0.5):.1f} | {pct(samples, 0.95):.1f} "
                f"| {base_n:,} | {len(base)} | {pct(base, 0.5):.1f} | {pct(base, 0.95):.1f} | {ratio:.1f}x |"
            )
        print("ratio = baseline p50 / downsampled p50 (higher: the downsampled query is that many times faster)")
        print(f"spike kept: loss max in the downsampled series = {rows_out[0][5]:.1f} (injected 1000.0)")

    out = []
    for (label, samples, buckets, base, base_n, _), what in zip(
        rows_out, ("chart of every metric", "chart of one metric, zoomed to half its steps"), strict=True
    ):
        p95 = pct(samples, 0.95)
        out.append(
            Figure(
                BENCH,
                f"{what} p95 ({total:,} points, max_points={max_points})",
                p95,
                "ms",
                baseline=f"fetching the {base_n:,} raw rows p95 {pct(base, 0.95):.0f} ms",
                goal=f"< {P95_GOAL_MS:g} ms",
                met=p95 < P95_GOAL_MS,
                note=f"{label}: {buckets:,} buckets, p50 {pct(samples, 0.5):.1f} ms, {len(samples)} reps",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--names", type=int, default=5, choices=range(1, len(NAMES) + 1))
    parser.add_argument("--max-points", type=int, default=MAX_POINTS, help="buckets per series")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--baseline-reps", type=int, default=3)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    add_figures_argument(parser)
    args = parser.parse_args()
    found = asyncio.run(run(args.pg_url, args.steps, args.names, args.max_points, args.reps, args.baseline_reps))
    write_figures(args.figures, found)


if __name__ == "__main__":
    main()
