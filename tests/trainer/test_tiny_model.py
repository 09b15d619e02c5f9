from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge_trainer.tiny_model import build_tiny_model, main


def test_tiny_model_is_deterministic_and_loads(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    first, second = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tiny_model_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    other = load_file(build_tiny_model(tmp_path / "other", seed=1) / "model.safetensors")
    assert not all(torch.equal(first[k], other[k]) for k in first)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer) and 1024 <= len(tokenizer) <= 2048
    assert tokenizer.model_max_length == 1024
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    assert None not in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)

    messages = [
        {"role": "user", "content": "How long should tea steep?"},
        {"role": "assistant", "content": "About four minutes."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>user\nHow long should tea steep?<|im_end|>\n<|im_start|>assistant\nAbout four minutes.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    # The {% generation %} markers give TRL's assistant_only_loss its mask, end-of-turn token included.
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(assistant) == "About four minutes.<|im_end|>"

    ids = tokenizer("Fine-tuning a tiny model.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))


def test_cli_skips_existing_model_unless_forced(tiny_model_dir, capsys):
    assert main([str(tiny_model_dir)]) == 0
    assert "already holds a model" in capsys.readouterr().out
