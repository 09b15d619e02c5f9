"""Added methods end to end: an unchanged DeepExtension-style training script, registered in the catalog
with the environment it needs, trains on a real agent process in that environment (a venv made here,
without TuneForge in it); a method whose environment the node lacks fails saying so. Catalog and jobs on
PostgreSQL over gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from tests.integration.test_jobs_service import StaticCatalog
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge_catalog import api as catalog_api
from tuneforge_catalog.main import CatalogSettings, build_catalog
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api as jobs_api
from tuneforge_jobs.catalog_client import GrpcCatalog
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import CatalogInputs, Jobs

REPO = Path(__file__).resolve().parents[2]
METHODS_DIR = REPO / "examples" / "methods"
DATASET = REPO / "examples" / "datasets" / "sample-chat.jsonl"


@dataclass
class Stack:
    catalog: catalog_pb2_grpc.CatalogServiceStub
    jobs: Jobs
    jobs_port: int
    dataset_id: str
    tmp_path: Path


@pytest.fixture
async def stack(postgres_url, second_postgres_url, tmp_path) -> AsyncIterator[Stack]:
    from tuneforge_trainer.tiny_model import build_tiny_model

    model_dir = await asyncio.to_thread(build_tiny_model, tmp_path / "models" / "tiny", 0)
    catalog, _ = await build_catalog(
        CatalogSettings(
            catalog_database_url=postgres_url,
            artifact_root=str(tmp_path / "artifacts"),
            catalog_seed_models=str(model_dir),
        )
    )
    catalog_server, catalog_port = await start_server([catalog_api.binding(catalog)], "127.0.0.1", 0)
    engine = make_engine(second_postgres_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    catalog_client = GrpcCatalog(f"127.0.0.1:{catalog_port}")
    changes = Notifier()
    jobs = Jobs(
        engine=engine,
        catalog=catalog_client,
        artifact_root=str(tmp_path / "artifacts"),
        subject_root="t",
        on_change=changes.notify,
    )
    jobs_server, jobs_port = await start_server(jobs_api.bindings(jobs, changes), "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{catalog_port}")
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)

    async def chunks():
        yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name="chat"))
        yield cpb.UploadDatasetRequest(chunk=DATASET.read_bytes())

    dataset = (await stub.UploadDataset(chunks(), timeout=30)).dataset
    yield Stack(stub, jobs, jobs_port, dataset.id, tmp_path)
    for closable in (channel, catalog_client):
        await closable.close()
    await jobs_server.stop(None)
    await catalog_server.stop(None)
    await catalog.close()
    await catalog.engine.dispose()
    await engine.dispose()


async def add_method(s: Stack, name: str, env: str, saving: dict[str, str] | None = None) -> None:
    """An added method training with deepextension_style/train.py in `env`; with `saving`, of the complete
    lifecycle, whose saving stage is that {"file": ..., "env": ...}."""
    stages: dict[str, Any] = {"training": {"file": "deepextension_style/train.py", "env": env}}
    if saving is not None:
        stages["saving"] = saving
    definition = struct_pb2.Struct()
    definition.update(
        {
            "name": name,
            "training_type": "chat",
            "lifecycle": "customized" if saving is None else "complete",
            "stages": stages,
        }
    )
    await s.catalog.CreateMethod(cpb.CreateMethodRequest(definition=definition), timeout=10)


def start_agent(s: Stack, **settings: str) -> subprocess.Popen:
    # No conda of this machine's, and a HOME without ~/.conda: only what the test maps is found.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDA", "MAMBA"))}
    defaults = dict(
        HOME=str(s.tmp_path / "home"),
        TUNEFORGE_JOBS_ADDRESS=f"127.0.0.1:{s.jobs_port}",
        TUNEFORGE_ARTIFACT_ROOT=str(s.tmp_path / "artifacts"),
        TUNEFORGE_AGENT_NAME="node",
        TUNEFORGE_AGENT_WORK_DIR=str(s.tmp_path / "agent"),
        TUNEFORGE_AGENT_METHODS_DIR=str(METHODS_DIR),
        TUNEFORGE_METRICS_PORT="-1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="2",
    )
    env.update({**defaults, **settings})  # a test's settings win (TUNEFORGE_AGENT_METHODS_DIR, ...)
    log = (s.tmp_path / "agent.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "tuneforge_trainer.agent"], env=env, stdout=log, stderr=log)


def stop(agent: subprocess.Popen) -> None:
    agent.terminate()
    try:
        agent.wait(timeout=15)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait(timeout=5)


async def finished(jobs: Jobs, job_id: str, within: float) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        job = await jobs.get(job_id)
        if job.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        await asyncio.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish within {within}s")


def venv_with_torch_but_not_tuneforge(path: Path) -> Path:
    """A separate environment, as a team's own conda env would be: its own prefix, torch and transformers
    reachable (through a .pth line to this venv's packages), TuneForge not installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = Path(
        subprocess.run(
            [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # A plain path line: the packages there import, the editable installs' own .pth files aren't processed.
    (site / "project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path


@pytest.mark.timeout(120)
async def test_an_unchanged_deepextension_script_trains_in_the_environment_its_method_names(stack):
    venv = await asyncio.to_thread(venv_with_torch_but_not_tuneforge, stack.tmp_path / "envs" / "deepextension")
    no_sdk = await asyncio.to_thread(subprocess.run, [venv / "bin" / "python", "-c", "import tuneforge_trainer"])
    assert no_sdk.returncode != 0  # the script must not need TuneForge: this environment doesn't have it
    await add_method(stack, "de-style", "deepextension")
    job = await stack.jobs.submit(
        "tiny", stack.dataset_id, "de-style", {"max_steps": 4, "batch_size": 2, "max_seq_length": 128}
    )
    assert (job.entrypoint, job.python_env) == ("deepextension_style/train.py", "deepextension")
    agent = start_agent(stack, TUNEFORGE_AGENT_PYTHON_ENVS=f"deepextension={venv}")
    try:
        done = await finished(stack.jobs, job.id, 90)
        logs = [line.text for line in await stack.jobs.logs(job.id, 0, 1000)]
        assert done.state == "SUCCEEDED", f"{done.state_reason}\n" + "\n".join(logs[-20:])
    finally:
        stop(agent)
    assert any(f"with {venv}/bin/python (python_env 'deepextension')" in line for line in logs)
    losses = await stack.jobs.metrics(job.id, ["loss"], 0, 1000)
    assert [p.step for p in losses] == [1, 2, 3, 4] and all(p.value > 0 for p in losses)
    assert (await stack.jobs.get(job.id)).progress == 100.0
    output = Path(done.output_uri)
    assert (output / "model.safetensors").is_file()
    saved = json.loads((output / "training_args.json").read_text())
    assert (saved["lora_rank"], saved["max_steps"], saved["load_in_4bit"]) == (8, 4, False)  # flags as given

    copy, _ = await stack.jobs.copy(job.id, {"max_steps": 2})
    assert (copy.entrypoint, copy.python_env) == ("deepextension_style/train.py", "deepextension")
    assert (job.saving_entrypoint, job.saving_python_env) == ("", "")  # the customized lifecycle saves nothing


@pytest.mark.timeout(120)
async def test_a_complete_methods_saving_stage_runs_after_its_training_and_its_model_is_stored(stack):
    from transformers import AutoModelForCausalLM

    venv = await asyncio.to_thread(venv_with_torch_but_not_tuneforge, stack.tmp_path / "envs" / "deepextension")
    # No env for the saving stage: it runs in the training's.
    await add_method(stack, "de-complete", "deepextension", saving={"file": "deepextension_style/save.py"})
    job = await stack.jobs.submit("tiny", stack.dataset_id, "de-complete", {"max_steps": 2, "max_seq_length": 128})
    assert (job.saving_entrypoint, job.saving_python_env) == ("deepextension_style/save.py", "deepextension")
    agent = start_agent(stack, TUNEFORGE_AGENT_PYTHON_ENVS=f"deepextension={venv}")
    try:
        done = await finished(stack.jobs, job.id, 90)
        logs = [line.text for line in await stack.jobs.logs(job.id, 0, 1000)]
        assert done.state == "SUCCEEDED", f"{done.state_reason}\n" + "\n".join(logs[-20:])
    finally:
        stop(agent)
    save_py = METHODS_DIR / "deepextension_style" / "save.py"
    marker = f"saving stage: running {save_py} with {venv}/bin/python (python_env 'deepextension')"
    assert marker in logs
    said = next(i for i, line in enumerate(logs) if line.startswith("loaded the fully fine-tuned model; saved"))
    assert logs.index(marker) < said  # the marker comes before the saving stage's own lines
    assert [p.value for p in await stack.jobs.metrics(job.id, ["loss"], 0, 1000)][-1] > 0
    changed = await stack.jobs.metrics(job.id, ["tensors_changed"], 0, 1000)
    assert len(changed) == 1 and changed[0].value > 0  # the saving stage's [log_data]: training changed weights
    output = Path(done.output_uri)
    assert (output / "model.safetensors").is_file() and (output / "complete" / "model.safetensors").is_file()
    complete = await asyncio.to_thread(AutoModelForCausalLM.from_pretrained, str(output / "complete"))
    trained = await asyncio.to_thread(AutoModelForCausalLM.from_pretrained, str(output))
    assert all(a.equal(b) for a, b in zip(complete.parameters(), trained.parameters(), strict=True))

    copy, _ = await stack.jobs.copy(job.id, {"max_steps": 1})  # resolved again from the catalog
    assert (copy.saving_entrypoint, copy.saving_python_env) == ("deepextension_style/save.py", "deepextension")


@pytest.mark.timeout(90)
async def test_a_saving_stage_that_fails_fails_the_job_with_its_error_line(stack):
    methods = stack.tmp_path / "methods"
    await asyncio.to_thread(shutil.copytree, METHODS_DIR / "deepextension_style", methods / "deepextension_style")
    (methods / "deepextension_style" / "broken_save.py").write_text(
        "import sys\n"
        "print(f'saving in {sys.prefix}', flush=True)\n"
        "print('error: cannot merge into the base: no space left on device', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    saver = await asyncio.to_thread(venv_with_torch_but_not_tuneforge, stack.tmp_path / "envs" / "saver")
    # Training in the agent's own interpreter, saving in an environment of its own.
    await add_method(
        stack, "de-broken-save", "base", saving={"file": "deepextension_style/broken_save.py", "env": "saver"}
    )
    job = await stack.jobs.submit("tiny", stack.dataset_id, "de-broken-save", {"max_steps": 1})
    agent = start_agent(stack, TUNEFORGE_AGENT_PYTHON_ENVS=f"saver={saver}", TUNEFORGE_AGENT_METHODS_DIR=str(methods))
    try:
        done = await finished(stack.jobs, job.id, 60)
        logs = [line.text for line in await stack.jobs.logs(job.id, 0, 1000)]
    finally:
        stop(agent)
    assert done.state == "FAILED" and done.attempt == 1, done.state_reason
    assert done.state_reason == "saving stage failed: error: cannot merge into the base: no space left on device"
    assert f"saving in {saver}" in logs  # the saving stage's env, not the training's
    assert not done.output_uri or not await asyncio.to_thread(Path(done.output_uri).is_dir)  # nothing stored


@pytest.mark.timeout(90)
async def test_a_method_whose_environment_the_node_lacks_fails_naming_it_and_where_it_looked(stack):
    await add_method(stack, "needs-env", "no-such-env")
    job = await stack.jobs.submit("tiny", stack.dataset_id, "needs-env", {"max_steps": 2})
    agent = start_agent(stack)
    try:
        done = await finished(stack.jobs, job.id, 60)
    finally:
        stop(agent)
    home_envs = stack.tmp_path / "home" / ".conda" / "envs" / "no-such-env" / "bin" / "python"
    assert done.state == "FAILED" and done.attempt == 1
    assert done.state_reason == (
        "python_env 'no-such-env': no Python interpreter found (not in agent_python_envs "
        f"(TUNEFORGE_AGENT_PYTHON_ENVS) nor a conda environment); looked at {home_envs}"
    )
    assert not (stack.tmp_path / "agent" / job.id / "attempt-1" / "dataset.jsonl").exists()  # nothing staged


class EnvCatalog(StaticCatalog):
    async def resolve_inputs(self, *args: Any, **kwargs: Any) -> CatalogInputs:
        inputs = await super().resolve_inputs(*args, **kwargs)
        return dataclasses.replace(
            inputs,
            entrypoint="team/train.py",
            python_env="team",
            saving_entrypoint="team/save.py",
            saving_python_env="team-save",
        )


async def test_an_assignment_carries_the_methods_environment_and_the_gpus_the_job_asked_for(tmp_path):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    changes = Notifier()
    jobs = Jobs(engine=engine, catalog=EnvCatalog(), artifact_root="/a", subject_root="t", on_change=changes.notify)
    server, port = await start_server(jobs_api.bindings(jobs, changes), "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        resources = apb.AgentResources(gpu_count=4, gpu_memory_bytes=80 << 30, slots=2)
        agent_id = (await agents.RegisterAgent(apb.RegisterAgentRequest(name="n", resources=resources))).agent_id
        await jobs.submit("m1", "d1", "team-sft", {}, resources={"gpu_count": 2})
        call = agents.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=agent_id))
        got = (await asyncio.wait_for(call.read(), 5)).assignment
        # Let the handler finish its next claim (a SQLite transaction) and park before the stream goes: a
        # handler cancelled mid-transaction on an engine disposed under it can leave the loop unable to close.
        await asyncio.sleep(0.5)
        call.cancel()
        assert (got.entrypoint, got.python_env, got.gpu_count) == ("team/train.py", "team", 2)
        assert (got.saving_entrypoint, got.saving_python_env) == ("team/save.py", "team-save")
    finally:
        await channel.close()
        await server.stop(1)
        await engine.dispose()
