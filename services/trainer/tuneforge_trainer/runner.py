"""What every built-in method does the same way: flags in, quiet libraries, Trainer arguments from the
schema, LoRA, the final report and save, and one `main` that turns failures into clear exits.

A method module supplies `train(params, extras) -> metrics` and calls `run_main`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge_common.methods import check_cross_field, greater_is_better
from tuneforge_trainer.sdk import (
    PAUSED_EXIT_CODE,
    RunPaths,
    install_pause_handler,
    log_data,
    parse_flags,
    pause_requested,
    run_paths,
)

__all__ = ["RunPaths", "run_main", "run_paths", "train_built"]


def quiet_libraries() -> None:
    """stdout carries the log_data protocol; keep library chatter and progress bars out of it."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_warning()
    # PEFT/TRL still call the renamed is_gradient_checkpointing; the warning is noise for users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)


def cuda_state() -> tuple[bool, bool]:
    """(CUDA available, bf16 supported on it)."""
    import torch

    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def best_checkpoint_tracking(metric: str, has_eval: bool) -> dict[str, Any]:
    if not (has_eval and metric.startswith("eval_")):
        return {}
    return {"metric_for_best_model": metric, "greater_is_better": greater_is_better(metric)}


def trainer_arguments(params: Any, precision: str, cuda: bool, output_dir: Path, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields every built-in method sets from its schema (TRL's configs take them all)."""
    checkpoints = params.save_steps > 0
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": params.epochs,
        "max_steps": params.max_steps,
        "per_device_train_batch_size": params.batch_size,
        "gradient_accumulation_steps": params.grad_accum_steps,
        "learning_rate": params.learning_rate,
        # transformers 5 dropped warmup_ratio: warmup_steps < 1 is read as a fraction of the steps.
        "warmup_steps": params.warmup_steps if params.warmup_steps > 0 else params.warmup_ratio,
        "weight_decay": params.weight_decay,
        "max_grad_norm": params.max_grad_norm,
        "lr_scheduler_type": params.lr_scheduler_type,
        "logging_strategy": "steps",
        "logging_steps": params.logging_steps,
        "seed": params.seed,
        "data_seed": params.seed,
        # TRL's configs default bf16 to True, which CPUs and older GPUs cannot honour: always say which.
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not cuda and precision == "bf16",  # transformers allows bf16 without a GPU only when told
        # Set, not left to TRL, whose configs turn it on by default: it recomputes every activation.
        "activation_checkpointing": params.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if params.gradient_checkpointing else None,
        "use_liger_kernel": params.use_liger_kernel,
        "save_strategy": "steps" if checkpoints else "no",
        "save_steps": params.save_steps if checkpoints else 500,
        "save_total_limit": params.save_total_limit or None,
        # The Trainer's own rotation then spares the best checkpoint too, as the jobs service's retention does.
        **best_checkpoint_tracking(params.checkpoint_metric, has_eval),
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": params.save_steps if checkpoints else params.logging_steps,
        "per_device_eval_batch_size": params.batch_size,
        # Counted for the tokens/s metric (a sum over the batch's attention mask: cheap).
        "include_num_input_tokens_seen": "non_padding",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_pin_memory": cuda,
    }


def trainer_inputs(model, config, dataset, eval_dataset, tokenizer, optimizer) -> dict[str, Any]:
    """What every TRL trainer of ours is built with: the model, its config, the data, and our callback."""
    from tuneforge_trainer.sdk import make_log_data_callback

    return {
        "model": model,
        "args": config,
        "train_dataset": dataset,
        "eval_dataset": eval_dataset,
        "processing_class": tokenizer,
        "optimizers": (optimizer, None),  # (None, None): Trainer builds AdamW and the schedule from the config
        "callbacks": [make_log_data_callback()],
    }


def lora_config(params: Any):
    from peft import LoraConfig

    given: str = params.target_modules
    targets: str | list[str] = given
    if given != "all-linear":
        targets = [t.strip() for t in given.split(",") if t.strip()]
    return LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def apply_lora(model, params: Any):
    """The model wrapped with its LoRA adapter; a target list that matches no module fails naming the flag."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(params))
    except ValueError as exc:
        if "target modules" in str(exc).lower() or "not found" in str(exc).lower():
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise SystemExit(
                f"error: --target_modules={params.target_modules}: no such modules in this model; "
                f"its linear layers are {', '.join(names)}"
            ) from None
        raise


def build_optimizer(model, params: Any):
    """LoRA+ (loraplus_lr_ratio > 0): AdamW with the B matrices at learning_rate x ratio; None leaves it to Trainer."""
    if getattr(params, "loraplus_lr_ratio", 0) <= 0 or not getattr(params, "use_lora", True):
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model=model,
        optimizer_cls=torch.optim.AdamW,
        lr=params.learning_rate,
        loraplus_lr_ratio=params.loraplus_lr_ratio,
        loraplus_weight_decay=params.weight_decay,
    )


def merge_into_base(
    adapter_dir: Path, base_path: Path, target: Path, precision: str, on_stage: Callable[[str], None] | None = None
) -> None:
    """The adapter merged into the full-precision base (never the 4-bit copy it may have trained on), saved
    as safetensors with the adapter's tokenizer and chat template (the base's when the adapter saved none).

    on_stage, when given, is told each stage as it starts: loading base, loading adapter, merging, saving.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge_trainer.hardware import torch_dtype
    from tuneforge_trainer.lifecycle import tokenizer_dir

    stage = on_stage or (lambda name: None)
    stage("loading base")
    # fp16/bf16 bases merge in their own dtype; an fp32 run keeps fp32. No quantization_config: unquantized.
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(precision))
    stage("loading adapter")
    adapted = PeftModel.from_pretrained(base, adapter_dir)
    stage("merging")
    merged = adapted.merge_and_unload()
    stage("saving")
    merged.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir(adapter_dir, base_path)).save_pretrained(target)


