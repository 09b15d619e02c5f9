"""The trainer agent: dials the jobs service, pulls assignments, runs each job as a child process.

Reports (state, metric points, log lines) carry per-(job, attempt) sequence numbers and stay
queued until the jobs service acknowledges them, so a dropped connection loses nothing and a
resend stores nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import grpc
from google.protobuf import json_format
from pydantic import Field, field_validator

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.artifacts import ArtifactStore
from tuneforge_common.config import CommonSettings
from tuneforge_common.grpcutil import serve_metrics, start_server
from tuneforge_common.logs import setup_logging
from tuneforge_common.params import protected_env_problem, to_env
from tuneforge_common.runtime import wait_for_shutdown_signal

from .sdk import PAUSED_EXIT_CODE, parse_checkpoint, parse_log_data

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
    agent_labels: str = Field(
        "",
        description="This agent's labels as k=v,k2=v2 (e.g. zone=eu,pool=a100); a job's resource request can ask "
        "for them.",
    )

    @field_validator("agent_labels")
    @classmethod
    def _labels_parse(cls, value: str) -> str:
        parse_labels(value)
        return value


def parse_labels(text: str) -> dict[str, str]:
    """'k=v,k2=v2' as a dict; blanks around names, values and commas are ignored."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"agent label {item.strip()!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


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
    # Called with (job id, attempt, reason) when the service refuses an attempt's reports: it must stop.
    on_stop: Callable[[str, int, str], None] | None = None

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
                if resp.stop:
                    # The attempt no longer owns its job: whatever it still reports would be refused too.
                    self.pending = [
                        p for p in self.pending if (p.request.job_id, p.request.attempt) != (resp.job_id, resp.attempt)
                    ]
                    if self.on_stop is not None:
                        self.on_stop(resp.job_id, resp.attempt, resp.reason)

        try:
            await run_until_first_failure(writer(), reader())
        finally:
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


async def run_until_first_failure(*coroutines: Any) -> None:
    """Run together until one fails (its error is raised) or all end; the rest are cancelled and awaited."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
        self.fenced = ""  # why the service refused this attempt's reports; it then reports nothing more
        self.pausing = False  # a pause was asked: the runner checkpoints and stops (exit PAUSED_EXIT_CODE)
        self.uploads: list[asyncio.Task] = []  # checkpoints being copied into the artifact store
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
            resume_from = await asyncio.to_thread(self._stage_checkpoint)
            if self.cancelled:  # stopped while its inputs were being staged: never start the process
                if not (self.shutting_down or self.fenced):
                    self.report(state=apb.StateReport(state=apb.REPORTED_STATE_CANCELLED, reason="terminated"))
                return
            output_dir = self.workdir / "output"
            params = json_format.MessageToDict(self.a.parameters)
            cmd = build_command(
                self.agent.settings.agent_python,
                self.a.entrypoint,
                params,
                model_path,
                dataset_path,
                str(output_dir),
                resume_from,
            )
            own = {
                "MODEL_PATH": model_path,
                "DATASET_PATH": dataset_path,
                "OUTPUT_DIR": str(output_dir),
                "RESUME_FROM_CHECKPOINT": resume_from,
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
            # Checkpoints reach the store (and the service) before the outcome that follows them.
            await asyncio.gather(*self.uploads, return_exceptions=True)
            if self.shutting_down or self.fenced:
                # The agent is stopping, not the job (its lease lapses and the job is retried elsewhere), or the
                # service has taken the job from this attempt: either way this attempt has no outcome to report.
                return
            if self.pausing:
                # A runner without pause support dies of SIGUSR1: still a pause, resumed from its latest checkpoint.
                reason = (
                    "paused at a checkpoint"
                    if code == PAUSED_EXIT_CODE
                    else f"stopped for a pause (exit code {code}); resumes from the latest saved checkpoint"
                )
                self.report(state=apb.StateReport(state=apb.REPORTED_STATE_PAUSED, reason=reason))
            elif self.cancelled:
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

    def _stage_checkpoint(self) -> str:
        """The checkpoint a resumed attempt starts from, copied next to the run; "" for a fresh start."""
        if not self.a.resume_from_uri:
            return ""
        local = self.workdir / "resume" / f"checkpoint-{self.a.resume_from_step}"
        fs, path = fsspec.core.url_to_fs(self.a.resume_from_uri)
        fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
        return str(local)

    async def _store_checkpoint(self, saved: dict[str, Any]) -> None:
        """Copy a checkpoint the runner saved into the store, then record it with the service."""
        if not self.a.checkpoint_uri:
            return
        uri = f"{self.a.checkpoint_uri}/checkpoint-{saved['step']}"
        try:
            await asyncio.to_thread(ArtifactStore(self.agent.settings.artifact_root).put_dir, saved["path"], uri)
        except OSError as exc:  # rotated away by the runner before the copy, or the store is down: not fatal
            self.log_line("agent", f"checkpoint at step {saved['step']} not stored: {exc}")
            return
        metrics = {k: float(v) for k, v in saved["metrics"].items() if isinstance(v, (int, float))}
        self.report(checkpoint=apb.CheckpointReport(step=saved["step"], uri=uri, metrics=metrics))

    async def pause(self) -> None:
        """Ask the runner to checkpoint and stop (SIGUSR1); it exits with PAUSED_EXIT_CODE."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            await self.terminate()  # not started yet: nothing to checkpoint, the service keeps its last one
            return
        self.pausing = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGUSR1)

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
            saved = parse_checkpoint(text) if name == "stdout" else None
            if saved is not None:
                self.uploads.append(asyncio.create_task(self._store_checkpoint(saved)))
                continue
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


