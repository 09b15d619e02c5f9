"""Parameter schema rules: aliases, defaults, types and ranges, all violations reported by field."""

import pytest

from tuneforge_common.errors import InvalidArgument
from tuneforge_common.methods import BUILTIN_METHODS, SftLoraParams
from tuneforge_common.params import parse_bool, resolve_parameters, specs_from_dataclass, to_env, to_flags

SPECS = specs_from_dataclass(SftLoraParams)


def test_defaults_fill_every_parameter_in_schema_order():
    resolved = resolve_parameters(SPECS, {})
    assert list(resolved) == [s.name for s in SPECS]
    assert resolved["lora_rank"] == 8 and resolved["max_steps"] == -1


def test_openai_and_mistral_aliases_map_to_canonical_names():
    resolved = resolve_parameters(SPECS, {"training_steps": 10, "warmup_fraction": 0.1, "seq_len": 256, "n_epochs": 2})
    assert (resolved["max_steps"], resolved["warmup_ratio"], resolved["max_seq_length"], resolved["epochs"]) == (
        10,
        0.1,
        256,
        2.0,
    )


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
