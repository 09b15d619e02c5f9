"""Supervised fine-tuning (TRL SFTTrainer) as the sft, sft-lora and qlora methods run it.

One builder for the three: `full=True` trains every weight (sft, with fim_ratio), otherwise a LoRA adapter,
on a 4-bit base when load_in_4bit (qlora's default). The trainer is built apart from training so tests can
check, parameter by parameter, what each one changes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from tuneforge_trainer import data, hardware, runner


@dataclasses.dataclass
class Built:
    trainer: Any
    tokenizer: Any
    eval_dataset: Any
    precision: str
    data_format: str
    train_rows: int


def _loss_on_completions(dataset, data_format: str, tokenizer, params: Any) -> tuple[Any, dict[str, Any]]:
    """The dataset and SFTConfig flags that put the loss on answers only (or on everything when asked)."""
    if not params.completion_only_loss:
        return dataset, {"completion_only_loss": False, "assistant_only_loss": False}
    if data_format == "chat":
        if "{% generation %}" in (tokenizer.chat_template or "") or "{%- generation %}" in (
            tokenizer.chat_template or ""
        ):
            return dataset, {"assistant_only_loss": True}
        # The template can't mark assistant tokens: learn the last assistant turn of each conversation.
        return data.chat_as_prompt_completion(dataset), {"completion_only_loss": True}
    return dataset, {"completion_only_loss": data_format != "text"}


class RowPerPackedSequence:
    """Batches of packed sequences with one row each, instead of TRL's one row for the whole batch.

    TRL's padding-free collator joins a batch's packed sequences into a single row, which FlashAttention-2's
    variable-length kernels split again at no cost. SDPA and eager attention instead compute the whole row
    under a block mask: batch_size times the attention work (measured: packing gained 1.24x over padding
    that way, 1.43x with a row per sequence). Each row keeps its samples apart by their restarting position
    ids; the short rows are padded at the end (labels -100), where no earlier token can see them.
    """

    def __init__(self, collator: Any, pad_token_id: int) -> None:
        self.collator, self.pad_token_id = collator, pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from torch.nn.functional import pad

        rows = [self.collator([example]) for example in examples]
        width = max(row["input_ids"].shape[1] for row in rows)

        def stacked(key: str, fill: int) -> Any:
            return torch.cat([pad(row[key], (0, width - row[key].shape[1]), value=fill) for row in rows])

        return {
            "input_ids": stacked("input_ids", self.pad_token_id),
            "labels": stacked("labels", -100),
            "position_ids": stacked("position_ids", 0),
            # Not a model input: PlatformSFTTrainer takes it out to count the tokens trained.
            "packed_tokens": torch.tensor(sum(row["input_ids"].shape[1] for row in rows)),
        }


def _platform_trainer_class():
    from trl import SFTTrainer

    class PlatformSFTTrainer(SFTTrainer):
        """SFTTrainer whose token count (the num_tokens metric) is right for RowPerPackedSequence batches."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            packed_tokens = inputs.pop("packed_tokens", None)
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if packed_tokens is not None and model.training and hasattr(self, "_total_train_tokens"):
                # TRL counted one row's width for a padding-free batch; it holds packed_tokens.
                self._total_train_tokens += int(packed_tokens) - inputs["position_ids"].size(1)
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

    return PlatformSFTTrainer


def _rows(path: Path, max_samples: int, params: Any, tokenizer, model_path: Path, cache_dir: str | None):
    """A file's supervised rows in one of TRL's formats, and that format."""
    dataset = data.load_rows(path, max_samples, cache_dir)
    dataset, data_format = data.prepare_dataset(dataset, params, bool(tokenizer.chat_template), path)
    if data_format == "chat" and not tokenizer.chat_template:
        raise SystemExit(f"error: {model_path} has no chat template, so chat ('messages') rows cannot be used")
    return dataset, data_format


