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
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import grpc
import psutil
from google.protobuf import json_format
from pydantic import Field, field_validator

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.artifacts import ArtifactStore
from tuneforge_common.auth import call_credentials, credentials_metadata
from tuneforge_common.config import CommonSettings
from tuneforge_common.grpcutil import serve_metrics, start_server
from tuneforge_common.logs import setup_logging
from tuneforge_common.params import protected_env_problem, to_env
from tuneforge_common.runtime import wait_for_shutdown_signal
from tuneforge_common.tls import TlsConfig, open_channel

from .forkserver import WarmProcess, WarmRunners
from .relay import InferenceRelay
from .sdk import PAUSED_EXIT_CODE, parse_checkpoint, parse_log_data

log = logging.getLogger("tuneforge.agent")
LINE_LIMIT = 1024 * 1024
KEEP_STDERR_LINES = 20
MAX_REASON_LINE = 500
# A runner's own reason for failing: argparse's "prog: error: ...", the SDK's "error: ...", logging's "ERROR: ...",
# an exception's "ValueError: ...". torchrun's closing ChildFailedError only says that a worker failed.
ERROR_LINE = re.compile(r"(?:^|[\s:.\]])(?:[A-Za-z_.]*Error|error|ERROR):\s*\S")
NOT_THE_REASON = ("ChildFailedError",)
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")
SERVE_READY = "[serve_ready]:"
OOM_HINT = "CUDA out of memory: lower batch_size or max_seq_length, or enable gradient_checkpointing / load_in_4bit"
# Storing a checkpoint or an output into the artifact store: tries, and the wait before the second (then doubled).
STORE_TRIES = 3
STORE_RETRY_FIRST_SECONDS = 1.0


class AgentSettings(CommonSettings):
    jobs_address: str = Field("127.0.0.1:50052", description="host:port of the jobs service.")
    agent_join_token: str = Field(
        "",
        description="One of the jobs service's agent_join_tokens: traded once for this node's own credential, "
        "which is kept in agent_credential_file and used from then on.",
    )
    agent_credential_file: str = Field(
        "", description="Where the node's credential is kept (mode 0600). Empty: credential in agent_work_dir."
    )
    agent_name: str = Field(default_factory=socket.gethostname, description="Name shown for this agent.")
    agent_slots: int = Field(1, description="Jobs this agent runs at once.")
    agent_work_dir: str = Field(".tuneforge/agent", description="Local scratch space for running jobs.")
    agent_python: str = Field(sys.executable, description="Python interpreter that runs built-in methods.")
    agent_methods_dir: str = Field(
        "",
        description="Where added methods' stage files live: a method's stages.training.file is a path inside it. "
        "Empty: the `methods` directory next to agent_work_dir (.tuneforge/methods by default).",
    )
    agent_python_envs: str = Field(
        "",
        description="Python environments added methods name, as name=/path/to/python,name2=/path/to/venv (a "
        "directory means its bin/python). A name not listed is looked up as a conda environment: <dir>/<name>/"
        "bin/python for each dir of CONDA_ENVS_PATH, the envs directory of the active conda ($CONDA_PREFIX), of "
        "CONDA_EXE's conda and of MAMBA_ROOT_PREFIX, and ~/.conda/envs. 'base' (unless listed) is agent_python.",
    )
    agent_grpc_port: int = Field(0, description="Port of the agent's health endpoint; 0 picks a free one.")
    agent_terminate_grace_seconds: float = Field(10.0, description="SIGTERM to SIGKILL grace on terminate.")
    agent_warm_runners: bool = Field(
        True,
        description="Keep a process with torch, transformers, PEFT and TRL imported, and fork each built-in "
        "method's runner from it: a job's first step comes about 10 s sooner than from a fresh interpreter. "
        "Costs the memory of one such process (a few hundred MB). Scripts, other Python environments, torchrun "
        "and runners whose environment changes what those libraries read at import start cold.",
    )
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

    @field_validator("agent_python_envs")
    @classmethod
    def _python_envs_parse(cls, value: str) -> str:
        parse_python_envs(value)
        return value

    def methods_dir(self) -> Path:
        if self.agent_methods_dir:
            return Path(self.agent_methods_dir).expanduser().resolve()
        return Path(self.agent_work_dir).expanduser().resolve().parent / "methods"


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


def parse_python_envs(text: str) -> dict[str, str]:
    """'name=/path/to/python,name2=/path/to/venv' as a dict; each needs a name and a path."""
    envs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"agent python env {item.strip()!r} is not name=/path/to/python-or-venv")
        envs[name.strip()] = path.strip()
    return envs


class LaunchError(Exception):
    """A job this agent can't start (unknown environment, missing stage file); the message is the job's reason."""


