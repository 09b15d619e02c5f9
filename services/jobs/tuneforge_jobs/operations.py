"""The lifecycle after training, as pure rules: which program a merge, an evaluation or a deployment runs,
over which model and adapter, and how a serve job reads as a deployment.

DeepExtension's lifecycle takes a trained model from customized (an adapter over its base) to complete (the
adapter merged in) to live (deployed and answering). Each step here is a job of its own kind, so it is
scheduled onto an agent, shows progress and a log, and is retried like a training. An added method's own
files take a step over when it defines them (seed 003): `saving` merges, `inference_customized` /
`inference_complete` serve, and a live method with a custom deployment environment serves with `deployment`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneforge_common.errors import FailedPrecondition

from .lifecycle import JobState

TRAIN, MERGE, EVALUATE, SERVE = "train", "merge", "evaluate", "serve"
BUILTIN_ENTRYPOINTS = {
    MERGE: "tuneforge_trainer.merge",
    EVALUATE: "tuneforge_trainer.evaluate",
    SERVE: "tuneforge_trainer.serve",
}
# Quantization enum name -> the merge program's --quantize.
QUANTIZE_FLAGS = {
    "QUANTIZATION_UNSPECIFIED": "none",
    "QUANTIZATION_NONE": "none",
    "QUANTIZATION_INT8": "8bit",
    "QUANTIZATION_NF4": "4bit",
}


@dataclass(frozen=True)
class ModelInputs:
    """A catalog model as an operation needs it (gathered by the catalog port)."""

    model_id: str
    name: str
    kind: str  # BASE, CUSTOMIZED, COMPLETE
    uri: str
    base_model_id: str = ""
    base_uri: str = ""  # the base's URI for a CUSTOMIZED model, whose uri is an adapter
    lineage: dict[str, Any] = field(default_factory=dict)
    # The lineage method's stages (an added method's files per stage); {} for built-ins and base models.
    stages: dict[str, Any] = field(default_factory=dict)
    lifecycle: str = ""
    training_env: str = ""


@dataclass(frozen=True)
class OperationPlan:
    kind: str
    entrypoint: str
    python_env: str
    model_uri: str
    adapter_uri: str


def _stage(model: ModelInputs, name: str) -> tuple[str, str] | None:
    """An added method's stage as (file, env); the env defaults to the training env, as the catalog stores it."""
    stage = model.stages.get(name)
    if not isinstance(stage, dict) or not str(stage.get("file") or "").strip():
        return None
    env = str(stage.get("env") or "").strip() or model.training_env
    return str(stage["file"]).strip(), env


def plan(kind: str, model: ModelInputs) -> OperationPlan:
    """The program an operation runs over `model`, and the model and adapter it gets."""
    customized = model.kind == "CUSTOMIZED"
    if customized and not model.base_uri:
        raise FailedPrecondition(f"model_id: model {model.model_id!r} is an adapter whose base model is gone")
    model_uri, adapter_uri = (model.base_uri, model.uri) if customized else (model.uri, "")
    own: tuple[str, str] | None = None
    if kind == MERGE:
        if not customized:
            raise FailedPrecondition(
                f"model_id: model {model.model_id!r} is {model.kind}; merging takes a CUSTOMIZED model (an adapter)"
            )
        own = _stage(model, "saving")
    elif kind == SERVE:
        # A live method with a custom deployment environment has a deployment stage (the catalog requires it).
        own = _stage(model, "deployment") if model.lifecycle == "live" else None
        own = own or _stage(model, "inference_customized" if customized else "inference_complete")
    elif kind != EVALUATE:
        raise ValueError(f"not an operation: {kind!r}")
    entrypoint, python_env = own or (BUILTIN_ENTRYPOINTS[kind], "")
    return OperationPlan(kind, entrypoint, python_env, model_uri, adapter_uri)


def complete_model_name(model_name: str, given: str) -> str:
    return given.strip() or f"{model_name}-complete"[:255]


# -- deployments: serve jobs seen as deployments ---------------------------------------------------------

PENDING, LIVE, STOPPING, STOPPED, FAILED = "PENDING", "LIVE", "STOPPING", "STOPPED", "FAILED"
ACTIVE_STATES = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.CANCELLING)


def deployment_state(job_state: str) -> str:
    """A serve job's state as a deployment's: RUNNING is live (its agent reports RUNNING once the worker
    listens); a serve job never succeeds on its own, so SUCCEEDED (a worker that exited 0) counts as stopped."""
    return {
        JobState.QUEUED: PENDING,
        JobState.STARTING: PENDING,
        JobState.RUNNING: LIVE,
        JobState.CANCELLING: STOPPING,
        JobState.PAUSED: STOPPED,
        JobState.CANCELLED: STOPPED,
        JobState.SUCCEEDED: STOPPED,
        JobState.FAILED: FAILED,
    }[JobState(job_state)]
