"""A real sft-lora child process: SIGUSR1 pauses it at a checkpoint it reports, and a run resumed from that
checkpoint continues at the next step with no step reported twice."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge_trainer.sdk import PAUSED_EXIT_CODE, parse_checkpoint, parse_log_data

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO / "examples" / "datasets" / "sample-chat.jsonl"


def flags(model: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tuneforge_trainer.methods.sft_lora",
        f"--model_path={model}",
        f"--dataset_path={DATASET}",
        f"--output_dir={output}",
        "--batch_size=2",
        "--learning_rate=0.001",
        "--logging_steps=1",
        *extra,
    ]


def test_sigusr1_pauses_at_a_reported_checkpoint_and_resuming_continues_at_the_next_step(
    tiny_model_dir, child_env, tmp_path
):
    output = tmp_path / "out"
    proc = subprocess.Popen(
        flags(tiny_model_dir, output, "--max_steps=500"),
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    steps, checkpoint = [], None
    for line in proc.stdout:
        payload = parse_log_data(line)
        if payload and "loss" in payload["details"]:
            steps.append(payload["details"]["step"])
            if len(steps) == 3:
                proc.send_signal(signal.SIGUSR1)  # what the agent sends when a pause is asked
        checkpoint = parse_checkpoint(line) or checkpoint
    assert proc.wait(timeout=120) == PAUSED_EXIT_CODE, proc.stderr.read()[-2000:] if proc.stderr else ""
    assert checkpoint is not None and Path(checkpoint["path"]).is_dir()
    assert checkpoint["step"] == steps[-1] < 500 and "loss" in checkpoint["metrics"]
    assert not (output / "adapter_config.json").exists()  # no final model: the run is not finished

    resumed = subprocess.run(
        flags(
            tiny_model_dir,
            output,
            f"--max_steps={checkpoint['step'] + 3}",
            f"--resume_from_checkpoint={checkpoint['path']}",
        ),
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    later = [
        p["details"]["step"] for p in map(parse_log_data, resumed.stdout.splitlines()) if p and "loss" in p["details"]
    ]
    assert later == [checkpoint["step"] + 1, checkpoint["step"] + 2, checkpoint["step"] + 3]
    assert (output / "adapter_config.json").is_file()


def test_a_resumed_run_reproduces_the_uninterrupted_loss_curve(tiny_model_dir, child_env, tmp_path):
    """Optimizer, scheduler, RNG (LoRA dropout) and data position all come back: steps 4-6 of a run resumed at
    step 3 have the losses and learning rates of the same steps in a run that never stopped."""

    def run(output: Path, *extra: str) -> dict[int, dict]:
        result = subprocess.run(
            flags(tiny_model_dir, output, "--max_steps=6", "--lora_dropout=0.2", "--max_seq_length=128", *extra),
            env=child_env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        logs = [p["details"] for p in map(parse_log_data, result.stdout.splitlines()) if p]
        return {d["step"]: d for d in logs if "loss" in d}

    whole = run(tmp_path / "whole", "--save_steps=3")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    resumed = run(tmp_path / "resumed", f"--resume_from_checkpoint={checkpoint}")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-4)
        assert resumed[step]["learning_rate"] == pytest.approx(whole[step]["learning_rate"])