def conda_envs_dirs(environ: Mapping[str, str], home: Path) -> list[Path]:
    """Where conda keeps named environments, in conda's own order of preference, without duplicates."""
    dirs = [Path(p).expanduser() for p in environ.get("CONDA_ENVS_PATH", "").split(os.pathsep) if p.strip()]
    prefix = environ.get("CONDA_PREFIX", "")
    if prefix:
        # Inside an activated environment CONDA_PREFIX is <root>/envs/<name>; in base it is <root> itself.
        active = Path(prefix)
        dirs.append(active.parent if active.parent.name == "envs" else active / "envs")
    conda_exe = environ.get("CONDA_EXE", "")
    if conda_exe:
        dirs.append(Path(conda_exe).parent.parent / "envs")  # <root>/bin/conda (condabin/conda too)
    if environ.get("MAMBA_ROOT_PREFIX"):
        dirs.append(Path(environ["MAMBA_ROOT_PREFIX"]) / "envs")
    dirs.append(home / ".conda" / "envs")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def _interpreters(path: Path) -> list[Path]:
    return [path / "bin" / "python", path / "bin" / "python3"] if path.is_dir() else [path]


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def resolve_python_env(
    name: str, explicit: Mapping[str, str], default: str, environ: Mapping[str, str], home: Path
) -> str:
    """The interpreter of the environment `name`: as mapped in agent_python_envs, else a conda environment of
    that name; empty or 'base' (unless mapped) is `default`, the agent's interpreter. The path is kept as it
    is, never resolved: a venv's bin/python is a symlink, and only through it does Python find the venv."""
    name = name.strip()
    if name in explicit:
        candidates = _interpreters(Path(explicit[name]).expanduser())
        where = f"agent_python_envs maps it to {explicit[name]}"
    elif name in ("", "base"):
        return default
    else:
        dirs = conda_envs_dirs(environ, home)
        candidates = [d / name / "bin" / "python" for d in dirs]
        where = "not in agent_python_envs (TUNEFORGE_AGENT_PYTHON_ENVS) nor a conda environment"
    found = next((c for c in candidates if _runnable(c)), None)
    if found is None:
        looked = ", ".join(str(c) for c in candidates)
        raise LaunchError(f"python_env {name!r}: no Python interpreter found ({where}); looked at {looked}")
    return str(found)


def resolve_stage_file(methods_dir: Path, file: str) -> Path:
    """An added method's stage file, strictly inside the methods directory: a relative path without '..'
    that, symlinks followed, still lands inside it."""
    root = methods_dir.resolve()
    given = PurePosixPath(file)
    if not file.strip() or given.is_absolute() or file.startswith("~") or ".." in given.parts:
        raise LaunchError(
            f"entrypoint {file!r}: an added method's file must be a path relative to the methods directory "
            f"{root}, without '..'"
        )
    path = (root / given).resolve()
    if not path.is_relative_to(root):
        raise LaunchError(f"entrypoint {file!r}: leads to {path}, outside the methods directory {root}")
    if not path.is_file():
        raise LaunchError(f"entrypoint {file!r}: no such file {root / given} (methods directory {root})")
    return path


@dataclass(frozen=True)
class Launch:
    """How one job's runner starts: its interpreter, what that runs, and for a file its directory."""

    python: str
    target: str  # a module for -m, or a script's absolute path
    script_dir: str = ""  # a script's directory, put on PYTHONPATH so it imports its siblings

    @property
    def is_script(self) -> bool:
        return bool(self.script_dir)


def _script(settings: AgentSettings, entrypoint: str, python_env: str) -> Path:
    if Path(entrypoint).is_absolute() and not python_env:
        if not Path(entrypoint).is_file():
            raise LaunchError(f"entrypoint {entrypoint!r}: no such file")
        return Path(entrypoint)
    return resolve_stage_file(settings.methods_dir(), entrypoint)


def resolve_launch(
    settings: AgentSettings,
    entrypoint: str,
    python_env: str,
    environ: Mapping[str, str] = os.environ,
    home: Path | None = None,
) -> Launch:
    """Interpreter and target of a job, or LaunchError naming each problem and what was looked at.

    A module (tuneforge_trainer.methods.sft_lora) is a built-in. A .py file is an added method's stage
    file, relative to the methods directory; an absolute one without a python_env is a file the jobs
    service named directly (the catalog stores only relative ones), run where it is.
    """
    problems: list[str] = []
    python = settings.agent_python
    try:
        python = resolve_python_env(
            python_env,
            parse_python_envs(settings.agent_python_envs),
            settings.agent_python,
            environ,
            Path.home() if home is None else home,
        )
    except LaunchError as exc:
        problems.append(str(exc))
    target, script_dir = entrypoint, ""
    if entrypoint.endswith(".py"):
        try:
            script = _script(settings, entrypoint, python_env)
            target, script_dir = str(script), str(script.parent)
        except LaunchError as exc:
            problems.append(str(exc))
    elif not entrypoint:
        problems.append("entrypoint: the assignment names no module or file to run")
    if problems:
        raise LaunchError("; ".join(problems))
    return Launch(python, target, script_dir)


# The most one ReportJob message carries: reports, and bytes (well under gRPC's 4 MiB message limit, as one log
# report may be long).
REPORTS_PER_MESSAGE = 500
REPORT_MESSAGE_BYTES = 1 << 20


@dataclass
class _Pending:
    request: apb.JobReport

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
        req = apb.JobReport(job_id=job_id, attempt=attempt, seq=self.seqs[key], time_unix=time.time(), **report)
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
        # Per (job, attempt), the highest seq written on this call: pending reports are in seq order, so this
        # says what is sent. (A set of every key sent grew by one entry per report for the agent's whole life.)
        sent: dict[tuple[str, int], int] = {}

        async def writer() -> None:
            while True:
                self.wake.clear()
                unsent = [
                    p.request
                    for p in self.pending
                    if p.request.seq > sent.get((p.request.job_id, p.request.attempt), 0)
                ]
                # The backlog in few messages: each message costs both sides framing and a wake-up.
                for message in _report_messages(self.agent_id, unsent):
                    await call.write(message)
                    for req in message.reports:
                        sent[(req.job_id, req.attempt)] = req.seq
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


def _report_messages(agent_id: str, reports: list[apb.JobReport]) -> Iterator[apb.ReportJobRequest]:
    """The reports in order, as few ReportJob messages as REPORTS_PER_MESSAGE and REPORT_MESSAGE_BYTES allow."""
    batch: list[apb.JobReport] = []
    size = 0
    for report in reports:
        report_size = report.ByteSize()
        if batch and (len(batch) >= REPORTS_PER_MESSAGE or size + report_size > REPORT_MESSAGE_BYTES):
            yield apb.ReportJobRequest(agent_id=agent_id, reports=batch)
            batch, size = [], 0
        batch.append(report)
        size += report_size
    if batch:
        yield apb.ReportJobRequest(agent_id=agent_id, reports=batch)


