"""What a user sets for a merge, an evaluation or a deployment: one schema each, as the training methods
have, read by the jobs service (validation), the gateway and CLI (forms and flags) and, as flags, by the
trainer's lifecycle programs (tuneforge_trainer.merge / evaluate / serve take these and their paths)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .methods import param
from .params import resolve_parameters, specs_from_dataclass

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
QUANTIZE_CHOICES = ("none", "8bit", "4bit")
ENGINES = ("auto", "transformers", "vllm")


@dataclass(frozen=True)
class MergeParams:
    """Merge a customized model's LoRA adapter into its full-precision base: the complete model."""

    precision: str = param(
        "auto", "dtype of the merged weights: auto keeps the base model's own (its config.json).", choices=PRECISIONS
    )
    quantize: str = param(
        "none",
        "Also save a bitsandbytes copy (8bit: LLM.int8, 4bit: NF4) under quantized-<bits>; needs a CUDA GPU.",
        choices=QUANTIZE_CHOICES,
    )


@dataclass(frozen=True)
class EvaluateParams:
    """Evaluate a model on a dataset: loss, perplexity and sample generations."""

    max_samples: int = param(200, "Rows evaluated, from the start of the file; 0 for all.", minimum=0)
    max_seq_length: int = param(512, "Tokens scored per row at most (longer rows are cut at the end).", minimum=2)
    batch_size: int = param(4, "Rows scored together.", minimum=1, maximum=1024)
    num_generations: int = param(5, "Rows, from the first, whose prompt gets a greedy answer.", minimum=0, maximum=1000)
    max_new_tokens: int = param(64, "Tokens generated per answer at most.", minimum=1, maximum=32768)
    prompt_input_column: str = param("", "The prompt column of question/answer rows (default: detected).")
    prompt_output_column: str = param("", "The answer column of question/answer rows (default: detected).")
    precision: str = param("auto", "Weights dtype: auto is bf16 on a GPU that has it, else fp32.", choices=PRECISIONS)


@dataclass(frozen=True)
class ServeParams:
    """Serve a model over an OpenAI-compatible API (deployments)."""

    max_model_len: int = param(
        0, "Context length (prompt + completion tokens); 0: the model's max_position_embeddings.", minimum=0
    )
    precision: str = param("auto", "Weights dtype: auto is bf16 (or fp16) on a GPU, fp32 on a CPU.", choices=PRECISIONS)
    engine: str = param(
        "auto", "auto: vLLM when it is installed and CUDA is available, else transformers.", choices=ENGINES
    )


def resolve_operation_parameters(params_cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """Coerced, range-checked and defaulted; InvalidArgument naming each bad `parameters.<name>`."""
    return resolve_parameters(specs_from_dataclass(params_cls), given)
