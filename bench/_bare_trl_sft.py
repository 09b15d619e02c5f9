"""The baseline of bench_training_throughput.py: LoRA fine-tuning as a user writes it with TRL alone.

SFTConfig + SFTTrainer(peft_config=LoraConfig(target_modules="all-linear")) on a JSONL file of chat rows. The
flags set what the user chose; `--packing` and `--gradient_checkpointing` left out keep TRL's own defaults
(SFTConfig: packing=False, i.e. each batch padded to its longest sample, and gradient_checkpointing=True).
Precision is always fp32 here (SFTConfig's default bf16=True needs a GPU, or use_cpu, on this machine).

The one line this adds to a user's script is the measurement: Trainer's own non-padding token count
(`include_num_input_tokens_seen="non_padding"`, the setting TuneForge's runner uses) and, after training, one
`bench-result: {json}` line on stdout with train_runtime (Trainer's training-loop time) and that count.

    python bench/_bare_trl_sft.py --model DIR --data FILE.jsonl --output DIR --max_steps 20 \\
        [--packing true|false] [--gradient_checkpointing true|false] [--assistant_only_loss true|false]
"""

from __future__ import annotations

import argparse
import json

RESULT_PREFIX = "bench-result: "


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--max_steps", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    # Left out: TRL's default.
    parser.add_argument("--packing", type=_bool)
    parser.add_argument("--gradient_checkpointing", type=_bool)
    parser.add_argument("--assistant_only_loss", type=_bool)
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")

    chosen: dict = {}
    if args.packing is not None:
        chosen["packing"] = args.packing
        if args.packing:
            chosen["packing_strategy"] = "bfd"  # TRL's default strategy, named for clarity
    if args.gradient_checkpointing is not None:
        chosen["gradient_checkpointing"] = args.gradient_checkpointing
    if args.assistant_only_loss is not None:
        chosen["assistant_only_loss"] = args.assistant_only_loss
    config = SFTConfig(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        seed=args.seed,
        bf16=False,
        report_to="none",
        include_num_input_tokens_seen="non_padding",  # the measurement
        **chosen,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    result = trainer.train()
    trainer.save_model(args.output)
    report = {
        "train_runtime": result.metrics["train_runtime"],
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "step": result.global_step,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "packing": bool(config.packing),
        "padding_free": bool(getattr(trainer, "padding_free", False)),
    }
    print(RESULT_PREFIX + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
