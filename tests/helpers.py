"""Small builders shared by tests (no torch needed)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def write_word_tokenizer(path: Path) -> Path:
    """A tokenizer.json that makes one token per whitespace-separated word, so counts are easy to check."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def write_fake_model_dir(path: Path, params: int = 64, chat_template: bool = True) -> Path:
    """A Hugging Face-shaped directory: config, word tokenizer and a safetensors file of `params` floats."""
    path.mkdir(parents=True, exist_ok=True)
    write_word_tokenizer(path)
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "max_position_embeddings": 2048,
                "dtype": "float32",
            }
        )
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}"} if chat_template else {})
    )
    header = json.dumps({"w": {"dtype": "F32", "shape": [params], "data_offsets": [0, 4 * params]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * (4 * params))
    return path


CHAT_ROW = {
    "messages": [{"role": "user", "content": "What is LoRA?"}, {"role": "assistant", "content": "A low-rank adapter."}]
}


def chat_jsonl(rows: int = 3) -> bytes:
    return b"".join(json.dumps(CHAT_ROW).encode() + b"\n" for _ in range(rows))


def wait_for(read: Callable[[], T], done: Callable[[T], bool], what: str, timeout_s: float = 180) -> T:
    """Poll `read` until `done` holds for its value; fail naming `what` and the last value after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}; last seen: {value!r}")
        time.sleep(0.2)
