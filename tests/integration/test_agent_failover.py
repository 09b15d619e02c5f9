"""Real agent processes and sft-lora runners against the jobs service on PostgreSQL: a pause checkpoints and frees
the agent. The helpers here also serve tests/reliability/test_agent_kills.py, where an agent is killed mid-run
(repeatedly) and its job resumes from its latest checkpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tuneforge_common.db import make_engine, migrate
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import CatalogInputs, Jobs

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "examples" / "datasets" / "sample-chat.jsonl"
MAX_STEPS = 24


class TinyCatalog:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    async def resolve_inputs(self, model_id, dataset_id, method_id, parameters, base=None) -> CatalogInputs:
        params = {"max_steps": MAX_STEPS, "save_steps": 4, "logging_steps": 1, "batch_size": 2, **parameters}
        return CatalogInputs(
            str(self.model_dir), str(DATASET), "tuneforge_trainer.methods.sft_lora", params, dataset_rows=40
        )

    async def dataset_tokens(self, dataset_id: str, model_id: str, max_seq_length: int) -> tuple[int, int]:
        return 0, 0

    async def publish_model(self, *args: Any) -> str:
        raise AssertionError("not used")


async def serve_jobs(postgres_url: str, tmp_path: Path, lease_ttl_seconds: int) -> tuple[Jobs, Any, int]:
    """The jobs service on PostgreSQL over gRPC, with short leases so a lost agent is noticed quickly."""
    from tuneforge_trainer.tiny_model import build_tiny_model

    model_dir = await asyncio.to_thread(build_tiny_model, tmp_path / "tiny", 0)
    engine = make_engine(postgres_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    changes = Notifier()
    jobs = Jobs(
        engine=engine,
        catalog=TinyCatalog(model_dir),
        artifact_root=str(tmp_path / "artifacts"),
        subject_root="t",
        lease_ttl_seconds=lease_ttl_seconds,
        heartbeat_interval_seconds=1,
        on_change=changes.notify,
    )
    server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
    return jobs, server, port


def start_agent(name: str, port: int, tmp_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "TUNEFORGE_JOBS_ADDRESS": f"127.0.0.1:{port}",
        "TUNEFORGE_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "TUNEFORGE_AGENT_NAME": name,
        "TUNEFORGE_AGENT_WORK_DIR": str(tmp_path / name),
        "TUNEFORGE_METRICS_PORT": "-1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
    }
    log = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "tuneforge_trainer.agent"], env=env, stdout=log, stderr=log)


def kill_with_children(proc: subprocess.Popen) -> None:
    """As a machine dying would: the agent and its runner, at once, with no goodbye."""
    children = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *children]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


async def wait_for(predicate, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(300)
async def test_pausing_a_running_job_checkpoints_frees_the_agent_and_resume_finishes_it(postgres_url, tmp_path):
    jobs, server, port = await serve_jobs(postgres_url, tmp_path, lease_ttl_seconds=5)
    agent = start_agent("only", port, tmp_path)
    try:
        # save_steps 0: the pause itself must save the checkpoint the resume starts from.
        job = await jobs.submit("tiny", "chat", "sft-lora", {"save_steps": 0, "max_steps": 400})

        async def training() -> Any:
            return (await jobs.get(job.id)).current_step >= 3

        await wait_for(training, 180, "a few steps")
        await jobs.pause(job.id)

        async def paused() -> Any:
            current = await jobs.get(job.id)
            return current if current.state in ("PAUSED", "FAILED", "SUCCEEDED") else None

        stopped = await wait_for(paused, 120, "the pause")
        logs = (tmp_path / "only.log").read_text()[-2000:]
        assert stopped.state == "PAUSED", f"{stopped.state_reason}\n{logs}"
        kept = await jobs.checkpoints(job.id)
        assert kept and stopped.agent_id is None and stopped.current_step < 400
        assert await asyncio.to_thread(os.path.isdir, kept[-1].uri)
        await jobs.resume(job.id)

        async def resumed_run() -> Any:
            current = await jobs.get(job.id)
            return current if current.attempt == 2 and current.state == "RUNNING" else None

        running = await wait_for(resumed_run, 120, "the resumed attempt to start")
        assert running.resumed_from_step == kept[-1].step
        await jobs.cancel(job.id)  # the rest of 400 steps would only slow the suite down
    finally:
        if agent.poll() is None:
            kill_with_children(agent)
        await server.stop(None)
        await jobs.engine.dispose()
