"""Gateway on PostgreSQL: requests/s and latency of GET /api/v1/jobs/{id} and GET /api/v1/jobs (page_size 50)
at 50 concurrent clients, side by side with the same reads as direct gRPC calls to the jobs service.

The embedded stack (catalog, jobs and gateway as processes, NATS; the trainer agent stopped right after the
start, so jobs stay QUEUED) runs on two fresh PostgreSQL databases, dropped afterwards. `--jobs` jobs are
submitted through the REST API. Then, for each read, `--concurrency` clients in this one process send requests
back to back for `--seconds` (after `--warmup` seconds not counted):

- gateway: one httpx.AsyncClient (one keep-alive connection) per client -> gateway -> JobService.GetJob /
  ListJobs (one client of 50 connections saturated this process first: httpcore's pool scans every connection
  for each request);
- baseline: grpc.aio stubs on one channel straight to the jobs service, the same requests with the same key
  (the gateway forwards the caller's key, so both paths authenticate the same way).

GetJob reads a job drawn at random from the seeded ones; ListJobs reads the first page of 50. The table gives
p50/p95 latency and requests/s, and the CPU each process used per second of the window (1.0 = one core busy), which
says what saturates first: on a small machine every process shares the same cores, the client included.

    python bench/bench_gateway.py [--jobs 1000] [--concurrency 50] [--seconds 5] [--figures out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
from _support import Figure, add_figures_argument, percentile, write_figures  # bench/ is the script's directory

from tuneforge.jobs.v1 import jobs_pb2 as pb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_cli.embedded import EmbeddedStack
from tuneforge_common.db import create_postgres_database, drop_postgres_databases

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "datasets" / "sample-chat.jsonl"
PAGE_SIZE = 50


@contextlib.contextmanager
def postgres_databases(admin_url: str, *names: str) -> Iterator[list[str]]:
    """Fresh PostgreSQL databases (their SQLAlchemy URLs), dropped afterwards even when the run fails."""
    made: list[str] = []
    try:
        for name in names:
            made.append(asyncio.run(create_postgres_database(admin_url, f"tuneforge_bench_{name}")))
        yield made
    finally:
        asyncio.run(drop_postgres_databases(admin_url, made))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 for one that is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


@dataclass
class Sample:
    latencies_ms: list[float]
    seconds: float
    cpu: dict[str, float]  # CPU seconds per second of the window, per process

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


async def drive(
    calls: list[Callable[[random.Random], Awaitable[None]]], seconds: float, warmup: float, pids: dict[str, int]
) -> Sample:
    """One worker per call, each calling back to back; only calls that start and end inside the window count."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    latencies: list[float] = []
    cpu_before: dict[str, float] = {}

    async def worker(n: int, call: Callable[[random.Random], Awaitable[None]]) -> None:
        rng = random.Random(n)
        while (began := loop.time()) < end:
            await call(rng)
            ended = loop.time()
            if began >= start and ended <= end:
                latencies.append((ended - began) * 1000)

    async def mark() -> None:
        await asyncio.sleep(warmup)
        cpu_before.update({name: cpu_seconds(pid) for name, pid in pids.items()})
        cpu_before["client"] = time.process_time()

    marker = asyncio.create_task(mark())
    await asyncio.sleep(0)
    await asyncio.gather(*(worker(n, call) for n, call in enumerate(calls)))
    await marker
    used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    used["client"] = time.process_time() - cpu_before["client"]
    # The last calls may end after the window: CPU is read when all have ended, so it divides by that span.
    span = max(seconds, loop.time() - start)
    return Sample(latencies, seconds, {name: value / span for name, value in used.items()})


