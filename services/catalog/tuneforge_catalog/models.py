"""Inspect a Hugging Face format model directory without loading it (no torch needed)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from tuneforge_common.errors import InvalidArgument


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    parameter_count: int
    context_length: int
    dtype: str
    has_chat_template: bool
    size_bytes: int


def _safetensors_param_count(path: Path) -> int:
    # The header is a little-endian u64 length followed by JSON with each tensor's shape.
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(math.prod(meta["shape"]) for name, meta in header.items() if name != "__metadata__")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def inspect_model_dir(path: Path, field: str = "path") -> ModelInfo:
    """Refuse, with the reason, a directory that transformers could not load as a causal LM."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidArgument.for_field(field, f"{path} has no config.json: not a Hugging Face model")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument.for_field(field, "config.json is not valid JSON") from None
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        raise InvalidArgument.for_field(field, "config.json names neither model_type nor architectures")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise InvalidArgument.for_field(field, f"{path} has no weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidArgument.for_field(field, f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    try:
        parameter_count = sum(_safetensors_param_count(w) for w in weights)
    except (OSError, ValueError, KeyError, struct.error):
        raise InvalidArgument.for_field(field, "a *.safetensors file has a corrupt header") from None
    tokenizer_config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file()
    if tokenizer_config.is_file():
        has_template = has_template or bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return ModelInfo(
        architecture=archs[0],
        parameter_count=parameter_count,
        context_length=int(config.get("max_position_embeddings") or 0),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        has_chat_template=has_template,
        size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    )
