"""Metric ingestion on PostgreSQL: agent reports over the real ReportJob gRPC stream vs a bulk INSERT baseline.

A jobs service (the real servicers, store and batching, in a process of its own as deployed; --same-process runs
it in this process's event loop instead) on a fresh PostgreSQL database receives metric reports from `--agents`
agents at once, each sending `--steps` reports of `--names` values (7 by default: what TRL's SFTTrainer logs
every step) through the trainer's own Reporter on its own ReportJob stream, numbered and acknowledged as a GPU
node's agent sends them. The time runs from the first report queued to the last one acknowledged (every point
committed). The baseline writes the same rows into the same table with bulk INSERTs (executemany, 1,000 steps
per transaction as the service's REPORT_BATCH) and, for reference, with one COPY. Prints points/s for each and
the ratio platform/baseline; the goal is >= 50,000 points/s (points = reports x values).

    python bench/bench_metric_ingest.py [--agents 10] [--steps 4000] [--names 7] [--pg-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
from _support import (  # bench/ is the script's directory, so first on sys.path
    Figure,
    FixedCatalog,
    add_figures_argument,
    jobs_database,
    write_figures,
)
from sqlalchemy import func, select

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.db import make_engine
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api, store
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs
from tuneforge_trainer.agent import Reporter

# What TRL's SFTTrainer logs at every step (TRL 0.2x): one report of these 7 values per training step.
NAMES = ["loss", "grad_norm", "learning_rate", "entropy", "num_tokens", "mean_token_accuracy", "epoch", "eval_loss"]
BENCH = "bench_metric_ingest"
GOAL_POINTS_S = 50_000
COLUMNS = ["job_id", "attempt", "name", "step", "value", "recorded_at"]


def values_at(step: int, names: list[str]) -> dict[str, float]:
    return {name: 1.0 / step + i for i, name in enumerate(names)}


async def count_points(jobs: Jobs, job_id: str) -> int:
    async with jobs.engine.connect() as conn:
        query = select(func.count()).select_from(store.metric_points).where(store.metric_points.c.job_id == job_id)
        return int((await conn.execute(query)).scalar_one())


def make_jobs(engine: Any, changes: Notifier | None = None) -> Jobs:
    notify = changes.notify if changes is not None else None
    return Jobs(engine=engine, catalog=FixedCatalog(), artifact_root="/a", subject_root="bench", on_change=notify)


async def serve(pg_url: str) -> None:
    """The jobs service's gRPC servicers on this database until stdin closes; prints the port first."""
    engine = make_engine(pg_url.replace("postgresql://", "postgresql+asyncpg://"))
    changes = Notifier()
    server, port = await start_server(api.bindings(make_jobs(engine, changes), changes), "127.0.0.1", 0)
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop(None)
    await engine.dispose()


@contextlib.asynccontextmanager
async def jobs_service(pg_url: str, jobs: Jobs, same_process: bool) -> AsyncIterator[int]:
    """The port of a jobs service on this database: a process of its own, as a deployment runs it apart from
    its agents (so the agents' side of the stream does not take its CPU), or this process's event loop."""
    if same_process:
        changes = Notifier()
        server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
        try:
            yield port
        finally:
            await server.stop(None)
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", pg_url, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        yield int(await proc.stdout.readline())
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)


async def one_agent(jobs: Jobs, port: int, steps: int, names: list[str], ready: asyncio.Barrier) -> str:
    """One agent's job: `steps` metric reports through its own Reporter and ReportJob stream, all acknowledged."""
    job = await jobs.submit("m", "d", "sft-lora", {})
    agent_id, _ = await jobs.register_agent(f"bench-{job.id}", {}, 1)
    job = await jobs.claim_next(agent_id)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        reporter = Reporter(agent_id=agent_id)
        reporter.add(job.id, job.attempt, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING))
        stream = asyncio.create_task(reporter.run_stream(stub))
        while reporter.pending:  # noqa: ASYNC110 - RUNNING stored: the stream is up before the clock starts
            await asyncio.sleep(0.005)
        await ready.wait()
        for step in range(1, steps + 1):
            reporter.add(job.id, job.attempt, metric=apb.MetricReport(step=step, values=values_at(step, names)))
            if step % 100 == 0:
                await asyncio.sleep(0)  # as a runner does between steps: the stream sends while reports come
        while reporter.pending:  # noqa: ASYNC110 - polling keeps the benchmark free of hooks into Reporter
            if stream.done():
                stream.result()
            await asyncio.sleep(0.005)
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)
    return job.id


