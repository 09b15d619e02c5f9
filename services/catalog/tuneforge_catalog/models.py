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


def _safetensors_param_count(path: Path) -> int:
    # The header is a little-endian u64 length followed by JSON with each tensor's shape.
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(math.prod(meta["shape"]) for name, meta in header.items() if name != "__metadata__")


def inspect_model_dir(path: Path) -> ModelInfo:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidArgument.for_field("uri", f"{path} has no config.json: not a Hugging Face model")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument.for_field("uri", "config.json is not valid JSON") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise InvalidArgument.for_field("uri", f"{path} has no weights (*.safetensors or *.bin)")
    tokenizer_config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file()
    if tokenizer_config.is_file():
        has_template = has_template or bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return ModelInfo(
        architecture=archs[0],
        parameter_count=sum(_safetensors_param_count(w) for w in weights),
        context_length=int(config.get("max_position_embeddings") or 0),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        has_chat_template=has_template,
    )
