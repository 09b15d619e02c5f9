"""Built-in `sft-lora` method: supervised fine-tuning of a LoRA adapter with TRL SFTTrainer + PEFT.

    python -m tuneforge_trainer.methods.sft_lora --model_path=DIR --dataset_path=FILE.jsonl \\
        --output_dir=DIR [--resume_from_checkpoint=DIR] [--lora_rank=8 --max_steps=5 ...]

Dataset rows (JSON lines), detected from the columns:
  * chat: {"messages": [{"role": ..., "content": ...}, ...]}, rendered with the model's chat template;
  * prompt/completion: {"prompt": ..., "completion": ...}, passed to TRL as is (loss on the completion);
  * question/answer style: columns named by --prompt_input_column/--prompt_output_column, or detected
    among question/instruction/query/input/prompt and answer/response/output/completion; turned into a
    one-turn chat (user/assistant) when the tokenizer has a chat template, plain text otherwise;
  * language modelling: {"text": ...}.

Every parameter of SftLoraParams is honoured here (tests/trainer/test_sft_lora.py checks each is read):
precision (compute_type), checkpoints (save_steps, save_total_limit), a validation split (validation_ratio),
FlashAttention-2, 4-bit loading (bitsandbytes) and LoRA+ (PEFT's create_loraplus_optimizer). What needs
hardware or packages this machine lacks fails before the model is loaded, with a message naming the flag.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

from tuneforge_common.methods import SftLoraParams, check_cross_field, greater_is_better
from tuneforge_trainer.sdk import (
    PAUSED_EXIT_CODE,
    install_pause_handler,
    log_data,
    make_log_data_callback,
    parse_flags,
    pause_requested,
)

PROMPT_CANDIDATES = ("question", "instruction", "query", "input", "prompt")
ANSWER_CANDIDATES = ("answer", "response", "output", "completion")
REQUIRED_EXTRAS = ("model_path", "dataset_path", "output_dir")
# The validation rows depend only on the dataset (and max_samples), not on --seed, so runs that differ in
# seed or hyperparameters are evaluated on the same rows and their eval_loss can be compared.
VALIDATION_SPLIT_SEED = 1234


class DatasetProblem(Exception):
    """A user-facing problem with the dataset file; the message names the line and column."""


# --- dataset -------------------------------------------------------------------------------------


def _line_number(path: Path, row_index: int) -> int:
    """1-based file line of the row_index-th JSON row (blank lines are not rows)."""
    seen = -1
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row_index:
                    return number
    return row_index + 1


def _first_bad_line(path: Path) -> str | None:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return f"{path} line {number}: invalid JSON ({exc})"
            if not isinstance(row, dict):
                return f"{path} line {number}: expected a JSON object, got {type(row).__name__}"
    return None


def load_rows(path: Path, max_samples: int, cache_dir: str | None = None):
    import datasets

    if not path.is_file():
        raise DatasetProblem(f"dataset file not found: {path}")
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as exc:  # the json builder's errors do not name the line; find it ourselves
        raise DatasetProblem(_first_bad_line(path) or f"cannot read {path} as JSON lines: {exc}") from exc
    if len(dataset) == 0:
        raise DatasetProblem(f"{path} holds no rows")
    if max_samples > 0 and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    return dataset


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _pick(columns: list[str], explicit: str, candidates: tuple[str, ...], what: str) -> str:
    if explicit:
        if explicit not in columns:
            raise DatasetProblem(f"{what} column {explicit!r} not found; the dataset has {', '.join(columns)}")
        return explicit
    for name in candidates:
        if name in columns:
            return name
    raise DatasetProblem(
        f"no {what} column: expected one of {', '.join(candidates)} (or set "
        f"--prompt_{'input' if what == 'prompt' else 'output'}_column); "
        f"the dataset has {', '.join(columns)}"
    )


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{i}] has no 'role'"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}] ('{message['role']}') has no text 'content'"
    return None


def prepare_dataset(dataset, params: SftLoraParams, has_chat_template: bool, path: Path):
    """Normalise rows to one of TRL's formats (messages / prompt+completion / text); describe it."""
    columns = list(dataset.column_names)

    def fail(index: int, problem: str) -> DatasetProblem:
        return DatasetProblem(f"{path} line {_line_number(path, index)}: {problem}")

    explicit = params.prompt_input_column or params.prompt_output_column
    if not explicit and "messages" in columns:
        for i, value in enumerate(dataset["messages"]):
            problem = _check_messages(value)
            if problem:
                raise fail(i, problem)
        # Drop the keys pyarrow adds as None to messages that lack them, so the template sees clean dicts.
        dataset = dataset.select_columns(["messages"]).map(
            lambda row: {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
        )
        return dataset, "chat"
    if not explicit and "prompt" in columns and "completion" in columns:
        for i, row in enumerate(dataset.select_columns(["prompt", "completion"])):
            for key in ("prompt", "completion"):
                if not isinstance(row[key], (str, list)) or not row[key]:
                    raise fail(i, f"column {key!r} is missing or empty")
        return dataset.select_columns(["prompt", "completion"]), "prompt-completion"
    if not explicit and "text" in columns and not any(c in columns for c in PROMPT_CANDIDATES):
        for i, value in enumerate(dataset["text"]):
            if _text(value) is None:
                raise fail(i, "column 'text' is missing or empty")
        return dataset.select_columns(["text"]), "text"

    if not explicit and not any(c in columns for c in PROMPT_CANDIDATES):
        raise DatasetProblem(
            f"cannot tell the row format from the columns {', '.join(columns)}: expected 'messages' (chat), "
            f"'prompt' and 'completion', 'text', or a prompt/answer pair ({'/'.join(PROMPT_CANDIDATES)} and "
            f"{'/'.join(ANSWER_CANDIDATES)}, or name them with --prompt_input_column/--prompt_output_column)"
        )
    prompt_col = _pick(columns, params.prompt_input_column, PROMPT_CANDIDATES, "prompt")
    answer_col = _pick(columns, params.prompt_output_column, ANSWER_CANDIDATES, "answer")
    if prompt_col == answer_col:
        raise DatasetProblem(f"prompt and answer columns are both {prompt_col!r}")
    # Alpaca-style rows keep their optional `input` as context under the instruction.
    alpaca = prompt_col == "instruction" and "input" in columns and answer_col != "input"
    context_col = "input" if alpaca else None
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(dataset):
        prompt, answer = _text(row.get(prompt_col)), _text(row.get(answer_col))
        if prompt is None:
            raise fail(i, f"column {prompt_col!r} is missing or empty")
        if answer is None:
            raise fail(i, f"column {answer_col!r} is missing or empty")
        context = _text(row.get(context_col)) if context_col else None
        if context:
            prompt = f"{prompt}\n\n{context}"
        if has_chat_template:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            )
        else:
            rows.append({"prompt": prompt + "\n", "completion": answer})
    import datasets

    return datasets.Dataset.from_list(rows), f"{prompt_col}/{answer_col}"


