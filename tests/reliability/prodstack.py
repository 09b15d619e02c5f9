"""A production-like TuneForge for fault tests: the embedded stack's real processes (NATS, catalog, jobs, a trainer
agent, gateway), but with both services' databases on PostgreSQL, short agent heartbeats, and the means to restart
one process and to watch a job as its clients do (SSE through the gateway, resuming with Last-Event-ID).

Also a private PostgreSQL cluster (`PrivatePostgres`) that a test may stop and start: the shared server is never
touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tuneforge_cli.embedded import EmbeddedStack, free_port
from tuneforge_common.db import create_postgres_database

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "datasets" / "sample-chat.jsonl"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

# Short leases: an agent heartbeats every second. The TTL stays long enough that a restarted jobs service (a few
# seconds of Python start-up on a busy CI machine) does not count a connected agent as lost.
FAST_LEASES = {
    "TUNEFORGE_JOBS_HEARTBEAT_INTERVAL_SECONDS": "1",
    "TUNEFORGE_JOBS_LEASE_TTL_SECONDS": "15",
    "TUNEFORGE_AUTH_CACHE_SECONDS": "5",
    "TUNEFORGE_LOG_LEVEL": "INFO",
}


class ProdStack:
    """The stack, an authenticated HTTP client on its gateway, and restart helpers."""

    def __init__(self, data_dir: Path, catalog_db: str, jobs_db: str, env: dict[str, str] | None = None) -> None:
        overrides = {
            **FAST_LEASES,
            "TUNEFORGE_CATALOG_DATABASE_URL": catalog_db,
            "TUNEFORGE_JOBS_DATABASE_URL": jobs_db,
            **(env or {}),
        }
        self.embedded = EmbeddedStack(data_dir=data_dir, gateway_port=0, env_overrides=overrides)
        self.stops: dict[str, tuple[float, bool]] = {}

    def start(self) -> None:
        try:
            self.embedded.start()
        except Exception:
            self.embedded.stop(grace=5)
            raise
        self.key = self.embedded.admin_key
        self.url = self.embedded.gateway_url
        self.http = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.key}"})

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()
        self.embedded.stop(grace=10)

    def restart(self, name: str, sig: signal.Signals = signal.SIGTERM) -> float:
        """Stop the service, start it again on the same port with the same settings, wait until it is healthy;
        returns the monotonic time at which it was healthy again. How long the stop took, and whether the process
        ended by itself (no SIGKILL after the grace period), go to `stops`."""
        began = time.monotonic()
        stopped = self.embedded.stop_one(name, sig)
        self.stops[name] = (time.monotonic() - began, stopped)
        self.embedded.start_one(name, timeout=120)
        return time.monotonic()

    def trained_steps(self, job_id: str) -> int:
        """The latest step the job's runner saved a checkpoint of, read off the agent's disk: unlike what the
        services report it goes on while they are down."""
        found = (self.embedded.data_dir / "agent" / job_id).glob("attempt-*/output/checkpoint-*")
        return max((int(p.name.removeprefix("checkpoint-")) for p in found if p.name[11:].isdigit()), default=0)

    def log(self, name: str) -> str:
        return (self.embedded.data_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def upload_sample_dataset(self) -> str:
        resp = self.http.post(
            "/api/v1/datasets", files={"file": ("sample-chat.jsonl", SAMPLE.read_bytes())}, data={"name": "sample"}
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def submit_tiny_job(self, dataset_id: str, max_steps: int, save_steps: int) -> dict[str, Any]:
        resp = self.http.post(
            "/api/v1/jobs",
            json={
                "model_id": "tiny-chat",
                "dataset_id": dataset_id,
                "method_id": "sft-lora",
                "parameters": {
                    "max_steps": max_steps,
                    "save_steps": save_steps,
                    "batch_size": 2,
                    "learning_rate": 1e-3,
                    "lora_rank": 4,
                    "logging_steps": 1,
                    # Short packed sequences: a step costs a fraction of a CPU-second, so a run's length is set by
                    # max_steps rather than by the sample dataset's size.
                    "max_seq_length": 64,
                },
            },
        )
        assert resp.status_code == 201, resp.text
        return resp.json()

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/api/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                job = self.job(job_id)
                if job["state"] in states:
                    return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f}s: {job}")

    def metric_steps(self, job_id: str, name: str = "loss") -> list[int]:
        resp = self.http.get(f"/api/v1/jobs/{job_id}/metrics", params={"name": name})
        assert resp.status_code == 200, resp.text
        return [int(p["step"]) for p in resp.json()["points"]]

    def log_seqs(self, job_id: str) -> list[int]:
        seqs: list[int] = []
        token = ""
        while True:
            resp = self.http.get(f"/api/v1/jobs/{job_id}/logs", params={"page_size": 1000, "page_token": token})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            seqs += [int(line["seq"]) for line in body.get("lines", [])]
            token = body.get("next_page_token", "")
            if not token:
                return seqs

    def history(self, job_id: str) -> list[dict[str, Any]]:
        resp = self.http.get(f"/api/v1/jobs/{job_id}/history")
        assert resp.status_code == 200, resp.text
        return resp.json()["events"]


@contextlib.contextmanager
def prod_stack(data_dir: Path, catalog_db: str, jobs_db: str, env: dict[str, str] | None = None) -> Iterator[ProdStack]:
    stack = ProdStack(data_dir, catalog_db, jobs_db, env)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@dataclass
class Seen:
    at: float  # monotonic time it reached the watcher
    kind: str
    data: dict[str, Any]


@dataclass
class _Watcher:
    """A job watched in a thread as a client does: each session reads until the job's terminal snapshot (or an end);
    a dropped session (a service restarting) is retried after a jittered backoff, resuming from where it was."""

    job_id: str
    seen: list[Seen] = field(default_factory=list)
    connects: int = 0
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _failures: int = 0  # sessions failed in a row: the backoff grows with them

    def start(self) -> Any:
        threading.Thread(target=self._run, daemon=True, name=f"{type(self).__name__}-{self.job_id}").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def steps(self, name: str = "loss") -> list[int]:
        return [int(s.data["step"]) for s in self.seen if s.kind == "metric" and s.data["name"] == name]

    def points_after(self, moment: float, name: str = "loss") -> int:
        return sum(1 for s in list(self.seen) if s.kind == "metric" and s.data["name"] == name and s.at > moment)

    def first_metric_after(self, moment: float, name: str = "loss") -> float:
        return next(s.at for s in self.seen if s.kind == "metric" and s.data["name"] == name and s.at > moment)

    def _session(self) -> bool:
        """One connection, read to its end; True when the watch is over (no retry), raises to retry."""
        raise NotImplementedError

    def _connected(self) -> None:
        self.connects += 1
        self._failures = 0

    def _run(self) -> None:
        import random

        while not self._stop.is_set() and not self.done.is_set():
            try:
                if self._session():
                    return
            except Exception as exc:  # a restarting service: refused, reset, UNAVAILABLE, or an error event
                self.errors.append(f"{type(exc).__name__}: {exc}")
            if self.done.is_set() or self._stop.is_set():
                return
            time.sleep(random.uniform(0.5, 1.0) * min(5.0, 0.25 * 2**self._failures))
            self._failures += 1


@dataclass
class SseWatcher(_Watcher):
    """Watches a job's SSE stream through the gateway as a browser's EventSource does: when the connection drops
    (or the stream ends with an error event) it reconnects, sending the last event id it saw as Last-Event-ID.
    It stops at the job's terminal snapshot, which the stream sends last."""

    url: str = ""
    key: str = ""
    terminal: frozenset[str] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
    last_id: str = ""

    def _session(self) -> bool:
        headers = {"Authorization": f"Bearer {self.key}"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        with httpx.stream(
            "GET",
            f"{self.url}/api/v1/jobs/{self.job_id}/events",
            headers=headers,
            timeout=httpx.Timeout(10, read=30),
        ) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")
            self._connected()
            return self._read(resp)

    def _read(self, resp: httpx.Response) -> bool:
        event_id = kind = ""
        for line in resp.iter_lines():
            if self._stop.is_set():
                return True
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if kind == "error":
                    raise RuntimeError(f"error event {data}")
                self.seen.append(Seen(time.monotonic(), kind, data))
                if event_id:
                    self.last_id = event_id
                if kind == "job" and data.get("state") in self.terminal:
                    self.done.set()
                    return True
        raise RuntimeError("stream ended before the job did")


@dataclass
class GrpcWatcher(_Watcher):
    """Watches a job with JobService.WatchJob straight on the jobs service, as an internal gRPC caller does: when the
    call fails UNAVAILABLE (the service restarting) it calls again with the last cursor as after_cursor."""

    address: str = ""
    key: str = ""
    cursor: str = ""

    def _session(self) -> bool:
        import grpc
        from google.protobuf import json_format

        from tuneforge.jobs.v1 import jobs_pb2 as jpb
        from tuneforge.jobs.v1 import jobs_pb2_grpc

        metadata = [("authorization", f"Bearer {self.key}")]
        with grpc.insecure_channel(self.address) as channel:
            call = jobs_pb2_grpc.JobServiceStub(channel).WatchJob(
                jpb.WatchJobRequest(job_id=self.job_id, after_cursor=self.cursor), metadata=metadata
            )
            self._connected()
            try:
                for update in call:
                    kind = update.WhichOneof("update") or ""
                    data = json_format.MessageToDict(getattr(update, kind), preserving_proto_field_name=True)
                    self.seen.append(Seen(time.monotonic(), kind, data))
                    self.cursor = update.cursor
                    if self._stop.is_set():
                        call.cancel()
                        return True
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    self.errors.append(f"{err.code().name}: {err.details()}")
                    return True
                raise ConnectionError(f"{err.code().name}: {err.details()}") from None
        self.done.set()  # the stream ends cleanly when the job is over
        return True


class Pacer:
    """Holds a job's training process to at most `steps_per_s` from when it starts: SIGSTOP while the steps seen are
    ahead of that pace, SIGCONT when they are not. The tiny model trains 10-80 steps a second on an idle machine
    and about 1 on a loaded one, so a job sized for the loaded machine ended before the last restart on the idle
    one; paced, it runs at least `steps / steps_per_s` seconds anywhere and no slower where the machine is slow.

    The runner is found as the agent's child that leads its own session (the agent starts it so); its process
    group is stopped, with any workers it started."""

    def __init__(self, agent: subprocess.Popen[Any], steps_seen: Callable[[], int], steps_per_s: float) -> None:
        self.agent_pid = agent.pid  # a runner ends with its attempt: a new one is looked for after each
        self.steps_seen = steps_seen
        self.steps_per_s = steps_per_s
        self.stopped_s = 0.0  # time the runner spent held, for the figures
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pacer")

    def __enter__(self) -> Pacer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _runner_group(self) -> int | None:
        """The runner: a descendant of the agent leading its own session. A warm runner is a fork of the agent's
        warm-runner server (which leads a session too, and whose command line it still has): the server is the
        agent's child, its runners are not."""
        import os

        import psutil

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.agent_pid).children(recursive=True):
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    server = child.ppid() == self.agent_pid and "tuneforge_trainer.forkserver" in child.cmdline()
                    if os.getpgid(child.pid) == child.pid and not server:
                        return child.pid
        return None

    def _signal(self, group: int, sig: signal.Signals) -> None:
        import os

        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)

    def _run(self) -> None:
        group: int | None = None
        began = held_since = None
        while not self._stop.wait(0.05):
            if group is None:
                group = self._runner_group()
                if group is None:
                    continue
            if began is None:
                if not self.steps_seen():
                    continue  # the pace counts from the first step: loading the model is not held
                began = time.monotonic()
            ahead = self.steps_seen() > (time.monotonic() - began) * self.steps_per_s
            if ahead and held_since is None:
                self._signal(group, signal.SIGSTOP)
                held_since = time.monotonic()
            elif not ahead and held_since is not None:
                self._signal(group, signal.SIGCONT)
                self.stopped_s += time.monotonic() - held_since
                held_since = None
        if group is not None and held_since is not None:
            self._signal(group, signal.SIGCONT)
            self.stopped_s += time.monotonic() - held_since


def wait_until(check: Callable[[], bool], what: str, timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class PrivatePostgres:
    """A PostgreSQL 15 cluster of the test's own (initdb in a temporary directory, owned by the postgres user), on
    a free port, that the test may stop and start again; removed at the end."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tf-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "pg"
        self.log = self.dir / "pg.log"
        self.port = free_port()
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"])

    def _as_postgres(self, args: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        pg_ctl = str(PG_BIN / "pg_ctl")
        self._as_postgres([pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start"])

    def stop(self) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database on this cluster (`name` and a random suffix): its SQLAlchemy URL."""
        return asyncio.run(create_postgres_database(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", name))

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
