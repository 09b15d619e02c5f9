"""Parameter schema rules: aliases, defaults, types and ranges, all violations reported by field."""

import re

import pytest

from tuneforge_common.errors import InvalidArgument
from tuneforge_common.methods import BUILTIN_METHODS, SftLoraParams
from tuneforge_common.params import (
    ParamSpec,
    coerce,
    parse_bool,
    resolve_parameters,
    specs_from_dataclass,
    to_env,
    to_flags,
)
from tuneforge_trainer.agent import runner_env

SPECS = specs_from_dataclass(SftLoraParams)


def test_defaults_fill_every_parameter_in_schema_order():
    resolved = resolve_parameters(SPECS, {})
    assert list(resolved) == [s.name for s in SPECS]
    assert resolved["lora_rank"] == 8 and resolved["max_steps"] == -1 and resolved["load_in_4bit"] is False


def test_openai_and_mistral_aliases_map_to_canonical_names():
    resolved = resolve_parameters(SPECS, {"training_steps": 10, "warmup_fraction": 0.1, "seq_len": 256, "n_epochs": 2})
    assert (resolved["max_steps"], resolved["warmup_ratio"], resolved["max_seq_length"], resolved["epochs"]) == (
        10,
        0.1,
        256,
        2.0,
    )


def test_environment_names_are_accepted_as_parameter_names():
    resolved = resolve_parameters(SPECS, {"LORA_RANK": "16", "GRAD_ACCUM_STEPS": 2, "LOAD_IN_4BIT": "false"})
    assert (resolved["lora_rank"], resolved["grad_accum_steps"], resolved["load_in_4bit"]) == (16, 2, False)


def test_strings_from_forms_are_coerced_to_the_schema_type():
    resolved = resolve_parameters(SPECS, {"lora_rank": "16", "learning_rate": "5e-5", "max_steps": 3.0})
    assert resolved["lora_rank"] == 16 and resolved["learning_rate"] == 5e-5 and resolved["max_steps"] == 3


def test_every_bad_field_is_named_in_one_error():
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(
            SPECS,
            {"bogus": 1, "lora_rank": 0, "learning_rate": "fast", "max_steps": 2.5, "lr_scheduler_type": "zigzag"},
        )
    fields = {v.field for v in exc.value.violations}
    assert fields == {
        "parameters.bogus",
        "parameters.lora_rank",
        "parameters.learning_rate",
        "parameters.max_steps",
        "parameters.lr_scheduler_type",
    }
    assert "must be >= 1" in exc.value.message


def test_a_name_and_its_alias_together_are_refused():
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(SPECS, {"max_steps": 5, "training_steps": 6})
    assert exc.value.violations[0].field == "parameters.training_steps"


def test_cross_field_rules_run_only_when_a_method_id_is_given():
    given = {"save_total_limit": 2}  # keeping 2 checkpoints of none saved
    assert resolve_parameters(SPECS, given)["save_total_limit"] == 2
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(SPECS, given, method_id="sft-lora")
    assert [v.field for v in exc.value.violations] == ["parameters.save_total_limit"]
    assert resolve_parameters(SPECS, {**given, "save_steps": 10}, method_id="sft-lora")["save_steps"] == 10


def test_cross_field_rules_wait_until_every_field_is_valid_on_its_own():
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(SPECS, {"save_total_limit": 2, "lora_rank": 0}, method_id="sft-lora")
    assert [v.field for v in exc.value.violations] == ["parameters.lora_rank"]


def test_specs_loaded_from_stored_json_get_the_same_cross_field_rules():
    stored = [ParamSpec.from_json(s.to_json()) for s in SPECS]  # as the catalog keeps them
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(stored, {"loraplus_lr_ratio": 0.5}, method_id="sft-lora")
    assert exc.value.violations[0].field == "parameters.loraplus_lr_ratio"


def test_param_spec_json_round_trip_keeps_applies_to():
    spec = next(s for s in SPECS if s.name == "lora_rank")
    data = spec.to_json()
    assert data["applies_to"] == list(spec.applies_to) and "sft-lora" in data["applies_to"]
    assert ParamSpec.from_json(data) == spec


def test_param_spec_json_stored_before_applies_to_still_loads():
    old = {k: v for k, v in SPECS[0].to_json().items() if k != "applies_to"}
    assert ParamSpec.from_json(old).applies_to == ()


def test_specs_of_a_class_that_is_no_builtin_schema_apply_to_no_method():
    from dataclasses import dataclass

    from tuneforge_common.methods import param

    @dataclass(frozen=True)
    class Toy:
        lora_rank: int = param(4, "Same name as a built-in parameter.")

    assert specs_from_dataclass(Toy)[0].applies_to == ()


def test_booleans_are_parsed_explicitly_never_by_truthiness():
    assert parse_bool("false") is False and parse_bool("true") is True and parse_bool(False) is False
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_runner_flags_and_env_follow_the_deepextension_contract():
    assert to_flags({"lora_rank": 8, "load_in_4bit": False}) == ["--lora_rank=8", "--load_in_4bit=false"]
    assert to_env({"lora_rank": 8, "load_in_4bit": True}) == {"LORA_RANK": "8", "LOAD_IN_4BIT": "true"}


