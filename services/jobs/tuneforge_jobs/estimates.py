"""What a job will cost before it runs: steps as the Hugging Face Trainer counts them, time from history.
Pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    parameters: dict[str, Any]
    dataset_rows: int
    epochs: float
    total_steps: int
    estimated_seconds: float = 0.0
    dataset_tokens: int = 0


def training_rows(rows: int, params: Mapping[str, Any]) -> int:
    """Rows the trainer sees: max_samples caps the dataset, validation_ratio holds rows out."""
    max_samples = int(params.get("max_samples", -1) or -1)
    used = rows if max_samples <= 0 else min(rows, max_samples)
    ratio = float(params.get("validation_ratio", 0.0) or 0.0)
    held_out = math.floor(used * ratio) if 0 < ratio < 1 else 0
    return max(0, used - held_out)


def steps_and_epochs(rows: int, params: Mapping[str, Any]) -> tuple[int, float]:
    """(total optimizer steps, epochs): max_steps > 0 wins over epochs, as in the Trainer."""
    batch = max(1, int(params.get("batch_size", 1) or 1))
    accum = max(1, int(params.get("grad_accum_steps", 1) or 1))
    train = training_rows(rows, params)
    # The Trainer: len(dataloader) // grad_accum updates an epoch, at least one.
    steps_per_epoch = max(math.ceil(train / batch) // accum, 1) if train else 0
    max_steps = int(params.get("max_steps", -1) or -1)
    if max_steps > 0:
        return max_steps, (max_steps / steps_per_epoch if steps_per_epoch else 0.0)
    epochs = float(params.get("epochs", 1.0) or 1.0)
    return math.ceil(epochs * steps_per_epoch), epochs


def seconds_per_step(history: Sequence[tuple[float, int]]) -> float:
    """Median seconds a step from finished comparable jobs' (run seconds, steps); 0 when none."""
    rates = sorted(seconds / steps for seconds, steps in history if seconds > 0 and steps > 0)
    if not rates:
        return 0.0
    middle = len(rates) // 2
    return rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2


def remaining_seconds(attempt_seconds: float, steps_this_attempt: int, steps_left: int) -> float:
    """The current attempt's pace applied to the steps left; 0 until a step is done."""
    if steps_this_attempt <= 0 or steps_left <= 0:
        return 0.0
    return attempt_seconds / steps_this_attempt * steps_left
