"""A job's own validation dataset (--validation_dataset_path / VALIDATION_DATASET_PATH) is what sft, dpo and grpo
evaluate on, prepared as their training rows are, instead of a held-out share; giving validation_ratio as well is
refused naming it; the agent passes the flag only to jobs that have one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge_common.methods import DpoParams, GrpoParams, SftLoraParams

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO / "examples" / "datasets"

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int, word: str) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{word} {i}?"}, {"role": "assistant", "content": f"{word} {i}."}]}
        for i in range(n)
    ]


def paths_for(model: Path, dataset: Path, output: Path, validation: Path | None):
    from tuneforge_trainer.runner import RunPaths

    return RunPaths(model, dataset, output, None, validation)


def test_split_validation_takes_the_given_rows_and_refuses_a_ratio_beside_them():
    import datasets

    from tuneforge_trainer.data import DatasetProblem, split_validation

    rows = datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(20)])
    given = datasets.Dataset.from_list([{"text": "held apart"}])
    train, validation = split_validation(rows, 0.0, given)
    assert train["text"] == rows["text"] and validation["text"] == ["held apart"]
    with pytest.raises(DatasetProblem, match=r"--validation_ratio=0.25 .* --validation_dataset_path"):
        split_validation(rows, 0.25, given)


def test_run_paths_read_the_validation_dataset_from_the_flag_or_the_environment(tiny_model_dir, tmp_path, monkeypatch):
    from tuneforge_trainer.sdk import run_paths

    monkeypatch.delenv("VALIDATION_DATASET_PATH", raising=False)
    validation = write_rows(tmp_path / "validation.jsonl", chat_rows(2, "v"))
    base = {"model_path": str(tiny_model_dir), "dataset_path": "/d.jsonl", "output_dir": str(tmp_path / "out")}
    assert run_paths(base).validation is None
    assert run_paths({**base, "validation_dataset_path": str(validation)}).validation == validation
    monkeypatch.setenv("VALIDATION_DATASET_PATH", str(validation))
    assert run_paths(base).validation == validation
    with pytest.raises(SystemExit, match="--validation_dataset_path=/nowhere.jsonl: no such file"):
        run_paths({**base, "validation_dataset_path": "/nowhere.jsonl"})


def test_sft_evaluates_on_every_row_of_the_validation_file_and_trains_on_every_training_row(tiny_model_dir, tmp_path):
    from tuneforge_trainer import supervised

    validation = write_rows(tmp_path / "validation.jsonl", chat_rows(6, "held"))
    params = SftLoraParams(max_steps=1, batch_size=2, lora_rank=2, max_samples=10)
    paths = paths_for(tiny_model_dir, DATASETS / "sample-chat.jsonl", tmp_path / "out", validation)
    built = supervised.build("sft-lora", params, paths, str(tmp_path / "cache"), full=False)
    # max_samples limits the training rows only; the validation file is evaluated whole.
    assert built.train_rows == 10 and len(built.eval_dataset) == 6
    assert built.trainer.args.eval_strategy == "steps"
    text = built.tokenizer.decode(built.trainer.eval_dataset[0]["input_ids"])
    assert "held 0" in text
    metrics = built.trainer.evaluate()
    assert metrics["eval_loss"] > 0


def test_sft_refuses_a_validation_file_whose_rows_differ_in_shape_or_a_ratio_beside_it(tiny_model_dir, tmp_path):
    from tuneforge_trainer import supervised

    text = write_rows(tmp_path / "text.jsonl", [{"text": "plain words"}] * 3)
    chat = write_rows(tmp_path / "chat.jsonl", chat_rows(3, "v"))
    train = DATASETS / "sample-chat.jsonl"
    with pytest.raises(SystemExit, match=r"holds text rows but the training dataset chat rows"):
        paths = paths_for(tiny_model_dir, train, tmp_path / "a", text)
        supervised.build("sft-lora", SftLoraParams(max_steps=1), paths, str(tmp_path / "cache"), full=False)
    with pytest.raises(SystemExit, match="--validation_ratio=0.2"):
        paths = paths_for(tiny_model_dir, train, tmp_path / "b", chat)
        params = SftLoraParams(max_steps=1, validation_ratio=0.2)
        supervised.build("sft-lora", params, paths, str(tmp_path / "cache"), full=False)


def test_dpo_evaluates_on_the_validation_files_preference_pairs(tiny_model_dir, tmp_path):
    from tuneforge_trainer.methods import dpo

    pairs = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(3)]
    validation = write_rows(tmp_path / "pairs.jsonl", pairs)
    paths = paths_for(tiny_model_dir, DATASETS / "sample-preference.jsonl", tmp_path / "out", validation)
    built = dpo.build(DpoParams(max_steps=1, batch_size=2, lora_rank=2), paths, str(tmp_path / "cache"))
    assert built.train_rows == 24 and len(built.eval_dataset) == 3
    assert built.trainer.args.eval_strategy == "steps"


def test_grpo_evaluates_on_the_validation_files_prompts(tiny_model_dir, tmp_path):
    from tuneforge_trainer.methods import grpo

    validation = write_rows(tmp_path / "qa.jsonl", [{"question": f"{i} + 1?", "answer": f"{i + 1}"} for i in range(4)])
    paths = paths_for(tiny_model_dir, DATASETS / "sample-qa.jsonl", tmp_path / "out", validation)
    params = GrpoParams(batch_size=2, num_generations=2, max_completion_length=8, lora_rank=2, max_steps=1)
    built = grpo.build(params, paths, str(tmp_path / "cache"), {})
    assert built.train_rows == 20 and len(built.eval_dataset) == 4
    assert built.eval_dataset[0]["answer"] == "1"


def test_grpo_refuses_to_evaluate_when_a_batch_cannot_hold_whole_groups(tiny_model_dir, tmp_path):
    from tuneforge_trainer.methods import grpo

    validation = write_rows(tmp_path / "qa.jsonl", [{"question": "1 + 1?", "answer": "2"}])
    paths = paths_for(tiny_model_dir, DATASETS / "sample-qa.jsonl", tmp_path / "out", validation)
    # Trains (2 x 2 completions per generation batch hold whole groups of 4) but can't evaluate 2 at a time.
    params = GrpoParams(batch_size=2, grad_accum_steps=2, num_generations=4, max_completion_length=8, lora_rank=2)
    with pytest.raises(SystemExit, match="--num_generations=4 must divide --batch_size=2 to evaluate"):
        grpo.build(params, paths, str(tmp_path / "cache"), {})


def test_the_agent_passes_the_validation_flag_only_to_jobs_that_have_one():
    from tuneforge_trainer.agent import build_command

    args = ({"lora_rank": 8.0}, "/m", "/d.jsonl", "/o", "")
    without = build_command("py", "tuneforge_trainer.methods.sft_lora", *args)
    assert not any(flag.startswith("--validation_dataset_path") for flag in without)
    with_one = build_command("py", "tuneforge_trainer.methods.sft_lora", *args, validation_dataset_path="/v.jsonl")
    assert "--validation_dataset_path=/v.jsonl" in with_one
    assert [f for f in with_one if f != "--validation_dataset_path=/v.jsonl"] == without
