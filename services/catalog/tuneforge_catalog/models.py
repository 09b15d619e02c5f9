"""Inspect a Hugging Face format model directory without loading it (no torch needed).

Every problem a file can have is an InvalidArgument naming the field the directory came from, with the
file and the reason; nothing here raises anything else for a bad directory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge_common.errors import InvalidArgument


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    # 0 when it can't be read without loading the weights (*.bin files are pickles).
    parameter_count: int
    context_length: int
    dtype: str
    has_chat_template: bool
    size_bytes: int


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Where configs keep the context length, first found wins; multimodal configs keep the language model's
# settings under text_config.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")
DTYPE_KEYS = ("dtype", "torch_dtype")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# The safetensors format caps its JSON header at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class _Bad(Exception):
    """A file's problem, said in words; inspect_model_dir turns it into InvalidArgument for its field."""


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise _Bad(f"{path.name} can't be read ({exc.strerror or 'I/O error'})") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _Bad(f"{path.name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise _Bad(f"{path.name} must hold a JSON object")
    return data


def _safetensors_param_count(path: Path) -> int:
    """Elements of every tensor, from the header: a little-endian u64 length, then JSON with each tensor's shape."""
    corrupt = f"{path.name} has a corrupt header"
    try:
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _Bad(f"{corrupt}: the file is shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > path.stat().st_size - 8:
                raise _Bad(f"{corrupt}: a header of {length} bytes does not fit the file")
            header = json.loads(fh.read(length))
    except OSError as exc:
        raise _Bad(f"{path.name} can't be read ({exc.strerror or 'I/O error'})") from None
    except (ValueError, RecursionError):
        raise _Bad(f"{corrupt}: not valid JSON") from None
    if not isinstance(header, dict):
        raise _Bad(f"{corrupt}: it must be a JSON object of tensors")
    count = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise _Bad(f"{corrupt}: tensor {name!r} has no shape (a list of integers)")
        if any(d < 0 for d in shape):
            raise _Bad(f"{corrupt}: tensor {name!r} has a negative dimension")
        count += math.prod(shape)
    return count


def _index_shards(path: Path, index_name: str) -> list[Path]:
    """The shard files a sharded checkpoint's index names; each must be in the directory."""
    index = _read_json_object(path / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
        raise _Bad(f"{index_name} has no weight_map (tensor name to shard file)")
    shards = sorted(set(weight_map.values()))
    missing = [f for f in shards if not (path / f).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _Bad(f"{index_name} names shard {missing[0]}{more}, missing from the directory")
    return [path / f for f in shards]


def _setting(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """The first of `keys` set in the config or else in its text_config, with the name it was found under."""
    text_config = config.get("text_config")
    for where, section in (("", config), ("text_config.", text_config if isinstance(text_config, dict) else {})):
        for key in keys:
            if section.get(key) is not None:
                return where + key, section[key]
    return None


def _context_length(config: dict[str, Any]) -> int:
    found = _setting(config, CONTEXT_KEYS)
    if found is None:
        return 0
    key, value = found
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"config.json {key} must be a whole number of tokens")
    if value > 2**31 - 1:
        raise _Bad(f"config.json {key} is too large ({value})")
    return value


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures")
    if isinstance(archs, str) and archs:
        return archs
    if isinstance(archs, list) and archs and isinstance(archs[0], str) and archs[0]:
        return archs[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) and model_type else "unknown"


def inspect_model_dir(path: Path, field: str = "path") -> ModelInfo:
    """Refuse, with the reason, a directory that transformers could not load as a causal LM."""
    try:
        return _inspect(path)
    except _Bad as exc:
        raise InvalidArgument.for_field(field, str(exc)) from None


def _inspect(path: Path) -> ModelInfo:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise _Bad(f"{path} has no config.json: not a Hugging Face model")
    config = _read_json_object(config_path)
    if not (config.get("model_type") or config.get("architectures")):
        raise _Bad("config.json names neither model_type nor architectures")
    weights = sorted(path.glob("*.safetensors"))  # a sharded checkpoint's shards too
    has_bin = any(path.glob("*.bin"))
    if not weights and not has_bin:
        raise _Bad(f"{path} has no weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise _Bad(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    # What transformers loads: model.safetensors, else the shards the safetensors index names (a repo may also
    # ship consolidated.safetensors, which must not be counted twice), else *.bin. The index of a format it
    # does not load may name files that were never downloaded (pytorch_model.bin.index.json next to
    # safetensors), so only the one it loads must be complete.
    if (path / "model.safetensors").is_file():
        weights = [path / "model.safetensors"]
    elif (path / SAFETENSORS_INDEX).is_file():
        weights = _index_shards(path, SAFETENSORS_INDEX)
    elif not weights and (path / BIN_INDEX).is_file():
        _index_shards(path, BIN_INDEX)
    parameter_count = sum(_safetensors_param_count(w) for w in weights)  # *.bin weights are pickles: 0

    has_template = (path / "chat_template.jinja").is_file()
    if (path / "tokenizer_config.json").is_file():
        template = _read_json_object(path / "tokenizer_config.json").get("chat_template")
        has_template = has_template or bool(template)
    dtype = _setting(config, DTYPE_KEYS)
    return ModelInfo(
        architecture=_architecture(config),
        parameter_count=parameter_count,
        context_length=_context_length(config),
        dtype=dtype[1] if dtype is not None and isinstance(dtype[1], str) and dtype[1] else "float32",
        has_chat_template=has_template,
        size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    )


@dataclass(frozen=True)
class AdapterInfo:
    base_model_path: str
    parameter_count: int
    size_bytes: int
    has_chat_template: bool


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def inspect_adapter_dir(path: Path, field: str = "uri") -> AdapterInfo:
    """A PEFT adapter (a customized model): its config, trained parameters and size; refused with the reason."""
    try:
        config = _read_json_object(path / "adapter_config.json")
        weights = path / "adapter_model.safetensors"
        if weights.is_file():
            count = _safetensors_param_count(weights)
        elif (path / "adapter_model.bin").is_file():
            count = 0  # a pickle: counting would mean loading it
        else:
            raise _Bad(f"{path} has no adapter weights (adapter_model.safetensors or adapter_model.bin)")
    except _Bad as exc:
        raise InvalidArgument.for_field(field, str(exc)) from None
    template = (path / "chat_template.jinja").is_file()
    tokenizer_config = path / "tokenizer_config.json"
    if not template and tokenizer_config.is_file():
        try:
            template = bool(_read_json_object(tokenizer_config).get("chat_template"))
        except _Bad:
            template = False
    return AdapterInfo(
        base_model_path=str(config.get("base_model_name_or_path") or ""),
        parameter_count=count,
        size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        has_chat_template=template,
    )
