from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge_trainer.sdk import parse_checkpoint, parse_log_data

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
    # stdout holds only the protocol: log_data lines and, when checkpoints are saved, checkpoint lines
    checkpoints = [c for c in map(parse_checkpoint, result.stdout.splitlines()) if c is not None]
    assert len(payloads) + len(checkpoints) == len([line for line in result.stdout.splitlines() if line.strip()])
    assert all(c["path"].endswith(f"checkpoint-{c['step']}") for c in checkpoints)
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
    from tuneforge_trainer.data import DatasetProblem, load_rows, prepare_dataset

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
    from tuneforge_trainer.data import load_rows, prepare_dataset

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


# --- the parameters beyond the basic schedule -----------------------------------------------------


def test_sft_lora_checkpoints_validation_loraplus_and_bf16_in_one_run(tiny_model_dir, child_env, tmp_path):
    output_dir = tmp_path / "adapter"
    result = run_method(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={DATASETS / 'sample-chat.jsonl'}",
        f"--output_dir={output_dir}",
        "--max_steps=4",
        "--batch_size=2",
        "--lora_rank=4",
        "--learning_rate=1e-3",
        "--save_steps=2",
        "--save_total_limit=1",
        "--val_size=0.2",  # UModelVerse/LLaMA-Factory spelling of validation_ratio
        "--loraplus_lr_ratio=16",
        "--compute_type=bf16",  # honoured on a CPU too (transformers' use_cpu bf16)
    )
    assert_trained(result, tiny_model_dir, output_dir, rank=4)
    assert "32 chat rows" in result.stderr and "8 held out for validation" in result.stderr
    # A checkpoint every 2 steps, only the latest kept.
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    payloads = [p for p in map(parse_log_data, result.stdout.splitlines()) if p is not None]
    evaluated = [p["details"]["step"] for p in payloads if "eval_loss" in p["details"]]
    assert evaluated[:2] == [2, 4]  # every save_steps steps
    assert math.isfinite(payloads[-1]["details"]["eval_loss"])  # the final report carries it


def test_loraplus_optimizer_gives_lora_b_the_ratio_times_the_learning_rate(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from tuneforge_common.methods import SftLoraParams
    from tuneforge_trainer.runner import build_optimizer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert build_optimizer(model, SftLoraParams()) is None  # LoRA+ off: Trainer builds its own AdamW
    optimizer = build_optimizer(model, SftLoraParams(learning_rate=1e-4, loraplus_lr_ratio=16, weight_decay=0.01))
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lrs and all(lr == pytest.approx(1.6e-3 if "lora_B" in n else 1e-4) for n, lr in lrs.items())
    assert any("lora_B" in n for n in lrs) and any("lora_A" in n for n in lrs)


def test_validation_split_is_the_same_every_run_and_disjoint_from_training():
    import datasets

    from tuneforge_trainer.data import DatasetProblem, split_validation

    rows = datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(20)])
    train, held_out = split_validation(rows, 0.25)
    again_train, again_held_out = split_validation(rows, 0.25)
    assert (len(train), len(held_out)) == (15, 5)
    assert held_out["text"] == again_held_out["text"] and train["text"] == again_train["text"]
    assert not set(train["text"]) & set(held_out["text"])
    assert split_validation(rows, 0.0) == (rows, None)
    assert len(split_validation(rows.select(range(3)), 0.01)[1]) == 1  # at least one row
    with pytest.raises(DatasetProblem, match="leaves no training rows"):
        split_validation(rows.select(range(1)), 0.5)


@pytest.mark.parametrize(
    ("compute_type", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, "fp32"),
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp32"),  # fp16 is never picked silently
        ("bf16", False, False, "bf16"),  # asked for: a CPU runs it too
        ("fp16", True, True, "fp16"),
        ("fp32", True, True, "fp32"),
    ],
)
def test_compute_type_resolves_to_a_precision_this_machine_runs(compute_type, cuda, bf16, expected):
    from tuneforge_common.methods import SftLoraParams
    from tuneforge_trainer.hardware import check_hardware

    assert check_hardware(SftLoraParams(compute_type=compute_type), cuda, bf16) == expected


@pytest.mark.parametrize(
    ("flags", "cuda", "bf16", "message"),
    [
        ({"compute_type": "fp16"}, False, False, "--compute_type=fp16 needs a CUDA GPU"),
        ({"compute_type": "bf16"}, True, False, "this GPU does not support bfloat16"),
        ({"load_in_4bit": True}, False, False, "--load_in_4bit=true: 4-bit quantization (bitsandbytes) needs a CUDA"),
        ({"flash_attention": True, "compute_type": "fp32"}, True, True, "needs bf16 or fp16 compute"),
    ],
)
def test_hardware_needs_fail_clearly_before_loading(monkeypatch, flags, cuda, bf16, message):
    from tuneforge_common.methods import SftLoraParams
    from tuneforge_trainer import hardware

    monkeypatch.setattr(hardware, "installed", lambda module: True)
    with pytest.raises(SystemExit, match=re.escape(message)):
        hardware.check_hardware(SftLoraParams(**flags), cuda, bf16)


@pytest.mark.parametrize(
    ("flags", "package"),
    [({"load_in_4bit": True}, "bitsandbytes"), ({"use_liger_kernel": True}, "liger-kernel")],
)
def test_missing_gpu_packages_are_named(monkeypatch, flags, package):
    from tuneforge_common.methods import SftLoraParams
    from tuneforge_trainer import hardware

    monkeypatch.setattr(hardware, "installed", lambda module: False)
    with pytest.raises(SystemExit, match=f"needs the {package} package"):
        hardware.check_hardware(SftLoraParams(**flags), True, True)


def test_sft_lora_4bit_without_cuda_fails_before_loading_the_model(tiny_model_dir, child_env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = run_method(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={DATASETS / 'sample-qa.jsonl'}",
        f"--output_dir={tmp_path / 'out'}",
        "--load_in_4bit=true",
    )
    assert result.returncode != 0 and "4-bit quantization (bitsandbytes) needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_hand_started_runs_get_the_catalogs_cross_field_rules(child_env):
    result = run_method(child_env, "--save_total_limit=2")
    assert result.returncode != 0
    assert "error: --save_total_limit: needs save_steps > 0" in result.stderr