def finish(trainer, result, tokenizer, paths: RunPaths, eval_dataset, *, merge: bool, precision: str) -> dict:
    """Save the result, report the final metrics as progress 100, and merge when asked."""
    trainer.save_model(str(paths.output))
    tokenizer.save_pretrained(str(paths.output))
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        # The final model's eval_loss: from the last step's evaluation, or evaluated now (reported by the callback).
        last = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == result.global_step]
        metrics.update(last[-1] if last else trainer.evaluate())
    if merge:
        print("merging the adapter into the base model", file=sys.stderr, flush=True)
        merge_into_base(paths.output, paths.model, paths.output / "merged", precision)
    log_data(
        100,
        step=result.global_step,
        epoch=trainer.state.epoch,
        train_loss=result.training_loss,
        eval_loss=metrics.get("eval_loss"),
        train_runtime=metrics.get("train_runtime"),
        train_samples_per_second=metrics.get("train_samples_per_second"),
        num_input_tokens_seen=trainer.state.num_input_tokens_seen or None,
    )
    return metrics


def train_and_finish(trainer, tokenizer, paths: RunPaths, eval_dataset, *, merge: bool, precision: str) -> dict:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout
    result = trainer.train(resume_from_checkpoint=paths.resume)
    if pause_requested():
        # Stopped after the pause checkpoint (reported by the callback); the final model comes after a resume.
        return {"paused_at_step": result.global_step}
    return finish(trainer, result, tokenizer, paths, eval_dataset, merge=merge, precision=precision)


def train_built(paths: RunPaths, build: Callable[[str | None], Any], *, merge: bool) -> dict:
    """Build the trainer (with the run's datasets cache dir), train it, and save, report and merge the result."""

    def run(cache_dir: str | None) -> dict:
        built = build(cache_dir)
        return train_and_finish(
            built.trainer, built.tokenizer, paths, built.eval_dataset, merge=merge, precision=built.precision
        )

    return with_datasets_cache(run)


def with_datasets_cache(train: Callable[[str | None], dict]) -> dict:
    """The Arrow copies of the dataset live as long as the run, unless the user chose a datasets cache."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return train(None)
    with tempfile.TemporaryDirectory(prefix="tuneforge-datasets-") as cache_dir:
        return train(cache_dir)


def check_params(method_id: str, params: Any) -> None:
    """The catalog's cross-field rules, for runs started by hand; SystemExit names the first broken flag."""
    for violation in check_cross_field(method_id, dataclasses.asdict(params)):
        raise SystemExit(f"error: --{violation.field.removeprefix('parameters.')}: {violation.description}")


def _out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def run_main(
    method_id: str, params_cls: type, train: Callable[[Any, dict[str, str]], dict], argv: list[str] | None = None
) -> int:
    params, extras = parse_flags(params_cls, argv)
    check_params(method_id, params)
    install_pause_handler()
    try:
        train(params, extras)
    except SystemExit:
        raise
    except Exception as exc:
        traceback.print_exc()
        if _out_of_memory(exc):
            print(
                f"error: {method_id}: CUDA out of memory: lower batch_size or max_seq_length, or turn on "
                "gradient_checkpointing or load_in_4bit",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"error: {method_id} training failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return PAUSED_EXIT_CODE if pause_requested() else 0
