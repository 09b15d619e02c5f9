"""Metric ingestion on PostgreSQL: agent reports over the real ReportJob gRPC stream vs a bulk INSERT baseline.

An in-process jobs service (the real servicer, store and batching) on a fresh PostgreSQL database receives
`--steps` metric reports of `--names` values each from the trainer's own Reporter, numbered and acknowledged
as a GPU node's agent sends them; the time runs from the first report queued to the last one acknowledged
(every point committed). The baseline writes the same rows into the same table with bulk INSERTs
(executemany, 1,000 rows per statement batch as the service's REPORT_BATCH) and, for reference, with COPY.
Prints points/s for each and the ratio platform/baseline.

    python bench/bench_metric_ingest.py [--steps 20000] [--names 5] [--pg-url postgresql://postgres@...]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time

import asyncpg
import grpc
from _support import FixedCatalog, jobs_database  # bench/ is the script's directory, so first on sys.path
from sqlalchemy import func, select

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api, store
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs
from tuneforge_trainer.agent import Reporter

NAMES = ["loss", "learning_rate", "grad_norm", "epoch", "reward", "reward_std", "kl", "eval_loss"]
COLUMNS = ["job_id", "attempt", "name", "step", "value", "recorded_at"]


def values_at(step: int, names: list[str]) -> dict[str, float]:
    return {name: 1.0 / step + i for i, name in enumerate(names)}


async def count_points(jobs: Jobs, job_id: str) -> int:
    async with jobs.engine.connect() as conn:
        query = select(func.count()).select_from(store.metric_points).where(store.metric_points.c.job_id == job_id)
        return int((await conn.execute(query)).scalar_one())


async def platform(jobs: Jobs, port: int, steps: int, names: list[str]) -> tuple[float, str]:
    """Seconds from the first report queued to the last acknowledged, through the agent's Reporter."""
    job = await jobs.submit("m", "d", "sft-lora", {})
    agent_id, _ = await jobs.register_agent("bench", {}, 1)
    job = await jobs.claim_next(agent_id)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        reporter = Reporter(agent_id=agent_id)
        reporter.add(job.id, job.attempt, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING))
        started = time.perf_counter()
        stream = asyncio.create_task(reporter.run_stream(stub))
        for step in range(1, steps + 1):
            reporter.add(job.id, job.attempt, metric=apb.MetricReport(step=step, values=values_at(step, names)))
            if step % 1000 == 0:
                await asyncio.sleep(0)  # as a runner does between steps: the stream sends while reports come
        while reporter.pending:  # noqa: ASYNC110 - polling keeps the benchmark free of hooks into Reporter
            if stream.done():
                stream.result()
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - started
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)
    return seconds, job.id


async def bulk_insert(jobs: Jobs, steps: int, names: list[str]) -> tuple[float, str]:
    """The same rows by executemany INSERTs, in transactions of 1,000 reports as the service batches them."""
    job = await jobs.submit("m", "d", "sft-lora", {})
    now = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    for first in range(1, steps + 1, 1000):
        rows = [
            dict(job_id=job.id, attempt=1, name=name, step=step, value=value, recorded_at=now)
            for step in range(first, min(first + 1000, steps + 1))
            for name, value in values_at(step, names).items()
        ]
        async with jobs.engine.begin() as conn:
            await conn.execute(store.metric_points.insert(), rows)
    return time.perf_counter() - started, job.id


async def copy_in(jobs: Jobs, pg_url: str, steps: int, names: list[str]) -> tuple[float, str]:
    """The same rows by one COPY: the fastest way into PostgreSQL, for reference."""
    job = await jobs.submit("m", "d", "sft-lora", {})
    now = dt.datetime.now(dt.UTC)
    conn = await asyncpg.connect(pg_url)
    try:
        started = time.perf_counter()
        records = [
            (job.id, 1, name, step, value, now)
            for step in range(1, steps + 1)
            for name, value in values_at(step, names).items()
        ]
        await conn.copy_records_to_table("metric_points", records=records, columns=COLUMNS)
        return time.perf_counter() - started, job.id
    finally:
        await conn.close()


async def run(admin_url: str, steps: int, n_names: int) -> None:
    names = NAMES[:n_names]
    points = steps * len(names)
    async with jobs_database(admin_url) as (pg_url, engine):
        changes = Notifier()
        jobs = Jobs(
            engine=engine, catalog=FixedCatalog(), artifact_root="/a", subject_root="bench", on_change=changes.notify
        )
        server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
        try:
            results = []
            for label, measure in [
                ("agent Reporter -> ReportJob stream -> jobs service", lambda: platform(jobs, port, steps, names)),
                (
                    "baseline: bulk INSERT (executemany, 1,000 steps per transaction)",
                    lambda: bulk_insert(jobs, steps, names),
                ),
                ("reference: one COPY", lambda: copy_in(jobs, pg_url, steps, names)),
            ]:
                seconds, job_id = await measure()
                stored = await count_points(jobs, job_id)
                assert stored == points, f"{label}: {stored} points stored, {points} sent"
                results.append((label, seconds))
        finally:
            await server.stop(None)

    print(f"{points:,} metric points ({steps:,} reports of {len(names)} values) into PostgreSQL\n")
    print("| path | seconds | points/s |\n| --- | --- | --- |")
    for label, seconds in results:
        print(f"| {label} | {seconds:.3f} | {points / seconds:,.0f} |")
    platform_rate, baseline_rate = points / results[0][1], points / results[1][1]
    print(f"\nratio platform/baseline (bulk INSERT): {platform_rate / baseline_rate:.2f}x")
    print(f"ratio platform/COPY: {platform_rate / (points / results[2][1]):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--names", type=int, default=5, choices=range(1, len(NAMES) + 1))
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = parser.parse_args()
    asyncio.run(run(args.pg_url, args.steps, args.names))


if __name__ == "__main__":
    main()
