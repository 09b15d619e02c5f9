"""The evaluate program: loss and perplexity on a dataset as training scores it, and sample generations."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.lora_adapter import make_adapter
from tuneforge_trainer.sdk import parse_log_data

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO / "examples" / "datasets"

# Raised inside PEFT/transformers/TRL, not by our code.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def run_evaluate(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge_trainer.evaluate", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_evaluate_chat_rows(tiny_model_dir, child_env, tmp_path):
    out = tmp_path / "eval"
    result = run_evaluate(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={DATASETS / 'sample-chat.jsonl'}",
        f"--output_dir={out}",
        "--max_samples=6",
        "--batch_size=4",
        "--num_generations=3",
        "--max_new_tokens=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payloads = [parse_log_data(line) for line in result.stdout.splitlines() if line.strip()]
    assert all(p is not None for p in payloads), "stdout carries only [log_data] lines"
    progress = [p["progress"] for p in payloads]
    assert progress == sorted(progress) and progress[-1] == 100 and progress[-2] < 100
    assert [p["details"]["rows"] for p in payloads if p["details"].get("stage") == "scoring"] == [4, 6]

    final = payloads[-1]["details"]
    assert set(final) == {"eval_loss", "perplexity", "eval_samples", "eval_tokens"}
    assert math.isfinite(final["eval_loss"]) and final["eval_loss"] > 0
    assert final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-12)
    assert final["eval_samples"] == 6 and final["eval_tokens"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k] for k in final} == final and metrics["data_format"] == "chat"

    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (DATASETS / "sample-chat.jsonl").read_text().splitlines()[:3]]
    assert len(generations) == 3
    assert all(set(g) == {"prompt", "reference", "generated"} for g in generations)
    assert [g["reference"] for g in generations] == [r["messages"][-1]["content"] for r in rows]
    assert all(g["prompt"] in [m["content"] for m in r["messages"]] for g, r in zip(generations, rows, strict=True))


def test_loss_is_the_models_own_on_the_tokens_training_scores(tiny_model_dir, tmp_path, capsys):
    """One prompt/answer row, model + adapter: eval_loss is the PeftModel's cross-entropy on the labels TRL's
    SFTTrainer builds for training (the prompt masked, the answer and its end token scored)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tuneforge_common.methods import SftLoraParams
    from tuneforge_trainer import data, evaluate

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps({"question": "Which herb spreads?", "answer": "Mint, in its own pot."}) + "\n")
    flags = [f"--model_path={tiny_model_dir}", f"--adapter_path={adapter}", f"--dataset_path={dataset}"]
    assert evaluate.main([*flags, f"--output_dir={tmp_path / 'out'}", "--num_generations=1", "--max_new_tokens=2"]) == 0
    eval_loss = parse_log_data(capsys.readouterr().out.splitlines()[-1])["details"]["eval_loss"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = data.prepare_dataset(data.load_rows(dataset, 0, str(tmp_path / "cache")), SftLoraParams(), True, dataset)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, completion_only_loss=True)
    row = SFTTrainer(model=base, args=config, train_dataset=rows, processing_class=tokenizer).train_dataset[0]
    assert -100 in row["labels"] and row["labels"][-1] != -100
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert eval_loss == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "a", "answer": "b"}', '{"question": oops}'], "error: --dataset_path: line 2: invalid JSON"),
        (
            ['{"question": "a", "answer": "b"}', "", '{"question": "c"}'],
            "error: --dataset_path: line 3: column 'answer' is missing or empty",
        ),
        (
            ['{"messages": [{"role": "user", "content": "hi"}]}', '{"messages": [{"role": "user"}]}'],
            "error: --dataset_path: line 2: messages[0] ('user') has no text 'content'",
        ),
    ],
)
def test_bad_dataset_line_is_named(tiny_model_dir, tmp_path, capsys, lines, message):
    from tuneforge_trainer import evaluate

    dataset = tmp_path / "bad.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    code = evaluate.main(
        [f"--model_path={tiny_model_dir}", f"--dataset_path={dataset}", f"--output_dir={tmp_path / 'out'}"]
    )
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "out").exists()
