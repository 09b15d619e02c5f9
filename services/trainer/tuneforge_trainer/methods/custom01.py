"""custom01: a template for your own training code, in plain PyTorch (no HF Trainer). Copy it and edit.

    python -m tuneforge_trainer.methods.custom01 --model_path=DIR --dataset_path=FILE.jsonl --output_dir=DIR \\
        [--resume_from_checkpoint=DIR] [--lora_rank=8 --max_steps=20 --max_input_length=256 ...]

The contract (DeepExtension's): every parameter of the method arrives as a `--key=value` flag and as its
upper-case environment variable (LORA_RANK=8); progress and metrics go to stdout as `[log_data]: {json}`
lines (tuneforge_trainer.sdk.log_data writes them); anything else printed is the job's log. A checkpoint
saved to a directory and announced with sdk.report_checkpoint is copied into the artifact store, and a
resumed job gets it back as --resume_from_checkpoint. SIGUSR1 asks for a pause: save a checkpoint and exit
with sdk.PAUSED_EXIT_CODE. Exit non-zero with an `error: ...` line on stderr to fail the job with that reason.

This template trains a LoRA adapter on prompt/answer rows (or chat rows: their last exchange) and takes
DeepExtension's generic parameters: the prompt keeps its last max_input_length tokens, the answer its first
max_content_length, both within max_seq_length; at the end it samples num_generations answers to the first
prompt into the log so you can see what the adapter learned.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any

from tuneforge_common.methods import DeepExtensionParams
from tuneforge_trainer.sdk import (
    PAUSED_EXIT_CODE,
    encode_prompt_answer,
    install_pause_handler,
    log_data,
    log_generations,
    parse_flags,
    pause_requested,
    read_prompt_answer_rows,
    report_checkpoint,
    run_paths,
)

STATE_FILE = "training_state.pt"


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int, epoch: int):
    """The epoch's batches, shuffled by (seed, epoch) so a resumed run sees the same order."""
    import torch

    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(chunk):
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
            mask[row, : len(row_ids)] = 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def save_checkpoint(model, optimizer, scheduler, step: int, output_dir: Path) -> Path:
    import torch

    path = output_dir / f"checkpoint-{step}"
    model.save_pretrained(path)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, path / STATE_FILE)
    return path


def train(params: DeepExtensionParams, model_path: Path, dataset_path: Path, output_dir: Path, resume: str) -> int:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    cuda = torch.cuda.is_available()
    if params.load_in_4bit and not cuda:
        return fail("--load_in_4bit=true needs a CUDA GPU (bitsandbytes); this machine has none")
    try:
        pairs = read_prompt_answer_rows(
            str(dataset_path), params.max_samples, params.prompt_input_column, params.prompt_output_column
        )
    except (OSError, ValueError) as exc:
        return fail(f"dataset: {exc}")
    if not pairs:
        return fail(f"dataset: {dataset_path} holds no rows")

    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [
        encode_prompt_answer(tokenizer, p, a, params.max_input_length, params.max_content_length, params.max_seq_length)
        for p, a in pairs
    ]
    print(f"custom01: {len(examples)} prompt/answer rows from {dataset_path}", file=sys.stderr, flush=True)

    load: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if params.load_in_4bit:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, **load)
    device = torch.device("cuda" if cuda else "cpu")
    if resume:
        model = PeftModel.from_pretrained(model, resume, is_trainable=True)
    else:
        config = LoraConfig(r=params.lora_rank, lora_alpha=2 * params.lora_rank, target_modules="all-linear")
        model = get_peft_model(model, config)
    model.to(device).train()

    micro_batches = math.ceil(len(examples) / params.batch_size)
    steps_per_epoch = max(1, micro_batches // params.grad_accum_steps)
    total = params.max_steps if params.max_steps > 0 else math.ceil(params.epochs * steps_per_epoch)
    warmup = params.warmup_steps if params.warmup_steps > 0 else int(params.warmup_ratio * total)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    step = 0
    if resume:
        state = torch.load(Path(resume) / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        print(f"custom01: resumed at step {step} from {resume}", file=sys.stderr, flush=True)

    def micro_batch_stream():
        epoch = 0
        while True:
            yield from ((epoch, b) for b in batches(examples, params.batch_size, pad_id, 42, epoch))
            epoch += 1

    stream = micro_batch_stream()
    for _ in range(step * params.grad_accum_steps):  # the data position of the resumed step
        next(stream)
    while step < total:
        loss_sum = 0.0
        for _ in range(params.grad_accum_steps):
            epoch, batch = next(stream)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss / params.grad_accum_steps
            loss.backward()
            loss_sum += float(loss)
        max_norm = params.max_grad_norm if params.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        log_data(
            100.0 * step / total,
            step=step,
            total_steps=total,
            epoch=epoch + 1,
            loss=loss_sum,
            grad_norm=grad_norm,
            learning_rate=scheduler.get_last_lr()[0],
        )
        if pause_requested() and step < total:
            path = save_checkpoint(model, optimizer, scheduler, step, output_dir)
            report_checkpoint(step, str(path), {"loss": loss_sum})
            return PAUSED_EXIT_CODE

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    log_generations(model, tokenizer, pairs[0][0], params.num_generations, min(32, params.max_content_length))
    return 0


def main(argv: list[str] | None = None) -> int:
    params, extras = parse_flags(DeepExtensionParams, argv)
    install_pause_handler()
    paths = run_paths(extras)  # SystemExit naming a missing flag
    if params.max_input_length >= params.max_seq_length:
        return fail("--max_input_length must be less than --max_seq_length")
    resume = paths.resume if isinstance(paths.resume, str) else ""
    return train(params, paths.model, paths.dataset, paths.output, resume)


if __name__ == "__main__":
    raise SystemExit(main())
