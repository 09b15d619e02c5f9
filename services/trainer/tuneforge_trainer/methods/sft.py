"""Built-in `sft` method: full supervised fine-tuning of every weight with TRL SFTTrainer.

    python -m tuneforge_trainer.methods.sft --model_path=DIR --dataset_path=FILE.jsonl --output_dir=DIR ...

Saves a complete model (safetensors, tokenizer, chat template). --fim_ratio reorders that share of plain-text
rows for fill-in-the-middle, adding the FIM tokens to the tokenizer when it has none.
"""

from __future__ import annotations

from typing import Any

from tuneforge_common.methods import SftParams
from tuneforge_trainer import runner, supervised

METHOD_ID = "sft"


def train(params: SftParams, extras: dict[str, str]) -> dict[str, Any]:
    return supervised.train(METHOD_ID, params, extras, full=True)


def main(argv: list[str] | None = None) -> int:
    return runner.run_main(METHOD_ID, SftParams, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
