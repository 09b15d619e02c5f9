"""JSONL dataset validation: formats detected, the first bad line named."""

import json

import pytest

from tuneforge_catalog.datasets import inspect_jsonl
from tuneforge_common.errors import InvalidArgument


def lines(*rows) -> list[bytes]:
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows]


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_chat_rows_are_counted_and_columns_reported():
    stats = inspect_jsonl(lines(CHAT, CHAT, ""))
    assert (stats.row_count, stats.format, stats.columns) == (2, "chat", ["messages"])


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"question": "a", "answer": "b"}, "prompt_completion"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"text": "a"}, "text"),
    ],
)
def test_formats_are_detected(row, fmt):
    assert inspect_jsonl(lines(row)).format == fmt


@pytest.mark.parametrize(
    "bad,problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": []}, "non-empty"),
        ({"prompt": "a", "chosen": "b"}, "rejected"),
        ({"n": 1}, "unrecognised row"),
    ],
)
def test_first_bad_line_is_named(bad, problem):
    with pytest.raises(InvalidArgument) as exc:
        inspect_jsonl(lines(CHAT, CHAT, bad, "{bad"))
    assert exc.value.violations[0].field == "content"
    assert exc.value.message.startswith("content: line 3:") and problem in exc.value.message


def test_invalid_utf8_is_refused_with_its_line():
    with pytest.raises(InvalidArgument, match="line 2: not valid UTF-8"):
        inspect_jsonl([json.dumps(CHAT).encode() + b"\n", b'{"text": "\xff\xfe"}\n'])


def test_mixed_formats_are_refused():
    with pytest.raises(InvalidArgument, match="line 2: row is text but earlier rows are chat"):
        inspect_jsonl(lines(CHAT, {"text": "x"}))


def test_empty_dataset_is_refused():
    with pytest.raises(InvalidArgument, match="no rows"):
        inspect_jsonl(lines("", "  "))