def _flag_value(value: Any) -> Any:
    # protobuf Struct turns every number into a double; an integral one goes back as an int.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The agent's own secrets and where it keeps them (service and join tokens, the bootstrap admin key, database and
# NATS URLs that may hold passwords, the credential and TLS key files): never handed to a runner, which runs
# a method's code and would otherwise hold the keys to every project.
SERVICE_SECRET_ENV = re.compile(r"TUNEFORGE_\w*(TOKEN|KEY|PASSWORD|SECRET|CREDENTIAL|DATABASE_URL|NATS_URL)\w*")


def runner_env(
    base: Mapping[str, str], params: dict[str, Any], own: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The runner's environment, and the parameter variables left out of it.

    The agent's environment but its secrets (SERVICE_SECRET_ENV), then each parameter as its variable
    (LORA_RANK=8), then the agent's own variables for the job (MODEL_PATH, OUTPUT_DIR, TUNEFORGE_JOB_ID, ...),
    which always win. A parameter never sets a protected variable (PATH, LD_*, PYTHON*, HF_*, CUDA_*, ...:
    params.protected_env_problem) nor one of the agent's own; the catalog refuses such names in added methods,
    this holds even if one got stored. A left-out parameter still reaches the runner as its --flag.
    """
    from_params = to_env({k: _flag_value(v) for k, v in params.items()})
    skipped = sorted(k for k in from_params if k in own or protected_env_problem(k))
    kept = {k: v for k, v in from_params.items() if k not in skipped}
    return {**without_service_secrets(base), **kept, **own}, skipped


def without_service_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment as the processes it starts may see it: its service secrets left out."""
    return {k: v for k, v in environ.items() if not SERVICE_SECRET_ENV.fullmatch(k)}


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
    nproc_per_node: int = 1,
    validation_dataset_path: str = "",
) -> list[str]:
    """DeepExtension's runner contract: every hyperparameter as --key=value, booleans as true/false.

    entrypoint: a .py file (run as a script) or a module (run with -m). With more than one process per node,
    torchrun (as `python -m torch.distributed.run`, so it is the environment's own) starts one per GPU.
    --validation_dataset_path only when the job has a validation dataset: scripts that never take one keep
    the flags they know.
    """
    values = {
        **{k: _flag_value(v) for k, v in params.items()},
        "model_path": model_path,
        "dataset_path": dataset_path,
        **({"validation_dataset_path": validation_dataset_path} if validation_dataset_path else {}),
        "output_dir": output_dir,
        "resume_from_checkpoint": resume_from,
    }
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
        if nproc_per_node > 1
        else []
    )
    return [python, *launcher, *_target(entrypoint), *_flags(values)]


def build_saving_command(
    python: str, entrypoint: str, params: dict[str, Any], model_path: str, adapter_path: str, output_dir: str
) -> list[str]:
    """An added method's saving stage, run after its training: the job's parameters as flags (as the training
    got them), then --model_path (the base model), --adapter_path (what the training saved) and --output_dir
    (where the complete model goes). One process: saving is no distributed run."""
    paths = {"model_path": model_path, "adapter_path": adapter_path}
    return build_operation_command(python, entrypoint, params, paths, output_dir)


def build_operation_command(
    python: str, entrypoint: str, params: dict[str, Any], paths: dict[str, str], output_dir: str
) -> list[str]:
    """A merge, evaluate or serve process: the job's parameters as flags, then the paths it has (model_path,
    adapter_path, dataset_path: the empty ones left out) and --output_dir."""
    values = {
        **{k: _flag_value(v) for k, v in params.items()},
        **{k: v for k, v in paths.items() if v},
        "output_dir": output_dir,
    }
    return [python, *_target(entrypoint), *_flags(values)]


def _target(entrypoint: str) -> list[str]:
    return [entrypoint] if entrypoint.endswith(".py") else ["-m", entrypoint]


def _flags(values: dict[str, Any]) -> list[str]:
    return [f"--{k}={'true' if v is True else 'false' if v is False else v}" for k, v in values.items()]


def parse_serve_ready(line: str) -> dict[str, Any] | None:
    """An inference worker's `[serve_ready]: {"host": ..., "port": ...}` line, or None."""
    if not line.startswith(SERVE_READY):
        return None
    try:
        ready = json.loads(line[len(SERVE_READY) :])
    except ValueError:
        return None
    return ready if isinstance(ready, dict) and isinstance(ready.get("port"), int) and ready["port"] > 0 else None


# Run before a command (execs it, same pid): the kernel sends SIGTERM to it when the agent dies. Not a
# preexec_fn: a child forked with one runs the parent's at-fork handlers, and gRPC's crash it at times.
STOP_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)  # the agent died before the prctl: nothing will stop the command\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def stop_with_agent(cmd: list[str]) -> list[str]:
    """`cmd` such that it is stopped (SIGTERM) when the agent dies, on Linux; as it is elsewhere.

    An inference worker runs until it is stopped: when its agent dies without stopping it (killed, out of
    memory), nothing else ever would. It would hold its GPU, unowned, while its deployment is requeued."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-I", "-S", "-c", STOP_WITH_PARENT, str(os.getpid()), *cmd]


def visible_devices(indices: list[int], agent_visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a runner given GPUs as the agent numbers them. When the agent itself is
    limited to some GPUs (its own CUDA_VISIBLE_DEVICES, e.g. "2,3" or GPU UUIDs), its GPU i is the i-th listed."""
    if agent_visible is not None and agent_visible.strip():
        listed = [d.strip() for d in agent_visible.split(",") if d.strip()]
        return ",".join(listed[i] for i in indices if i < len(listed))
    return ",".join(str(i) for i in indices)


