from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from tuneforge_common.methods import SftLoraParams, param
from tuneforge_trainer import sdk
from tuneforge_trainer.sdk import LOG_DATA_PREFIX, log_data, parse_flags, parse_log_data


@dataclass(frozen=True)
class ToyParams:
    use_fast: bool = param(False, "A boolean flag.")
    rate: float = param(0.5, "A bounded float.", minimum=0.0, maximum=1.0, aliases=("r",))
    name: str = param("a", "A choice.", choices=("a", "b"))


# --- log_data / parse_log_data --------------------------------------------------------------------


def test_parse_log_data_valid_line():
    line = '  [log_data]: {"code": 200, "progress": 50.0, "details": {"loss": 1.5}}\n'
    assert parse_log_data(line) == {"code": 200, "progress": 50.0, "details": {"loss": 1.5}}


@pytest.mark.parametrize(
    "line",
    [
        "[log_data]: {not json",
        "[log_data]: ",
        "[log_data]: [1, 2, 3]",
        '[log_data]: "just a string"',
        "{'loss': 1.0, 'epoch': 0.1}",
        "Training started",
        "",
        'noise [log_data]: {"code": 200}',
    ],
)
def test_parse_log_data_rejects_other_lines(line):
    assert parse_log_data(line) is None


def test_log_data_prints_one_parseable_line(capsys):
    log_data(37.5, step=3, loss=2.25, learning_rate=1e-4, eval_loss=None, grad_norm=float("nan"))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(LOG_DATA_PREFIX)
    payload = json.loads(out[len(LOG_DATA_PREFIX) :])  # strict JSON: no NaN literal
    assert payload == {
        "code": 200,
        "progress": 37.5,
        "details": {"step": 3, "loss": 2.25, "learning_rate": 1e-4, "grad_norm": "nan"},
    }
    assert parse_log_data(out) == payload


def test_log_data_code_and_progress_clamped(capsys):
    log_data(120, code=500)
    assert parse_log_data(capsys.readouterr().out) == {"code": 500, "progress": 100.0, "details": {}}


def test_sdk_import_does_not_import_torch():
    code = (
        "import sys, tuneforge_trainer.sdk as s; s.parse_log_data('x'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


def test_log_data_callback_reports_numeric_logs(capsys):
    callback = sdk.make_log_data_callback()
    from transformers import TrainerCallback

    assert isinstance(callback, TrainerCallback) and isinstance(callback, sdk.LogDataCallback)
    state = SimpleNamespace(global_step=3, max_steps=12, epoch=0.25, is_world_process_zero=True)
    callback.on_log(
        None, state, None, logs={"loss": 1.25, "grad_norm": 0.5, "learning_rate": 2e-4, "note": "text", "flag": True}
    )
    payload = parse_log_data(capsys.readouterr().out)
    assert payload == {
        "code": 200,
        "progress": 25.0,
        "details": {"step": 3, "epoch": 0.25, "loss": 1.25, "grad_norm": 0.5, "learning_rate": 2e-4},
    }


def test_log_data_callback_reports_training_tokens_per_second(capsys):
    callback = sdk.make_log_data_callback()
    state = SimpleNamespace(global_step=0, max_steps=4, epoch=0.0, is_world_process_zero=True, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    time.sleep(0.05)
    state.global_step, state.num_input_tokens_seen = 1, 5000
    callback.on_log(None, state, None, logs={"loss": 2.0})
    details = parse_log_data(capsys.readouterr().out)["details"]
    assert details["tokens_seen"] == 5000
    assert 0 < details["tokens_per_second"] < 5000 / 0.05
    callback.on_log(None, state, None, logs={"eval_loss": 2.5})  # evaluations carry no throughput
    assert "tokens_per_second" not in parse_log_data(capsys.readouterr().out)["details"]


# --- parse_flags ----------------------------------------------------------------------------------


def test_parse_flags_defaults_flags_and_extras():
    params, extras = parse_flags(
        SftLoraParams,
        [
            "--lora_rank=4",
            "--learning_rate",
            "1e-3",
            "--max-steps=7",
            "--lr_scheduler_type=cosine",
            "--model_path=/m",
            "--dataset_path",
            "/d.jsonl",
            "--output_dir=/o",
            "--resume_from_checkpoint=",
        ],
        environ={},
    )
    assert (params.lora_rank, params.learning_rate, params.max_steps) == (4, 1e-3, 7)
    assert params.lr_scheduler_type == "cosine"
    assert params.lora_alpha == 16 and params.epochs == 1.0  # defaults
    assert extras == {"model_path": "/m", "dataset_path": "/d.jsonl", "output_dir": "/o", "resume_from_checkpoint": ""}


def test_parse_flags_aliases():
    params, extras = parse_flags(SftLoraParams, ["--lr=0.01", "--rank=32"], environ={})
    assert (params.learning_rate, params.lora_rank, extras) == (0.01, 32, {})


def test_parse_flags_environment_fallback_and_flag_precedence():
    environ = {"LORA_RANK": "16", "LEARNING_RATE": "0.5", "PROMPT_INPUT_COLUMN": "question"}
    params, _ = parse_flags(SftLoraParams, ["--learning_rate=0.1"], environ=environ)
    assert params.lora_rank == 16 and params.learning_rate == 0.1
    assert params.prompt_input_column == "question"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--use_fast=true"], True),
        (["--use_fast=false"], False),
        (["--use_fast=False"], False),
        (["--use_fast=0"], False),
        (["--use_fast=yes"], True),
        (["--use_fast"], True),
        (["--use_fast", "false"], False),
        ([], False),
    ],
)
def test_parse_flags_booleans(argv, expected):
    params, _ = parse_flags(ToyParams, argv, environ={})
    assert params.use_fast is expected


def test_parse_flags_boolean_from_environment():
    assert parse_flags(ToyParams, [], environ={"USE_FAST": "false"})[0].use_fast is False
    assert parse_flags(ToyParams, [], environ={"USE_FAST": "on"})[0].use_fast is True


@pytest.mark.parametrize(
    ("argv", "environ", "needle"),
    [
        (["--lora_rank=abc"], {}, "--lora_rank"),
        (["--lora_rank=0"], {}, "--lora_rank: must be >= 1"),
        (["--lr=5"], {}, "--lr: must be <= 1"),
        (["--lr_scheduler_type=bogus"], {}, "--lr_scheduler_type: must be one of"),
        (["--max_steps"], {}, "--max_steps: needs a value"),
        (["--lora_rank=4", "--rank=8"], {}, "given twice"),
        (["positional"], {}, "unexpected argument"),
        ([], {"LORA_RANK": "many"}, "LORA_RANK"),
    ],
)
def test_parse_flags_bad_value_names_the_flag(argv, environ, needle):
    with pytest.raises(SystemExit) as excinfo:
        parse_flags(SftLoraParams, argv, environ=environ)
    assert needle in str(excinfo.value.code)


def test_parse_flags_bad_boolean():
    with pytest.raises(SystemExit, match="--use_fast: expected true or false"):
        parse_flags(ToyParams, ["--use_fast=maybe"], environ={})
