"""`tuneforge train`'s per-parameter flags, generated from a method's parameter schema (method_flags.py)."""

from __future__ import annotations

import pytest

from tuneforge_cli.commands.jobs import TRAIN_FLAGS
from tuneforge_cli.method_flags import FlagError, flags_table, method_flags, parse_method_flags

SCHEMA = [
    {"name": "lora_rank", "type": "int", "help": "Rank.", "default_value": 8.0, "minimum": 1.0, "maximum": 256.0,
     "aliases": ["lora_r", "rank"]},
    {"name": "learning_rate", "type": "float", "help": "LR.", "default_value": 0.0002, "minimum": 1e-9, "maximum": 1.0,
     "aliases": ["lr"]},
    {"name": "packing", "type": "bool", "help": "Pack.", "default_value": True, "aliases": ["padding_free"]},
    {"name": "lr_scheduler_type", "type": "string", "default_value": "linear", "choices": ["linear", "cosine"]},
    {"name": "target_modules", "type": "string", "default_value": "all-linear"},
    {"name": "name", "type": "string", "default_value": "", "help": "A custom method's own 'name' parameter."},
]  # fmt: skip


def parse(*args: str) -> dict:
    return parse_method_flags(method_flags(SCHEMA, TRAIN_FLAGS), list(args), "m")


def test_each_parameter_is_a_flag_converted_to_its_type():
    assert parse("--lora-rank", "4", "--learning-rate=1e-3", "--no-packing", "--lr-scheduler-type", "cosine") == {
        "lora_rank": 4,
        "learning_rate": 0.001,
        "packing": False,
        "lr_scheduler_type": "cosine",
    }
    assert parse("--packing") == {"packing": True}
    assert parse("--packing=false", "--target-modules", "q_proj,v_proj") == {
        "packing": False,
        "target_modules": "q_proj,v_proj",
    }
    assert parse() == {}  # nothing given: the method's defaults hold, nothing is sent


def test_aliases_are_flags_of_their_parameter():
    assert parse("--lora-r", "16", "--lr", "0.01", "--no-padding-free") == {
        "lora_rank": 16,
        "learning_rate": 0.01,
        "packing": False,
    }
    with pytest.raises(FlagError) as twice:
        parse("--lora-rank", "4", "--rank", "8")
    assert twice.value.flag == "--rank" and "lora_rank" in twice.value.message


def test_a_parameter_named_like_a_train_option_is_spelled_with_param_prefix():
    flags = method_flags(SCHEMA, TRAIN_FLAGS)
    assert "--name" not in flags and flags["--param-name"].name == "name"
    assert parse("--param-name", "x") == {"name": "x"}


@pytest.mark.parametrize(
    ("args", "flag", "says"),
    [
        (["--lora-rank", "0"], "--lora-rank", "below the minimum 1"),
        (["--lora-rank", "300"], "--lora-rank", "above the maximum 256"),
        (["--lora-rank", "2.5"], "--lora-rank", "not an integer"),
        (["--lr", "fast"], "--lr", "not a number"),
        (["--learning-rate", "nan"], "--learning-rate", "not a finite number"),
        (["--packing=maybe"], "--packing", "not a boolean"),
        (["--lr-scheduler-type", "step"], "--lr-scheduler-type", "not one of: linear, cosine"),
        (["--lora-rnak", "4"], "--lora-rnak", "did you mean --lora-rank"),
        (["--lora-rank"], "--lora-rank", "needs a value"),
        (["--no-lora-rank"], "--no-lora-rank", "no such option"),
        (["4"], "4", "unexpected argument"),
    ],
)
def test_a_bad_flag_or_value_is_refused_naming_the_flag(args, flag, says):
    with pytest.raises(FlagError) as bad:
        parse(*args)
    assert bad.value.flag == flag and says in bad.value.message


def test_the_flags_table_shows_type_default_range_choices_and_help():
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(flags_table(method_flags(SCHEMA, TRAIN_FLAGS), "flags"))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert "int" in rows["--lora-rank"] and "1..256" in rows["--lora-rank"] and "Rank." in rows["--lora-rank"]
    assert "bool" in rows["--packing"] and "true" in rows["--packing"] and "--no-name" in text
    assert "linear | cosine" in rows["--lr-scheduler-type"]
    assert "--param-name" in rows and "--lr" not in rows  # an alias works as a flag but is not listed


def test_a_mistyped_train_option_is_suggested_too():
    with pytest.raises(FlagError) as bad:
        parse_method_flags(method_flags(SCHEMA, TRAIN_FLAGS), ["--datset", "ds"], "m", TRAIN_FLAGS)
    assert "did you mean --dataset?" in bad.value.message
