"""Token counts render rows the way the sft runner does: chat template for conversations, plain text otherwise."""

from __future__ import annotations

import json

import pytest

from tests.helpers import CHAT_ROW, write_fake_model_dir
from tuneforge_catalog.tokens import TokenCounter
from tuneforge_common.errors import FailedPrecondition

# One token per whitespace-separated word (the test tokenizer), so counts can be read off the text.
TEMPLATE = "{{ bos_token }} {% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}{{ eos_token }}"


@pytest.fixture
def model_dir(tmp_path):
    path = write_fake_model_dir(tmp_path / "m")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    return path


def test_chat_rows_are_counted_through_the_models_chat_template(model_dir):
    # <s> <user> What is LoRA? <assistant> A low-rank adapter. </s>
    assert TokenCounter(model_dir, "m").count(CHAT_ROW, "chat") == 10


def test_question_answer_pairs_become_a_user_and_an_assistant_turn(model_dir):
    row = {"question": "two plus two", "answer": "four"}
    assert TokenCounter(model_dir, "m").count(row, "columns", "question", "answer") == 8


def test_instruction_rows_put_the_input_under_the_instruction(model_dir):
    row = {"instruction": "Summarise this", "input": "long text here", "output": "short"}
    # <s> <user> Summarise this long text here <assistant> short </s>
    assert TokenCounter(model_dir, "m").count(row, "instruction") == 10


def test_without_a_chat_template_rows_are_plain_text(tmp_path):
    path = write_fake_model_dir(tmp_path / "plain", chat_template=False)
    counter = TokenCounter(path, "plain")
    assert counter.count(CHAT_ROW, "chat") == 8  # "user: What is LoRA?" / "assistant: A low-rank adapter."
    assert counter.count({"prompt": "a b", "completion": "c"}, "prompt_completion") == 3


def test_named_templates_use_the_default_one(model_dir):
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]}
        )
    )
    assert TokenCounter(model_dir, "m").count(CHAT_ROW, "chat") == 8  # no bos/eos configured


def test_a_model_without_tokenizer_json_is_a_failed_precondition(model_dir):
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(FailedPrecondition, match="has no tokenizer.json"):
        TokenCounter(model_dir, "m")


def test_a_template_that_raises_is_a_failed_precondition(model_dir):
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ raise_exception('roles must alternate') }}"})
    )
    with pytest.raises(FailedPrecondition, match="roles must alternate"):
        TokenCounter(model_dir, "m").count(CHAT_ROW, "chat")


def test_generation_blocks_and_loop_controls_render_like_transformers(model_dir):
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% if m.role == 'assistant' %}{% generation %}<a> {{ m.content }}{% endgeneration %}"
        "{% else %}<u> {{ m.content }} {% endif %}{% endfor %}"
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert TokenCounter(model_dir, "m").count(CHAT_ROW, "chat") == 8


def test_a_template_that_does_not_compile_is_a_failed_precondition(model_dir):
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(FailedPrecondition, match="does not compile"):
        TokenCounter(model_dir, "m")


def test_the_built_in_tiny_models_template_counts_chat_rows(tmp_path):
    from tuneforge_trainer.tiny_model import CHAT_TEMPLATE

    path = write_fake_model_dir(tmp_path / "tiny")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "</s>"}))
    assert TokenCounter(path, "tiny").count(CHAT_ROW, "chat") > 6


def test_batched_counts_match_one_by_one_counts_in_row_order(model_dir):
    counter = TokenCounter(model_dir, "m")
    rows = [{"prompt": "w " * n, "completion": "done"} for n in range(7)] + [CHAT_ROW] * 3
    formats = ["prompt_completion"] * 7 + ["chat"] * 3
    single = [counter.count(r, f) for r, f in zip(rows, formats, strict=True)]
    batched = list(counter.count_all(rows[:7], "prompt_completion", batch=3)) + list(
        counter.count_all(rows[7:], "chat", batch=2)
    )
    assert batched == single
