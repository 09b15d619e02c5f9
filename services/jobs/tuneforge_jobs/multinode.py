"""Jobs larger than one node, handed to Kubernetes instead of a trainer agent.

An agent runs a job on its own node (torchrun --standalone over the node's GPUs). A job asking for more GPUs
than a node has goes to an engine that already does multi-node rendezvous: this module renders, from the job's
row, either a plain Kubernetes indexed Job plus a headless Service (torchrun with the c10d rendezvous on pod 0),
or a Kubeflow Trainer `TrainJob` (its torch runtime sets torchrun's PET_* variables). Each pod runs the job's
method exactly as the agent would: every parameter as a --key=value flag and as its upper-snake environment
variable, plus MODEL_PATH, DATASET_PATH, OUTPUT_DIR, ... (see tuneforge_trainer.agent.build_command and
runner_env, which this mirrors without importing the trainer, which needs torch).

The pods read the model and dataset from, and write the output to, the artifact store mounted at the same path
as in the services (a ReadWriteMany volume). Metrics and logs go to the pods' stdout ([log_data] lines); the
TuneForge job is not tracked by the jobs service while it runs there.

    python -m tuneforge_jobs.multinode --job-id job-... [--gpus-per-node 8] [--engine job|trainjob] | kubectl apply -f -
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from tuneforge_common.params import protected_env_problem, to_env

RDZV_PORT = 29400
# The label the headless Service selects the job's pods by, and that names the TuneForge job on every object.
JOB_LABEL = "tuneforge.io/job-id"


class MultiNodeError(ValueError):
    """A job this renderer can't turn into a manifest; the message names the field."""


@dataclass(frozen=True)
class MultiNodeJob:
    """The job's fields a multi-node run needs (from the jobs table)."""

    id: str
    entrypoint: str
    parameters: Mapping[str, Any]
    model_uri: str
    dataset_uri: str
    gpu_count: int
    validation_dataset_uri: str = ""
    python_env: str = ""
    saving_entrypoint: str = ""
    kind: str = "train"


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how the job runs; the defaults match deploy/k8s."""

    gpus_per_node: int = 8
    namespace: str = "tuneforge"
    image: str = "tuneforge/trainer:0.1.0"
    # The artifact store's root as the services see it, and the claim that holds it (mounted at the same path).
    artifact_root: str = "/data/artifacts"
    artifacts_claim: str = "tuneforge-artifacts"
    # Where added methods' files are; empty: <artifact_root>/methods, as the trainer image's agents have it.
    methods_dir: str = ""
    python: str = "python"
    rdzv_port: int = RDZV_PORT
    # Kubeflow Trainer's runtime (a ClusterTrainingRuntime) for engine "trainjob".
    trainjob_runtime: str = "torch-distributed"
    node_selector: Mapping[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})


@dataclass(frozen=True)
class NodePlan:
    nnodes: int
    nproc_per_node: int


def plan_nodes(gpu_count: int, gpus_per_node: int) -> NodePlan:
    """How many nodes and processes per node: whole nodes of gpus_per_node GPUs each (torchrun runs the same
    number of processes on every node)."""
    if gpus_per_node < 1:
        raise MultiNodeError(f"gpus_per_node: must be at least 1, got {gpus_per_node}")
    if gpu_count <= gpus_per_node:
        raise MultiNodeError(
            f"resources.gpu_count: {gpu_count} GPUs fit on one node of {gpus_per_node}; a trainer agent runs it"
        )
    if gpu_count % gpus_per_node:
        raise MultiNodeError(
            f"resources.gpu_count: {gpu_count} is not a whole number of {gpus_per_node}-GPU nodes "
            f"(ask for {math.ceil(gpu_count / gpus_per_node) * gpus_per_node})"
        )
    return NodePlan(nnodes=gpu_count // gpus_per_node, nproc_per_node=gpus_per_node)


def resource_name(job_id: str) -> str:
    """A DNS-1123 label for the job's objects; pods add '-<index>' and must stay within 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"tuneforge-{job_id}".lower()).strip("-")
    return name[:50].rstrip("-")


def _flag_value(value: Any) -> Any:
    # As the agent: an integral float (a protobuf Struct number) goes back as an int.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _flags(values: Mapping[str, Any]) -> list[str]:
    return [f"--{k}={'true' if v is True else 'false' if v is False else v}" for k, v in values.items()]