def error_line(stderr_tail: list[str], out_of_memory: bool) -> str:
    """A failed run's own last word: its last error: line (the CUDA one when it ran out of memory), else its last
    stderr line; "" when it said nothing."""
    errors = [t for t in stderr_tail if ERROR_LINE.search(t) and not any(n in t for n in NOT_THE_REASON)]
    if out_of_memory:
        errors = [t for t in errors if any(m in t for m in OOM_MARKERS)] or errors
    line = errors[-1] if errors else stderr_tail[-1] if stderr_tail else ""
    if len(line) > MAX_REASON_LINE:
        line = line[: MAX_REASON_LINE - 3] + "..."
    return line


def saving_failure_reason(code: int, stderr_tail: list[str], out_of_memory: bool) -> str:
    """A failed saving stage's reason: its own last word, as a training's, else how it ended."""
    line = error_line(stderr_tail, out_of_memory)
    if line:
        return f"saving stage failed: {line}"
    how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"saving stage failed: {how}, no error output"


def failure_reason(code: int, stderr_tail: list[str], out_of_memory: bool) -> str:
    """A failed run's reason: how it ended, then its own last word (its last error: line, else its last stderr
    line), with what to change when CUDA ran out of memory."""
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    line = error_line(stderr_tail, out_of_memory)
    if out_of_memory:
        return f"training process {how}: {OOM_HINT}" + (f" ({line})" if line else "")
    return f"training process {how}: {line or 'no error output'}"