def build(method_id: str, params: Any, paths: runner.RunPaths, cache_dir: str | None, *, full: bool) -> Built:
    import transformers
    from trl import SFTConfig

    runner.quiet_libraries()
    transformers.set_seed(params.seed)  # the LoRA matrices' initialisation follows --seed too
    tokenizer = runner.load_tokenizer(paths.model)
    cuda, cuda_bf16 = runner.cuda_state()
    precision = hardware.check_hardware(params, cuda, cuda_bf16)
    fim_ratio = getattr(params, "fim_ratio", 0.0)
    try:
        dataset, data_format = _rows(paths.dataset, params.max_samples, params, tokenizer, paths.model, cache_dir)
        validation = None
        if paths.validation is not None:  # every row of it: max_samples limits the training rows
            validation, validation_format = _rows(paths.validation, 0, params, tokenizer, paths.model, cache_dir)
            data.check_same_shape(validation, dataset, validation_format, data_format, paths.validation)
        added_tokens = False
        fim_rows = 0
        if fim_ratio > 0:
            if data_format != "text":
                raise SystemExit(
                    f"error: --fim_ratio={fim_ratio}: fill-in-the-middle reorders plain-text rows ('text' "
                    f"column, e.g. source files); this dataset is {data_format}"
                )
            tokens, added_tokens = data.fim_tokens(tokenizer)
            dataset, fim_rows = data.fim_transform(dataset, fim_ratio, tokens, params.seed)
            if validation is not None:  # scored on rows shaped as the training rows are
                validation, _ = data.fim_transform(validation, fim_ratio, tokens, params.seed)
        dataset, loss_flags = _loss_on_completions(dataset, data_format, tokenizer, params)
        if validation is not None:
            validation, _ = _loss_on_completions(validation, data_format, tokenizer, params)
        dataset, eval_dataset = data.split_validation(dataset, params.validation_ratio, validation)
    except data.DatasetProblem as exc:
        raise SystemExit(f"error: dataset: {exc}") from None
    held_out = validation_note(eval_dataset, paths.validation)
    fim = f", {fim_rows} reordered for fill-in-the-middle" if fim_ratio > 0 else ""
    print(
        f"{method_id}: {len(dataset)} {data_format} rows from {paths.dataset}{held_out}{fim}",
        file=sys.stderr,
        flush=True,
    )

    model = hardware.load_model(paths.model, params, precision)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    optimizer = None
    if not full:
        if getattr(params, "load_in_4bit", False):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
        # Wrapped here rather than by SFTTrainer(peft_config=...) so the LoRA+ optimizer can see the adapter.
        model = runner.apply_lora(model, params)
        optimizer = runner.build_optimizer(model, params)

    config = SFTConfig(
        **runner.trainer_arguments(params, precision, cuda, paths.output, eval_dataset is not None),
        max_length=params.max_seq_length,
        # Best-fit decreasing packing is padding-free: samples keep their own position ids, so none attends
        # to another, and no step computes padding.
        packing=params.packing,
        packing_strategy="bfd",
        **loss_flags,
    )
    trainer = _platform_trainer_class()(
        **runner.trainer_inputs(model, config, dataset, eval_dataset, tokenizer, optimizer)
    )
    if params.packing and model.config._attn_implementation != "flash_attention_2":
        # Swapped after construction: TRL refuses a collator of ours in padding-free mode.
        trainer.data_collator = RowPerPackedSequence(trainer.data_collator, tokenizer.pad_token_id)
    return Built(trainer, tokenizer, eval_dataset, precision, data_format, len(dataset))


def validation_note(eval_dataset: Any, validation_path: Path | None) -> str:
    """What the run evaluates on, for its first log line."""
    if eval_dataset is None:
        return ""
    if validation_path is not None:
        return f", {len(eval_dataset)} validation rows from {validation_path}"
    return f", {len(eval_dataset)} held out for validation"


def train(method_id: str, params: Any, extras: dict[str, str], *, full: bool) -> dict[str, Any]:
    paths = runner.run_paths(extras)
    return runner.train_built(
        paths,
        lambda cache_dir: build(method_id, params, paths, cache_dir, full=full),
        merge=not full and getattr(params, "merge_adapter", False),
    )