def split_validation(dataset, ratio: float):
    """(train, validation) with `ratio` of the rows held out (at least one) by a fixed seed; validation None at 0."""
    if ratio <= 0:
        return dataset, None
    held_out = max(1, round(len(dataset) * ratio))
    if held_out >= len(dataset):
        raise DatasetProblem(
            f"--validation_ratio={ratio} leaves no training rows out of {len(dataset)}; "
            "use more rows or a smaller ratio"
        )
    split = dataset.train_test_split(test_size=held_out, shuffle=True, seed=VALIDATION_SPLIT_SEED)
    return split["train"], split["test"]


# --- hardware ------------------------------------------------------------------------------------


def resolve_precision(compute_type: str, cuda: bool, cuda_bf16: bool) -> str:
    """bf16, fp16 or fp32 for --compute_type on this machine; SystemExit when it can't be honoured.

    auto: bf16 on a GPU that supports it, else fp32 (fp16 is never picked silently: it needs loss scaling
    and overflows more easily). bf16 runs on a CPU too (slowly, but as asked); fp16 mixed precision
    needs CUDA.
    """
    if compute_type == "auto":
        return "bf16" if cuda and cuda_bf16 else "fp32"
    if compute_type == "fp16" and not cuda:
        raise SystemExit(
            "error: --compute_type=fp16 needs a CUDA GPU (fp16 mixed precision scales the loss on CUDA); "
            "this machine has none: use bf16, fp32 or auto"
        )
    if compute_type == "bf16" and cuda and not cuda_bf16:
        raise SystemExit("error: --compute_type=bf16: this GPU does not support bfloat16; use fp16, fp32 or auto")
    return compute_type


