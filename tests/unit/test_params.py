"""Parameter schema rules: aliases, defaults, types and ranges, all violations reported by field."""

import pytest

from tuneforge_common.errors import InvalidArgument
from tuneforge_common.methods import BUILTIN_METHODS, SftLoraParams
from tuneforge_common.params import (
    ParamSpec,
    parse_bool,
    resolve_parameters,
    specs_from_dataclass,
    to_env,
    to_flags,
)

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