async def platform(jobs: Jobs, port: int, agents: int, steps: int, names: list[str]) -> tuple[float, list[str]]:
    """Seconds from the first report queued to the last acknowledged (stored), over every agent's stream."""
    ready = asyncio.Barrier(agents + 1)
    runs = [asyncio.create_task(one_agent(jobs, port, steps, names, ready)) for _ in range(agents)]
    await ready.wait()
    started = time.perf_counter()
    job_ids = await asyncio.gather(*runs)
    return time.perf_counter() - started, job_ids


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


async def run(admin_url: str, agents: int, steps: int, n_names: int, same_process: bool) -> list[Figure]:
    names = NAMES[:n_names]
    points = agents * steps * len(names)
    async with jobs_database(admin_url) as (pg_url, engine):
        jobs = make_jobs(engine)
        async with jobs_service(pg_url, jobs, same_process) as port:
            seconds, job_ids = await platform(jobs, port, agents, steps, names)
            stored = sum([await count_points(jobs, job_id) for job_id in job_ids])
            assert stored == points, f"platform: {stored} points stored, {points} sent"
            results = [(f"{agents} agent Reporter(s) -> ReportJob streams -> jobs service", seconds)]
            for label, measure in [
                (
                    "baseline: bulk INSERT (executemany, 1,000 steps per transaction)",
                    lambda: bulk_insert(jobs, agents * steps, names),
                ),
                ("reference: one COPY", lambda: copy_in(jobs, pg_url, agents * steps, names)),
            ]:
                seconds, job_id = await measure()
                stored = await count_points(jobs, job_id)
                assert stored == points, f"{label}: {stored} points stored, {points} sent"
                results.append((label, seconds))

    where = "in this process" if same_process else "in a process of its own"
    shape = f"{agents} agent(s) x {steps:,} reports of {len(names)} values, the jobs service {where}"
    print(f"{points:,} metric points ({shape}) into PostgreSQL\n")
    print("| path | seconds | points/s |\n| --- | --- | --- |")
    for label, seconds in results:
        print(f"| {label} | {seconds:.3f} | {points / seconds:,.0f} |")
    platform_rate, baseline_rate, copy_rate = (points / seconds for _, seconds in results)
    print(f"\nreports/s through the platform: {agents * steps / results[0][1]:,.0f}")
    print(f"ratio platform/baseline (bulk INSERT): {platform_rate / baseline_rate:.2f}x")
    print(f"ratio platform/COPY: {platform_rate / copy_rate:.2f}x")
    return [
        Figure(
            BENCH,
            "metric ingestion, agent Reporter -> ReportJob stream -> PostgreSQL",
            platform_rate,
            "points/s",
            baseline=f"bulk INSERT of the same rows {baseline_rate:,.0f} points/s; one COPY {copy_rate:,.0f} points/s",
            goal=f">= {GOAL_POINTS_S:,} points/s",
            met=platform_rate >= GOAL_POINTS_S,
            note=f"{shape}, each acknowledged only once stored",
        ),
        Figure(
            BENCH,
            "metric ingestion: platform / bulk INSERT",
            platform_rate / baseline_rate,
            "x",
            baseline=f"bulk INSERT {baseline_rate:,.0f} points/s",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10, help="agents, each with its own job and stream")
    parser.add_argument("--steps", type=int, default=4_000, help="metric reports per agent")
    parser.add_argument("--names", type=int, default=7, choices=range(1, len(NAMES) + 1), help="values per report")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument(
        "--same-process", action="store_true", help="run the jobs service in this process's event loop, with the agents"
    )
    parser.add_argument("--serve", metavar="PG_URL", help=argparse.SUPPRESS)  # the jobs service's own process
    add_figures_argument(parser)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    found = asyncio.run(run(args.pg_url, args.agents, args.steps, args.names, args.same_process))
    write_figures(args.figures, found)


if __name__ == "__main__":
    main()
