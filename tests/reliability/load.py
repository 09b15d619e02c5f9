"""Load on one jobs service: simulated agents report metrics while SSE and gRPC watchers follow their jobs.

The system under test runs as real processes on a fresh PostgreSQL database each: one catalog (submit resolves
the model and dataset through it, and it checks API keys), ONE jobs service and ONE gateway, with the service
token, agent join token and a bootstrap admin key as a deployment has them, and events on the given NATS.

In this process:

- `agents` simulated trainer agents, each speaking the real agent protocol on its own channel: JoinAgent with
  the join token, RegisterAgent with its resources, heartbeats, its assignment from StreamAssignments, and its
  reports on the ReportJob stream through the trainer's own `Reporter` (numbered and acknowledged). Each runs one
  submitted job: RUNNING, then `rate` metric reports per second (step 1, 2, ..., each with the values in
  `names`) for `seconds`, then SUCCEEDED.
- `sse_watchers` watchers of the gateway's `GET /api/v1/jobs/{id}/events` and `grpc_watchers` of the jobs
  service's `WatchJob`, spread round-robin over the jobs, each opened before its job's first report. Each
  checks that it gets every step of every metric of its job exactly once, in order, and that its stream ends
  when the job succeeds.
- The latency of a point is (when a watcher read it) - (when its agent queued it for sending), both on this
  process's monotonic clock.
- Every `sample_s` the RSS and CPU of the jobs and gateway processes are sampled (psutil). "Memory flat" compares
  the mean RSS of the last third of the samples after warm-up with the first third.

    python -m tests.reliability.load --agents 50 --rate 10 --sse-watchers 50 --grpc-watchers 50 \\
        --seconds 600 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
import psutil

from tests.helpers import chat_jsonl, write_fake_model_dir
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_cli.embedded import free_port, tcp_open, wait_for
from tuneforge_common.auth import call_credentials, credentials_metadata, new_key
from tuneforge_common.db import create_postgres_database, drop_postgres_databases
from tuneforge_trainer.agent import Reporter

PG_ADMIN_URL = os.environ.get("TUNEFORGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("TUNEFORGE_TEST_NATS_URL", "nats://127.0.0.1:4222")
NAMES = ("loss", "learning_rate", "grad_norm")
MODEL_ID = "tiny-load"
# Log lines of the services that count as errors: structured ERROR/CRITICAL records and bare tracebacks.
ERROR_MARKS = ('"level": "ERROR"', '"level": "CRITICAL"', "Traceback (most recent call last)")
MAX_ERROR_MESSAGES = 20


@dataclass(frozen=True)
class LoadConfig:
    agents: int = 10
    rate: float = 10.0
    sse_watchers: int = 10
    grpc_watchers: int = 10
    seconds: float = 20.0
    names: tuple[str, ...] = NAMES
    sample_s: float = 2.0
    # Samples taken before this are left out of "memory flat": imports, pools and caches filling up.
    warmup_s: float = 10.0

    @property
    def steps(self) -> int:
        return max(1, round(self.seconds * self.rate))


class Errors:
    """Every failure seen, counted, with the first messages kept for the report."""

    def __init__(self) -> None:
        self.count = 0
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.messages) < MAX_ERROR_MESSAGES:
            self.messages.append(message)


@dataclass
class Watcher:
    kind: str  # "sse" or "grpc"
    index: int
    job_id: str
    # Per metric name, the steps received, in the order received.
    steps: dict[str, list[int]] = field(default_factory=dict)
    ended: bool = False

    def check(self, names: tuple[str, ...], steps: int) -> list[str]:
        """What this watcher got wrong: a missing, repeated or out-of-order step, or a stream that never ended."""
        problems = []
        want = list(range(1, steps + 1))
        for name in names:
            got = self.steps.get(name, [])
            if got != want:
                missing = len(set(want) - set(got))
                dupes = len(got) - len(set(got))
                ordered = all(a < b for a, b in zip(got, got[1:], strict=False))
                problems.append(
                    f"{self.kind} watcher {self.index} of job {self.job_id}, {name}: {len(got)} of {steps} steps "
                    f"({missing} missing, {dupes} repeated, {'in' if ordered else 'out of'} order)"
                )
        if not self.ended:
            problems.append(f"{self.kind} watcher {self.index} of job {self.job_id}: stream did not end")
        return problems


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: float
    cpu_percent: float


@dataclass
class LoadResult:
    config: dict[str, Any]
    errors: int
    error_messages: list[str]
    seconds: float
    points_sent: int
    points_delivered: dict[str, int]
    points_expected: dict[str, int]
    incomplete_watchers: int
    latency_s: dict[str, dict[str, float]]
    steady_latency_s: dict[str, dict[str, float]]
    ack_latency_s: dict[str, float]
    generator_loop_lag_s: dict[str, float]
    throughput: dict[str, float]
    processes: dict[str, dict[str, float]]
    samples: dict[str, list[dict[str, float]]]

    def summary(self) -> str:
        lines = [
            f"load: {self.config['agents']} agents x {self.config['rate']:g} reports/s of {len(self.config['names'])} "
            f"values, {self.config['sse_watchers']} SSE + {self.config['grpc_watchers']} gRPC watchers, "
            f"{self.config['seconds']:g} s (ran {self.seconds:.1f} s)",
            f"errors: {self.errors}" + "".join(f"\n  {m}" for m in self.error_messages),
            f"points sent: {self.points_sent} ({self.throughput['sent_points_per_s']:.0f}/s)",
        ]
        for kind, delivered in self.points_delivered.items():
            lat = self.latency_s.get(kind, {})
            lines.append(
                f"{kind}: {delivered} of {self.points_expected[kind]} points delivered "
                f"({self.throughput[f'{kind}_points_per_s']:.0f}/s); latency p50 {lat.get('p50', 0) * 1000:.0f} ms, "
                f"p95 {lat.get('p95', 0) * 1000:.0f} ms, p99 {lat.get('p99', 0) * 1000:.0f} ms, "
                f"max {lat.get('max', 0) * 1000:.0f} ms"
            )
            steady = self.steady_latency_s.get(kind, {})
            lines.append(
                f"  after the {self.config['warmup_s']:g} s warm-up: p50 {steady.get('p50', 0) * 1000:.0f} ms, "
                f"p95 {steady.get('p95', 0) * 1000:.0f} ms, p99 {steady.get('p99', 0) * 1000:.0f} ms, "
                f"max {steady.get('max', 0) * 1000:.0f} ms"
            )
        ack = self.ack_latency_s
        lines.append(
            f"report to ack: p50 {ack.get('p50', 0) * 1000:.0f} ms, p95 {ack.get('p95', 0) * 1000:.0f} ms, "
            f"max {ack.get('max', 0) * 1000:.0f} ms"
        )
        lines.append(f"incomplete watchers: {self.incomplete_watchers}")
        lag = self.generator_loop_lag_s
        lines.append(
            f"generator event-loop lag: p50 {lag.get('p50', 0) * 1000:.0f} ms, p99 {lag.get('p99', 0) * 1000:.0f} ms, "
            f"max {lag.get('max', 0) * 1000:.0f} ms"
        )
        for name, p in self.processes.items():
            lines.append(
                f"{name}: RSS start {p['rss_start_mb']:.1f} MB, end {p['rss_end_mb']:.1f} MB, "
                f"max {p['rss_max_mb']:.1f} MB, "
                f"growth after warm-up {p['rss_growth_mb']:+.1f} MB ({p['rss_growth_mb_per_min']:+.2f} MB/min); "
                f"CPU mean {p['cpu_mean_percent']:.0f}%, max {p['cpu_max_percent']:.0f}%, "
                f"{p['cpu_ms_per_report']:.2f} ms per report"
            )
        return "\n".join(lines)


def percentiles(values: array) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1], "mean": statistics.fmean(ordered)}


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def memory_growth(samples: list[Sample], warmup_s: float) -> tuple[float, float]:
    """(MB, MB/min): the mean RSS of the last third of the samples after warm-up minus that of the first third."""
    kept = [s for s in samples if s.t >= warmup_s] or samples
    third = max(1, len(kept) // 3)
    first, last = kept[:third], kept[-third:]
    growth = statistics.fmean(s.rss_mb for s in last) - statistics.fmean(s.rss_mb for s in first)
    minutes = (statistics.fmean(s.t for s in last) - statistics.fmean(s.t for s in first)) / 60
    return growth, (growth / minutes if minutes > 0 else 0.0)


# -- the system under test ---------------------------------------------------------------------------------------


@dataclass
class System:
    root: Path
    nats_url: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    databases: list[str] = field(default_factory=list)
    service_token: str = field(default_factory=lambda: secrets.token_hex(32))
    join_token: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_key: str = field(default_factory=lambda: new_key()[1])
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def jobs_address(self) -> str:
        return f"127.0.0.1:{self.ports['jobs']}"

    @property
    def catalog_address(self) -> str:
        return f"127.0.0.1:{self.ports['catalog']}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def stream(self) -> str:
        return f"TUNEFORGE_LOAD_{self.suffix}"

    async def _database(self) -> str:
        url = await create_postgres_database(PG_ADMIN_URL, f"tuneforge_load_{self.suffix}")
        self.databases.append(url)
        return url

    def _spawn(self, name: str, env: dict[str, str]) -> subprocess.Popen:
        self.logs[name] = self.root / f"{name}.log"
        with self.logs[name].open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"tuneforge_{name}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    async def start(self) -> None:
        model_dir = write_fake_model_dir(self.root / "models" / MODEL_ID)
        self.ports.update(catalog=free_port(), jobs=free_port(), gateway=free_port())
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TUNEFORGE_SERVICE_TOKEN": self.service_token,
            "TUNEFORGE_AGENT_JOIN_TOKENS": self.join_token,
            "TUNEFORGE_BOOTSTRAP_ADMIN_KEY": self.admin_key,
            "TUNEFORGE_NATS_URL": self.nats_url,
            "TUNEFORGE_EVENTS_STREAM": self.stream,
            "TUNEFORGE_EVENTS_SUBJECT_ROOT": f"tfload{self.suffix}",
            "TUNEFORGE_ARTIFACT_ROOT": str(self.root / "artifacts"),
            "TUNEFORGE_CATALOG_DATABASE_URL": await self._database(),
            "TUNEFORGE_JOBS_DATABASE_URL": await self._database(),
            "TUNEFORGE_CATALOG_GRPC_PORT": str(self.ports["catalog"]),
            "TUNEFORGE_JOBS_GRPC_PORT": str(self.ports["jobs"]),
            "TUNEFORGE_GATEWAY_PORT": str(self.ports["gateway"]),
            "TUNEFORGE_CATALOG_ADDRESS": self.catalog_address,
            "TUNEFORGE_JOBS_ADDRESS": self.jobs_address,
            "TUNEFORGE_CATALOG_SEED_MODELS": str(model_dir),
            "TUNEFORGE_GATEWAY_UPLOAD_DIR": str(self.root / "uploads"),
        }
        catalog = self._spawn("catalog", env)
        await asyncio.to_thread(wait_for, lambda: tcp_open(self.ports["catalog"]), "catalog", 60, [catalog])
        jobs = self._spawn("jobs", env)
        await asyncio.to_thread(wait_for, lambda: tcp_open(self.ports["jobs"]), "jobs", 60, [jobs])
        gateway = self._spawn("gateway", env)
        await asyncio.to_thread(wait_for, self._gateway_healthy, "gateway /healthz", 60, [gateway, catalog, jobs])

    def _gateway_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.gateway_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_errors(self) -> list[str]:
        """The services' log lines that record an error or a traceback, each prefixed with its service."""
        found = []
        for name, path in self.logs.items():
            if path.exists():
                for line in path.read_text(errors="replace").splitlines():
                    if any(mark in line for mark in ERROR_MARKS):
                        found.append(f"{name} log: {line[:300]}")
        return found

    async def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await asyncio.to_thread(proc.wait)
        await drop_postgres_databases(PG_ADMIN_URL, self.databases)
        with contextlib.suppress(Exception):
            nc = await nats.connect(self.nats_url)
            try:
                await nc.jetstream().delete_stream(self.stream)
            finally:
                await nc.close()


