"""The lifecycle's less common paths with real processes: an added method's own inference, deployment and saving
files (seed 003) are what its published models' deployments and merges run, on a real agent process in the
method's own Python environment; a deployment whose agent process dies takes its worker with it, goes back to
pending and comes back live on another agent. The real catalog and jobs services on PostgreSQL over gRPC, short
leases, a reaper as main() runs.

The added methods' files are this test's own and need only the standard library: the training copies a real PEFT
adapter (made once here on the tiny model) into its output, as a training saves one; the inference workers answer
a chat completion with what they were started with; the saving stage copies the base model and adds a marker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2

from tests.conftest import _fresh_postgres_database
from tests.trainer.lora_adapter import make_adapter
from tuneforge.catalog.v1 import catalog_pb2 as cpb
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.common.v1 import common_pb2
from tuneforge.jobs.v1 import inference_pb2 as ipb
from tuneforge.jobs.v1 import inference_pb2_grpc, jobs_pb2_grpc, lifecycle_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import lifecycle_pb2 as lpb
from tuneforge_catalog import api as catalog_api
from tuneforge_catalog.jobs_client import GrpcJobs
from tuneforge_catalog.main import CatalogSettings, build_catalog
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api as jobs_api
from tuneforge_jobs.catalog_client import GrpcCatalog
from tuneforge_jobs.inference import InferenceRouter
from tuneforge_jobs.main import MIGRATIONS, reaper
from tuneforge_jobs.model_lifecycle import ModelLifecycle
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "examples" / "datasets" / "sample-chat.jsonl"
BASE = "tiny"  # the seeded base model's id (its directory's name)
ENV = "team-env"  # the added methods' Python environment: a venv with nothing but the standard library
LEASE_S = 4  # an agent silent this long is lost
T = TypeVar("T")

# --- the added methods' files ---------------------------------------------------------------------------

FLAGS = """
import os, sys

def flags(required):
    '''--key=value flags (DeepExtension's runner contract: every parameter, then the paths); exits on others.'''
    found = {}
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if not key.startswith("--") or not sep:
            sys.exit(f"error: {arg!r} is not a --key=value flag")
        found[key[2:]] = value
    missing = [name for name in required if not found.get(name)]
    if missing:
        sys.exit(f"error: --{missing[0]} is required")
    return found
"""

TRAIN = """
import os, shutil
from team_flags import flags

given = flags(["model_path", "dataset_path", "output_dir"])
# The adapter this method "trains": a real PEFT adapter on the base model, made once by the test.
shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepared_adapter"), given["output_dir"])
print('[log_data]: {"code": 200, "progress": 100, "details": {"step": 1, "total_steps": 1, "loss": 0.5}}', flush=True)
"""

SAVE = """
import json, os, shutil, sys
from team_flags import flags

given = flags(["model_path", "adapter_path", "output_dir"])
if not os.path.isfile(os.path.join(given["adapter_path"], "adapter_config.json")):
    sys.exit("error: --adapter_path has no adapter_config.json")
shutil.copytree(given["model_path"], given["output_dir"], dirs_exist_ok=True)
marker = {"file": os.path.basename(__file__), "prefix": sys.prefix, "flags": given}
with open(os.path.join(given["output_dir"], "saved_by_team.json"), "w") as fh:
    json.dump(marker, fh)
print("saved the complete model", flush=True)
"""

# One inference worker, saved under each inference/deployment stage's file name: it answers with its own file.
WORKER = """
import http.server, json, os, signal, sys, threading
from team_flags import flags

