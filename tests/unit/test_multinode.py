"""The multi-node manifest: a job larger than one node rendered as an indexed Job + headless Service with
torchrun's c10d rendezvous (or a Kubeflow TrainJob), running the method exactly as a trainer agent would."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from tuneforge_jobs import multinode, store
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.multinode import ClusterOptions, MultiNodeError, MultiNodeJob
from tuneforge_trainer.agent import build_command, runner_env

K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())
ROOT = "/data/artifacts"
PARAMS = {"lora_rank": 8, "learning_rate": 0.0002, "max_steps": 100.0, "load_in_4bit": False, "hf_token": "x"}


def _job(**changes: object) -> MultiNodeJob:
    fields: dict[str, object] = {
        "id": "job-0123456789abcdef0123",
        "entrypoint": "tuneforge_trainer.methods.sft_lora",
        "parameters": PARAMS,
        "model_uri": f"{ROOT}/models/m-1",
        "dataset_uri": f"{ROOT}/datasets/sha256/ab.jsonl",
        "gpu_count": 16,
    }
    fields.update(changes)
    return MultiNodeJob(**fields)  # type: ignore[arg-type]


def _validate(obj: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def test_sixteen_gpus_on_eight_gpu_nodes_is_two_torchrun_nodes_with_c10d_rendezvous_on_pod_zero() -> None:
    service, job = multinode.render_indexed_job(_job(), ClusterOptions(gpus_per_node=8))
    _validate(service)
    _validate(job)
    name = job["metadata"]["name"]
    assert service["metadata"]["name"] == name == job["spec"]["template"]["spec"]["subdomain"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in command and "--nproc-per-node=8" in command
    assert "--rdzv-backend=c10d" in command
    assert f"--rdzv-endpoint={name}-0.{name}.tuneforge.svc:29400" in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[ROOT] == "artifacts"


def test_pods_get_the_flags_and_environment_the_agent_gives_its_runner() -> None:
    job = _job()
    (_, k8s_job) = multinode.render_indexed_job(job)
    (container,) = k8s_job["spec"]["template"]["spec"]["containers"]
    output_dir = f"{ROOT}/jobs/{job.id}/output"
    # The agent's own command for the same job on one node: after the launcher, identical.
    agent_cmd = build_command(
        "python", job.entrypoint, dict(PARAMS), job.model_uri, job.dataset_uri, output_dir, resume_from=""
    )
    assert container["command"][-len(agent_cmd[1:]) :] == agent_cmd[1:]
    assert "--lora_rank=8" in container["command"] and "--max_steps=100" in container["command"]
    assert "--load_in_4bit=false" in container["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    own = {"MODEL_PATH": job.model_uri, "DATASET_PATH": job.dataset_uri, "OUTPUT_DIR": output_dir}
    agent_env, skipped = runner_env({}, dict(PARAMS), own)
    assert skipped == ["HF_TOKEN"]  # a protected name stays out of the environment, as on the agent
    assert {k: env[k] for k in agent_env} == agent_env
    assert "HF_TOKEN" not in env
    assert env["TUNEFORGE_JOB_ID"] == job.id and env["LORA_RANK"] == "8" and env["LOAD_IN_4BIT"] == "false"


def test_an_added_methods_file_runs_from_the_methods_directory() -> None:
    (_, k8s_job) = multinode.render_indexed_job(_job(entrypoint="team/train.py"))
    command = k8s_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"{ROOT}/methods/team/train.py" in command and "-m" not in command[3:]


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        ({"gpu_count": 8}, "resources.gpu_count", "one node"),
        ({"gpu_count": 12}, "resources.gpu_count", "ask for 16"),
        ({"model_uri": "s3://bucket/models/m-1"}, "model_uri", "object store"),
        ({"dataset_uri": "/elsewhere/d.jsonl"}, "dataset_uri", "outside the artifact store"),
        ({"python_env": "team-env"}, "python_env", "trainer image"),
        ({"entrypoint": "../escape.py"}, "entrypoint", "relative"),
        ({"kind": "serve"}, "kind", "only trainings"),
    ],
)
def test_jobs_it_cannot_run_are_refused_naming_the_field(changes: dict, field: str, says: str) -> None:
    with pytest.raises(MultiNodeError, match=f"^{field}: .*{says}"):
        multinode.render_indexed_job(_job(**changes))


def test_resource_names_are_dns_labels_short_enough_for_indexed_pod_hostnames() -> None:
    name = multinode.resource_name("Job_" + "X" * 80)
    assert len(name) + len("-99") <= 63 and name == name.lower() and "_" not in name


def test_trainjob_runs_the_same_command_under_the_torch_runtime() -> None:
    job = _job(gpu_count=32)
    train = multinode.render_trainjob(job, ClusterOptions(gpus_per_node=8))
    assert train["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and train["kind"] == "TrainJob"
    spec = train["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["command"] == ["python", "-m", "torch.distributed.run"]
    (_, k8s_job) = multinode.render_indexed_job(job)
    k8s_command = k8s_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert k8s_command[-len(trainer["args"]) :] == trainer["args"]
    # TrainJob is a CRD (no schema here): its Kubernetes parts are checked as the pod they become.
    (override,) = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    pod_spec = override["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {
            "securityContext": pod_spec["securityContext"],
            "nodeSelector": pod_spec["nodeSelector"],
            "volumes": pod_spec["volumes"],
            "containers": [
                {
                    "name": "node",
                    "image": trainer["image"],
                    "command": trainer["command"],
                    "args": trainer["args"],
                    "env": trainer["env"],
                    "resources": trainer["resourcesPerNode"],
                    "volumeMounts": pod_spec["containers"][0]["volumeMounts"],
                }
            ],
        },
    }
    _validate(pod)


async def _make_jobs_db(url: str, job_id: str, artifacts: Path) -> None:
    from tuneforge_common.db import make_engine, migrate

    engine = make_engine(url)
    now = dt.datetime.now(dt.UTC)
    try:
        await migrate(engine, MIGRATIONS, "alembic_version_jobs")
        async with engine.begin() as conn:
            await conn.execute(
                store.jobs.insert().values(
                    id=job_id,
                    model_id="m-1",
                    dataset_id="d-1",
                    method_id="sft-lora",
                    model_uri=f"{artifacts}/models/m-1",
                    dataset_uri=f"{artifacts}/datasets/d.jsonl",
                    entrypoint="tuneforge_trainer.methods.sft_lora",
                    parameters=json.dumps({"lora_rank": 16}),
                    resources=json.dumps({"gpu_count": 16}),
                    state="QUEUED",
                    max_attempts=3,
                    created_at=now,
                    updated_at=now,
                )
            )
    finally:
        await engine.dispose()


def test_cli_reads_the_job_from_the_jobs_database_and_prints_a_manifest_kubectl_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts = tmp_path / "artifacts"
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    asyncio.run(_make_jobs_db(url, "job-cli", artifacts))
    monkeypatch.setenv("TUNEFORGE_ARTIFACT_ROOT", str(artifacts))
    monkeypatch.setenv("TUNEFORGE_JOBS_DATABASE_URL", url)
    assert multinode.main(["--job-id", "job-cli", "--gpus-per-node", "4"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "List" and listed["apiVersion"] == "v1"
    service, job = listed["items"]
    _validate(service)
    _validate(job)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=4" in command and "--nproc-per-node=4" in command and "--lora_rank=16" in command
    assert f"--model_path={artifacts}/models/m-1" in command

    assert multinode.main(["--job-id", "job-cli", "--engine", "trainjob"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["trainer"]["numNodes"] == 2

    assert multinode.main(["--job-id", "job-nope"]) == 2
    assert "job_id: no job 'job-nope'" in capsys.readouterr().err


PROBE = """
import argparse, json, os
import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--lora_rank", type=int)
parser.add_argument("--output_dir")
args, _ = parser.parse_known_args()
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": int(total),
                  "lora_rank": args.lora_rank, "env": os.environ["LORA_RANK"], "job": os.environ["TUNEFORGE_JOB_ID"]}))
