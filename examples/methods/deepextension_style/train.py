"""A training script written for DeepExtension's "Add New Method", run by TuneForge unchanged.

Nothing here knows TuneForge: the contract is DeepExtension's. Hyperparameters come as --key=value flags
(also as upper-case environment variables: LORA_RANK, ...), booleans as true/false; the script reports by
printing `[log_data]: {json}` lines on stdout and saves what it trained into --output_dir; exit code 0 is
success. Unknown flags are ignored (parse_known_args), so the platform may pass more than it reads.

It trains a causal language model on the JSONL dataset with torch and transformers directly: a plain
loop, full fine-tuning, which is all a few steps on the tiny test model need. --lora_rank is read and
recorded, to show the flags such a script takes; a real one would hand it to its adapter library.

Register it (the methods directory of the agent holds deepextension_style/):
    {"name": "de-style", "training_type": "chat", "lifecycle": "customized",
     "stages": {"training": {"file": "deepextension_style/train.py", "env": "<conda env name>"}}}
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch
from rows import row_text
from transformers import AutoModelForCausalLM, AutoTokenizer


def str2bool(value: str) -> bool:
    # Never argparse's type=bool: bool("false") is True.
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    if value.strip().lower() in ("false", "0", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def log_data(progress: float, **details: float) -> None:
    print("[log_data]: " + json.dumps({"code": 200, "progress": round(progress, 2), "details": details}), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--dataset_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--max_samples", type=int, default=-1)
    parser.add_argument("--load_in_4bit", type=str2bool, default=False)
    parser.add_argument("--prompt_input_column", default="")
    parser.add_argument("--prompt_output_column", default="")
    parser.add_argument("--seed", type=int, default=42)
    args, unknown = parser.parse_known_args()
    if unknown:
        print(f"ignoring flags this script does not use: {' '.join(a.split('=')[0] for a in unknown)}", flush=True)
    if args.load_in_4bit and not torch.cuda.is_available():
        parser.error("--load_in_4bit needs a CUDA GPU")
    return args


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    with open(args.dataset_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.max_samples > 0:
        rows = rows[: args.max_samples]
    if not rows:
        sys.exit(f"error: {args.dataset_path} has no rows")
    texts = [row_text(r, args.prompt_input_column, args.prompt_output_column) for r in rows]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_path).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)

    per_epoch = math.ceil(len(texts) / args.batch_size)
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(per_epoch * args.epochs))
    for step in range(1, total + 1):
        start = ((step - 1) % per_epoch) * args.batch_size
        batch = tokenizer(
            texts[start : start + args.batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=args.max_seq_length,
        ).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        log_data(
            100.0 * step / total,
            step=step,
            total_steps=total,
            loss=round(loss.item(), 6),
            learning_rate=args.learning_rate,
            grad_norm=round(float(grad_norm), 6),
            epoch=round(step / per_epoch, 4),
        )

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_args.json").write_text(json.dumps(vars(args), indent=2))
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    main()