given = flags(["model_path", "output_dir"])
WHO = {"file": os.path.basename(__file__), "prefix": sys.prefix, "pid": os.getpid(), "flags": given}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if self.path != "/v1/chat/completions":
            return self.answer(404, {"error": {"message": f"no {self.path}", "type": "invalid_request_error"}})
        content = json.dumps({**WHO, "asked": body["messages"][-1]["content"]})
        self.answer(200, {
            "id": "chatcmpl-team", "object": "chat.completion", "created": 0,
            "model": given.get("served_model_name", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the server's thread inherits the mask
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(f"serving {given['model_path']} with {os.path.basename(__file__)}", flush=True)
print("[serve_ready]: " + json.dumps({"host": "127.0.0.1", "port": server.server_address[1]}), flush=True)
signal.sigwait({signal.SIGTERM})
server.shutdown()
"""

# A complete method (its own saving, inference_customized and inference_complete files) and a live one with a
# custom deployment environment (its deployment file serves, whatever inference files it also names).
METHODS = {
    "team-complete": {
        "lifecycle": "complete",
        "stages": {
            "training": {"file": "team/train.py", "env": ENV},
            "saving": {"file": "team/save.py"},  # env: the training's
            "inference_customized": {"file": "team/serve_customized.py", "env": ENV},
            "inference_complete": {"file": "team/serve_complete.py", "env": ENV},
        },
    },
    "team-live": {
        "lifecycle": "live",
        "deployment_environment": "custom",
        "stages": {
            "training": {"file": "team/train.py", "env": ENV},
            "saving": {"file": "team/save.py", "env": ENV},
            "deployment": {"file": "team/deploy.py", "env": ENV},
            "inference_customized": {"file": "team/serve_customized.py", "env": ENV},
        },
    },
}


def write_methods(methods: Path, base_dir: Path) -> None:
    team = methods / "team"
    team.mkdir(parents=True)
    for name, text in {"team_flags.py": FLAGS, "train.py": TRAIN, "save.py": SAVE}.items():
        (team / name).write_text(textwrap.dedent(text))
    for name in ("serve_customized.py", "serve_complete.py", "deploy.py"):
        (team / name).write_text(textwrap.dedent(WORKER))
    make_adapter(base_dir, team / "prepared_adapter")


# --- the stack ------------------------------------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    catalog: catalog_pb2_grpc.CatalogServiceStub
    jobs_stub: jobs_pb2_grpc.JobServiceStub
    lifecycle: lifecycle_pb2_grpc.ModelLifecycleServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    jobs: Jobs
    jobs_port: int
    venv: Path
    base_uri: str = ""
    agents: list[subprocess.Popen] = field(default_factory=list)
    # Per added method: its CUSTOMIZED model, published from a training that ran on the agent.
    customized: dict[str, cpb.Model] = field(default_factory=dict)

    @property
    def agent(self) -> subprocess.Popen:
        return self.agents[-1]

    def start_agent(self, name: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDA", "MAMBA", "TUNEFORGE_"))}
        env.update(
            HOME=str(self.tmp / "home"),
            TUNEFORGE_JOBS_ADDRESS=f"127.0.0.1:{self.jobs_port}",
            TUNEFORGE_ARTIFACT_ROOT=str(self.tmp / "artifacts"),
            TUNEFORGE_AGENT_NAME=name,
            TUNEFORGE_AGENT_WORK_DIR=str(self.tmp / name),
            TUNEFORGE_AGENT_METHODS_DIR=str(self.tmp / "methods"),
            TUNEFORGE_AGENT_PYTHON_ENVS=f"{ENV}={self.venv}",
            TUNEFORGE_AGENT_TERMINATE_GRACE_SECONDS="5",
            TUNEFORGE_METRICS_PORT="-1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        log = (self.tmp / f"{name}.log").open("w")
        agent = subprocess.Popen([sys.executable, "-m", "tuneforge_trainer.agent"], env=env, stdout=log, stderr=log)
        self.agents.append(agent)
        return agent

    def agent_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.tmp.glob("*.log")))


async def wait_for(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, within: float = 60) -> T:
    """Poll read() until done(value); fail naming `what` and the last value seen."""
    deadline = time.monotonic() + within
    while True:
        value = await read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}; last seen: {value}")
        await asyncio.sleep(0.2)


async def job_of(w: World, job_id: str) -> jpb.Job:
    return (await w.jobs_stub.GetJob(jpb.GetJobRequest(job_id=job_id), timeout=10)).job


async def succeeded(w: World, job_id: str, within: float = 60) -> jpb.Job:
    ended = (jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED)
    job = await wait_for(lambda: job_of(w, job_id), lambda j: j.state in ended, f"job {job_id} to end", within)
    if job.state != jpb.JOB_STATE_SUCCEEDED:
        logs = [line.text for line in await w.jobs.logs(job_id, 0, 1000)]
        raise AssertionError(f"job {job_id}: {jpb.JobState.Name(job.state)} {job.state_reason}\n" + "\n".join(logs))
    return job


async def deployment_of(w: World, deployment_id: str) -> lpb.Deployment:
    request = lpb.GetDeploymentRequest(deployment_id=deployment_id)
    return (await w.lifecycle.GetDeployment(request, timeout=10)).deployment


async def deployed(w: World, deployment_id: str, state: int, what: str, within: float = 30) -> lpb.Deployment:
    return await wait_for(lambda: deployment_of(w, deployment_id), lambda d: d.state == state, what, within)


async def chat(w: World, model_id: str, text: str) -> tuple[int, dict[str, Any]]:
    """InferenceService.CreateChatCompletion: the worker's HTTP status and its answer."""
    body = {"model": model_id, "messages": [{"role": "user", "content": text}]}
    request = ipb.CreateChatCompletionRequest(model=model_id, body=json.dumps(body).encode())
    status, data = 0, b""
    async for part in w.inference.CreateChatCompletion(request, timeout=30):
        status, data = part.http_status, data + part.data
    return status, json.loads(data)


def answered_by(answer: dict[str, Any]) -> dict[str, Any]:
    """What the worker said about itself: its file, interpreter prefix, pid and flags."""
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    return json.loads(answer["choices"][0]["message"]["content"])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def undeploy_and_wait(w: World, deployment_id: str) -> lpb.Deployment:
    await w.lifecycle.UndeployModel(lpb.UndeployModelRequest(deployment_id=deployment_id), timeout=10)
    return await deployed(w, deployment_id, lpb.DEPLOYMENT_STATE_STOPPED, "the deployment to stop")


def kill_with_children(proc: subprocess.Popen) -> None:
    """As a machine dying would: the agent and its workers, at once, with no goodbye."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def stop_agent(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # a clean shutdown stops its runs
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        kill_with_children(proc)


@pytest.fixture(scope="module")
def databases() -> Iterator[tuple[str, str]]:
    """The catalog's and the jobs service's own PostgreSQL databases, for the whole module."""
    catalog_db, jobs_db = _fresh_postgres_database(), _fresh_postgres_database()
    yield next(catalog_db), next(jobs_db)
    for made in (catalog_db, jobs_db):
        next(made, None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(databases, tmp_path_factory) -> AsyncIterator[World]:
    """Catalog and jobs over gRPC (short leases, the reaper running), the added methods registered, one agent
    process, and each method's training run and published as a user would: SubmitJob, then PublishCheckpoint."""
    from tuneforge_trainer.tiny_model import build_tiny_model

    catalog_url, jobs_url = databases
    tmp = tmp_path_factory.mktemp("lifecycle")
    base_dir = await asyncio.to_thread(build_tiny_model, tmp / "models" / BASE, 0)
    await asyncio.to_thread(write_methods, tmp / "methods", base_dir)
    venv = tmp / "venvs" / ENV
    await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)

    catalog, _ = await build_catalog(
        CatalogSettings(
            catalog_database_url=catalog_url, artifact_root=str(tmp / "artifacts"), catalog_seed_models=str(base_dir)
        )
    )
    catalog_server, catalog_port = await start_server([catalog_api.binding(catalog)], "127.0.0.1", 0)
    engine = make_engine(jobs_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    catalog_client = GrpcCatalog(f"127.0.0.1:{catalog_port}")
    changes = Notifier()
    jobs = Jobs(
        engine=engine,
        catalog=catalog_client,
        artifact_root=str(tmp / "artifacts"),
        subject_root="t",
        lease_ttl_seconds=LEASE_S,
        heartbeat_interval_seconds=1,
        on_change=changes.notify,
    )
    jobs_server, jobs_port = await start_server(jobs_api.bindings(jobs, changes), "127.0.0.1", 0)
    catalog.jobs = catalog_jobs = GrpcJobs(f"127.0.0.1:{jobs_port}")
    reaping = asyncio.create_task(reaper(jobs, 0.5))
    catalog_channel = grpc.aio.insecure_channel(f"127.0.0.1:{catalog_port}")
    jobs_channel = grpc.aio.insecure_channel(f"127.0.0.1:{jobs_port}")
    w = World(
        tmp=tmp,
        catalog=catalog_pb2_grpc.CatalogServiceStub(catalog_channel),
        jobs_stub=jobs_pb2_grpc.JobServiceStub(jobs_channel),
        lifecycle=lifecycle_pb2_grpc.ModelLifecycleServiceStub(jobs_channel),
        inference=inference_pb2_grpc.InferenceServiceStub(jobs_channel),
        jobs=jobs,
        jobs_port=jobs_port,
        venv=venv,
    )
    try:
        w.base_uri = (await w.catalog.GetModel(cpb.GetModelRequest(model_id=BASE), timeout=10)).model.uri

        async def chunks():
            yield cpb.UploadDatasetRequest(metadata=cpb.DatasetUploadMetadata(name="chat"))
            yield cpb.UploadDatasetRequest(chunk=DATASET.read_bytes())

        dataset = (await w.catalog.UploadDataset(chunks(), timeout=60)).dataset
        trainings = {}
        for name, definition in METHODS.items():
            struct = struct_pb2.Struct()
            struct.update({"name": name, "training_type": "chat", **definition})
            await w.catalog.CreateMethod(cpb.CreateMethodRequest(definition=struct), timeout=10)
            parameters = struct_pb2.Struct()
            parameters.update({"max_steps": 1, "lora_rank": 4})
            request = jpb.SubmitJobRequest(model_id=BASE, dataset_id=dataset.id, method_id=name, parameters=parameters)
            trainings[name] = (await w.jobs_stub.SubmitJob(request, timeout=30)).job
        w.start_agent("node-a")
        for name, training in trainings.items():
            await succeeded(w, training.id, within=90)
            publish = jpb.PublishCheckpointRequest(job_id=training.id, name=f"{name}-adapter")
            model_id = (await w.jobs_stub.PublishCheckpoint(publish, timeout=30)).model_id
            w.customized[name] = (await w.catalog.GetModel(cpb.GetModelRequest(model_id=model_id), timeout=10)).model
        yield w
    finally:
        for agent in w.agents:
            await asyncio.to_thread(stop_agent, agent)
        reaping.cancel()
        for closable in (catalog_channel, jobs_channel, catalog_client, catalog_jobs):
            await closable.close()
        await jobs_server.stop(None)
        await catalog_server.stop(None)
        await catalog.close()
        await catalog.engine.dispose()
        await engine.dispose()


# --- the tests ------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_the_published_models_are_customized_with_the_added_methods_in_their_lineage(world):
    for name, model in world.customized.items():
        assert model.kind == common_pb2.MODEL_KIND_CUSTOMIZED
        assert (model.lineage.method_id, model.lineage.base_model_id) == (name, BASE)
        assert (Path(model.uri) / "adapter_config.json").is_file()
        # The complete method's training ran its saving stage too: the complete model next to the adapter.
        assert (Path(model.uri) / "complete" / "saved_by_team.json").is_file()


@pytest.mark.timeout(120)
async def test_a_deployment_runs_the_methods_inference_file_over_the_base_and_adapter_and_undeploy_stops_it(world):
    model = world.customized["team-complete"]
    request = lpb.DeployModelRequest(model_id=model.id)
    deployment = (await world.lifecycle.DeployModel(request, timeout=10)).deployment
    try:
        assert deployment.state == lpb.DEPLOYMENT_STATE_PENDING
        assert deployment.entrypoint == "team/serve_customized.py"
        live = await deployed(world, deployment.id, lpb.DEPLOYMENT_STATE_LIVE, "the deployment to be live")
        assert live.agent_id and live.attempt == 1

        status, answer = await chat(world, model.id, "who answers?")
        assert status == 200, answer
        worker = answered_by(answer)
        assert answer["model"] == model.id  # the deployment named the worker's model after the catalog's id
        assert (worker["file"], worker["prefix"], worker["asked"]) == (
            "serve_customized.py",
            str(world.venv),
            "who answers?",
        )
        assert worker["flags"]["model_path"] == world.base_uri  # the base model, with the published adapter
        assert worker["flags"]["adapter_path"] == model.uri
        assert worker["flags"]["served_model_name"] == model.id and worker["flags"]["output_dir"]
        counted = await deployment_of(world, deployment.id)
        assert (counted.request_count, counted.error_count) == (1, 0)
    finally:
        stopped = await undeploy_and_wait(world, deployment.id)
    assert stopped.state == lpb.DEPLOYMENT_STATE_STOPPED
    await wait_for(lambda: asyncio.to_thread(gone, worker["pid"]), bool, "the inference worker to exit", 15)
    with pytest.raises(grpc.aio.AioRpcError) as not_deployed:
        await chat(world, model.id, "still there?")
    assert not_deployed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not deployed" in not_deployed.value.details()


@pytest.mark.timeout(120)
async def test_a_merge_runs_the_methods_saving_file_and_its_complete_model_is_published_and_served(world):
    customized = world.customized["team-complete"]
    merge = (
        await world.lifecycle.MergeModel(lpb.MergeModelRequest(model_id=customized.id, name="team-merged"), timeout=10)
    ).job
    assert merge.kind == jpb.JOB_KIND_MERGE and (await world.jobs.get(merge.id)).entrypoint == "team/save.py"
    done = await succeeded(world, merge.id)
    lifecycle = ModelLifecycle(world.jobs, InferenceRouter())
    assert await lifecycle.publish_merged() == 1
    assert await lifecycle.publish_merged() == 0  # published once
    result_model_id = (await job_of(world, merge.id)).result_model_id
    complete = (await world.catalog.GetModel(cpb.GetModelRequest(model_id=result_model_id), timeout=10)).model
    assert (complete.name, complete.kind) == ("team-merged", common_pb2.MODEL_KIND_COMPLETE)
    assert complete.uri == done.output_uri, (complete.uri, done.output_uri)
    assert (complete.lineage.method_id, complete.lineage.base_model_id) == ("team-complete", BASE)
    marker = json.loads((Path(complete.uri) / "saved_by_team.json").read_text())
    assert (marker["file"], marker["prefix"]) == ("save.py", str(world.venv))  # the training's env
    assert marker["flags"]["model_path"] == world.base_uri and marker["flags"]["adapter_path"] == customized.uri
    assert marker["flags"]["lora_rank"] == "4"  # the method's own file gets the training's parameters
    assert (Path(complete.uri) / "model.safetensors").is_file()

    # A deployment of the complete model runs the method's inference_complete file, without an adapter.
    deployment = (
        await world.lifecycle.DeployModel(lpb.DeployModelRequest(model_id=complete.id), timeout=10)
    ).deployment
    try:
        await deployed(world, deployment.id, lpb.DEPLOYMENT_STATE_LIVE, "the complete model's deployment")
        status, answer = await chat(world, complete.id, "merged?")
        worker = answered_by(answer)
        assert status == 200 and worker["file"] == "serve_complete.py"
        assert worker["flags"]["model_path"] == complete.uri and "adapter_path" not in worker["flags"]
    finally:
        await undeploy_and_wait(world, deployment.id)


@pytest.mark.timeout(120)
async def test_a_deployment_whose_agent_is_lost_goes_back_to_pending_and_comes_back_live_on_another(world):
    model = world.customized["team-live"]
    deployment = (await world.lifecycle.DeployModel(lpb.DeployModelRequest(model_id=model.id), timeout=10)).deployment
    try:
        # A live method with a custom deployment environment serves with its deployment file.
        assert deployment.entrypoint == "team/deploy.py"
        first = await deployed(world, deployment.id, lpb.DEPLOYMENT_STATE_LIVE, "the deployment to be live")
        status, answer = await chat(world, model.id, "before")
        before = answered_by(answer)
        assert status == 200 and before["file"] == "deploy.py" and before["flags"]["adapter_path"] == model.uri

        # The agent process dies (SIGKILL: no shutdown of its runs); its worker must not outlive it, unowned.
        world.agent.send_signal(signal.SIGKILL)
        await asyncio.to_thread(world.agent.wait, 10)
        await wait_for(lambda: asyncio.to_thread(gone, before["pid"]), bool, "the dead agent's worker to exit", 10)
        pending = await deployed(
            world, deployment.id, lpb.DEPLOYMENT_STATE_PENDING, "the lost agent's deployment to be requeued"
        )
        assert pending.agent_id == "" and "agent lost during attempt 1" in pending.state_reason
        listed = await world.lifecycle.ListDeployments(lpb.ListDeploymentsRequest(model_id=model.id), timeout=10)
        assert [d.id for d in listed.deployments] == [deployment.id]  # still active: waiting for an agent
        with pytest.raises(grpc.aio.AioRpcError) as starting:
            await chat(world, model.id, "anyone?")
        assert starting.value.code() == grpc.StatusCode.UNAVAILABLE  # retry shortly: it is starting again

        world.start_agent("node-b")
        again = await deployed(world, deployment.id, lpb.DEPLOYMENT_STATE_LIVE, "the deployment on the new agent")
        assert again.attempt == 2 and again.agent_id and again.agent_id != first.agent_id
        status, answer = await chat(world, model.id, "after")
        after = answered_by(answer)
        assert status == 200 and after["file"] == "deploy.py" and after["pid"] != before["pid"]
        assert after["flags"]["adapter_path"] == model.uri and after["asked"] == "after"
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{world.agent_logs()}") from None
    finally:
        await undeploy_and_wait(world, deployment.id)