def seed(http: httpx.Client, url: str, key: str, n: int) -> list[str]:
    """Upload the sample dataset, then submit n jobs through the REST API, 16 at a time."""
    with SAMPLE.open("rb") as fh:
        resp = http.post("/api/v1/datasets", files={"file": ("sample-chat.jsonl", fh)}, data={"name": "bench"})
    resp.raise_for_status()
    body = {"model_id": "tiny-chat", "dataset_id": resp.json()["id"], "method_id": "sft-lora"}

    async def submit_all() -> list[str]:
        ids: list[str] = []
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

            async def submitter(count: int) -> None:
                for _ in range(count):
                    submitted = await client.post("/api/v1/jobs", json={**body, "parameters": {"max_steps": 5}})
                    submitted.raise_for_status()
                    ids.append(submitted.json()["id"])

            await asyncio.gather(*(submitter(n // 16 + (i < n % 16)) for i in range(16)))
        return ids

    return asyncio.run(submit_all())


async def measure(stack: EmbeddedStack, key: str, job_ids: list[str], args: argparse.Namespace) -> dict[str, Sample]:
    headers = {"Authorization": f"Bearer {key}"}
    metadata = (("authorization", f"Bearer {key}"),)
    pids = {name: stack.procs[name].pid for name in ("gateway", "jobs", "catalog")}
    # A client (one connection) per worker: httpcore's pool looks at every connection of its pool for each request,
    # so one client of 50 connections spent this process's whole core there at under 100 requests/s.
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    results: dict[str, Sample] = {}
    async with contextlib.AsyncExitStack() as stack_of:
        clients = [
            await stack_of.enter_async_context(
                httpx.AsyncClient(base_url=stack.gateway_url, headers=headers, timeout=30, limits=one)
            )
            for _ in range(args.concurrency)
        ]
        channel = await stack_of.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['jobs']}"))
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        def http_get(http: httpx.AsyncClient) -> Callable[[random.Random], Awaitable[None]]:
            async def call(rng: random.Random) -> None:
                (await http.get(f"/api/v1/jobs/{rng.choice(job_ids)}")).raise_for_status()

            return call

        def http_list(http: httpx.AsyncClient) -> Callable[[random.Random], Awaitable[None]]:
            async def call(rng: random.Random) -> None:
                resp = await http.get("/api/v1/jobs", params={"page_size": PAGE_SIZE})
                resp.raise_for_status()
                assert len(resp.json()["jobs"]) == min(PAGE_SIZE, len(job_ids))

            return call

        async def grpc_get(rng: random.Random) -> None:
            await stub.GetJob(pb.GetJobRequest(job_id=rng.choice(job_ids)), metadata=metadata, timeout=30)

        async def grpc_list(rng: random.Random) -> None:
            found = await stub.ListJobs(pb.ListJobsRequest(page_size=PAGE_SIZE), metadata=metadata, timeout=30)
            assert len(found.jobs) == min(PAGE_SIZE, len(job_ids))

        paths: list[tuple[str, list[Callable[[random.Random], Awaitable[None]]]]] = [
            ("gateway GET /api/v1/jobs/{id}", [http_get(c) for c in clients]),
            ("baseline gRPC GetJob", [grpc_get] * args.concurrency),
            (f"gateway GET /api/v1/jobs?page_size={PAGE_SIZE}", [http_list(c) for c in clients]),
            (f"baseline gRPC ListJobs page_size={PAGE_SIZE}", [grpc_list] * args.concurrency),
        ]
        for label, calls in paths:
            results[label] = await drive(calls, args.seconds, args.warmup, pids)
            print(f"  {label}: {results[label].rps:,.0f} requests/s", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs to seed through the REST API")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=5, help="measured seconds per read and path")
    parser.add_argument("--warmup", type=float, default=1, help="seconds of load before the window opens")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    add_figures_argument(parser)
    args = parser.parse_args()
    # A time limit's SIGTERM unwinds like Ctrl-C, so the databases and processes made here are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    began = time.monotonic()
    with (
        postgres_databases(args.pg_url, "catalog", "jobs") as (catalog_db, jobs_db),
        tempfile.TemporaryDirectory(prefix="tf-bench-gateway-") as tmp,
    ):
        overrides = {
            "TUNEFORGE_CATALOG_DATABASE_URL": catalog_db,
            "TUNEFORGE_JOBS_DATABASE_URL": jobs_db,
            "TUNEFORGE_LOG_LEVEL": "WARNING",  # a log line per request would be part of what is measured
        }
        stack = EmbeddedStack(data_dir=Path(tmp) / "stack", gateway_port=0, env_overrides=overrides)
        try:
            stack.start(progress=lambda msg: print(f"  {msg}", file=sys.stderr))
            stack.stop_one("trainer")  # no agent: the seeded jobs stay QUEUED and nothing else loads the machine
            key = stack.admin_key
            with httpx.Client(base_url=stack.gateway_url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as h:
                seeded_at = time.monotonic()
                job_ids = seed(h, stack.gateway_url, key, args.jobs)
                seed_s = time.monotonic() - seeded_at
            print(f"  seeded {len(job_ids):,} jobs in {seed_s:.1f} s", file=sys.stderr)
            results = asyncio.run(measure(stack, key, job_ids, args))
        finally:
            stack.stop(grace=10)

    print(
        f"\n{args.concurrency} concurrent clients (one process), {args.seconds:g} s per row, "
        f"{args.jobs:,} jobs in PostgreSQL; wall {time.monotonic() - began:.0f} s\n"
    )
    print("| path | requests | requests/s | p50 ms | p95 ms | CPU: client | gateway | jobs | catalog |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, s in results.items():
        cpu = s.cpu
        print(
            f"| {label} | {len(s.latencies_ms):,} | {s.rps:,.0f} | {s.percentile(50):.1f} | {s.percentile(95):.1f} "
            f"| {cpu['client']:.2f} | {cpu['gateway']:.2f} | {cpu['jobs']:.2f} | {cpu['catalog']:.2f} |"
        )
    rows = list(results.values())
    figures = []
    for name, gateway, direct in (("GET /api/v1/jobs/{id}", rows[0], rows[1]), ("GET /api/v1/jobs", rows[2], rows[3])):
        ratio = gateway.rps / direct.rps
        print(
            f"\n{name}: gateway/gRPC requests/s {ratio:.2f}x, p95 {gateway.percentile(95) / direct.percentile(95):.2f}x"
        )
        settings = f"{args.concurrency} clients in one process, {args.jobs} jobs, page_size {PAGE_SIZE}"
        figures += [
            Figure(
                "bench_gateway",
                f"{name} requests/s ({args.concurrency} clients)",
                gateway.rps,
                "requests/s",
                baseline=f"direct gRPC {direct.rps:,.0f} requests/s ({ratio:.2f}x)",
                note=f"gateway CPU {gateway.cpu['gateway']:.2f}, client CPU {gateway.cpu['client']:.2f}; {settings}",
            ),
            Figure(
                "bench_gateway",
                f"{name} p95 latency ({args.concurrency} clients)",
                gateway.percentile(95),
                "ms",
                baseline=f"direct gRPC p95 {direct.percentile(95):.1f} ms",
                note=f"p50 {gateway.percentile(50):.1f} ms (gRPC {direct.percentile(50):.1f} ms)",
            ),
        ]
    write_figures(args.figures, figures)


if __name__ == "__main__":
    main()
