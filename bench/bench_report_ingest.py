"""Metric ingestion: agent reports over the real ReportJob gRPC stream vs a bulk SQL insert baseline.

Both write the same number of metric points into the same jobs database in the same process; the ratio
is the platform path's throughput relative to the fastest possible write.

    python bench/bench_report_ingest.py [--points 5000] [--database-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import time
from typing import Any

import grpc

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api, store
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import CatalogInputs, Jobs
from tuneforge_trainer.agent import Reporter


class FixedCatalog:
    async def resolve_inputs(self, model_id: str, dataset_id: str, method_id: str, parameters: dict[str, Any]):
        return CatalogInputs("/m", "/d", "x", parameters)


async def run(points: int, database_url: str) -> None:
    engine = make_engine(database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    changes = Notifier()
    jobs = Jobs(
        engine=engine, catalog=FixedCatalog(), artifact_root="/a", subject_root="bench", on_change=changes.notify
    )
    server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
    job = await jobs.submit("m", "d", "sft-lora", {})
    agent_id = await jobs.register_agent("bench", {}, 1)
    await jobs.claim_next(agent_id)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        reporter = Reporter(agent_id=agent_id)
        started = time.perf_counter()
        for step in range(1, points + 1):
            reporter.add(job.id, 1, metric=apb.MetricReport(step=step, values={"loss": 1.0 / step}))
        stream = asyncio.create_task(reporter.run_stream(stub))
        while reporter.pending:  # noqa: ASYNC110 - polling keeps the benchmark free of hooks into Reporter
            await asyncio.sleep(0.01)
        platform_s = time.perf_counter() - started
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)

    now = dt.datetime.now(dt.UTC)
    rows = [
        dict(job_id=job.id, attempt=1, name="baseline", step=s, value=1.0 / s, recorded_at=now)
        for s in range(1, points + 1)
    ]
    started = time.perf_counter()
    async with engine.begin() as conn:
        await conn.execute(store.metric_points.insert(), rows)
    baseline_s = time.perf_counter() - started
    await server.stop(None)
    await engine.dispose()

    platform_rate, baseline_rate = points / platform_s, points / baseline_s
    print("| path | points | seconds | points/s |\n| --- | --- | --- | --- |")
    print(f"| agent ReportJob stream -> jobs service | {points} | {platform_s:.3f} | {platform_rate:,.0f} |")
    print(f"| bulk INSERT baseline | {points} | {baseline_s:.3f} | {baseline_rate:,.0f} |")
    print(f"ratio platform/baseline: {platform_rate / baseline_rate:.3f}x ({engine.dialect.name})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{tmp}/bench.db"
        asyncio.run(run(args.points, url))


if __name__ == "__main__":
    main()
