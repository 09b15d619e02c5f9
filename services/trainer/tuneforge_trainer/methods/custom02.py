"""custom02: a template for your own training code on the Hugging Face Trainer. Copy it and edit.

    python -m tuneforge_trainer.methods.custom02 --model_path=DIR --dataset_path=FILE.jsonl --output_dir=DIR ...

The same contract as custom01 (flags and upper-case environment variables in, `[log_data]` lines out), but
the loop is transformers' Trainer: sdk.make_log_data_callback() turns its logs into `[log_data]` lines,
announces its checkpoints and stops it for a pause; the Trainer's resume restores optimizer, scheduler, RNG
and data position. It fine-tunes a LoRA adapter on prompt/answer rows with DeepExtension's generic parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tuneforge_common.methods import DeepExtensionParams
from tuneforge_trainer.sdk import (
    PAUSED_EXIT_CODE,
    encode_prompt_answer,
    install_pause_handler,
    log_generations,
    make_log_data_callback,
    parse_flags,
    pause_requested,
    read_prompt_answer_rows,
    run_paths,
)


def train(params: DeepExtensionParams, model_path: Path, dataset_path: Path, output_dir: Path, resume: str) -> int:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    if params.load_in_4bit and not torch.cuda.is_available():
        print("error: --load_in_4bit=true needs a CUDA GPU (bitsandbytes)", file=sys.stderr)
        return 1
    try:
        pairs = read_prompt_answer_rows(
            str(dataset_path), params.max_samples, params.prompt_input_column, params.prompt_output_column
        )
    except (OSError, ValueError) as exc:
        print(f"error: dataset: {exc}", file=sys.stderr)
        return 1
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = []
    for prompt, answer in pairs:
        ids, labels = encode_prompt_answer(
            tokenizer, prompt, answer, params.max_input_length, params.max_content_length, params.max_seq_length
        )
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    model: Any = AutoModelForCausalLM.from_pretrained(model_path)
    lora = LoraConfig(r=params.lora_rank, lora_alpha=2 * params.lora_rank, target_modules="all-linear")
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum_steps,
        learning_rate=params.learning_rate,
        warmup_steps=params.warmup_steps if params.warmup_steps > 0 else params.warmup_ratio,
        max_grad_norm=params.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[make_log_data_callback()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout, where only [log_data] belongs
    trainer.train(resume_from_checkpoint=resume or None)
    if pause_requested():
        return PAUSED_EXIT_CODE
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    log_generations(model, tokenizer, pairs[0][0], params.num_generations, min(32, params.max_content_length))
    return 0


def main(argv: list[str] | None = None) -> int:
    params, extras = parse_flags(DeepExtensionParams, argv)
    install_pause_handler()
    paths = run_paths(extras)  # SystemExit naming a missing flag
    resume = paths.resume if isinstance(paths.resume, str) else ""
    return train(params, paths.model, paths.dataset, paths.output, resume)


if __name__ == "__main__":
    raise SystemExit(main())