def _local_path(uri: str, what: str, artifact_root: str) -> str:
    """A URI the pods can open: a path inside the mounted artifact store."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise MultiNodeError(
            f"{what}: {uri!r} is in an object store; multi-node runs read the artifact store from a shared volume "
            f"mounted at {artifact_root} (TUNEFORGE_ARTIFACT_ROOT)"
        )
    root = PurePosixPath(artifact_root)
    path = PurePosixPath(uri)
    if not path.is_absolute() or not path.is_relative_to(root) or ".." in path.parts:
        raise MultiNodeError(f"{what}: {uri!r} is outside the artifact store {artifact_root}, which the pods mount")
    return str(path)


def _target(job: MultiNodeJob, options: ClusterOptions) -> list[str]:
    if job.python_env:
        raise MultiNodeError(
            f"python_env: {job.python_env!r}; multi-node pods run the trainer image's Python only (build an image "
            "with the method's environment and pass --image)"
        )
    if not job.entrypoint:
        raise MultiNodeError("entrypoint: the job names no module or file to run")
    if not job.entrypoint.endswith(".py"):
        return ["-m", job.entrypoint]
    given = PurePosixPath(job.entrypoint)
    if given.is_absolute() or ".." in given.parts:
        raise MultiNodeError(f"entrypoint: {job.entrypoint!r} must be relative to the methods directory")
    methods_dir = options.methods_dir or f"{options.artifact_root.rstrip('/')}/methods"
    return [str(PurePosixPath(methods_dir) / given)]


@dataclass(frozen=True)
class Run:
    """What every node runs: the method's target with its flags, and the environment."""

    target: list[str]
    flags: list[str]
    env: dict[str, str]


def build_run(job: MultiNodeJob, options: ClusterOptions) -> Run:
    if job.kind != "train":
        raise MultiNodeError(f"kind: {job.kind!r}; only trainings run on several nodes")
    if job.saving_entrypoint:
        raise MultiNodeError("saving_entrypoint: a method with a saving stage runs on a trainer agent only")
    root = options.artifact_root.rstrip("/")
    model_path = _local_path(job.model_uri, "model_uri", root)
    dataset_path = _local_path(job.dataset_uri, "dataset_uri", root)
    validation_path = (
        _local_path(job.validation_dataset_uri, "validation_dataset_uri", root) if job.validation_dataset_uri else ""
    )
    output_dir = f"{root}/jobs/{job.id}/output"
    params = {k: _flag_value(v) for k, v in job.parameters.items()}
    values = {
        **params,
        "model_path": model_path,
        "dataset_path": dataset_path,
        **({"validation_dataset_path": validation_path} if validation_path else {}),
        "output_dir": output_dir,
        "resume_from_checkpoint": "",
    }
    own = {
        "MODEL_PATH": model_path,
        "DATASET_PATH": dataset_path,
        "VALIDATION_DATASET_PATH": validation_path,
        "OUTPUT_DIR": output_dir,
        "RESUME_FROM_CHECKPOINT": "",
        "TUNEFORGE_JOB_ID": job.id,
        "TUNEFORGE_ATTEMPT": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    # As the agent's runner_env: parameters never set a protected variable nor one of the runner's own.
    from_params = {k: v for k, v in to_env(params).items() if k not in own and protected_env_problem(k) is None}
    return Run(target=_target(job, options), flags=_flags(values), env={**from_params, **own})


def _env_list(env: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in env.items()]


def _labels(job: MultiNodeJob, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "tuneforge",
        "app.kubernetes.io/component": "multinode-training",
        JOB_LABEL: job.id,
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(options: ClusterOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": options.artifacts_claim}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "artifacts", "mountPath": options.artifact_root.rstrip("/")},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def render_indexed_job(job: MultiNodeJob, options: ClusterOptions | None = None) -> list[dict[str, Any]]:
    """A headless Service and an indexed Job of one pod per node; torchrun's c10d rendezvous on pod 0."""
    options = options or ClusterOptions()
    plan = plan_nodes(job.gpu_count, options.gpus_per_node)
    run = build_run(job, options)
    name = resource_name(job.id)
    labels = _labels(job, name)
    # Pod <job>-<index> of an indexed Job is reachable as <job>-<index>.<subdomain> through the headless Service.
    endpoint = f"{name}-0.{name}.{options.namespace}.svc:{options.rdzv_port}"
    command = [
        options.python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={plan.nnodes}",
        f"--nproc-per-node={plan.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={job.id}",
        *run.target,
        *run.flags,
    ]
    volumes, mounts = _volumes(options)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            # Rendezvous starts before any pod is Ready: its DNS name must resolve at once.
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job.id},
            "ports": [{"name": "rdzv", "port": options.rdzv_port, "targetPort": options.rdzv_port}],
        },
    }
    k8s_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": plan.nnodes,
            "parallelism": plan.nnodes,
            # A lost node breaks the rendezvous for all: the run fails as a whole rather than one pod retrying.
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": name,
                    "restartPolicy": "Never",
                    "securityContext": _pod_security(),
                    "nodeSelector": dict(options.node_selector),
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "trainer",
                            "image": options.image,
                            "command": command,
                            "workingDir": "/tmp",
                            "env": _env_list(run.env),
                            "ports": [{"name": "rdzv", "containerPort": options.rdzv_port}],
                            "resources": {
                                "requests": {"nvidia.com/gpu": str(plan.nproc_per_node)},
                                "limits": {"nvidia.com/gpu": str(plan.nproc_per_node)},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }
    return [service, k8s_job]


