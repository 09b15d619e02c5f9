"""Built-in `qlora` method: a LoRA adapter trained on the base model quantized to 4-bit NF4 (bitsandbytes).

    python -m tuneforge_trainer.methods.qlora --model_path=DIR --dataset_path=FILE.jsonl --output_dir=DIR ...

Needs a CUDA GPU and bitsandbytes (both checked before the model loads). The adapter is saved against the
full-precision base, and --merge_adapter merges it onto that base, not onto the dequantized 4-bit weights.
"""

from __future__ import annotations

from typing import Any

from tuneforge_common.methods import QLoraParams
from tuneforge_trainer import runner, supervised

METHOD_ID = "qlora"


def train(params: QLoraParams, extras: dict[str, str]) -> dict[str, Any]:
    return supervised.train(METHOD_ID, params, extras, full=False)


def main(argv: list[str] | None = None) -> int:
    return runner.run_main(METHOD_ID, QLoraParams, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
