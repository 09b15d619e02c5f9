"""Small builders shared by tests (no torch needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def write_fake_model_dir(path: Path, params: int = 64, chat_template: bool = True) -> Path:
    """A Hugging Face-shaped directory: config, tokenizer config and a safetensors file of `params` floats."""
    path.mkdir(parents=True, exist_ok=True)
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
