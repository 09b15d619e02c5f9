"""Parameter schemas of the built-in training methods.

One frozen dataclass per method; field metadata is the help text, bounds,
aliases and group. Validation (catalog), runner flags (trainer), CLI and UI
forms are all generated from these, so a parameter is declared exactly once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def param(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    group: str = "basic",
) -> Any:
    return field(
        default=default,
        metadata={
            "help": help,
            "min": minimum,
            "max": maximum,
            "choices": choices,
            "aliases": aliases,
            "group": group,
        },
    )


LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


@dataclass(frozen=True)
class SftLoraParams:
    """Supervised fine-tuning of a LoRA adapter (TRL SFTTrainer + PEFT)."""

    lora_rank: int = param(8, "Rank of the LoRA adapter matrices.", minimum=1, maximum=256, aliases=("lora_r", "rank"))
    lora_alpha: int = param(16, "LoRA scaling factor (alpha).", minimum=1, maximum=1024)
    lora_dropout: float = param(0.05, "Dropout on the LoRA layers.", minimum=0.0, maximum=0.9, group="advanced")
    max_seq_length: int = param(
        512,
        "Maximum sequence length in tokens; longer samples are truncated.",
        minimum=16,
        maximum=131072,
        aliases=("seq_len", "cutoff_len"),
    )
    max_samples: int = param(
        -1, "Maximum number of training samples to load; -1 loads all.", minimum=-1, maximum=100_000_000
    )
    epochs: float = param(
        1.0,
        "Passes over the dataset; used when max_steps is not set.",
        minimum=0.01,
        maximum=50,
        aliases=("n_epochs", "num_train_epochs"),
    )
    max_steps: int = param(
        -1,
        "Total optimizer steps; overrides epochs when set (> 0).",
        minimum=-1,
        maximum=10_000_000,
        aliases=("training_steps",),
    )
    batch_size: int = param(
        4, "Samples per device per step.", minimum=1, maximum=64, aliases=("per_device_train_batch_size",)
    )
    grad_accum_steps: int = param(
        1, "Gradient accumulation steps.", minimum=1, maximum=128, aliases=("gradient_accumulation_steps",)
    )
    learning_rate: float = param(2e-4, "Initial learning rate.", minimum=1e-9, maximum=1.0, aliases=("lr",))
    warmup_steps: int = param(
        0, "Warmup steps; overrides warmup_ratio when > 0.", minimum=0, maximum=1_000_000, group="advanced"
    )
    warmup_ratio: float = param(
        0.0,
        "Fraction of total steps used for warmup.",
        minimum=0.0,
        maximum=0.5,
        aliases=("warmup_fraction",),
        group="advanced",
    )
    weight_decay: float = param(0.0, "Weight decay (L2 penalty).", minimum=0.0, maximum=1.0, group="advanced")
    max_grad_norm: float = param(1.0, "Gradient clipping norm.", minimum=0.0, maximum=100.0, group="advanced")
    lr_scheduler_type: str = param(
        "linear", "Learning-rate schedule.", choices=LR_SCHEDULERS, aliases=("lr_scheduler",), group="advanced"
    )
    logging_steps: int = param(
        1, "Report metrics every N steps.", minimum=1, maximum=100_000, aliases=("log_interval",), group="advanced"
    )
    seed: int = param(
        42, "Random seed for data order and initialisation.", minimum=0, maximum=2**31 - 1, group="advanced"
    )
    prompt_input_column: str = param(
        "", "Column used as the prompt for prompt/response rows (e.g. question, instruction); empty detects it."
    )
    prompt_output_column: str = param(
        "", "Column used as the expected answer (e.g. answer, response); empty detects it."
    )


@dataclass(frozen=True)
class MethodDefinition:
    id: str
    display_name: str
    description: str
    training_type: str
    lifecycle: str
    params: type
    entrypoint: str


BUILTIN_METHODS: tuple[MethodDefinition, ...] = (
    MethodDefinition(
        id="sft-lora",
        display_name="SFT with LoRA",
        description="Supervised fine-tuning of a LoRA adapter with TRL SFTTrainer and PEFT; "
        "chat datasets use the model's chat template.",
        training_type="chat",
        lifecycle="customized",
        params=SftLoraParams,
        entrypoint="tuneforge_trainer.methods.sft_lora",
    ),
)


def env_name(name: str) -> str:
    return name.upper()


def param_fields(params_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(params_cls))
