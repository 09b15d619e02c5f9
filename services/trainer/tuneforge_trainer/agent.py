"""The trainer agent: dials the jobs service, pulls assignments, runs each job as a child process.

Reports (state, metric points, log lines) carry per-(job, attempt) sequence numbers and stay
queued until the jobs service acknowledges them, so a dropped connection loses nothing and a
resend stores nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import grpc
from google.protobuf import json_format
from pydantic import Field

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.artifacts import ArtifactStore
from tuneforge_common.config import CommonSettings
from tuneforge_common.grpcutil import serve_metrics, start_server
from tuneforge_common.logs import setup_logging
from tuneforge_common.params import protected_env_problem, to_env
from tuneforge_common.runtime import wait_for_shutdown_signal

from .sdk import parse_log_data

log = logging.getLogger("tuneforge.agent")
LINE_LIMIT = 1024 * 1024
KEEP_STDERR_LINES = 20


class AgentSettings(CommonSettings):
    jobs_address: str = Field("127.0.0.1:50052", description="host:port of the jobs service.")
    agent_name: str = Field(default_factory=socket.gethostname, description="Name shown for this agent.")
    agent_slots: int = Field(1, description="Jobs this agent runs at once.")
    agent_work_dir: str = Field(".tuneforge/agent", description="Local scratch space for running jobs.")
    agent_python: str = Field(sys.executable, description="Python interpreter that runs built-in methods.")
    agent_grpc_port: int = Field(0, description="Port of the agent's health endpoint; 0 picks a free one.")
    agent_terminate_grace_seconds: float = Field(10.0, description="SIGTERM to SIGKILL grace on terminate.")


@dataclass
class _Pending:
    request: apb.ReportJobRequest

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.request.job_id, self.request.attempt, self.request.seq)


@dataclass
class Reporter:
    """Numbered, acknowledged reports over one bidi stream that survives reconnects."""

    agent_id: str = ""
    pending: list[_Pending] = field(default_factory=list)
    seqs: dict[tuple[str, int], int] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, job_id: str, attempt: int, **report: Any) -> None:
        key = (job_id, attempt)
        self.seqs[key] = self.seqs.get(key, 0) + 1
        req = apb.ReportJobRequest(
            agent_id=self.agent_id, job_id=job_id, attempt=attempt, seq=self.seqs[key], time_unix=time.time(), **report
        )
        self.pending.append(_Pending(req))
        self.wake.set()

    def ack(self, job_id: str, attempt: int, acked_seq: int) -> None:
        self.pending = [
            p
            for p in self.pending
            if not (p.request.job_id == job_id and p.request.attempt == attempt and p.request.seq <= acked_seq)
        ]

    def unacked(self, job_id: str) -> int:
        return sum(1 for p in self.pending if p.request.job_id == job_id)

    async def run_stream(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        call = stub.ReportJob()
        sent: set[tuple[str, int, int]] = set()

        async def writer() -> None:
            while True:
                self.wake.clear()
                for item in list(self.pending):
                    if item.key not in sent:
                        item.request.agent_id = self.agent_id
                        await call.write(item.request)
                        sent.add(item.key)
                await self.wake.wait()

        async def reader() -> None:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ConnectionError("report stream closed by the jobs service")
                self.ack(resp.job_id, resp.attempt, resp.acked_seq)

        tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            call.cancel()


def _flag_value(value: Any) -> Any:
    # protobuf Struct turns every number into a double; an integral one goes back as an int.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def runner_env(
    base: Mapping[str, str], params: dict[str, Any], own: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The runner's environment, and the parameter variables left out of it.

    The agent's environment, then each parameter as its variable (LORA_RANK=8), then the agent's own
    variables for the job (MODEL_PATH, OUTPUT_DIR, TUNEFORGE_JOB_ID, ...), which always win. A parameter
    never sets a protected variable (PATH, LD_*, PYTHON*, HF_*, CUDA_*, ...: params.protected_env_problem)
    nor one of the agent's own; the catalog refuses such names in added methods, this holds even if one
    got stored. A left-out parameter still reaches the runner as its --flag.
    """
    from_params = to_env({k: _flag_value(v) for k, v in params.items()})
    skipped = sorted(k for k in from_params if k in own or protected_env_problem(k))
    kept = {k: v for k, v in from_params.items() if k not in skipped}
    return {**base, **kept, **own}, skipped