@contextlib.asynccontextmanager
async def running_system(nats_url: str, keep_dir: Path | None = None) -> AsyncIterator[System]:
    root = Path(tempfile.mkdtemp(prefix="tuneforge-load-"))
    system = System(root, nats_url)
    try:
        await system.start()
        yield system
    finally:
        await system.stop()
        await asyncio.to_thread(_keep_logs_and_clean, system, keep_dir)


def _keep_logs_and_clean(system: System, keep_dir: Path | None) -> None:
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        for path in system.logs.values():
            if path.exists():
                shutil.copy(path, keep_dir / path.name)
    shutil.rmtree(system.root, ignore_errors=True)


# -- the load ----------------------------------------------------------------------------------------------------


class Load:
    def __init__(self, config: LoadConfig, system: System) -> None:
        self.config = config
        self.system = system
        self.errors = Errors()
        # When each point's report was queued by its agent: (job id, step) -> monotonic seconds.
        self.sent_at: dict[tuple[str, int], float] = {}
        self.latencies: dict[str, array] = {"sse": array("d"), "grpc": array("d")}
        # The same for points sent after the warm-up: the steady state, without 50 agents joining, registering
        # and being assigned at once, and every stream's first catch-up.
        self.steady_latencies: dict[str, array] = {"sse": array("d"), "grpc": array("d")}
        self.watchers: list[Watcher] = []
        self.samples: dict[str, list[Sample]] = {"jobs": [], "gateway": [], "generator": []}
        # How late this process's event loop ran a 0.1 s sleep (s): its own lag adds to every latency measured.
        self.loop_lag: array = array("d")
        # Queued by the agent -> acknowledged by the jobs service (stored), for the last step of each ack.
        self.ack_latencies: array = array("d")
        self.points_sent = 0
        self.reports_sent = 0
        # CPU seconds each process had used when the load started, and has used since (at the last sample).
        self.cpu_start: dict[str, float] = {}
        self.cpu_used: dict[str, float] = {}
        self.started = 0.0
        self.admin_metadata = credentials_metadata(self.system.admin_key)

    # The user's side: a dataset and the jobs, through the catalog and the jobs service with the admin key.
    async def submit_jobs(self) -> list[str]:
        async with grpc.aio.insecure_channel(self.system.catalog_address) as channel:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)

            async def upload() -> AsyncIterator[cpb.UploadDatasetRequest]:
                yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name="load"))
                yield cpb.UploadDatasetRequest(chunk=chat_jsonl(8))

            dataset = (await catalog.UploadDataset(upload(), timeout=30, metadata=self.admin_metadata)).dataset
            if dataset.status != common_pb2.DATASET_STATUS_READY:
                raise RuntimeError(f"the load's dataset is {common_pb2.DatasetStatus.Name(dataset.status)}")
        async with grpc.aio.insecure_channel(self.system.jobs_address) as channel:
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            ids = []
            for i in range(self.config.agents):
                request = jpb.SubmitJobRequest(
                    model_id=MODEL_ID, dataset_id=dataset.id, method_id="sft-lora", name=f"load-{i}"
                )
                ids.append((await jobs.SubmitJob(request, timeout=30, metadata=self.admin_metadata)).job.id)
            return ids

    async def agent(self, index: int, go: asyncio.Event) -> None:
        """One trainer node: join, register, heartbeat, take one assignment and report it to the end."""
        credential = ""
        interceptors = call_credentials(lambda: credentials_metadata(credential))
        async with grpc.aio.insecure_channel(self.system.jobs_address, interceptors=interceptors) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            name = f"load-agent-{index}"
            joined = await stub.JoinAgent(
                apb.JoinAgentRequest(join_token=self.system.join_token, name=name), timeout=30
            )
            credential = joined.credential
            resources = apb.AgentResources(cpu_count=2, memory_bytes=8 << 30, slots=1)
            registered = await stub.RegisterAgent(apb.RegisterAgentRequest(name=name, resources=resources), timeout=30)
            agent_id = registered.agent_id
            interval = registered.heartbeat_interval_seconds or 3
            running: list[str] = []

            async def heartbeats() -> None:
                while True:
                    resp = await stub.Heartbeat(
                        apb.HeartbeatRequest(agent_id=agent_id, running_job_ids=running), timeout=30
                    )
                    if resp.cancel_job_ids:
                        self.errors.add(f"agent {index}: told to cancel {list(resp.cancel_job_ids)}")
                    await asyncio.sleep(interval)

            assignments: asyncio.Queue[apb.JobAssignment] = asyncio.Queue()

            async def stream_assignments() -> None:
                async for msg in stub.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=agent_id)):
                    if msg.WhichOneof("work") == "assignment":
                        assignments.put_nowait(msg.assignment)
                    else:
                        self.errors.add(f"agent {index}: unexpected cancellation {msg.cancellation}")

            def stopped(job_id: str, attempt: int, reason: str) -> None:
                self.errors.add(f"agent {index}: job {job_id} attempt {attempt} fenced: {reason}")

            reporter = Reporter(agent_id=agent_id, on_stop=stopped)
            acknowledge = reporter.ack

            def timed_ack(job_id: str, attempt: int, acked_seq: int) -> None:
                # Report seq n is step n-1 (seq 1 is RUNNING): the time from queueing the step to its ack.
                sent = self.sent_at.get((job_id, acked_seq - 1))
                if sent is not None:
                    self.ack_latencies.append(time.monotonic() - sent)
                acknowledge(job_id, attempt, acked_seq)

            reporter.ack = timed_ack  # type: ignore[method-assign]
            background = [
                asyncio.create_task(heartbeats()),
                asyncio.create_task(stream_assignments()),
                asyncio.create_task(reporter.run_stream(stub)),
            ]
            try:
                assignment = await asyncio.wait_for(assignments.get(), 60)
                job_id, attempt = assignment.job_id, assignment.attempt
                running.append(job_id)
                reporter.add(job_id, attempt, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING))
                await go.wait()
                await self._report_metrics(reporter, job_id, attempt, background, index)
                reporter.add(job_id, attempt, state=apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED))
                await self._drain(reporter, background)
            finally:
                for task in background:
                    task.cancel()
                for outcome in await asyncio.gather(*background, return_exceptions=True):
                    if isinstance(outcome, Exception) and not isinstance(outcome, asyncio.CancelledError):
                        self.errors.add(f"agent {index}: {type(outcome).__name__}: {outcome}")

    async def _report_metrics(
        self, reporter: Reporter, job_id: str, attempt: int, background: list[asyncio.Task], index: int
    ) -> None:
        """`rate` reports a second on a fixed schedule (each agent offset by its index, so they interleave)."""
        period = 1 / self.config.rate
        first = self.started + (index / max(1, self.config.agents)) * period
        for step in range(1, self.config.steps + 1):
            delay = first + (step - 1) * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for task in background:
                if task.done():
                    raise RuntimeError(f"agent {index}: a stream ended early: {task}")
            values = {name: 1.0 / step + i for i, name in enumerate(self.config.names)}
            self.sent_at[(job_id, step)] = time.monotonic()
            reporter.add(
                job_id,
                attempt,
                metric=apb.MetricReport(
                    step=step,
                    values=values,
                    total_steps=self.config.steps,
                    progress_percent=100.0 * step / self.config.steps,
                ),
            )
            self.points_sent += len(values)
            self.reports_sent += 1

    async def _drain(self, reporter: Reporter, background: list[asyncio.Task], limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while reporter.pending:  # noqa: ASYNC110 - the Reporter has no hook for "all acknowledged"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(reporter.pending)} reports unacknowledged after {limit_s:.0f} s")
            for task in background:
                if task.done():
                    raise RuntimeError(f"a stream ended before every report was acknowledged: {task}")
            await asyncio.sleep(0.05)

    def _received(self, watcher: Watcher, name: str, step: int) -> None:
        now = time.monotonic()
        watcher.steps.setdefault(name, []).append(step)
        sent = self.sent_at.get((watcher.job_id, step))
        if sent is None:
            self.errors.add(f"{watcher.kind} watcher {watcher.index}: step {step} of {name} was never sent")
        else:
            self.latencies[watcher.kind].append(now - sent)
            if sent - self.started >= self.config.warmup_s:
                self.steady_latencies[watcher.kind].append(now - sent)

    async def grpc_watcher(self, watcher: Watcher, opened: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.system.jobs_address) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            # Batched, as a client following many points a second (the gateway's hub) asks for it.
            request = jpb.WatchJobRequest(job_id=watcher.job_id, batched=True)
            call = stub.WatchJob(request, metadata=self.admin_metadata)
            await call.wait_for_connection()
            opened.set()
            async for message in call:
                updates = message.batch.updates if message.WhichOneof("update") == "batch" else [message]
                for resp in updates:
                    if resp.WhichOneof("update") == "metric":
                        self._received(watcher, resp.metric.name, resp.metric.step)
            watcher.ended = True

    async def sse_watcher(self, client: httpx.AsyncClient, watcher: Watcher, opened: asyncio.Event) -> None:
        url = f"/api/v1/jobs/{watcher.job_id}/events"
        async with client.stream("GET", url, headers={"Authorization": f"Bearer {self.system.admin_key}"}) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"GET {url}: {resp.status_code} {(await resp.aread())[:200]!r}")
            opened.set()
            event = ""
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "metric":
                    point = json.loads(line[6:])
                    self._received(watcher, point["name"], int(point["step"]))
                elif line.startswith("data: ") and event == "error":
                    raise RuntimeError(f"error event: {line[6:]}")
            watcher.ended = True

    async def watch(self, coro: Any, watcher: Watcher) -> None:
        try:
            await coro
        except Exception as exc:
            self.errors.add(f"{watcher.kind} watcher {watcher.index} of job {watcher.job_id}: {exc!r}"[:500])

    async def sample(self) -> None:
        procs = {name: psutil.Process(self.system.procs[name].pid) for name in ("jobs", "gateway")}
        procs["generator"] = psutil.Process()  # this process: its agents and watchers must keep up too
        for name, proc in procs.items():
            proc.cpu_percent()  # the first call starts the interval
            self.cpu_start[name] = _cpu_seconds(proc)
        while True:
            await asyncio.sleep(self.config.sample_s)
            t = time.monotonic() - self.started
            for name, proc in procs.items():
                self.samples[name].append(Sample(t, proc.memory_info().rss / 2**20, proc.cpu_percent()))
                self.cpu_used[name] = _cpu_seconds(proc) - self.cpu_start[name]

    def watcher_kinds(self) -> list[str]:
        """The kinds alternating while both last (s, g, s, g, ...; then g, s, ... on the next round over the
        jobs), so with as many of each as an even number of jobs, every job has one watcher of each kind."""
        sse, grpc_ = self.config.sse_watchers, self.config.grpc_watchers
        kinds = []
        for _ in range(sse + grpc_):
            place, round_ = len(kinds) % max(1, self.config.agents), len(kinds) // max(1, self.config.agents)
            turn = "sse" if place % 2 == round_ % 2 else "grpc"
            if (turn == "sse" and sse) or not grpc_:
                kinds.append("sse")
                sse -= 1
            else:
                kinds.append("grpc")
                grpc_ -= 1
        return kinds

    async def watch_loop_lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            self.loop_lag.append(time.monotonic() - before - 0.1)

    async def run(self) -> LoadResult:
        cfg = self.config
        job_ids = await self.submit_jobs()
        self.watchers = [Watcher(kind, n, job_ids[n % len(job_ids)]) for n, kind in enumerate(self.watcher_kinds())]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(
            base_url=self.system.gateway_url, timeout=httpx.Timeout(30, read=None), limits=limits
        ) as client:
            opened = [asyncio.Event() for _ in self.watchers]
            watching = [
                asyncio.create_task(
                    self.watch(self.sse_watcher(client, w, ev) if w.kind == "sse" else self.grpc_watcher(w, ev), w)
                )
                for w, ev in zip(self.watchers, opened, strict=True)
            ]
            go = asyncio.Event()
            agents = [asyncio.create_task(self.agent(i, go)) for i in range(cfg.agents)]
            # Every watcher's stream is open before the first metric report, so each must see every step.
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in opened)), 120)
            self.started = time.monotonic()
            sampler = asyncio.create_task(self.sample())
            lag = asyncio.create_task(self.watch_loop_lag())
            go.set()
            for i, outcome in enumerate(await asyncio.gather(*agents, return_exceptions=True)):
                if isinstance(outcome, BaseException):
                    self.errors.add(f"agent {i}: {type(outcome).__name__}: {outcome}"[:500])
            # The watchers' streams end once their job is SUCCEEDED; give the last points time to arrive.
            _, late = await asyncio.wait(watching, timeout=60)
            for task in late:
                task.cancel()
            elapsed = time.monotonic() - self.started
            sampler.cancel()
            lag.cancel()
            await asyncio.gather(sampler, lag, *late, return_exceptions=True)
        return self.result(elapsed)

    def result(self, elapsed: float) -> LoadResult:
        cfg = self.config
        incomplete = 0
        for watcher in self.watchers:
            problems = watcher.check(cfg.names, cfg.steps)
            incomplete += bool(problems)
            for problem in problems:
                self.errors.add(problem)
        for line in self.system.log_errors():
            self.errors.add(line)
        per_watcher = cfg.steps * len(cfg.names)
        delivered = {
            kind: sum(sum(map(len, w.steps.values())) for w in self.watchers if w.kind == kind)
            for kind in ("sse", "grpc")
        }
        expected = {"sse": cfg.sse_watchers * per_watcher, "grpc": cfg.grpc_watchers * per_watcher}
        processes = {}
        for name, samples in self.samples.items():
            if not samples:
                continue
            growth, per_min = memory_growth(samples, cfg.warmup_s)
            processes[name] = {
                "rss_start_mb": samples[0].rss_mb,
                "rss_end_mb": samples[-1].rss_mb,
                "rss_max_mb": max(s.rss_mb for s in samples),
                "rss_growth_mb": growth,
                "rss_growth_mb_per_min": per_min,
                "cpu_mean_percent": statistics.fmean(s.cpu_percent for s in samples),
                "cpu_max_percent": max(s.cpu_percent for s in samples),
                # CPU time per metric report: what the load costs the process, however busy the machine is.
                "cpu_ms_per_report": 1000 * self.cpu_used.get(name, 0.0) / max(1, self.reports_sent),
            }
        config = asdict(cfg) | {"steps": cfg.steps}
        return LoadResult(
            config=config,
            errors=self.errors.count,
            error_messages=self.errors.messages,
            seconds=elapsed,
            points_sent=self.points_sent,
            points_delivered=delivered,
            points_expected=expected,
            incomplete_watchers=incomplete,
            latency_s={kind: percentiles(values) for kind, values in self.latencies.items()},
            steady_latency_s={kind: percentiles(values) for kind, values in self.steady_latencies.items()},
            ack_latency_s=percentiles(self.ack_latencies),
            generator_loop_lag_s=percentiles(self.loop_lag),
            throughput={
                "sent_points_per_s": self.points_sent / elapsed,
                **{f"{kind}_points_per_s": n / elapsed for kind, n in delivered.items()},
            },
            processes=processes,
            samples={name: [asdict(s) for s in samples] for name, samples in self.samples.items()},
        )


async def run_load(config: LoadConfig, nats_url: str = NATS_URL, keep_logs: Path | None = None) -> LoadResult:
    async with running_system(nats_url, keep_logs) as system:
        return await Load(config, system).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0, help="metric reports per second per agent")
    parser.add_argument("--sse-watchers", type=int, default=50)
    parser.add_argument("--grpc-watchers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--names", default=",".join(NAMES), help="metric names in each report, comma-separated")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between RSS/CPU samples")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="samples before this are left out of growth")
    parser.add_argument("--nats-url", default=NATS_URL)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--logs", type=Path, help="copy the services' logs here")
    args = parser.parse_args()
    config = LoadConfig(
        agents=args.agents,
        rate=args.rate,
        sse_watchers=args.sse_watchers,
        grpc_watchers=args.grpc_watchers,
        seconds=args.seconds,
        names=tuple(n for n in args.names.split(",") if n),
        sample_s=args.sample_s,
        warmup_s=args.warmup_s,
    )
    result = asyncio.run(run_load(config, args.nats_url, args.logs))
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    sys.exit(1 if result.errors else 0)


if __name__ == "__main__":
    main()
