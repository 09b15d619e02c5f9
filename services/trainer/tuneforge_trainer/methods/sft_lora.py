"""Built-in `sft-lora` method: supervised fine-tuning of a LoRA adapter with TRL SFTTrainer + PEFT.

    python -m tuneforge_trainer.methods.sft_lora --model_path=DIR --dataset_path=FILE.jsonl \\
        --output_dir=DIR [--resume_from_checkpoint=DIR] [--lora_rank=8 --max_steps=5 ...]

Rows: chat, prompt/completion, question/answer style or text (tuneforge_trainer.data). Every parameter of
SftLoraParams changes the run (tests/trainer/test_parameters_take_effect.py shows each).
"""

from __future__ import annotations

from typing import Any

from tuneforge_common.methods import SftLoraParams
from tuneforge_trainer import runner, supervised

METHOD_ID = "sft-lora"


def train(params: SftLoraParams, extras: dict[str, str]) -> dict[str, Any]:
    return supervised.train(METHOD_ID, params, extras, full=False)


def main(argv: list[str] | None = None) -> int:
    return runner.run_main(METHOD_ID, SftLoraParams, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
