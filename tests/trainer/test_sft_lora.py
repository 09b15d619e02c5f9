from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge_trainer.sdk import parse_log_data

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO / "examples" / "datasets"

# Raised inside PEFT/transformers when loading the adapter, not by our code.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def run_method(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge_trainer.methods.sft_lora", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def assert_trained(result: subprocess.CompletedProcess, model_dir: Path, output_dir: Path, rank: int) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    payloads = [p for p in map(parse_log_data, result.stdout.splitlines()) if p is not None]
    # stdout holds only the log_data protocol
    assert len(payloads) == len([line for line in result.stdout.splitlines() if line.strip()])
    losses = [p["details"] for p in payloads if "loss" in p["details"]]
    assert len(losses) >= 4
    assert all(isinstance(d["loss"], float) and math.isfinite(d["loss"]) for d in losses)
    steps = [d["step"] for d in losses]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert all(p["code"] == 200 and 0 <= p["progress"] <= 100 for p in payloads)
    assert payloads[-1]["progress"] == 100

    from peft import PeftModel

    assert json.loads((output_dir / "adapter_config.json").read_text())["r"] == rank
    assert (output_dir / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, output_dir)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b, "no LoRA weights loaded"
    # lora_B starts at zero, so any non-zero value shows the adapter was trained and saved.
    assert any(torch.count_nonzero(p) > 0 for p in lora_b.values())


def test_sft_lora_trains_and_saves_loadable_adapter(tiny_model_dir, child_env, tmp_path):
    output_dir = tmp_path / "chat-adapter"
    result = run_method(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={DATASETS / 'sample-chat.jsonl'}",
        f"--output_dir={output_dir}",
        "--max_steps=4",
        "--batch_size=2",
        "--lora_rank=4",
        "--learning_rate=1e-3",
        "--resume_from_checkpoint=",
    )
    assert_trained(result, tiny_model_dir, output_dir, rank=4)
    assert "40 chat rows" in result.stderr


def test_sft_lora_prompt_answer_columns(tiny_model_dir, child_env, tmp_path):
    output_dir = tmp_path / "qa-adapter"
    child_env["LORA_RANK"] = "2"  # environment fallback reaches the child
    result = run_method(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={DATASETS / 'sample-qa.jsonl'}",
        f"--output_dir={output_dir}",
        "--max_steps=4",
        "--batch_size=2",
        "--max_samples=10",
        "--prompt_input_column=question",
        "--prompt_output_column=answer",
    )
    assert_trained(result, tiny_model_dir, output_dir, rank=2)
    assert "10 question/answer rows" in result.stderr


def test_sft_lora_bad_dataset_fails_with_line_and_column(tiny_model_dir, child_env, tmp_path):
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c"}\n')
    result = run_method(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={dataset}",
        f"--output_dir={tmp_path / 'out'}",
        "--max_steps=1",
    )
    assert result.returncode != 0
    assert f"{dataset} line 3: column 'answer' is missing or empty" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("lines", "flags", "needle"),
    [
        (['{"question": "a", "answer": "b"}', '{"question": oops}'], {}, "line 2: invalid JSON"),
        (['{"foo": "a"}'], {}, "cannot tell the row format"),
        (
            ['{"messages": [{"role": "user", "content": "hi"}]}', '{"messages": [{"role": "user"}]}'],
            {},
            "line 2: messages[0] ('user') has no text 'content'",
        ),
        (['{"messages": []}'], {}, "line 1: 'messages' must be a non-empty list"),
        (['{"q": "a", "a": "b"}'], {"prompt_input_column": "query"}, "prompt column 'query' not found"),
    ],
)
def test_dataset_problems_are_named(tmp_path, lines, flags, needle):
    from tuneforge_common.methods import SftLoraParams
    from tuneforge_trainer.methods.sft_lora import DatasetProblem, load_rows, prepare_dataset

    dataset = tmp_path / "bad.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetProblem) as excinfo:
        prepare_dataset(load_rows(dataset, -1, str(tmp_path / "cache")), SftLoraParams(**flags), True, dataset)
    assert needle in str(excinfo.value)


@pytest.mark.parametrize(
    ("row", "chat", "expected"),
    [
        (
            {"instruction": "Sum", "input": "1 2", "output": "3"},
            True,
            {
                "prompt": [{"role": "user", "content": "Sum\n\n1 2"}],
                "completion": [{"role": "assistant", "content": "3"}],
            },
        ),
        ({"query": "Hi?", "response": "Hello."}, False, {"prompt": "Hi?\n", "completion": "Hello."}),
        ({"prompt": "Say a", "completion": " a"}, True, {"prompt": "Say a", "completion": " a"}),
        ({"text": "Plain text."}, True, {"text": "Plain text."}),
    ],
)
def test_dataset_formats_are_normalised(tmp_path, row, chat, expected):
    from tuneforge_common.methods import SftLoraParams
    from tuneforge_trainer.methods.sft_lora import load_rows, prepare_dataset

    dataset = tmp_path / "rows.jsonl"
    dataset.write_text(json.dumps(row) + "\n")
    rows = load_rows(dataset, -1, str(tmp_path / "cache"))
    prepared, _ = prepare_dataset(rows, SftLoraParams(), chat, dataset)
    assert prepared[0] == expected


def test_sft_lora_missing_flags_and_bad_values(child_env):
    result = run_method(child_env, "--lora_rank=0")
    assert result.returncode != 0 and "--lora_rank: must be >= 1" in result.stderr
    result = run_method(child_env, "--max_steps=2")
    assert result.returncode != 0 and "--model_path" in result.stderr