def check_hardware(params: SftLoraParams, cuda: bool, cuda_bf16: bool) -> str:
    """The precision to train in, after checking that 4-bit loading and FlashAttention-2 can run here."""
    precision = resolve_precision(params.compute_type, cuda, cuda_bf16)
    if params.load_in_4bit:
        if not cuda:
            raise SystemExit(
                "error: --load_in_4bit=true: 4-bit quantization (bitsandbytes) needs a CUDA GPU and this "
                "machine has none; set load_in_4bit=false to train on the unquantized model"
            )
        if not _installed("bitsandbytes"):
            raise SystemExit(
                "error: --load_in_4bit=true needs the bitsandbytes package: pip install 'tuneforge-trainer[gpu]'"
            )
    if params.flash_attention:
        if not cuda:
            raise SystemExit(
                "error: --flash_attention=true: FlashAttention-2 needs a CUDA GPU and this machine has none"
            )
        if not _installed("flash_attn"):
            raise SystemExit("error: --flash_attention=true needs the flash-attn package: pip install flash-attn")
        if precision == "fp32":
            raise SystemExit(
                "error: --flash_attention=true needs bf16 or fp16 compute; set --compute_type=bf16 or fp16"
            )
    return precision


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def load_model(model_path: Path, params: SftLoraParams, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if params.flash_attention:
        kwargs["attn_implementation"] = "flash_attention_2"
    if params.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            # QLoRA's choices; the qlora method's schema makes both settable.
            bnb_4bit_quant_type=getattr(params, "bnb_4bit_quant_type", "nf4"),
            bnb_4bit_use_double_quant=getattr(params, "bnb_4bit_use_double_quant", True),
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def build_optimizer(model, params: SftLoraParams):
    """LoRA+ (loraplus_lr_ratio > 0): AdamW with the B matrices at learning_rate x ratio; None leaves it to Trainer."""
    if params.loraplus_lr_ratio <= 0:
        return None
    import torch

    try:
        from peft.optimizers import create_loraplus_optimizer
    except ImportError:
        raise SystemExit(
            "error: --loraplus_lr_ratio needs peft.optimizers.create_loraplus_optimizer (peft >= 0.12)"
        ) from None
    return create_loraplus_optimizer(
        model=model,
        optimizer_cls=torch.optim.AdamW,
        lr=params.learning_rate,
        loraplus_lr_ratio=params.loraplus_lr_ratio,
        loraplus_weight_decay=params.weight_decay,
    )


# --- training ------------------------------------------------------------------------------------


def _required(extras: dict[str, str]) -> dict[str, str]:
    # Flag first, then the upper-snake environment variable, as for the hyperparameters.
    values = {k: extras.get(k) or os.environ.get(k.upper(), "") for k in REQUIRED_EXTRAS}
    missing = [f"--{k}" for k, v in values.items() if not v]
    if missing:
        raise SystemExit(f"error: missing required flag(s): {', '.join(missing)}")
    return values


def train(params: SftLoraParams, extras: dict[str, str]) -> dict[str, Any]:
    # The Arrow copies of the dataset live as long as the run, unless the user chose a datasets cache.
    if os.environ.get("HF_DATASETS_CACHE"):
        return _train(params, extras, None)
    with tempfile.TemporaryDirectory(prefix="tuneforge-datasets-") as cache_dir:
        return _train(params, extras, cache_dir)


def _train(params: SftLoraParams, extras: dict[str, str], cache_dir: str | None) -> dict[str, Any]:
    paths = _required(extras)
    model_path, dataset_path = Path(paths["model_path"]), Path(paths["dataset_path"])
    output_dir = Path(paths["output_dir"])
    if not (model_path / "config.json").is_file():
        raise SystemExit(f"error: --model_path={model_path}: no model there (config.json missing)")
    resume_flag = extras.get("resume_from_checkpoint", os.environ.get("RESUME_FROM_CHECKPOINT")) or None
    resume: str | bool | None = resume_flag
    if resume_flag is not None:
        if resume_flag.lower() == "true":
            resume = True  # Trainer picks the last checkpoint in output_dir
        elif not Path(resume_flag).is_dir():
            raise SystemExit(f"error: --resume_from_checkpoint={resume_flag}: no such checkpoint directory")

    import datasets
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    # stdout carries the log_data protocol; keep library chatter and progress bars out of it.
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_warning()
    # PEFT/TRL still call the renamed is_gradient_checkpointing; the warning is noise for users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    precision = check_hardware(params, cuda, cuda and torch.cuda.is_bf16_supported())
    try:
        dataset = load_rows(dataset_path, params.max_samples, cache_dir)
        dataset, data_format = prepare_dataset(dataset, params, bool(tokenizer.chat_template), dataset_path)
        dataset, eval_dataset = split_validation(dataset, params.validation_ratio)
    except DatasetProblem as exc:
        raise SystemExit(f"error: dataset: {exc}") from None
    if data_format == "chat" and not tokenizer.chat_template:
        raise SystemExit(f"error: {model_path} has no chat template, so chat ('messages') rows cannot be used")
    held_out = f", {len(eval_dataset)} held out for validation" if eval_dataset is not None else ""
    print(f"sft-lora: {len(dataset)} {data_format} rows from {dataset_path}{held_out}", file=sys.stderr, flush=True)

    model = load_model(model_path, params, precision)
    # Wrapped here rather than by SFTTrainer(peft_config=...) so the LoRA+ optimizer can see the adapter.
    model = get_peft_model(
        model,
        LoraConfig(
            r=params.lora_rank,
            lora_alpha=params.lora_alpha,
            lora_dropout=params.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    optimizer = build_optimizer(model, params)

    checkpoints = params.save_steps > 0
    config = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum_steps,
        learning_rate=params.learning_rate,
        # transformers 5 dropped warmup_ratio: warmup_steps < 1 is read as a fraction of the steps.
        warmup_steps=params.warmup_steps if params.warmup_steps > 0 else params.warmup_ratio,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        lr_scheduler_type=params.lr_scheduler_type,
        logging_strategy="steps",
        logging_steps=params.logging_steps,
        seed=params.seed,
        max_length=params.max_seq_length,
        # SFTConfig defaults bf16 to True, which CPUs and older GPUs cannot honour: always say which.
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda and precision == "bf16",  # transformers allows bf16 without a GPU only when told
        # transformers 5 renamed gradient_checkpointing (TRL still sets the old name, which then warns).
        activation_checkpointing=cuda,  # saves GPU memory; only slows small CPU runs down
        save_strategy="steps" if checkpoints else "no",
        save_steps=params.save_steps if checkpoints else 500,
        save_total_limit=params.save_total_limit or None,
        # The Trainer's own rotation then spares the best checkpoint too, as the jobs service's retention does;
        # only an eval metric can be tracked, and only with a validation split.
        **best_checkpoint_tracking(params.checkpoint_metric, eval_dataset is not None),
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=params.save_steps if checkpoints else params.logging_steps,
        per_device_eval_batch_size=params.batch_size,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, None),  # (None, None): Trainer builds AdamW and the schedule from the config
        callbacks=[make_log_data_callback()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout
    result = trainer.train(resume_from_checkpoint=resume)
    if pause_requested():
        # Stopped after the pause checkpoint (reported by the callback); the final model comes after a resume.
        return {"paused_at_step": result.global_step}

    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        # The final model's eval_loss: from the last step's evaluation, or evaluated now (reported by the callback).
        last = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == result.global_step]
        metrics.update(last[-1] if last else trainer.evaluate())
    log_data(
        100,
        step=result.global_step,
        epoch=trainer.state.epoch,
        train_loss=result.training_loss,
        eval_loss=metrics.get("eval_loss"),
        train_runtime=metrics.get("train_runtime"),
        train_samples_per_second=metrics.get("train_samples_per_second"),
    )
    return metrics


def best_checkpoint_tracking(metric: str, has_eval: bool) -> dict[str, Any]:
    if not (has_eval and metric.startswith("eval_")):
        return {}
    return {"metric_for_best_model": metric, "greater_is_better": greater_is_better(metric)}


def check_params(params: SftLoraParams) -> None:
    """The catalog's cross-field rules, for runs started by hand; SystemExit names the first broken flag."""
    for violation in check_cross_field("sft-lora", dataclasses.asdict(params)):
        raise SystemExit(f"error: --{violation.field.removeprefix('parameters.')}: {violation.description}")


def main(argv: list[str] | None = None) -> int:
    params, extras = parse_flags(SftLoraParams, argv)
    check_params(params)
    install_pause_handler()
    try:
        train(params, extras)
    except SystemExit:
        raise
    except Exception as exc:
        traceback.print_exc()
        print(f"error: sft-lora training failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return PAUSED_EXIT_CODE if pause_requested() else 0


if __name__ == "__main__":
    raise SystemExit(main())
