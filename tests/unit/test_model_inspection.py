"""inspect_model_dir on hand-built Hugging Face directories: what it reads, and that every bad file is an
InvalidArgument naming the field with the reason (never an uncaught exception, which a client sees as INTERNAL)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_fake_model_dir
from tuneforge_catalog.models import inspect_model_dir
from tuneforge_common.errors import InvalidArgument


def safetensors(path: Path, header: Any, data: bytes = b"") -> Path:
    """A safetensors file: little-endian u64 header length, the JSON header, then the data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def tensors(**shapes: list[int]) -> dict[str, Any]:
    """A header for F32 tensors of the given shapes, laid out one after the other."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header


def write_config(path: Path, **config: Any) -> None:
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))


def refusal(path: Path, field: str = "path") -> str:
    with pytest.raises(InvalidArgument) as exc:
        inspect_model_dir(path, field)
    ((violation_field, description),) = [(v.field, v.description) for v in exc.value.violations]
    assert violation_field == field
    return description


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_fake_model_dir(tmp_path / "model", params=64)


def test_a_well_formed_directory_is_read_without_loading_it(model):
    info = inspect_model_dir(model)
    assert (info.architecture, info.parameter_count, info.context_length, info.dtype, info.has_chat_template) == (
        "LlamaForCausalLM",
        64,
        2048,
        "float32",
        True,
    )
    assert info.size_bytes == sum(f.stat().st_size for f in model.iterdir())


# -- tokenizer_config.json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "tokenizer_config.json is not valid JSON"),
        (b"\xff\xfe\x00", "tokenizer_config.json is not valid JSON"),
        (b'["chat_template"]', "tokenizer_config.json must hold a JSON object"),
        (b'"{{ messages }}"', "tokenizer_config.json must hold a JSON object"),
    ],
)
def test_a_malformed_tokenizer_config_is_invalid_argument_naming_the_field(model, content, reason):
    (model / "tokenizer_config.json").write_bytes(content)
    assert refusal(model, "hub_id") == reason


def test_a_chat_template_file_counts_without_a_tokenizer_config(model):
    (model / "tokenizer_config.json").unlink()
    assert inspect_model_dir(model).has_chat_template is False
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert inspect_model_dir(model).has_chat_template is True


# -- config.json: context length and dtype ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["2048 tokens", "", [2048], {"value": 2048}, True, -1, 1.5])
def test_a_context_length_that_is_not_a_whole_number_is_invalid_argument(model, value):
    write_config(model, max_position_embeddings=value)
    assert refusal(model) == "config.json max_position_embeddings must be a whole number of tokens"


def test_a_context_length_written_as_an_integral_float_is_read(model):
    write_config(model, max_position_embeddings=4096.0)
    assert inspect_model_dir(model).context_length == 4096


@pytest.mark.parametrize(
    ("config", "length"),
    [
        ({"max_position_embeddings": 4096, "n_positions": 1024}, 4096),
        ({"n_positions": 1024}, 1024),  # GPT-2
        ({"seq_length": 8192}, 8192),  # ChatGLM, Qwen (v1)
        ({"max_sequence_length": 2048}, 2048),
        ({"text_config": {"max_position_embeddings": 131072}}, 131072),  # multimodal (Gemma 3, Llava, Mistral 3)
        ({"max_position_embeddings": 512, "text_config": {"max_position_embeddings": 131072}}, 512),
        ({"max_position_embeddings": None, "n_positions": 1024}, 1024),
        ({}, 0),
    ],
)
def test_context_length_falls_back_to_other_keys_and_the_text_config(model, config, length):
    write_config(model, **config)
    assert inspect_model_dir(model).context_length == length


def test_a_bad_context_length_in_the_text_config_names_where_it_was_found(model):
    write_config(model, text_config={"max_position_embeddings": "long"})
    assert refusal(model) == "config.json text_config.max_position_embeddings must be a whole number of tokens"


@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ({"torch_dtype": "bfloat16"}, "bfloat16"),
        ({"dtype": "float16", "torch_dtype": "bfloat16"}, "float16"),
        ({"text_config": {"torch_dtype": "bfloat16"}}, "bfloat16"),
        ({"text_config": {"dtype": "float16"}}, "float16"),
        ({"dtype": {"weights": "bf16"}}, "float32"),
        ({}, "float32"),
    ],
)
def test_dtype_comes_from_dtype_or_torch_dtype_or_the_text_config(model, config, dtype):
    write_config(model, **config)
    assert inspect_model_dir(model).dtype == dtype


def test_a_config_that_is_not_an_object_is_invalid_argument(model):
    (model / "config.json").write_text('["LlamaForCausalLM"]')
    assert refusal(model) == "config.json must hold a JSON object"


def test_the_architecture_falls_back_to_the_model_type(model):
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": []}))
    assert inspect_model_dir(model).architecture == "qwen2"


# -- safetensors headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ([1, 2, 3], "it must be a JSON object of tensors"),
        ("weights", "it must be a JSON object of tensors"),
        ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, "tensor 'w' has no shape (a list of integers)"),
        ({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 4]}}, "tensor 'w' has no shape (a list of integers)"),
        ({"w": {"shape": ["4"]}}, "tensor 'w' has no shape (a list of integers)"),
        ({"w": {"shape": [2, 2.0]}}, "tensor 'w' has no shape (a list of integers)"),
        ({"w": [4]}, "tensor 'w' has no shape (a list of integers)"),
        ({"w": {"shape": [-4]}}, "tensor 'w' has a negative dimension"),
    ],
)
def test_a_safetensors_header_of_the_wrong_shape_is_invalid_argument(model, header, reason):
    safetensors(model / "model.safetensors", header, b"\0" * 16)
    assert refusal(model) == f"model.safetensors has a corrupt header: {reason}"


def test_a_safetensors_header_that_is_not_json_is_invalid_argument(model):
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    assert refusal(model) == "model.safetensors has a corrupt header: not valid JSON"


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 1 << 40) + b"{}"])
def test_a_truncated_safetensors_file_is_invalid_argument(model, content):
    (model / "model.safetensors").write_bytes(content)
    assert refusal(model).startswith("model.safetensors has a corrupt header: ")


# -- sharded and *.bin checkpoints -------------------------------------------------------------------------


def shard_index(path: Path, weight_map: dict[str, str], total_size: int = 0) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_sharded_safetensors_checkpoint_counts_every_shard_once(model):
    (model / "model.safetensors").unlink()
    safetensors(model / "model-00001-of-00002.safetensors", tensors(a=[4, 8], b=[8]), b"\0" * 160)
    safetensors(model / "model-00002-of-00002.safetensors", tensors(c=[16, 2]), b"\0" * 128)
    shard_index(
        model,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
        total_size=288,
    )
    info = inspect_model_dir(model)
    assert info.parameter_count == 4 * 8 + 8 + 16 * 2
    assert info.size_bytes == sum(f.stat().st_size for f in model.iterdir())


def test_a_consolidated_copy_next_to_the_shards_is_not_counted_twice(model):
    # Mistral's repositories ship consolidated.safetensors (for mistral-inference) beside the transformers shards.
    (model / "model.safetensors").unlink()
    safetensors(model / "model-00001-of-00001.safetensors", tensors(a=[10]), b"\0" * 40)
    safetensors(model / "consolidated.safetensors", tensors(a=[10]), b"\0" * 40)
    shard_index(model, {"a": "model-00001-of-00001.safetensors"})
    assert inspect_model_dir(model).parameter_count == 10


def test_a_safetensors_index_naming_a_missing_shard_is_invalid_argument(model):
    (model / "model.safetensors").unlink()
    safetensors(model / "model-00001-of-00003.safetensors", tensors(a=[4]), b"\0" * 16)
    shard_index(
        model,
        {
            "a": "model-00001-of-00003.safetensors",
            "b": "model-00002-of-00003.safetensors",
            "c": "model-00003-of-00003.safetensors",
        },
    )
    assert refusal(model) == (
        "model.safetensors.index.json names shard model-00002-of-00003.safetensors and 1 more, "
        "missing from the directory"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "model.safetensors.index.json is not valid JSON"),
        ("[]", "model.safetensors.index.json must hold a JSON object"),
        ('{"metadata": {}}', "model.safetensors.index.json has no weight_map (tensor name to shard file)"),
        ('{"weight_map": {"a": 1}}', "model.safetensors.index.json has no weight_map (tensor name to shard file)"),
    ],
)
def test_a_malformed_safetensors_index_is_invalid_argument(model, content, reason):
    (model / "model.safetensors").unlink()
    safetensors(model / "model-00001-of-00001.safetensors", tensors(a=[4]), b"\0" * 16)
    (model / "model.safetensors.index.json").write_text(content)
    assert refusal(model) == reason


def test_a_bin_index_without_its_shards_is_ignored_when_safetensors_are_there(model):
    # snapshot_download(allow_patterns=["*.json", "*.safetensors"]) keeps the *.bin index but not the shards.
    (model / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 256}, "weight_map": {"w": "pytorch_model-00001-of-00001.bin"}})
    )
    assert inspect_model_dir(model).parameter_count == 64


def test_bin_only_weights_have_no_parameter_count_but_the_directory_is_accepted(model):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model-00001-of-00002.bin").write_bytes(b"\x80\x04pickle")
    (model / "pytorch_model-00002-of-00002.bin").write_bytes(b"\x80\x04pickle")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (model / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
    )
    info = inspect_model_dir(model)
    assert info.parameter_count == 0
    assert info.size_bytes == sum(f.stat().st_size for f in model.iterdir())


def test_a_bin_index_naming_a_missing_shard_is_invalid_argument_without_safetensors(model):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model-00001-of-00002.bin").write_bytes(b"\x80\x04pickle")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert refusal(model) == (
        "pytorch_model.bin.index.json names shard pytorch_model-00002-of-00002.bin, missing from the directory"
    )


def test_a_directory_without_weights_or_tokenizer_is_refused(model):
    (model / "tokenizer.json").unlink()
    assert refusal(model).endswith("has no tokenizer (tokenizer.json, tokenizer.model, vocab.json, vocab.txt)")
    (model / "model.safetensors").unlink()
    assert refusal(model).endswith("has no weights (*.safetensors or *.bin)")
