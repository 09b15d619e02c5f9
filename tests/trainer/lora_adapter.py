"""A LoRA adapter on the tiny model whose weights are random (init_lora_weights=False), so it changes the outputs,
saved as training saves one: adapter files plus the tokenizer with its chat template."""

from __future__ import annotations

from pathlib import Path


def make_adapter(base_dir: Path, output_dir: Path, seed: int = 1) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
        )
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(output_dir)
    return output_dir