def test_builtin_methods_have_help_for_every_parameter():
    for method in BUILTIN_METHODS:
        for spec in specs_from_dataclass(method.params):
            assert spec.help, f"{method.id}.{spec.name} has no help text"


# --- explicit nulls (Mistral's OptionalNullable fields) and JSON wording --------------------------------


def test_an_explicit_null_is_not_given_so_the_default_applies():
    given = {"training_steps": None, "learning_rate": None, "seq_len": None, "load_in_4bit": None, "lora_rank": 16}
    resolved = resolve_parameters(SPECS, given)
    assert resolved == resolve_parameters(SPECS, {"lora_rank": 16})
    assert resolved["max_steps"] == -1 and resolved["lora_rank"] == 16


def test_a_null_alias_next_to_its_canonical_name_is_not_given_twice():
    assert resolve_parameters(SPECS, {"training_steps": None, "max_steps": 5})["max_steps"] == 5


def test_an_explicit_null_for_a_required_parameter_is_still_required():
    specs = [ParamSpec(name="temperature", type="float", help="", required=True)]
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(specs, {"temperature": None})
    assert [(v.field, v.description) for v in exc.value.violations] == [("parameters.temperature", "is required")]


def test_an_unknown_parameter_is_refused_even_when_null():
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(SPECS, {"bogus": None})
    assert [v.field for v in exc.value.violations] == ["parameters.bogus"]


PYTHON_WORDS = {"NoneType", "dict", "list", "str", "int", "float", "bool", "tuple", "None", "True", "False"}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("lora_rank", {"a": 1}, "expected an integer, got an object"),
        ("lora_rank", [1], "expected an integer, got an array"),
        ("lora_rank", True, "expected an integer, got a boolean"),
        ("lora_rank", "eight", 'expected an integer, got "eight"'),
        ("lora_rank", 2.5, "expected an integer, got 2.5"),
        ("learning_rate", {"a": 1}, "expected a number, got an object"),
        ("learning_rate", [], "expected a number, got an array"),
        ("learning_rate", False, "expected a number, got a boolean"),
        ("learning_rate", "fast", 'expected a number, got "fast"'),
        ("learning_rate", "inf", "expected a finite number"),
        ("load_in_4bit", {"a": 1}, "expected true or false, got an object"),
        ("load_in_4bit", [True], "expected true or false, got an array"),
        ("load_in_4bit", 0.5, "expected true or false, got 0.5"),
        ("load_in_4bit", "maybe", 'expected true or false, got "maybe"'),
        ("lr_scheduler_type", {"a": 1}, "expected a string, got an object"),
        ("lr_scheduler_type", ["cosine"], "expected a string, got an array"),
    ],
)
def test_type_errors_name_json_types_never_python_ones(name, value, message):
    with pytest.raises(InvalidArgument) as exc:
        resolve_parameters(SPECS, {name: value})
    (violation,) = exc.value.violations
    assert (violation.field, violation.description) == (f"parameters.{name}", message)
    assert not PYTHON_WORDS & set(re.findall(r"\w+", message)) and not set("{['") & set(message)


@pytest.mark.parametrize("spec_type", ["int", "float", "bool", "string"])
def test_coerce_says_null_for_a_null_value(spec_type):
    with pytest.raises(ValueError, match=r"got null$"):
        coerce(ParamSpec(name="x", type=spec_type, help=""), None)


# --- the runner's environment (trainer agent) ------------------------------------------------------------


OWN = {"MODEL_PATH": "/m", "DATASET_PATH": "/d.jsonl", "OUTPUT_DIR": "/o", "TUNEFORGE_JOB_ID": "j-1"}
BASE = {"PATH": "/usr/bin", "HOME": "/home/agent", "HF_TOKEN": "secret", "LD_PRELOAD": ""}


def test_parameters_reach_the_runner_environment_under_their_variable_names():
    env, skipped = runner_env(BASE, {"lora_rank": 8.0, "load_in_4bit": True}, OWN)
    assert env == {**BASE, "LORA_RANK": "8", "LOAD_IN_4BIT": "true", **OWN} and skipped == []


def test_a_parameter_never_overrides_a_protected_variable_in_the_runner_environment():
    params = {
        "path": "/tmp/evil",
        "ld_preload": "/tmp/evil.so",
        "pythonpath": "/tmp",
        "hf_token": "stolen",
        "cuda_visible_devices": "0,1,2,3",
        "tuneforge_attempt": "9",
        "lora_rank": 8,
    }
    env, skipped = runner_env(BASE, params, OWN)
    assert skipped == ["CUDA_VISIBLE_DEVICES", "HF_TOKEN", "LD_PRELOAD", "PATH", "PYTHONPATH", "TUNEFORGE_ATTEMPT"]
    assert env == {**BASE, "LORA_RANK": "8", **OWN}


def test_the_agents_own_variables_win_over_parameters_of_the_same_name():
    # Parameters named model_path/output_dir are refused by the catalog; a stored one still can't redirect a run.
    env, skipped = runner_env(BASE, {"model_path": "/elsewhere", "output_dir": "/elsewhere"}, OWN)
    assert (env["MODEL_PATH"], env["OUTPUT_DIR"]) == ("/m", "/o") and skipped == ["MODEL_PATH", "OUTPUT_DIR"]