def build_command(
    python: str,
    entrypoint: str,
    params: dict[str, Any],
    model_path: str,
    dataset_path: str,
    output_dir: str,
    resume_from: str,
) -> list[str]:
    """DeepExtension's runner contract: every hyperparameter as --key=value, booleans as true/false."""
    values = {
        **{k: _flag_value(v) for k, v in params.items()},
        "model_path": model_path,
        "dataset_path": dataset_path,
        "output_dir": output_dir,
        "resume_from_checkpoint": resume_from,
    }
    target = [entrypoint] if entrypoint.endswith(".py") else ["-m", entrypoint]
    flags = [f"--{k}={'true' if v is True else 'false' if v is False else v}" for k, v in values.items()]
    return [python, *target, *flags]


def metric_report(parsed: dict[str, Any]) -> apb.MetricReport | None:
    details = parsed.get("details") or {}
    if not isinstance(details, dict):
        return None
    values = {
        k: float(v)
        for k, v in details.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    try:
        step = int(details.get("step", 0))
        progress = float(parsed.get("progress", 0.0))
        total = int(details.get("total_steps", 0))
    except (TypeError, ValueError):
        return None
    values.pop("total_steps", None)
    return apb.MetricReport(step=step, values=values, progress_percent=progress, total_steps=total)


class JobRun:
    """One attempt of one job on this agent."""

    def __init__(self, agent: Agent, assignment: apb.JobAssignment) -> None:
        self.agent = agent
        self.a = assignment
        self.proc: asyncio.subprocess.Process | None = None
        self.cancelled = False
        self.shutting_down = False
        self.workdir = (
            Path(agent.settings.agent_work_dir).resolve() / assignment.job_id / f"attempt-{assignment.attempt}"
        )

    def report(self, **report: Any) -> None:
        self.agent.reporter.add(self.a.job_id, self.a.attempt, **report)

    def log_line(self, stream: str, text: str) -> None:
        self.report(log=apb.LogReport(stream=stream, text=text))

    def _stage_inputs(self) -> tuple[str, str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        model_path = self.a.model_uri
        if "://" in model_path and not model_path.startswith("file://"):
            local = self.workdir / "model"
            fs, path = fsspec.core.url_to_fs(model_path)
            fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
            model_path = str(local)
        dataset_path = str(self.workdir / "dataset.jsonl")
        fs, path = fsspec.core.url_to_fs(self.a.dataset_uri)
        fs.get_file(path, dataset_path)
        return model_path, dataset_path

    async def run(self) -> None:
        try:
            self.log_line("agent", f"attempt {self.a.attempt} starting on agent {self.agent.settings.agent_name}")
            model_path, dataset_path = await asyncio.to_thread(self._stage_inputs)
            output_dir = self.workdir / "output"
            params = json_format.MessageToDict(self.a.parameters)
            cmd = build_command(
                self.agent.settings.agent_python,
                self.a.entrypoint,
                params,
                model_path,
                dataset_path,
                str(output_dir),
                self.a.resume_from_uri,
            )
            own = {
                "MODEL_PATH": model_path,
                "DATASET_PATH": dataset_path,
                "OUTPUT_DIR": str(output_dir),
                "RESUME_FROM_CHECKPOINT": self.a.resume_from_uri,
                "TUNEFORGE_JOB_ID": self.a.job_id,
                "TUNEFORGE_ATTEMPT": str(self.a.attempt),
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
            }
            env, skipped = runner_env(os.environ, params, own)
            if skipped:
                self.log_line("agent", f"not set from parameters (protected variables): {', '.join(skipped)}")
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(self.workdir),
                start_new_session=True,
                limit=LINE_LIMIT,
            )
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING, reason=f"pid {self.proc.pid}"))
            stderr_tail: list[str] = []
            await asyncio.gather(
                self._pump(self.proc.stdout, "stdout", None), self._pump(self.proc.stderr, "stderr", stderr_tail)
            )
            code = await self.proc.wait()
            if self.shutting_down:
                # The agent is stopping, not the job: its lease lapses and the job is retried elsewhere.
                return
            if self.cancelled:
                self.report(state=apb.StateReport(state=apb.REPORTED_STATE_CANCELLED, reason="terminated"))
            elif code == 0:
                store = ArtifactStore(self.agent.settings.artifact_root)
                await asyncio.to_thread(store.put_dir, str(output_dir), self.a.output_uri)
                self.log_line("agent", f"output stored at {self.a.output_uri}")
                self.report(
                    state=apb.StateReport(
                        state=apb.REPORTED_STATE_SUCCEEDED, reason="completed", output_uri=self.a.output_uri
                    )
                )
            else:
                last = stderr_tail[-1] if stderr_tail else "no error output"
                self.report(
                    state=apb.StateReport(
                        state=apb.REPORTED_STATE_FAILED, reason=f"training process exited with code {code}: {last}"
                    )
                )
        except Exception as exc:  # staging or upload failed: the job fails with the reason, the agent lives on
            log.exception("job %s failed on the agent", self.a.job_id)
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_FAILED, reason=f"agent error: {exc}"))
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.workdir / "model", ignore_errors=True)

    async def _pump(self, stream: asyncio.StreamReader | None, name: str, tail: list[str] | None) -> None:
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: skip the rest of it
                raw = await stream.read(LINE_LIMIT)
            if not raw:
                return
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            parsed = parse_log_data(text)
            metric = metric_report(parsed) if parsed is not None else None
            if metric is not None:
                self.report(metric=metric)
                continue
            self.log_line(name, text)
            if tail is not None and text.strip():
                tail.append(text.strip())
                del tail[:-KEEP_STDERR_LINES]

    async def terminate(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period."""
        self.cancelled = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.agent.settings.agent_terminate_grace_seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def detect_gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.reporter = Reporter()
        self.runs: dict[str, JobRun] = {}
        self.tasks: set[asyncio.Task] = set()
        self.agent_id = ""

    def resources(self) -> apb.AgentResources:
        gpus = detect_gpus()
        return apb.AgentResources(
            gpu_count=len(gpus),
            gpu_models=gpus,
            cpu_count=os.cpu_count() or 1,
            memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            slots=self.settings.agent_slots,
        )

    async def run_forever(self) -> None:
        backoff = 0.5
        async with grpc.aio.insecure_channel(self.settings.jobs_address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            while True:
                try:
                    await self._session(stub)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    delay = backoff * (0.5 + random.random())  # jitter so many agents don't reconnect in step
                    log.warning("connection to jobs service lost (%s); reconnecting in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, 15.0)
                else:
                    backoff = 0.5

    async def _session(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        resp = await stub.RegisterAgent(
            apb.RegisterAgentRequest(
                name=self.settings.agent_name, resources=self.resources(), resume_agent_id=self.agent_id
            ),
            timeout=10,
        )
        if self.agent_id and not resp.resumed and self.runs:
            # Our lease lapsed while we were away: the service has requeued these jobs, so stop our copies.
            log.warning("lease lost; stopping %d job(s) the service has requeued", len(self.runs))
            await self.shutdown()
        self.agent_id = self.reporter.agent_id = resp.agent_id
        log.info("registered as %s (resumed=%s)", self.agent_id, resp.resumed)
        tasks = [
            asyncio.create_task(self._heartbeats(stub, resp.heartbeat_interval_seconds or 3)),
            asyncio.create_task(self._assignments(stub)),
            asyncio.create_task(self.reporter.run_stream(stub)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _heartbeats(self, stub: agent_pb2_grpc.AgentServiceStub, interval: float) -> None:
        while True:
            resp = await stub.Heartbeat(
                apb.HeartbeatRequest(agent_id=self.agent_id, running_job_ids=list(self.runs)), timeout=10
            )
            for job_id in resp.cancel_job_ids:
                self._cancel(job_id)
            await asyncio.sleep(interval)

    async def _assignments(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        async for msg in stub.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=self.agent_id)):
            if msg.WhichOneof("work") == "assignment":
                self._start(msg.assignment)
            elif msg.WhichOneof("work") == "cancellation":
                self._cancel(msg.cancellation.job_id)
        raise ConnectionError("assignment stream ended")

    def _start(self, assignment: apb.JobAssignment) -> None:
        if assignment.job_id in self.runs:
            return
        run = JobRun(self, assignment)
        self.runs[assignment.job_id] = run
        task = asyncio.create_task(run.run(), name=f"job-{assignment.job_id}")
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, assignment.job_id))

    def _finished(self, job_id: str, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.runs.pop(job_id, None)

    def _cancel(self, job_id: str) -> None:
        run = self.runs.get(job_id)
        if run is not None and not run.cancelled:
            task = asyncio.create_task(run.terminate())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def shutdown(self) -> None:
        for run in self.runs.values():
            run.shutting_down = True
        await asyncio.gather(*(run.terminate() for run in list(self.runs.values())), return_exceptions=True)


async def serve() -> None:
    settings = AgentSettings()
    setup_logging(settings.log_level)
    agent = Agent(settings)
    server, port = await start_server([], settings.grpc_host, settings.agent_grpc_port)
    metrics = serve_metrics(settings.metrics_port, settings.grpc_host)
    print(f"TUNEFORGE_READY trainer grpc={port} metrics={metrics}", flush=True)
    runner = asyncio.create_task(agent.run_forever())
    await wait_for_shutdown_signal()
    await agent.shutdown()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await server.stop(grace=2)


def main() -> None:
    from tuneforge_common.runtime import run_service

    run_service(serve)


if __name__ == "__main__":
    main()
