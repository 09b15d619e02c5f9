"""Which program a merge, an evaluation or a deployment runs, over which model and adapter (pure rules)."""

from __future__ import annotations

import pytest

from tuneforge_common.errors import FailedPrecondition, InvalidArgument
from tuneforge_common.operations import EvaluateParams, MergeParams, ServeParams, resolve_operation_parameters
from tuneforge_jobs import operations as ops
from tuneforge_jobs.lifecycle import JobState


def model(kind: str = "CUSTOMIZED", stages: dict | None = None, lifecycle: str = "", **kw) -> ops.ModelInputs:
    defaults = dict(model_id="m1", name="mine", kind=kind, uri="/store/adapter", base_model_id="base", base_uri="/base")
    return ops.ModelInputs(**{**defaults, **kw}, stages=stages or {}, lifecycle=lifecycle, training_env="train-env")


def test_a_customized_model_is_merged_serves_and_evaluates_as_its_base_plus_its_adapter():
    for kind in (ops.MERGE, ops.EVALUATE, ops.SERVE):
        plan = ops.plan(kind, model())
        assert (plan.model_uri, plan.adapter_uri, plan.python_env) == ("/base", "/store/adapter", "")
        assert plan.entrypoint == ops.BUILTIN_ENTRYPOINTS[kind]


def test_a_complete_or_base_model_serves_alone_and_only_an_adapter_merges():
    plan = ops.plan(ops.SERVE, model("COMPLETE", uri="/store/complete"))
    assert (plan.model_uri, plan.adapter_uri) == ("/store/complete", "")
    with pytest.raises(FailedPrecondition, match="model_id: model 'm1' is COMPLETE; merging takes a CUSTOMIZED"):
        ops.plan(ops.MERGE, model("COMPLETE"))
    with pytest.raises(FailedPrecondition, match="base model is gone"):
        ops.plan(ops.SERVE, model(base_uri=""))


def test_an_added_methods_own_files_take_over_its_steps_in_its_own_environments():
    stages = {
        "saving": {"file": "mine/save.py", "env": ""},
        "inference_customized": {"file": "mine/infer_adapter.py", "env": "serve-env"},
        "inference_complete": {"file": "mine/infer_full.py", "env": "serve-env"},
        "deployment": {"file": "mine/deploy.py", "env": "deploy-env"},
    }
    merge = ops.plan(ops.MERGE, model(stages=stages, lifecycle="complete"))
    assert (merge.entrypoint, merge.python_env) == ("mine/save.py", "train-env")  # saving runs in the training env
    assert ops.plan(ops.SERVE, model(stages=stages, lifecycle="complete")).entrypoint == "mine/infer_adapter.py"
    complete = model("COMPLETE", stages=stages, lifecycle="complete")
    assert ops.plan(ops.SERVE, complete).entrypoint == "mine/infer_full.py"
    live = ops.plan(ops.SERVE, model(stages=stages, lifecycle="live"))
    assert (live.entrypoint, live.python_env) == ("mine/deploy.py", "deploy-env")
    assert ops.plan(ops.EVALUATE, model(stages=stages)).entrypoint == ops.BUILTIN_ENTRYPOINTS[ops.EVALUATE]


def test_a_serve_jobs_state_reads_as_a_deployments():
    assert [ops.deployment_state(s) for s in JobState] == [
        "PENDING",  # QUEUED
        "PENDING",  # STARTING
        "LIVE",  # RUNNING
        "STOPPED",  # SUCCEEDED: a worker that exited on its own
        "FAILED",
        "STOPPING",  # CANCELLING
        "STOPPED",  # CANCELLED
        "STOPPED",  # PAUSED
    ]


def test_operation_parameters_are_checked_against_their_schema_naming_the_field():
    assert resolve_operation_parameters(MergeParams, {})["quantize"] == "none"
    assert resolve_operation_parameters(EvaluateParams, {"max_samples": "20"})["max_samples"] == 20
    assert resolve_operation_parameters(ServeParams, {"max_model_len": 512})["engine"] == "auto"
    with pytest.raises(InvalidArgument) as bad:
        resolve_operation_parameters(EvaluateParams, {"num_generations": -1, "warp": 9})
    assert sorted(v.field for v in bad.value.violations) == ["parameters.num_generations", "parameters.warp"]
    with pytest.raises(InvalidArgument, match="parameters.quantize"):
        resolve_operation_parameters(MergeParams, {"quantize": "2bit"})