def render_trainjob(job: MultiNodeJob, options: ClusterOptions | None = None) -> dict[str, Any]:
    """A Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1) on its torch runtime, which starts one pod per
    node and sets torchrun's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK and master address."""
    options = options or ClusterOptions()
    plan = plan_nodes(job.gpu_count, options.gpus_per_node)
    run = build_run(job, options)
    name = resource_name(job.id)
    volumes, mounts = _volumes(options)
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": options.namespace, "labels": _labels(job, name)},
        "spec": {
            "runtimeRef": {
                "name": options.trainjob_runtime,
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
            },
            "trainer": {
                "image": options.image,
                "command": [options.python, "-m", "torch.distributed.run"],
                "args": [*run.target, *run.flags],
                "env": _env_list(run.env),
                "numNodes": plan.nnodes,
                "numProcPerNode": plan.nproc_per_node,
                "resourcesPerNode": {"limits": {"nvidia.com/gpu": str(plan.nproc_per_node)}},
            },
            # The torch runtime's trainer job is "node" and its container "node".
            "podTemplateOverrides": [
                {
                    "targetJobs": [{"name": "node"}],
                    "spec": {
                        "securityContext": _pod_security(),
                        "nodeSelector": dict(options.node_selector),
                        "volumes": volumes,
                        "containers": [{"name": "node", "volumeMounts": mounts}],
                    },
                }
            ],
        },
    }


def job_from_row(row: Any) -> MultiNodeJob:
    """From a jobs-table row (parameters and resources are JSON text)."""
    resources = json.loads(row.resources or "{}")
    return MultiNodeJob(
        id=row.id,
        entrypoint=row.entrypoint,
        parameters=json.loads(row.parameters or "{}"),
        model_uri=row.model_uri,
        dataset_uri=row.dataset_uri,
        validation_dataset_uri=row.validation_dataset_uri or "",
        gpu_count=int(resources.get("gpu_count", 0) or 0),
        python_env=row.python_env or "",
        saving_entrypoint=row.saving_entrypoint or "",
        kind=row.kind or "train",
    )


async def load_job(database_url: str, job_id: str) -> MultiNodeJob:
    """The job from the jobs service's database (read only)."""
    from sqlalchemy import select

    from tuneforge_common.db import make_engine

    from . import store

    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(store.jobs).where(store.jobs.c.id == job_id))).first()
    finally:
        await engine.dispose()
    if row is None:
        raise MultiNodeError(f"job_id: no job {job_id!r} in the jobs database")
    return job_from_row(row)


def manifest(job: MultiNodeJob, options: ClusterOptions, engine: str) -> dict[str, Any]:
    """What `kubectl apply -f -` takes: a List of the indexed Job's objects, or the TrainJob."""
    if engine == "trainjob":
        return render_trainjob(job, options)
    return {"apiVersion": "v1", "kind": "List", "items": render_indexed_job(job, options)}


def main(argv: Sequence[str] | None = None) -> int:
    from tuneforge_common.artifacts import ArtifactStore

    from .main import JobsSettings

    parser = argparse.ArgumentParser(
        prog="python -m tuneforge_jobs.multinode",
        description="Print the Kubernetes manifest (JSON) that runs a job larger than one node.",
    )
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--engine", choices=("job", "trainjob"), default="job", help="indexed Job or Kubeflow TrainJob")
    parser.add_argument("--gpus-per-node", type=int, default=ClusterOptions.gpus_per_node)
    parser.add_argument("--namespace", default=ClusterOptions.namespace)
    parser.add_argument("--image", default=ClusterOptions.image)
    parser.add_argument("--artifacts-claim", default=ClusterOptions.artifacts_claim)
    parser.add_argument(
        "--database-url", default="", help="the jobs database; default: TUNEFORGE_JOBS_DATABASE_URL as the service"
    )
    args = parser.parse_args(argv)
    settings = JobsSettings()
    options = ClusterOptions(
        gpus_per_node=args.gpus_per_node,
        namespace=args.namespace,
        image=args.image,
        # Resolved as the service resolves it, so it prefixes the URIs the service stored.
        artifact_root=ArtifactStore(settings.artifact_root).root,
        artifacts_claim=args.artifacts_claim,
    )
    try:
        job = asyncio.run(load_job(args.database_url or settings.jobs_database_url, args.job_id))
        print(json.dumps(manifest(job, options, args.engine), indent=2))
    except MultiNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
