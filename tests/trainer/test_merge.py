"""The merge program ("Complete" stage): adapter + base -> one complete model, as a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.lora_adapter import make_adapter
from tuneforge_trainer.sdk import parse_log_data

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def run_merge(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge_trainer.merge", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def logits(model, inputs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in inputs], dim=1)


def test_merged_model_is_base_plus_adapter(tiny_model_dir, child_env, tmp_path):
    from peft import PeftModel

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "models" / "complete"
    child = subprocess.Popen(
        [sys.executable, "-m", "tuneforge_trainer.merge"]
        + [f"--model_path={tiny_model_dir}", f"--adapter_path={adapter}", f"--output_dir={out}"],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    # While it runs: base and base + adapter (PeftModel) logits on a few inputs.
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    inputs = [
        tokenizer("The garden in spring")["input_ids"],
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello?"}], add_generation_prompt=True)["input_ids"],
        tokenizer("Water the basil when the soil is dry.")["input_ids"],
    ]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_logits = logits(base, inputs)
    expected = logits(PeftModel.from_pretrained(base, adapter).eval(), inputs)
    assert (expected - base_logits).abs().max() > 1e-2, "the adapter should change the outputs"
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]

    lines = [line for line in stdout.splitlines() if line.strip()]
    payloads = [parse_log_data(line) for line in lines]
    assert all(p is not None for p in payloads), "stdout carries only [log_data] lines"
    stages = [p["details"]["stage"] for p in payloads if "stage" in p["details"]]
    assert stages == ["loading base", "loading adapter", "merging", "saving"]
    progress = [p["progress"] for p in payloads]
    assert progress == sorted(progress) and progress[-1] == 100
    final = payloads[-1]["details"]
    assert final["output_dir"] == str(out) and "quantized_dir" not in final
    assert final["size_bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

    # A complete model in safetensors, with the adapter's tokenizer and chat template; nothing left beside it.
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template and tokenizer.chat_template
    assert sorted(p.name for p in out.parent.iterdir()) == ["complete"]

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(merged.parameters()).dtype == torch.float32  # auto keeps the base's own dtype
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-4, rtol=0)


def test_merge_into_bf16_in_process(tiny_model_dir, tmp_path, capsys):
    from tuneforge_trainer import merge

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "bf16"
    out.mkdir()  # an empty directory is taken over
    code = merge.main(
        [f"--model_path={tiny_model_dir}", f"--adapter_path={adapter}", f"--output_dir={out}", "--precision=bf16"]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert parse_log_data(capsys.readouterr().out.splitlines()[-1])["details"]["output_dir"] == str(out)


def test_quantize_without_cuda_fails_before_any_work(tiny_model_dir, child_env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "models" / "complete"
    result = run_merge(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--adapter_path={adapter}",
        f"--output_dir={out}",
        "--quantize=4bit",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --quantize: 8-bit/4-bit quantization needs a CUDA GPU"
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter_path={tiny}"], "--adapter_path={tiny}: no LoRA adapter there (adapter_config.json missing)"),
        (["--model_path={tmp}"], "--model_path={tmp}: no model there (config.json missing)"),
        (["--output_dir={tiny}"], "--output_dir={tiny}: already exists and is not an empty directory"),
        (["--quantize=2bit"], "--quantize: must be one of none, 8bit, 4bit"),
    ],
)
def test_bad_command_lines_are_named(tiny_model_dir, tmp_path, capsys, flags, message):
    from tuneforge_trainer import merge

    given = {"model_path": str(tiny_model_dir), "adapter_path": str(tmp_path), "output_dir": str(tmp_path / "out")}
    (tmp_path / "adapter_config.json").write_text("{}")  # enough for the flag checks, which come first
    for flag in flags:
        key, _, value = flag.removeprefix("--").partition("=")
        given[key] = value.format(tiny=tiny_model_dir, tmp=tmp_path / "nothing")
    assert merge.main([f"--{k}={v}" for k, v in given.items()]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "error: " + message.format(
        tiny=tiny_model_dir, tmp=tmp_path / "nothing"
    )
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_a_merge_stopped_halfway_leaves_nothing_at_out(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from tuneforge_trainer import lifecycle, merge, runner

    def stopped_while_saving(adapter, base, target, precision, on_stage=None):
        (target / "model.safetensors").write_bytes(b"half a model")
        raise lifecycle.Stopped  # what SIGTERM raises in the program

    monkeypatch.setattr(runner, "merge_into_base", stopped_while_saving)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    out = tmp_path / "models" / "complete"
    code = merge.main([f"--model_path={tiny_model_dir}", f"--adapter_path={adapter}", f"--output_dir={out}"])
    assert code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: merge: stopped by SIGTERM"
    assert list(out.parent.iterdir()) == []  # neither OUT nor the partial directory next to it
