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
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

from tuneforge_common.methods import SftLoraParams
from tuneforge_trainer.sdk import log_data, make_log_data_callback, parse_flags

PROMPT_CANDIDATES = ("question", "instruction", "query", "input", "prompt")
ANSWER_CANDIDATES = ("answer", "response", "output", "completion")
REQUIRED_EXTRAS = ("model_path", "dataset_path", "output_dir")


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
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
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
    try:
        dataset = load_rows(dataset_path, params.max_samples, cache_dir)
        dataset, data_format = prepare_dataset(dataset, params, bool(tokenizer.chat_template), dataset_path)
    except DatasetProblem as exc:
        raise SystemExit(f"error: dataset: {exc}") from None
    if data_format == "chat" and not tokenizer.chat_template:
        raise SystemExit(f"error: {model_path} has no chat template, so chat ('messages') rows cannot be used")
    print(f"sft-lora: {len(dataset)} {data_format} rows from {dataset_path}", file=sys.stderr, flush=True)

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)

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
        bf16=bf16,  # SFTConfig defaults bf16 to True, which CPUs and older GPUs cannot honour
        fp16=False,
        # transformers 5 renamed gradient_checkpointing (TRL still sets the old name, which then warns).
        activation_checkpointing=cuda,  # saves GPU memory; only slows small CPU runs down
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
    )
    peft_config = LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[make_log_data_callback()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout
    result = trainer.train(resume_from_checkpoint=resume)

    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    metrics = dict(result.metrics)
    log_data(
        100,
        step=result.global_step,
        epoch=trainer.state.epoch,
        train_loss=result.training_loss,
        train_runtime=metrics.get("train_runtime"),
        train_samples_per_second=metrics.get("train_samples_per_second"),
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    params, extras = parse_flags(SftLoraParams, argv)
    try:
        train(params, extras)
    except SystemExit:
        raise
    except Exception as exc:
        traceback.print_exc()
        print(f"error: sft-lora training failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
