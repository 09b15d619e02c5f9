"""The built-in methods' parameter schemas against the seed tables, their cross-field rules, and the
"Add New Method" definition rules (seed 003)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from tuneforge_common import methods
from tuneforge_common.errors import InvalidArgument
from tuneforge_common.methods import (
    BUILTIN_METHODS,
    CROSS_FIELD_RULES,
    check_cross_field,
    custom_method_specs,
    custom_method_stages,
    param_fields,
    parameter_matrix,
    validate_custom_method,
)
from tuneforge_common.params import (
    ParamSpec,
    protected_env_problem,
    resolve_parameters,
    specs_from_dataclass,
    to_env,
    to_flags,
)

BUILTIN_IDS = ("sft", "sft-lora", "qlora", "dpo", "grpo", "custom01", "custom02")
SPECS = {m.id: specs_from_dataclass(m.params) for m in BUILTIN_METHODS}


def spec(method_id: str, name: str) -> ParamSpec:
    return next(s for s in SPECS[method_id] if s.name == name)


def resolve(method_id: str, given: dict[str, Any]) -> dict[str, Any]:
    return resolve_parameters(SPECS[method_id], given, method_id=method_id)


def violations(method_id: str, given: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as exc:
        resolve(method_id, given)
    return {v.field: v.description for v in exc.value.violations}


# --- the seeds' parameters -----------------------------------------------------------------------

# DeepExtension's parameter table (seed 000), the runner's environment names; OUTPUT_DIR, MODEL_PATH and
# DATASET_PATH are the platform's. The two column names are camel case there and accepted as aliases.
DEEPEXTENSION = [
    "LORA_RANK",
    "LOAD_IN_4BIT",
    "MAX_SEQ_LENGTH",
    "MAX_INPUT_LENGTH",
    "MAX_CONTENT_LENGTH",
    "MAX_SAMPLES",
    "NUM_GENERATIONS",
    "MAX_GRAD_NORM",
    "EPOCHS",
    "MAX_STEPS",
    "BATCH_SIZE",
    "GRAD_ACCUM_STEPS",
    "LEARNING_RATE",
    "WARMUP_STEPS",
    "WARMUP_RATIO",
]
DEEPEXTENSION_COLUMNS = [("PromptInputColumn", "prompt_input_column"), ("PromptOutputColumn", "prompt_output_column")]

# UModelVerse's LoRA fine-tuning form (seed 002): (label, name a request may use, canonical name).
UMODELVERSE = [
    ("Initial Learning Rate", "learning_rate", "learning_rate"),
    ("Training Rounds", "epochs", "epochs"),
    ("Batch Size", "batch_size", "batch_size"),
    ("Maximum Sample Size", "max_samples", "max_samples"),
    ("Computation Type", "compute_type", "compute_type"),
    ("CheckPoint Save Interval", "save_steps", "save_steps"),
    ("Maximum CheckPoint Saves", "save_total_limit", "save_total_limit"),
    ("Log Save Interval", "log_interval", "logging_steps"),
    ("Truncation Length", "cutoff_len", "max_seq_length"),
    ("Truncation Length", "truncation_length", "max_seq_length"),
    ("Learning Rate Scheduler", "lr_scheduler", "lr_scheduler_type"),
    ("Validation Set Ratio", "validation_ratio", "validation_ratio"),
    ("Use Flash Attention", "flash_attention", "flash_attention"),
    ("LoRA Rank Value", "lora_rank", "lora_rank"),
    ("LoRA Scaling Factor", "lora_alpha", "lora_alpha"),
    ("LoRA Random Dropout", "lora_dropout", "lora_dropout"),
    ("LoRA+ Learning Rate Ratio", "loraplus_lr_ratio", "loraplus_lr_ratio"),
]
UMODELVERSE_VALUES = {
    "compute_type": "bf16",
    "flash_attention": True,
    "lr_scheduler_type": "cosine",
    "loraplus_lr_ratio": 16,
    "validation_ratio": 0.1,
    "lora_dropout": 0.1,
    "save_total_limit": 3,
}

# Mistral's TrainingParametersIn (seed 004) and OpenAI's hyperparameters: (name, canonical name).
MISTRAL = [
    ("training_steps", "max_steps"),
    ("learning_rate", "learning_rate"),
    ("weight_decay", "weight_decay"),
    ("warmup_fraction", "warmup_ratio"),
    ("epochs", "epochs"),
    ("fim_ratio", "fim_ratio"),
    ("seq_len", "max_seq_length"),
]
OPENAI = [("n_epochs", "epochs"), ("batch_size", "batch_size")]


def test_every_builtin_method_is_listed_once_with_its_runner_module():
    assert [m.id for m in BUILTIN_METHODS] == list(BUILTIN_IDS)
    entrypoints = {m.id: m.entrypoint for m in BUILTIN_METHODS}
    assert entrypoints["sft-lora"] == "tuneforge_trainer.methods.sft_lora"
    assert entrypoints["custom01"] == "tuneforge_trainer.methods.custom01"
    assert entrypoints["grpo"] == "tuneforge_trainer.methods.grpo"
    assert all(m.training_type == "chat" and m.lifecycle in ("customized", "complete") for m in BUILTIN_METHODS)


@pytest.mark.parametrize("method_id", ["custom01", "custom02"])
def test_custom_templates_receive_exactly_deepextensions_generic_table(method_id):
    by_env = {s.env_name: s for s in SPECS[method_id]}
    assert sorted(by_env) == sorted(DEEPEXTENSION + ["PROMPT_INPUT_COLUMN", "PROMPT_OUTPUT_COLUMN"])
    for alias, name in DEEPEXTENSION_COLUMNS:
        assert alias in spec(method_id, name).aliases


@pytest.mark.parametrize("env", DEEPEXTENSION)
def test_deepextension_names_are_the_runner_environment_names(env):
    name = env.lower()
    assert spec("custom01", name).env_name == env
    assert to_env({name: 1}) == {env: "1"} and to_flags({name: 1}) == [f"--{name}=1"]


def test_deepextension_form_names_resolve_on_the_custom_templates():
    given = {"LORA_RANK": 16, "LOAD_IN_4BIT": "true", "PromptInputColumn": "question", "MAX_INPUT_LENGTH": 256}
    resolved = resolve("custom01", given)
    assert (resolved["lora_rank"], resolved["load_in_4bit"], resolved["prompt_input_column"]) == (16, True, "question")
    assert to_env(resolved)["MAX_INPUT_LENGTH"] == "256" and to_env(resolved)["PROMPT_INPUT_COLUMN"] == "question"


@pytest.mark.parametrize(("label", "given", "name"), UMODELVERSE)
def test_umodelverse_parameters_resolve_on_sft_lora(label, given, name):
    value = UMODELVERSE_VALUES.get(name, spec("sft-lora", name).default)
    extra = {"save_steps": 10} if name == "save_total_limit" else {}
    assert resolve("sft-lora", {given: value, **extra})[name] == value, label


@pytest.mark.parametrize(("given", "name"), MISTRAL + OPENAI)
def test_mistral_and_openai_hyperparameters_resolve_on_full_sft(given, name):
    value = spec("sft", name).default
    value = 0.25 if name == "fim_ratio" else 7 if name in ("max_steps", "batch_size") else value
    assert resolve("sft", {given: value})[name] == value


def test_fim_ratio_is_offered_only_by_full_fine_tuning_whose_runner_can_train_the_fim_tokens():
    assert parameter_matrix()["fim_ratio"] == ["sft"]
    assert "full fine-tuning" in spec("sft", "fim_ratio").help.lower()


def test_compute_type_choices_follow_umodelverse():
    assert spec("sft-lora", "compute_type").choices == ("auto", "bf16", "fp16", "fp32")


def test_four_bit_loading_defaults_on_only_for_qlora():
    assert spec("qlora", "load_in_4bit").default is True and spec("sft-lora", "load_in_4bit").default is False
    assert spec("qlora", "bnb_4bit_quant_type").choices == ("nf4", "fp4")
    assert spec("qlora", "bnb_4bit_use_double_quant").type == "bool"


def test_dpo_parameters_follow_trl():
    assert spec("dpo", "loss_type").default == "sigmoid"
    assert {"sigmoid", "ipo", "hinge", "robust"} <= set(spec("dpo", "loss_type").choices)
    assert resolve("dpo", {"max_input_length": 300})["max_prompt_length"] == 300
    assert spec("dpo", "use_lora").default is True and spec("dpo", "beta").default == 0.1


def test_trl_dpo_accepts_every_loss_type_offered():
    trl = pytest.importorskip("trl")
    import typing

    hints = typing.get_type_hints(trl.DPOConfig)
    assert hints["loss_type"] == list[str]  # TRL takes a list; the runner passes [loss_type]
    doc = trl.DPOConfig.__doc__ or ""
    assert all(f"'{loss}'" in doc for loss in spec("dpo", "loss_type").choices)


def test_grpo_needs_two_generations_per_prompt_and_says_why():
    num_generations = spec("grpo", "num_generations")
    assert num_generations.minimum == 2 and "at least 2" in num_generations.help
    assert violations("grpo", {"num_generations": 1}) == {"parameters.num_generations": "must be >= 2, got 1"}
    resolved = resolve("grpo", {"max_input_length": 128, "max_content_length": 64})
    assert (resolved["max_prompt_length"], resolved["max_completion_length"]) == (128, 64)
    assert resolved["reward_functions"] == "accuracy,format"


def test_every_parameter_has_help_a_group_and_a_default_within_its_bounds():
    for method_id, specs in SPECS.items():
        for s in specs:
            assert s.help and s.group in ("basic", "advanced"), f"{method_id}.{s.name}"
            assert not s.required, f"{method_id}.{s.name} has no default"
            if s.choices:
                assert s.default in s.choices, f"{method_id}.{s.name}"
            if s.minimum is not None:
                assert s.default >= s.minimum, f"{method_id}.{s.name}"
            if s.maximum is not None:
                assert s.default <= s.maximum, f"{method_id}.{s.name}"


@pytest.mark.parametrize("method_id", BUILTIN_IDS)
def test_defaults_pass_the_methods_cross_field_rules(method_id):
    assert resolve(method_id, {}) == {s.name: s.default for s in SPECS[method_id]}


@pytest.mark.parametrize("method_id", BUILTIN_IDS)
def test_names_and_aliases_never_clash_within_a_method(method_id):
    names = [s.name for s in SPECS[method_id]]
    everything = names + [a for s in SPECS[method_id] for a in s.aliases]
    assert len(everything) == len(set(everything))
    assert not {s.env_name for s in SPECS[method_id]} & (set(everything) - set(names))


# --- applies_to and the parameter matrix ---------------------------------------------------------


def test_parameter_matrix_lists_the_methods_whose_schema_has_each_parameter():
    matrix = parameter_matrix()
    for method in BUILTIN_METHODS:
        for f in param_fields(method.params):
            assert method.id in matrix[f.name]
    for name, ids in matrix.items():
        assert ids == sorted(ids)
        assert all(name in {f.name for f in param_fields(methods.builtin_method(i).params)} for i in ids)


def test_parameter_matrix_examples():
    matrix = parameter_matrix()
    assert matrix["learning_rate"] == sorted(BUILTIN_IDS)
    assert matrix["lora_rank"] == ["custom01", "custom02", "dpo", "grpo", "qlora", "sft-lora"]
    assert matrix["load_in_4bit"] == ["custom01", "custom02", "qlora", "sft-lora"]
    assert matrix["num_generations"] == ["custom01", "custom02", "grpo"]
    assert matrix["max_prompt_length"] == ["dpo", "grpo"]
    assert matrix["compute_type"] == ["dpo", "grpo", "qlora", "sft", "sft-lora"]


def test_builtin_specs_carry_applies_to_from_the_matrix():
    matrix = parameter_matrix()
    for method_id, specs in SPECS.items():
        for s in specs:
            assert list(s.applies_to) == matrix[s.name], f"{method_id}.{s.name}"


def test_spec_to_pb_fills_applies_to():
    api = pytest.importorskip("tuneforge_catalog.api")
    msg = api.spec_to_pb(spec("sft-lora", "lora_rank"))
    assert list(msg.applies_to) == parameter_matrix()["lora_rank"] and "sft" not in msg.applies_to


# --- precedence and cross-field rules ------------------------------------------------------------


def test_max_steps_and_epochs_together_are_accepted_max_steps_wins_in_the_runner():
    resolved = resolve("sft-lora", {"max_steps": 100, "epochs": 3})
    assert (resolved["max_steps"], resolved["epochs"]) == (100, 3.0)
    assert "overrides epochs" in spec("sft-lora", "max_steps").help


def test_warmup_steps_and_ratio_together_are_accepted_steps_win_in_the_runner():
    resolved = resolve("custom01", {"WARMUP_STEPS": 10, "WARMUP_RATIO": 0.1})
    assert (resolved["warmup_steps"], resolved["warmup_ratio"]) == (10, 0.1)
    assert "overrides warmup_ratio" in spec("custom01", "warmup_steps").help


@pytest.mark.parametrize(
    ("method_id", "given", "field"),
    [
        ("custom01", {"max_input_length": 1024, "max_seq_length": 1024}, "parameters.max_input_length"),
        ("dpo", {"max_input_length": 2048}, "parameters.max_prompt_length"),
        ("grpo", {"max_prompt_length": 4096, "max_seq_length": 2048}, "parameters.max_prompt_length"),
    ],
)
def test_prompt_length_must_be_below_max_seq_length(method_id, given, field):
    assert field in violations(method_id, given)
    assert "must be less than max_seq_length" in violations(method_id, given)[field]


def test_checkpoint_limit_needs_checkpoints():
    assert violations("sft", {"save_total_limit": 3}) == {
        "parameters.save_total_limit": "needs save_steps > 0: without it no checkpoints are saved to limit"
    }
    assert resolve("sft", {"save_total_limit": 3, "save_steps": 50})["save_total_limit"] == 3


@pytest.mark.parametrize(("ratio", "ok"), [(0, True), (1, True), (16, True), (0.5, False), (0.999, False)])
def test_loraplus_ratio_is_off_or_at_least_one(ratio, ok):
    if ok:
        assert resolve("qlora", {"loraplus_lr_ratio": ratio})["loraplus_lr_ratio"] == ratio
    else:
        assert (
            "must be 0 (LoRA+ off) or at least 1"
            in violations("qlora", {"loraplus_lr_ratio": ratio})["parameters.loraplus_lr_ratio"]
        )


def test_loraplus_without_lora_is_refused():
    assert (
        "needs use_lora"
        in violations("dpo", {"use_lora": False, "loraplus_lr_ratio": 16})["parameters.loraplus_lr_ratio"]
    )


def test_flash_attention_in_fp32_is_refused():
    assert "parameters.flash_attention" in violations("sft-lora", {"flash_attention": True, "compute_type": "fp32"})
    assert resolve("sft-lora", {"flash_attention": True, "compute_type": "bf16"})["flash_attention"] is True


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing:FutureWarning")  # raised inside transformers
@pytest.mark.parametrize(
    ("batch", "accum", "generations"), [(4, 1, 4), (3, 1, 4), (2, 2, 4), (1, 1, 2), (6, 1, 3), (8, 2, 16), (4, 3, 8)]
)
def test_grpo_generation_batch_rule_matches_trl(batch, accum, generations, tmp_path):
    trl = pytest.importorskip("trl")
    given = {"batch_size": batch, "grad_accum_steps": accum, "num_generations": generations}
    try:
        trl.GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            num_generations=generations,
            report_to="none",
            bf16=False,
            use_cpu=True,
        )
        trl_accepts = True
    except ValueError:
        trl_accepts = False
    if trl_accepts:
        assert resolve("grpo", given)["num_generations"] == generations
    else:
        assert "must divide batch_size x grad_accum_steps" in violations("grpo", given)["parameters.num_generations"]


def test_grpo_evaluation_batches_hold_whole_groups_too():
    given = {"batch_size": 2, "grad_accum_steps": 2, "num_generations": 4}
    assert resolve("grpo", given)["num_generations"] == 4
    assert (
        "must divide batch_size (2)"
        in violations("grpo", {**given, "validation_ratio": 0.1})["parameters.num_generations"]
    )


def test_grpo_prompt_and_completion_must_fit_in_the_sequence():
    given = {"max_prompt_length": 600, "max_completion_length": 600, "max_seq_length": 1024}
    assert "must fit in max_seq_length (1024)" in violations("grpo", given)["parameters.max_completion_length"]


@pytest.mark.parametrize("rewards", ["", " , ", "accuracy,Format", "accuracy,,format", "accuracy,accuracy"])
def test_grpo_reward_functions_must_be_distinct_names(rewards):
    assert "parameters.reward_functions" in violations("grpo", {"reward_functions": rewards})


def test_every_violation_of_the_cross_field_rules_is_reported_at_once():
    given = {"save_total_limit": 2, "loraplus_lr_ratio": 0.5, "flash_attention": True, "compute_type": "fp32"}
    assert set(violations("sft-lora", given)) == {
        "parameters.save_total_limit",
        "parameters.loraplus_lr_ratio",
        "parameters.flash_attention",
    }


def test_every_builtin_method_has_cross_field_rules_and_added_methods_have_none():
    assert set(CROSS_FIELD_RULES) == set(BUILTIN_IDS)
    assert check_cross_field("my-method", {"save_total_limit": 2, "save_steps": 0}) == []


# --- added methods ("Add New Method", seed 003) --------------------------------------------------


def definition(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "my-sft",
        "display_name": "My SFT",
        "training_type": "chat",
        "lifecycle": "customized",
        "stages": {"training": {"file": "train/my_sft.py", "env": "my-env"}},
    }
    data.update(overrides)
    return data


def fields(data: Any) -> dict[str, str]:
    return {v.field: v.description for v in validate_custom_method(data)}


TRAINING = {"file": "train.py", "env": "train-env"}
SAVING = {"file": "save.py", "env": "save-env"}


def test_a_minimal_customized_method_is_valid():
    assert validate_custom_method(definition()) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"stages": {}},
            {
                "definition.stages.training.file": "is required for the customized lifecycle",
                "definition.stages.training.env": "is required for the customized lifecycle",
            },
        ),
        (
            {"stages": {"training": {"file": "train.py"}}},
            {"definition.stages.training.env": "is required for the customized lifecycle"},
        ),
        (
            {"lifecycle": "complete", "stages": {"training": TRAINING}},
            {"definition.stages.saving.file": "is required for the complete lifecycle"},
        ),
        (
            {"lifecycle": "complete", "stages": {"training": TRAINING, "saving": {"env": "x"}}},
            {"definition.stages.saving.file": "is required for the complete lifecycle"},
        ),
        (
            {"lifecycle": "live", "stages": {"training": TRAINING, "saving": SAVING}},
            {"definition.deployment_environment": "is required for the live lifecycle: builtin or custom"},
        ),
        (
            {
                "lifecycle": "live",
                "deployment_environment": "custom",
                "stages": {"training": TRAINING, "saving": SAVING},
            },
            {
                "definition.stages.deployment.file": "is required for the live lifecycle with a custom deployment "
                "environment",
                "definition.stages.deployment.env": "is required for the live lifecycle with a custom deployment "
                "environment",
            },
        ),
        (
            {"lifecycle": "live", "deployment_environment": "builtin", "stages": {"training": TRAINING}},
            {"definition.stages.saving.file": "is required for the live lifecycle"},
        ),
        (
            {"stages": {"training": TRAINING, "inference_customized": {"file": "infer.py"}}},
            {"definition.stages.inference_customized.env": "is required when the inference_customized stage is given"},
        ),
        (
            {"lifecycle": "complete", "stages": {"training": TRAINING, "saving": SAVING, "inference_complete": {}}},
            {
                "definition.stages.inference_complete.file": "is required when the inference_complete stage is given",
                "definition.stages.inference_complete.env": "is required when the inference_complete stage is given",
            },
        ),
    ],
)
def test_missing_mandatory_items_name_the_exact_field(overrides, expected):
    assert fields(definition(**overrides)) == expected


@pytest.mark.parametrize(
    "overrides",
    [
        {"stages": {"training": TRAINING, "inference_customized": {"file": "infer.py", "env": "infer"}}},
        {"lifecycle": "complete", "stages": {"training": TRAINING, "saving": {"file": "save.py"}}},
        {
            "lifecycle": "complete",
            "stages": {"training": TRAINING, "saving": SAVING, "inference_complete": {"file": "i.py", "env": "e"}},
        },
        {"lifecycle": "live", "deployment_environment": "builtin", "stages": {"training": TRAINING, "saving": SAVING}},
        {
            "lifecycle": "live",
            "deployment_environment": "custom",
            "stages": {"training": TRAINING, "saving": SAVING, "deployment": {"file": "deploy/serve.py", "env": "d"}},
        },
    ],
)
def test_complete_definitions_for_every_lifecycle_are_valid(overrides):
    assert validate_custom_method(definition(**overrides)) == []


def test_saving_runs_in_the_training_env_unless_given():
    data = definition(lifecycle="complete", stages={"training": TRAINING, "saving": {"file": "save.py"}})
    assert custom_method_stages(data)["saving"] == {"file": "save.py", "env": "train-env"}
    assert data["stages"]["saving"] == {"file": "save.py"}  # the definition itself is left alone


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"stages": {"training": TRAINING, "inference_complete": {"file": "i.py", "env": "e"}}}, "inference_complete"),
        ({"stages": {"training": TRAINING, "saving": SAVING}}, "saving"),
        ({"stages": {"training": TRAINING, "deployment": {"file": "d.py", "env": "e"}}}, "deployment"),
    ],
)
def test_stages_the_lifecycle_does_not_use_are_refused(overrides, field):
    assert f"definition.stages.{field}" in fields(definition(**overrides))


def test_unknown_stage_names_are_refused():
    found = fields(definition(stages={"training": TRAINING, "eval": TRAINING, "inference-live": TRAINING}))
    assert set(found) == {"definition.stages.eval", "definition.stages.inference-live"}
    assert found["definition.stages.eval"].startswith("unknown stage; expected one of training, saving")


def test_seed_003s_hyphenated_stage_names_are_the_same_stages_stored_with_underscores():
    data = definition(
        lifecycle="complete",
        stages={
            "training": TRAINING,
            "saving": SAVING,
            "inference-customized": {"file": "ic.py", "env": "e"},
            "inference-complete": {"file": "icomp.py", "env": "e"},
        },
    )
    assert validate_custom_method(data) == []
    assert custom_method_stages(data) == {
        "training": TRAINING,
        "saving": SAVING,
        "inference_customized": {"file": "ic.py", "env": "e"},
        "inference_complete": {"file": "icomp.py", "env": "e"},
    }


def test_a_hyphenated_stage_is_checked_like_its_underscore_spelling_and_named_as_written():
    assert fields(definition(stages={"training": TRAINING, "inference-customized": {"file": "i.py"}})) == {
        "definition.stages.inference-customized.env": "is required when the inference_customized stage is given"
    }
    # The customized lifecycle has no complete model to run inference on.
    assert fields(definition(stages={"training": TRAINING, "inference-complete": {"file": "i.py", "env": "e"}})) == {
        "definition.stages.inference-complete": "is not used by the customized lifecycle"
    }


def test_a_stage_given_in_both_spellings_is_refused():
    stages = {"training": TRAINING, "inference_customized": TRAINING, "inference-customized": TRAINING}
    assert fields(definition(stages=stages)) == {
        "definition.stages.inference-customized": "names the inference_customized stage again (as inference_customized)"
    }


def test_deployment_environment_is_for_the_live_lifecycle_only():
    assert fields(definition(deployment_environment="builtin")) == {
        "definition.deployment_environment": "is only used by the live lifecycle"
    }
    live = definition(lifecycle="live", deployment_environment="cloud", stages={"training": TRAINING, "saving": SAVING})
    assert fields(live) == {"definition.deployment_environment": "must be builtin or custom"}


@pytest.mark.parametrize(
    ("file", "needle"),
    [
        ("/opt/train.py", "relative path"),
        ("C:/train.py", "relative path"),
        ("~/train.py", "relative path"),
        ("..\\train.py", "relative path"),
        ("../train.py", "'..'"),
        ("a/../../train.py", "'..'"),
        ("train.sh", "ending in .py"),
        ("train", "ending in .py"),
        (" train.py", "spaces"),
    ],
)
def test_stage_files_are_relative_python_files_inside_the_methods_directory(file, needle):
    found = fields(definition(stages={"training": {"file": file, "env": "e"}}))
    assert needle in found["definition.stages.training.file"]


@pytest.mark.parametrize("env", ["my env", "-leading", "a/b", "x" * 65])
def test_stage_envs_are_conda_environment_names(env):
    assert "definition.stages.training.env" in fields(definition(stages={"training": {"file": "t.py", "env": env}}))


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "is required"),
        ("   ", "is required"),
        (None, "is required"),
        ("My-SFT", "lowercase"),
        ("my sft", "lowercase"),
        ("x" * 65, "1-64"),
        ("sft-lora", "built-in method"),
        ("custom01", "built-in method"),
    ],
)
def test_method_names_are_unique_lowercase_identifiers(name, needle):
    assert needle in fields(definition(name=name))["definition.name"]


def test_every_problem_is_reported_at_once():
    bad = {
        "name": "Bad Name",
        "training_type": "audio",
        "lifecycle": "forever",
        "stages": {"training": {"file": "/abs.py", "env": "e", "gpu": 1}},
        "colour": "blue",
        "parameters": [{"name": "x", "type": "complex"}],
    }
    assert set(fields(bad)) == {
        "definition.name",
        "definition.training_type",
        "definition.lifecycle",
        "definition.stages.training.file",
        "definition.stages.training.gpu",
        "definition.colour",
        "definition.parameters[0].type",
    }


def test_a_definition_that_is_not_an_object_is_refused():
    assert fields(["name"]) == {"definition": "must be an object"}


def test_required_fields_are_named_when_absent():
    # Which stages are mandatory depends on the lifecycle, so without one only their shape is checked.
    assert fields({}) == {
        "definition.name": "is required",
        "definition.training_type": "is required: one of chat, embedding, vision-language, image-generation",
        "definition.lifecycle": "is required: one of customized, complete, live",
    }


def test_a_definition_sent_as_a_protobuf_struct_validates():
    data = definition(
        parameters=[{"name": "rank", "type": "int", "default": 8, "min": 1, "max": 64, "help": "Rank."}],
    )
    msg = struct_pb2.Struct()
    msg.update(data)
    decoded = json_format.MessageToDict(msg)  # what the catalog servicer hands over: numbers are floats
    assert validate_custom_method(decoded) == []
    (rank,) = custom_method_specs(decoded)
    assert (rank.default, rank.minimum, rank.maximum, rank.required) == (8, 1, 64, False)


def test_without_parameters_an_added_method_takes_deepextensions_generic_table():
    assert custom_method_specs(definition()) == specs_from_dataclass(methods.DeepExtensionParams) == SPECS["custom01"]


def test_custom_parameters_become_param_specs_resolved_like_builtin_ones():
    data = definition(
        parameters=[
            {"name": "rank", "type": "int", "default": 8, "min": 1, "max": 64, "help": "Rank.", "aliases": ["r"]},
            {"name": "mode", "type": "string", "default": "fast", "choices": ["fast", "slow"], "group": "advanced"},
            {"name": "use_cache", "type": "bool", "default": False},
            {"name": "temperature", "type": "float"},
        ]
    )
    assert validate_custom_method(data) == []
    specs = custom_method_specs(data)
    assert [(s.name, s.type, s.default, s.required) for s in specs] == [
        ("rank", "int", 8, False),
        ("mode", "string", "fast", False),
        ("use_cache", "bool", False, False),
        ("temperature", "float", None, True),
    ]
    assert resolve_parameters(specs, {"r": "16", "temperature": 0.7, "USE_CACHE": "true"}) == {
        "rank": 16,
        "mode": "fast",
        "use_cache": True,
        "temperature": 0.7,
    }
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(specs, {})
    assert [v.field for v in exc.value.violations] == ["parameters.temperature"]


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        ({"type": "int"}, {"definition.parameters[0].name": "is required"}),
        ({"name": "Rank", "type": "int"}, {"definition.parameters[0].name"}),
        ({"name": "2rank", "type": "int"}, {"definition.parameters[0].name"}),
        ({"name": "output_dir", "type": "string"}, {"definition.parameters[0].name"}),
        ({"name": "rank"}, {"definition.parameters[0].type"}),
        ({"name": "rank", "type": "complex"}, {"definition.parameters[0].type"}),
        (
            {"name": "rank", "type": "int", "default": 2.5},
            {"definition.parameters[0].default": "expected an integer, got 2.5"},
        ),
        (
            {"name": "rank", "type": "int", "default": 0, "min": 1},
            {"definition.parameters[0].default": "must be >= 1, got 0"},
        ),
        ({"name": "rank", "type": "int", "default": 99, "max": 64}, {"definition.parameters[0].default"}),
        ({"name": "rank", "type": "int", "min": 10, "max": 1}, {"definition.parameters[0].max"}),
        ({"name": "rank", "type": "int", "min": "one"}, {"definition.parameters[0].min"}),
        ({"name": "flag", "type": "bool", "default": "maybe"}, {"definition.parameters[0].default"}),
        ({"name": "flag", "type": "bool", "min": 0}, {"definition.parameters[0].min"}),
        (
            {"name": "mode", "type": "string", "default": "x", "choices": ["a", "b"]},
            {"definition.parameters[0].default"},
        ),
        ({"name": "rank", "type": "int", "choices": ["1"]}, {"definition.parameters[0].choices"}),
        ({"name": "rank", "type": "int", "group": "expert"}, {"definition.parameters[0].group"}),
        ({"name": "rank", "type": "int", "help": 5}, {"definition.parameters[0].help"}),
        ({"name": "rank", "type": "int", "unit": "tokens"}, {"definition.parameters[0].unit"}),
        ({"name": "rank", "type": "int", "aliases": ["bad-alias"]}, {"definition.parameters[0].aliases"}),
        ("rank", {"definition.parameters[0]"}),
    ],
)
def test_bad_custom_parameter_specs_name_the_key(parameter, expected):
    found = fields(definition(parameters=[parameter]))
    if isinstance(expected, dict):
        assert found == expected
    else:
        assert set(found) == expected


@pytest.mark.parametrize(
    ("name", "variable"),
    [
        ("path", "PATH"),
        ("home", "HOME"),
        ("user", "USER"),
        ("shell", "SHELL"),
        ("tmpdir", "TMPDIR"),
        ("pwd", "PWD"),
        ("pythonpath", "PYTHONPATH"),
        ("python_startup", "PYTHON_STARTUP"),
        ("ld_preload", "LD_PRELOAD"),
        ("ld_library_path", "LD_LIBRARY_PATH"),
        ("dyld_insert_libraries", "DYLD_INSERT_LIBRARIES"),
        ("hf_token", "HF_TOKEN"),
        ("hf_hub_offline", "HF_HUB_OFFLINE"),
        ("huggingface_hub_cache", "HUGGINGFACE_HUB_CACHE"),
        ("cuda_visible_devices", "CUDA_VISIBLE_DEVICES"),
        ("nccl_debug", "NCCL_DEBUG"),
        ("torch_home", "TORCH_HOME"),
        ("transformers_cache", "TRANSFORMERS_CACHE"),
        ("tuneforge_x", "TUNEFORGE_X"),
        ("tuneforge_job_id", "TUNEFORGE_JOB_ID"),
        ("omp_num_threads", "OMP_NUM_THREADS"),
        ("mkl_num_threads", "MKL_NUM_THREADS"),
    ],
)
def test_custom_parameters_whose_environment_variable_would_change_the_runner_are_refused(name, variable):
    data = definition(parameters=[{"name": "rank", "type": "int", "default": 8}, {"name": name, "type": "string"}])
    found = fields(data)
    assert set(found) == {"definition.parameters[1].name"}
    assert found["definition.parameters[1].name"].startswith(f"can't be used: its environment variable {variable} ")
    with pytest.raises(InvalidArgument):
        custom_method_specs(data)


@pytest.mark.parametrize("name", ["paths", "home_dir", "users", "cuda", "hf", "pyth", "learning_rate", "old_path"])
def test_parameter_names_that_only_resemble_protected_variables_are_allowed(name):
    assert fields(definition(parameters=[{"name": name, "type": "string", "default": "x"}])) == {}


def test_no_builtin_parameter_sets_a_protected_environment_variable():
    assert not [s.env_name for specs in SPECS.values() for s in specs if protected_env_problem(s.env_name)]


def test_custom_parameter_names_and_aliases_must_be_unique():
    data = definition(
        parameters=[
            {"name": "rank", "type": "int", "default": 1},
            {"name": "rank", "type": "int", "default": 2},
            {"name": "alpha", "type": "int", "default": 2, "aliases": ["rank"]},
        ]
    )
    assert fields(data) == {
        "definition.parameters[1].name": "'rank' is already used by parameters[0]",
        "definition.parameters[2].aliases": "'rank' is already used by parameters[0]",
    }


def test_parameters_must_be_a_list():
    assert fields(definition(parameters={"rank": 8})) == {"definition.parameters": "must be a list of parameter specs"}


def test_custom_method_specs_refuses_an_invalid_definition():
    with pytest.raises(InvalidArgument):
        custom_method_specs(definition(parameters=[{"name": "x", "type": "complex"}]))


def test_validation_does_not_change_the_definition():
    data = definition(lifecycle="complete", stages={"training": TRAINING, "saving": {"file": "s.py"}})
    before = copy.deepcopy(data)
    validate_custom_method(data)
    custom_method_specs(data)
    assert data == before