def store_error(exc: BaseException) -> str:
    """An artifact-store failure as a reason says it: the OS error without the temporary file's path."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else exc.strerror
    return str(exc) or type(exc).__name__


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
        self.proc: asyncio.subprocess.Process | WarmProcess | None = None
        self.cancelled = False
        self.shutting_down = False
        self.fenced = ""  # why the service refused this attempt's reports; it then reports nothing more
        self.pausing = False  # a pause was asked: the runner checkpoints and stops (exit PAUSED_EXIT_CODE)
        self.uploads: list[asyncio.Task] = []  # checkpoints being copied into the artifact store
        self.stored_steps: list[int] = []  # the checkpoints stored (and reported) so far
        self.store_failed = ""  # why a checkpoint could not be stored: the run was stopped, and fails with this
        self.gpus: list[int] = []  # the agent's GPUs this run holds (as the agent numbers them)
        self.distributed = False  # started under torchrun, one worker process per GPU
        self.out_of_memory = False  # CUDA said so on stderr
        self.kind = assignment.kind or "train"  # train, or an operation on a model: merge, evaluate, serve
        # "training", then "saving" for an added method with a saving stage; an operation's stage is its kind.
        self.stage = "training" if self.kind == "train" else self.kind
        self.serve_port = 0  # a serve job's worker, once it said it listens
        self.workdir = (
            Path(agent.settings.agent_work_dir).resolve() / assignment.job_id / f"attempt-{assignment.attempt}"
        )

    def report(self, **report: Any) -> None:
        self.agent.reporter.add(self.a.job_id, self.a.attempt, **report)

    def log_line(self, stream: str, text: str) -> None:
        self.report(log=apb.LogReport(stream=stream, text=text))

    def _stage_dir(self, uri: str, name: str) -> str:
        """A model directory's local path: copied next to the run from a remote store, else used where it is."""
        if "://" not in uri or uri.startswith("file://"):
            return uri
        local = self.workdir / name
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
        return str(local)

    def _stage_inputs(self) -> tuple[str, str, str]:
        """Local paths of the model, the dataset and the validation dataset ("" when the job has none; an
        operation may have no dataset either)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        model_path = self._stage_dir(self.a.model_uri, "model")
        dataset_path = ""
        if self.a.dataset_uri:
            dataset_path = str(self.workdir / "dataset.jsonl")
            fs, path = fsspec.core.url_to_fs(self.a.dataset_uri)
            fs.get_file(path, dataset_path)
        validation_path = ""
        if self.a.validation_dataset_uri:
            validation_path = str(self.workdir / "validation.jsonl")
            fs, path = fsspec.core.url_to_fs(self.a.validation_dataset_uri)
            fs.get_file(path, validation_path)
        return model_path, dataset_path, validation_path

    async def run(self) -> None:
        settings = self.agent.settings
        try:
            self.log_line("agent", f"attempt {self.a.attempt} starting on agent {settings.agent_name}")
            if self.kind != "train":
                await self._run_operation()
                return
            # Before anything is staged or started: a job this node can't run fails at once, saying why (its
            # saving stage too: no training is wasted on a job whose output could not then be saved).
            launch = await asyncio.to_thread(resolve_launch, settings, self.a.entrypoint, self.a.python_env)
            saving = await asyncio.to_thread(self._resolve_saving)
            model_path, dataset_path, validation_path = await asyncio.to_thread(self._stage_inputs)
            resume_from = await asyncio.to_thread(self._stage_checkpoint)
            if self._cancelled_before_start():
                return
            output_dir = self.workdir / "output"
            params = json_format.MessageToDict(self.a.parameters)
            nproc = max(1, self.a.gpu_count)
            self.distributed = nproc > 1
            cmd = build_command(
                launch.python,
                launch.target,
                params,
                model_path,
                dataset_path,
                str(output_dir),
                resume_from,
                nproc_per_node=nproc,
                validation_dataset_path=validation_path,
            )
            own = {
                "MODEL_PATH": model_path,
                "DATASET_PATH": dataset_path,
                "VALIDATION_DATASET_PATH": validation_path,
                "OUTPUT_DIR": str(output_dir),
                "RESUME_FROM_CHECKPOINT": resume_from,
            }
            env = self._stage_env(launch, params, own)
            self.log_line("agent", self._describe(launch, self.a.python_env, nproc, env.get("CUDA_VISIBLE_DEVICES")))
            code, stderr_tail = await self._run_stage(cmd, env)
            if self._checkpoint_lost():
                return
            if self._stopped(code):
                return
            if code != 0:
                self._failed(code, stderr_tail, failure_reason(code, stderr_tail, self.out_of_memory))
                return
            if saving is not None:
                # The saving stage: the method's own file turns what the training saved (an adapter, or a whole
                # model) into the complete model, under <output>/complete, stored with the rest below.
                self.stage, self.distributed = "saving", False
                complete_dir = output_dir / "complete"
                cmd = build_saving_command(
                    saving.python, saving.target, params, model_path, str(output_dir), str(complete_dir)
                )
                own = {"MODEL_PATH": model_path, "ADAPTER_PATH": str(output_dir), "OUTPUT_DIR": str(complete_dir)}
                env = self._stage_env(saving, params, own)
                if self._stopped(code):  # terminated or paused between the stages
                    return
                described = self._describe(saving, self.a.saving_python_env, 1, env.get("CUDA_VISIBLE_DEVICES"))
                self.log_line("agent", f"saving stage: {described}")
                code, stderr_tail = await self._run_stage(cmd, env)
                if self._stopped(code):
                    return
                if code != 0:
                    self._failed(code, stderr_tail, saving_failure_reason(code, stderr_tail, self.out_of_memory))
                    return
                self.log_line("agent", f"saving stage done: the complete model is in {complete_dir}")
            await self._store_output_and_succeed(output_dir)
        except LaunchError as exc:  # the user's to fix (environment, file): the reason says it, no traceback
            log.warning("job %s attempt %d can't start: %s", *self._id, exc)
            self.log_line("agent", str(exc))
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_FAILED, reason=str(exc)))
        except Exception as exc:  # staging or upload failed: the job fails with the reason, the agent lives on
            log.exception("job %s failed on the agent", self.a.job_id)
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_FAILED, reason=f"agent error: {exc}"))
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.workdir / "model", ignore_errors=True)
                shutil.rmtree(self.workdir / "adapter", ignore_errors=True)

    async def _run_operation(self) -> None:
        """Merge, evaluate or serve: one process over a model (and its adapter), without checkpoints. Merge and
        evaluate store their output and succeed; a serve job's worker runs until the job is stopped."""
        launch = await asyncio.to_thread(resolve_launch, self.agent.settings, self.a.entrypoint, self.a.python_env)
        model_path, dataset_path, _ = await asyncio.to_thread(self._stage_inputs)
        adapter_path = (
            await asyncio.to_thread(self._stage_dir, self.a.adapter_uri, "adapter") if self.a.adapter_uri else ""
        )
        if self._cancelled_before_start():
            return
        output_dir = self.workdir / "output"
        params = json_format.MessageToDict(self.a.parameters)
        paths = {"model_path": model_path, "adapter_path": adapter_path, "dataset_path": dataset_path}
        cmd = build_operation_command(launch.python, launch.target, params, paths, str(output_dir))
        own = {name.upper(): value for name, value in paths.items() if value} | {"OUTPUT_DIR": str(output_dir)}
        env = self._stage_env(launch, params, own)
        self.log_line(
            "agent", f"{self.kind}: " + self._describe(launch, self.a.python_env, 1, env.get("CUDA_VISIBLE_DEVICES"))
        )
        code, stderr_tail = await self._run_stage(cmd, env)
        if self._stopped(code):
            return
        if self.kind == "serve":  # a worker ends only when stopped: on its own, it failed
            reason = failure_reason(code, stderr_tail, self.out_of_memory) if code else "the inference worker exited"
            self._failed(code, stderr_tail, reason)
            return
        if code != 0:
            self._failed(code, stderr_tail, failure_reason(code, stderr_tail, self.out_of_memory))
            return
        await self._store_output_and_succeed(output_dir)

    def _cancelled_before_start(self) -> bool:
        """Stopped while its inputs were being staged: the process is never started (CANCELLED is reported
        unless the agent is stopping or the service took the job from this attempt)."""
        if self.cancelled and not (self.shutting_down or self.fenced):
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_CANCELLED, reason="terminated"))
        return self.cancelled

    async def _store_output_and_succeed(self, output_dir: Path) -> None:
        # A run that saved nothing has an empty output, as ever (put_dir refuses a missing directory).
        await asyncio.to_thread(output_dir.mkdir, parents=True, exist_ok=True)
        try:
            await self._store_dir(str(output_dir), self.a.output_uri)
        except Exception as exc:
            reason = f"the output could not be stored at {self.a.output_uri}: {store_error(exc)} ({STORE_TRIES} tries)"
            log.error("job %s attempt %d: %s", *self._id, reason)
            self.log_line("agent", reason)
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_FAILED, reason=reason))
            return
        self.log_line("agent", f"output stored at {self.a.output_uri}")
        self.report(
            state=apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED, reason="completed", output_uri=self.a.output_uri)
        )

    def _resolve_saving(self) -> Launch | None:
        """The saving stage's interpreter and file, found exactly as the training's are; None without one."""
        if not self.a.saving_entrypoint:
            return None
        try:
            return resolve_launch(self.agent.settings, self.a.saving_entrypoint, self.a.saving_python_env)
        except LaunchError as exc:
            raise LaunchError(f"saving stage: {exc}") from None

    def _stage_env(self, launch: Launch, params: dict[str, Any], paths: dict[str, str]) -> dict[str, str]:
        """A stage's environment: the agent's, the parameters as variables, then the agent's own for the job."""
        settings = self.agent.settings
        own = {
            **paths,
            "TUNEFORGE_JOB_ID": self.a.job_id,
            "TUNEFORGE_ATTEMPT": str(self.a.attempt),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
        }
        base = dict(os.environ)
        if launch.python != settings.agent_python:
            # Another environment's interpreter: its bin first on PATH, for the tools a script calls, and
            # no VIRTUAL_ENV naming the agent's own environment.
            base.pop("VIRTUAL_ENV", None)
            own["PATH"] = os.pathsep.join(p for p in (str(Path(launch.python).parent), base.get("PATH")) if p)
        if launch.is_script:
            # python file.py puts its directory on sys.path; PYTHONPATH keeps it there for the processes the
            # script starts (dataloader workers, its own subprocesses).
            own["PYTHONPATH"] = os.pathsep.join(p for p in (launch.script_dir, base.get("PYTHONPATH")) if p)
        if self.gpus:
            own["CUDA_VISIBLE_DEVICES"] = visible_devices(self.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        env, skipped = runner_env(base, params, own)
        if skipped:
            self.log_line("agent", f"not set from parameters (protected variables): {', '.join(skipped)}")
        return env

    async def _run_stage(self, cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
        """Run one stage's process in the attempt's directory to its end: its exit code and last stderr lines.
        Its [log_data] lines become metrics, its checkpoints are stored, the rest goes to the job's log."""
        self.out_of_memory = False
        if self.kind == "serve":  # a worker ends only when stopped (trainings end on their own)
            cmd = stop_with_agent(cmd)
        warm = self.agent.warm
        self.proc = await warm.spawn(cmd, env, str(self.workdir)) if warm is not None else None
        if self.proc is not None:
            self.log_line("agent", f"{self.stage} process forked warm from the agent's preloaded runner")
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(self.workdir),
                start_new_session=True,
                limit=LINE_LIMIT,
            )
        if self.stage in ("training", "merge", "evaluate"):  # a serve job runs once its worker listens
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING, reason=f"pid {self.proc.pid}"))
        if self.cancelled or (self.pausing and self.stage == "saving"):
            await self._stop_process()  # stopped while it was starting
        stderr_tail: list[str] = []
        await asyncio.gather(
            self._pump(self.proc.stdout, "stdout", None), self._pump(self.proc.stderr, "stderr", stderr_tail)
        )
        code = await self.proc.wait()
        # Checkpoints reach the store (and the service) before the outcome that follows them.
        await asyncio.gather(*self.uploads, return_exceptions=True)
        return code, stderr_tail

    def _stopped(self, code: int) -> bool:
        """Whether the run was stopped rather than ended on its own: reports that outcome, when it has one."""
        if self.shutting_down or self.fenced:
            # The agent is stopping, not the job (its lease lapses and the job is retried elsewhere), or the
            # service has taken the job from this attempt: either way this attempt has no outcome to report.
            return True
        if self.pausing:
            if self.stage == "saving":
                reason = (
                    "paused during the saving stage, which was stopped; resumes from the latest saved checkpoint "
                    "and saves again"
                )
            elif code == PAUSED_EXIT_CODE:
                reason = "paused at a checkpoint"
            else:
                # A runner without pause support dies of SIGUSR1: still a pause, resumed from its latest checkpoint.
                reason = f"stopped for a pause (exit code {code}); resumes from the latest saved checkpoint"
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_PAUSED, reason=reason))
            return True
        if self.cancelled:
            self.report(state=apb.StateReport(state=apb.REPORTED_STATE_CANCELLED, reason="terminated"))
            return True
        return False

    def _failed(self, code: int, stderr_tail: list[str], reason: str) -> None:
        if stderr_tail:
            # Its last words as one block, so the job's log ends with them even where lines interleave.
            block = "\n".join(stderr_tail)
            self.log_line("agent", f"{self.stage} process exited with code {code}; last stderr lines:\n{block}")
            log.warning(
                "job %s attempt %d: %s exit code %d; last stderr lines:\n%s", *self._id, self.stage, code, block
            )
        self.report(state=apb.StateReport(state=apb.REPORTED_STATE_FAILED, reason=reason))

    @property
    def _id(self) -> tuple[str, int]:
        return self.a.job_id, self.a.attempt

    def _describe(self, launch: Launch, python_env: str, nproc: int, devices: str | None) -> str:
        what = f"running {launch.target} with {launch.python}"
        if python_env:
            what += f" (python_env {python_env!r})"
        if nproc > 1:
            what += f" under torchrun, {nproc} processes"
        if devices is not None:
            what += f" on CUDA_VISIBLE_DEVICES={devices}"
        return what

    def _stage_checkpoint(self) -> str:
        """The checkpoint a resumed attempt starts from, copied next to the run; "" for a fresh start."""
        if not self.a.resume_from_uri:
            return ""
        local = self.workdir / "resume" / f"checkpoint-{self.a.resume_from_step}"
        fs, path = fsspec.core.url_to_fs(self.a.resume_from_uri)
        fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
        return str(local)

    async def _store_dir(self, local_dir: str, uri: str) -> None:
        """ArtifactStore.put_dir (all of the directory under uri, or nothing new), tried STORE_TRIES times with a
        doubling wait, for what passes (an object store's blip, a moment's contention); raises the last error.
        Stops early once another checkpoint's store has failed for good: the run is ending anyway."""
        store = ArtifactStore(self.agent.settings.artifact_root)
        delay = STORE_RETRY_FIRST_SECONDS
        for tried in range(1, STORE_TRIES + 1):
            try:
                await asyncio.to_thread(store.put_dir, local_dir, uri)
                return
            except Exception as exc:
                if tried == STORE_TRIES or self.store_failed or not await asyncio.to_thread(os.path.isdir, local_dir):
                    raise  # the last try, the run is ending, or nothing left to store (rotated away by the runner)
                log.warning("job %s attempt %d: storing %s failed (%s); retrying", *self._id, uri, exc)
                self.log_line("agent", f"storing {uri} failed: {store_error(exc)}; retrying in {delay:g}s")
                await asyncio.sleep(delay)
                delay *= 2

    async def _store_checkpoint(self, saved: dict[str, Any]) -> None:
        """Copy a checkpoint the runner saved into the store, then record it with the service. A checkpoint that
        can't be stored after the retries stops the run (see _checkpoint_lost)."""
        if not self.a.checkpoint_uri:
            return
        step = saved["step"]
        uri = f"{self.a.checkpoint_uri}/checkpoint-{step}"
        try:
            await self._store_dir(saved["path"], uri)
        except Exception as exc:
            if not await asyncio.to_thread(os.path.isdir, saved["path"]):
                # Rotated away by the runner (save_total_limit) before it could be copied: a later one follows.
                self.log_line("agent", f"checkpoint at step {step} not stored: the runner removed it first ({exc})")
                return
            latest = f"checkpoint-{max(self.stored_steps)}" if self.stored_steps else "none"
            reason = (
                f"checkpoint at step {step} could not be stored at {uri}: {store_error(exc)} ({STORE_TRIES} tries); "
                f"training stopped rather than go on without checkpoints (latest stored: {latest})"
            )
            if not self.store_failed:
                self.store_failed = reason
                log.error("job %s attempt %d: %s", *self._id, reason)
                self.log_line("agent", reason)
                await self._stop_process()
            return
        self.stored_steps.append(step)
        metrics = {k: float(v) for k, v in saved["metrics"].items() if isinstance(v, (int, float))}
        self.report(checkpoint=apb.CheckpointReport(step=step, uri=uri, metrics=metrics))

    def _checkpoint_lost(self) -> bool:
        """A checkpoint could not be stored: the run was stopped and fails with why (see below). Not when the run
        was stopped for another reason with an outcome of its own (terminated, fenced, the agent stopping).

        FAILED rather than a retry through the requeue path: the agent protocol has no "retry me" outcome (a
        requeue is the service's answer to a *lost* agent, not to a report), and the artifact store is one store
        shared by every agent, so another attempt elsewhere would meet the same full or read-only store and
        burn the job's attempts on it. A full disk or a read-only mount is the operator's to fix; the checkpoints
        stored before stay intact and listed, so nothing trained up to them is lost. Brief faults are absorbed
        by the retries in _store_dir before it comes to this."""
        if not self.store_failed or self.cancelled or self.shutting_down or self.fenced:
            return False
        self.report(state=apb.StateReport(state=apb.REPORTED_STATE_FAILED, reason=self.store_failed))
        return True

    async def pause(self) -> None:
        """Ask the runner to checkpoint and stop (SIGUSR1); it exits with PAUSED_EXIT_CODE."""
        if self.stage == "saving":
            # The saving stage has no checkpoint to save (the training's are stored already) nor a pause to honour:
            # it is stopped as a terminate stops it, and the job pauses; a resume trains on from the latest
            # checkpoint and saves again. Letting it finish instead would hold the GPUs for as long as a merge
            # takes, behind a pause nothing could then hurry (a terminate is not sent to a pausing run).
            self.pausing = True
            await self._stop_process()
            return
        proc = self.proc
        if proc is None or proc.returncode is not None:
            await self.terminate()  # not started yet: nothing to checkpoint, the service keeps its last one
            return
        targets = [proc.pid]
        if self.distributed:
            # torchrun dies of SIGUSR1 (it doesn't pass it on): the signal goes to its workers, which checkpoint
            # and stop; torchrun then ends with them.
            targets = [p.pid for p in _children(proc.pid, recursive=False)]
            if not targets:  # no worker started yet: nothing to checkpoint
                await self.terminate()
                return
        self.pausing = True
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

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
            if name == "stderr" and any(marker in text for marker in OOM_MARKERS):
                self.out_of_memory = True
            ready = parse_serve_ready(text) if name == "stdout" and self.kind == "serve" else None
            if ready is not None and not self.serve_port:
                self.serve_port = int(ready["port"])
                self.log_line("agent", f"inference worker listening on port {self.serve_port}")
                self.report(state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING, reason="serving"))
                continue
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
        """SIGTERM to the process group, SIGKILL after the grace period; the run ends CANCELLED."""
        self.cancelled = True
        if not (self.shutting_down or self.fenced) and self.proc is not None and self.proc.returncode is None:
            self.log_line("agent", f"terminating the {self.stage} process (SIGTERM to its process group)")
        await self._stop_process()

    async def _stop_process(self) -> None:
        """SIGTERM to the running stage's process group, SIGKILL after the grace period."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        # torchrun starts each worker in a session of its own, out of reach of the group's signals: noted
        # now, while they are still the runner's children, so the SIGKILL below reaches them too.
        tree = _children(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.agent.settings.agent_terminate_grace_seconds)
        except TimeoutError:
            tree += _children(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for child in tree:
                with contextlib.suppress(psutil.Error):
                    child.kill()  # psutil checks the pid still names the same process


def _children(pid: int, recursive: bool = True) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=recursive)
    except psutil.Error:
        return []


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


# Reconnecting to the jobs service: the first wait, doubled per failed try up to the last (seconds).
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 8.0


def _brief(exc: BaseException) -> str:
    """An RPC error as its code and details on one line, anything else as its text."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.tls = TlsConfig.from_settings(settings)  # checked here: the channel only opens in run_forever's task
        self.reporter = Reporter(on_stop=self._stop_fenced)
        self.runs: dict[str, JobRun] = {}
        self.tasks: set[asyncio.Task] = set()
        self.agent_id = ""
        self.registrations = 0  # sessions registered so far: a reconnect after one starts its backoff over
        self.free_gpus: list[int] | None = None  # the GPUs no run holds; known once the node is probed
        self.credential_file = Path(settings.agent_credential_file or Path(settings.agent_work_dir) / "credential")
        self.credential = ""
        self.relay = InferenceRelay(self._worker_port)
        # Started by serve() (an agent process); an Agent made in-process starts every runner cold.
        self.warm: WarmRunners | None = None

    def start_warm_runners(self) -> None:
        if self.settings.agent_warm_runners and self.warm is None:
            base = without_service_secrets(os.environ)
            self.warm = WarmRunners.for_agent(self.settings.agent_python, base, LINE_LIMIT)
            self.warm.start()

    def _worker_port(self, job_id: str) -> int:
        run = self.runs.get(job_id)
        return run.serve_port if run is not None and run.kind == "serve" and not run.cancelled else 0

    def resources(self) -> apb.AgentResources:
        """What this node offers: GPUs (count, models, memory per GPU: the smallest one's when they differ),
        CPUs, RAM, the labels from TUNEFORGE_AGENT_LABELS and the slots."""
        gpus = detect_gpus(self.settings.agent_python)
        if self.free_gpus is None:
            self.free_gpus = list(range(len(gpus)))
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
        backoff = RECONNECT_FIRST_S
        credentials = call_credentials(lambda: credentials_metadata(self.credential))
        async with open_channel(self.settings.jobs_address, tls=self.tls, interceptors=credentials) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            while True:
                registered = self.registrations
                try:
                    await self._authenticate(stub)
                    await self._session(stub)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self.registrations != registered:
                        backoff = RECONNECT_FIRST_S  # the session was up: this is a new outage, start over
                    # Jittered below the ceiling, so many agents don't reconnect in step and none waits longer
                    # than RECONNECT_MAX_S, which stays under the lease TTL (an agent back in time keeps its jobs).
                    delay = backoff * (0.5 + random.random() / 2)
                    log.warning("connection to jobs service lost (%s); reconnecting in %.1fs", _brief(exc), delay)
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
                else:
                    backoff = RECONNECT_FIRST_S

    async def _authenticate(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        """Use the stored credential; without one (or when the service no longer knows it) join with the join
        token. No token and no credential: go on without one (a jobs service that requires it says so)."""
        if not self.credential and self.credential_file.exists():
            self.credential = self.credential_file.read_text().strip()
        if self.credential:
            try:
                await stub.Heartbeat(apb.HeartbeatRequest(agent_id=self.agent_id or "-"), timeout=10)
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAUTHENTICATED or not self.settings.agent_join_token:
                    return  # other answers (an unknown agent id) are for the session to handle
                log.warning("the jobs service no longer accepts this node's credential; joining again")
        if not self.settings.agent_join_token:
            return
        resp = await stub.JoinAgent(
            apb.JoinAgentRequest(join_token=self.settings.agent_join_token, name=self.settings.agent_name), timeout=10
        )
        self.credential_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.credential_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(resp.credential)
        self.credential = resp.credential
        log.info("joined as credential %s", resp.credential_id)

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
        self.registrations += 1
        log.info("registered as %s (resumed=%s)", self.agent_id, resp.resumed)
        await run_until_first_failure(
            self._heartbeats(stub, resp.heartbeat_interval_seconds or 3),
            self._assignments(stub),
            self.reporter.run_stream(stub),
            self.relay.run_forever(stub, self.agent_id),
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
        run.gpus = self._take_gpus(assignment.job_id, assignment.gpu_count)
        self.runs[assignment.job_id] = run
        task = asyncio.create_task(run.run(), name=f"job-{assignment.job_id}")
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, assignment.job_id))

    def _finished(self, job_id: str, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        run = self.runs.pop(job_id, None)
        if run is not None and self.free_gpus is not None:
            self.free_gpus = sorted(self.free_gpus + run.gpus)

    def _take_gpus(self, job_id: str, count: int) -> list[int]:
        """GPUs for a run that asked for `count`, lowest free first. The scheduler only sends a job whose GPUs
        are free here; when this agent knows fewer (probe failed), the run goes unpinned rather than not at all.
        A job that asked for none isn't pinned either: it sees what the agent sees."""
        free = self.free_gpus or []
        if count <= 0 or len(free) < count:
            if count > 0:
                log.warning("job %s asks for %d GPU(s), %d known free here: not pinning it", job_id, count, len(free))
            return []
        taken, self.free_gpus = free[:count], free[count:]
        return taken

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
    server, port = await start_server([], settings.grpc_host, settings.agent_grpc_port, tls=agent.tls)
    metrics = serve_metrics(settings.metrics_port, settings.grpc_host)
    print(f"TUNEFORGE_READY trainer grpc={port} metrics={metrics}", flush=True)
    agent.start_warm_runners()
    runner = asyncio.create_task(agent.run_forever())
    await wait_for_shutdown_signal()
    await agent.shutdown()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    if agent.warm is not None:
        await agent.warm.close()
    await server.stop(grace=2)


def main() -> None:
    from tuneforge_common.runtime import run_service

    run_service(serve)


if __name__ == "__main__":
    main()