@dataclass(frozen=True)
class Gpu:
    model: str
    memory_bytes: int


# Run in a child process: CUDA initialised in the long-lived agent would hold memory on the GPUs for good.
_TORCH_PROBE = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        gpus.append([torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory])
print(json.dumps(gpus))
"""


def _gpu_devices_present() -> bool:
    """Cheap look for a GPU driver, so CPU-only nodes skip importing torch just to learn there is none."""
    return (
        shutil.which("nvidia-smi") is not None
        or Path("/dev/nvidiactl").exists()
        or Path("/dev/kfd").exists()  # ROCm, which torch.cuda also drives
        or any(Path("/dev").glob("nvidia[0-9]*"))
    )


def _torch_gpus(python: str) -> list[Gpu] | None:
    """GPUs as torch sees them in the runners' interpreter; None when torch is missing or sees no GPU."""
    try:
        out = subprocess.run(
            [python, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        found = [Gpu(str(name), int(memory)) for name, memory in json.loads(out.strip().splitlines()[-1])]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, TypeError):
        return None
    return found or None


def _nvidia_smi_gpus() -> list[Gpu]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append(Gpu(name.strip(), int(float(mib.strip())) * 1024 * 1024))
        except ValueError:
            continue
    return gpus


@functools.cache
def detect_gpus(python: str = sys.executable) -> tuple[Gpu, ...]:
    """The node's GPUs: from torch.cuda when torch is importable and sees them, else nvidia-smi, else none.
    Probed once per process: GPUs do not come and go under a running agent."""
    if not _gpu_devices_present():
        return ()
    return tuple(_torch_gpus(python) or _nvidia_smi_gpus())


def total_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.reporter = Reporter(on_stop=self._stop_fenced)
        self.runs: dict[str, JobRun] = {}
        self.tasks: set[asyncio.Task] = set()
        self.agent_id = ""

    def resources(self) -> apb.AgentResources:
        """What this node offers: GPUs (count, models, memory per GPU: the smallest one's when they differ),
        CPUs, RAM, the labels from TUNEFORGE_AGENT_LABELS and the slots."""
        gpus = detect_gpus(self.settings.agent_python)
        return apb.AgentResources(
            gpu_count=len(gpus),
            gpu_models=[g.model for g in gpus],
            gpu_memory_bytes=min((g.memory_bytes for g in gpus), default=0),
            cpu_count=os.cpu_count() or 1,
            memory_bytes=total_memory_bytes(),
            labels=parse_labels(self.settings.agent_labels),
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
                name=self.settings.agent_name,
                resources=await asyncio.to_thread(self.resources),  # the first call probes the GPUs
                resume_agent_id=self.agent_id,
            ),
            timeout=10,
        )
        if self.agent_id and not resp.resumed and self.runs:
            # Our lease lapsed while we were away: the service has requeued these jobs, so stop our copies.
            log.warning("lease lost; stopping %d job(s) the service has requeued", len(self.runs))
            await self.shutdown()
        self.agent_id = self.reporter.agent_id = resp.agent_id
        log.info("registered as %s (resumed=%s)", self.agent_id, resp.resumed)
        await run_until_first_failure(
            self._heartbeats(stub, resp.heartbeat_interval_seconds or 3),
            self._assignments(stub),
            self.reporter.run_stream(stub),
        )

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
                self._cancel(msg.cancellation.job_id, msg.cancellation.checkpoint_first)
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

    def _cancel(self, job_id: str, checkpoint_first: bool = False) -> None:
        run = self.runs.get(job_id)
        if run is not None and not run.cancelled and not run.pausing:
            task = asyncio.create_task(run.pause() if checkpoint_first else run.terminate())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _stop_fenced(self, job_id: str, attempt: int, reason: str) -> None:
        """The service refused this attempt's reports (requeued, given to another agent, our lease lapsed)."""
        run = self.runs.get(job_id)
        if run is None or run.a.attempt != attempt or run.fenced:
            return
        log.warning("stopping job %s attempt %d: the jobs service refused its reports: %s", job_id, attempt, reason)
        run.fenced = reason or "refused by the jobs service"
        self._cancel(job_id)

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