dist.destroy_process_group()
"""


def test_the_rendered_command_rendezvouses_two_nodes_under_torchrun(tmp_path: Path) -> None:
    """Two copies of the pod's command, as pods 0 and 1 would run it (here on one host, on CPU with gloo and
    the rendezvous endpoint pointed at 127.0.0.1 instead of pod 0's DNS name), meet and run the method."""
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "probe.py").write_text(PROBE)
    options = ClusterOptions(
        gpus_per_node=1, artifact_root=str(tmp_path), methods_dir=str(tmp_path / "methods"), python=sys.executable
    )
    job = _job(
        entrypoint="probe.py",
        gpu_count=2,
        model_uri=f"{tmp_path}/models/m",
        dataset_uri=f"{tmp_path}/d.jsonl",
    )
    (_, k8s_job) = multinode.render_indexed_job(job, options)
    (container,) = k8s_job["spec"]["template"]["spec"]["containers"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        f"--rdzv-endpoint=127.0.0.1:{port}" if arg.startswith("--rdzv-endpoint=") else arg
        for arg in container["command"]
    ]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, "CUDA_VISIBLE_DEVICES": ""}
    nodes = [
        subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=120)
            assert node.returncode == 0, err[-2000:]
            outputs += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finally:
        for node in nodes:
            node.kill()
    assert sorted(o["rank"] for o in outputs) == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 3 for o in outputs)
    assert all(o["lora_rank"] == 8 and o["env"] == "8" and o["job"] == job.id for o in outputs)
