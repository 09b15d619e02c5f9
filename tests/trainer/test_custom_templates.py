"""The custom01 (plain PyTorch) and custom02 (HF Trainer) templates, and the SDK functions they use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge_trainer.sdk import PAUSED_EXIT_CODE, parse_checkpoint, parse_log_data

REPO = Path(__file__).resolve().parents[2]
QA = REPO / "examples" / "datasets" / "sample-qa.jsonl"
CHAT = REPO / "examples" / "datasets" / "sample-chat.jsonl"


def command(template: str, model: Path, output: Path, *flags: str, dataset: Path = QA) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"tuneforge_trainer.methods.{template}",
        f"--model_path={model}",
        f"--dataset_path={dataset}",
        f"--output_dir={output}",
        "--batch_size=2",
        "--learning_rate=1e-3",
        *flags,
    ]


def run(env, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args, **kwargs), env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False
    )


def details(stdout: str) -> list[dict]:
    return [p["details"] for p in map(parse_log_data, stdout.splitlines()) if p is not None]


@pytest.mark.parametrize("template", ["custom01", "custom02"])
def test_template_trains_an_adapter_and_shows_num_generations_samples(template, tiny_model_dir, child_env, tmp_path):
    output = tmp_path / "out"
    result = run(child_env, template, tiny_model_dir, output, "--max_steps=3", "--lora_rank=4", "--num_generations=3")
    assert result.returncode == 0, result.stderr[-2000:]
    reported = details(result.stdout)
    assert [d["step"] for d in reported if "loss" in d] == [1, 2, 3]
    assert reported[-1]["generations"] == 3
    samples = json.loads(next(line for line in result.stderr.splitlines() if line.startswith('{"prompt"')))
    assert len(samples["generations"]) == 3
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 4


def test_custom01_pauses_at_a_checkpoint_and_resumes_where_it_stopped(tiny_model_dir, child_env, tmp_path):
    output = tmp_path / "out"
    proc = subprocess.Popen(
        command("custom01", tiny_model_dir, output, "--max_steps=6"),
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first step is done: ask for a pause
    assert parse_log_data(first) is not None
    os.kill(proc.pid, signal.SIGUSR1)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == PAUSED_EXIT_CODE
    saved = next(c for c in map(parse_checkpoint, rest.splitlines()) if c is not None)
    assert 1 <= saved["step"] < 6 and Path(saved["path"]).is_dir()

    resumed = run(
        child_env, "custom01", tiny_model_dir, output, "--max_steps=6", f"--resume_from_checkpoint={saved['path']}"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [d["step"] for d in details(resumed.stdout) if "loss" in d]
    assert steps == list(range(saved["step"] + 1, 7))
    assert f"resumed at step {saved['step']}" in resumed.stderr


def test_template_failures_name_the_problem(tiny_model_dir, child_env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "only a prompt"}\n')
    result = run(child_env, "custom01", tiny_model_dir, tmp_path / "out", "--max_steps=1", dataset=bad)
    assert result.returncode == 1 and f"error: dataset: {bad} line 2: no prompt/answer pair" in result.stderr
    result = run(child_env, "custom01", tiny_model_dir, tmp_path / "out", "--max_input_length=2048")
    assert result.returncode == 1 and "--max_input_length must be less than --max_seq_length" in result.stderr


def test_encode_prompt_answer_bounds_prompt_answer_and_sequence(tiny_model_dir):
    from transformers import AutoTokenizer

    from tuneforge_trainer.sdk import encode_prompt_answer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, answer = "word " * 200 + "LAST", "first " + "answer " * 200
    ids, labels = encode_prompt_answer(tokenizer, prompt, answer, 16, 8, 64)
    prompt_len = labels.index(next(x for x in labels if x != -100))
    assert prompt_len == 16 and len(ids) == 16 + 8 and ids[-1] == tokenizer.eos_token_id
    # max_input_length keeps the prompt's end (the question), max_content_length the answer's start.
    assert tokenizer.decode(ids[:16]).rstrip().endswith("assistant")
    assert tokenizer.decode(ids[16:]).startswith("first")
    ids, labels = encode_prompt_answer(tokenizer, prompt, answer, 16, 64, 20)  # max_seq_length bounds both
    assert len(ids) == len(labels) == 20


def test_read_prompt_answer_rows_picks_columns_and_chat_turns(tmp_path):
    from tuneforge_trainer.sdk import read_prompt_answer_rows

    assert read_prompt_answer_rows(str(QA), max_samples=5)[0][0].startswith("What colour")
    assert len(read_prompt_answer_rows(str(QA), max_samples=5)) == 5
    chat = read_prompt_answer_rows(str(CHAT), max_samples=1)
    assert chat[0][0] == "How long should I steep black tea?"
    custom = tmp_path / "c.jsonl"
    custom.write_text('{"ask": "q?", "reply": "a.", "question": "no"}\n')
    assert read_prompt_answer_rows(str(custom), input_column="ask", output_column="reply") == [("q?", "a.")]


def test_custom01_honours_the_schedule_parameters(tiny_model_dir, child_env, tmp_path):
    """max_samples, batch_size, grad_accum_steps and epochs set the steps; warmup_steps the learning rates."""
    schedule = ("--max_samples=4", "--grad_accum_steps=2", "--epochs=2", "--max_grad_norm=0.5")
    warm = run(child_env, "custom01", tiny_model_dir, tmp_path / "a", *schedule, "--warmup_steps=1")
    cold = run(child_env, "custom01", tiny_model_dir, tmp_path / "b", *schedule, "--warmup_steps=0")
    for result in (warm, cold):
        assert result.returncode == 0, result.stderr[-2000:]
    # 4 rows / batch 2 = 2 micro-batches an epoch, 2 of them per step: 1 step an epoch, 2 in all.
    warm_steps = [d for d in details(warm.stdout) if "loss" in d]
    assert [d["step"] for d in warm_steps] == [1, 2] and warm_steps[0]["total_steps"] == 2
    assert [d["learning_rate"] for d in warm_steps] == pytest.approx([1e-3, 0.0])  # warmed up after step 1
    cold_rates = [d["learning_rate"] for d in details(cold.stdout) if "loss" in d]
    assert cold_rates == pytest.approx([5e-4, 0.0])  # linear decay from the start
