"""Dataset validation rules: pure functions over the uploaded bytes, no I/O beyond the iterator given."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from tuneforge_common.errors import InvalidArgument

CHAT = "chat"
PROMPT_COMPLETION = "prompt_completion"
PREFERENCE = "preference"
TEXT = "text"
ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_REPORTED_COLUMNS = 64


@dataclass
class DatasetStats:
    row_count: int = 0
    format: str = ""
    columns: list[str] = field(default_factory=list)


def _bad_line(line_no: int, problem: str) -> InvalidArgument:
    return InvalidArgument.for_field("content", f"line {line_no}: {problem}")


def classify_row(row: dict, line_no: int) -> str:
    """Which training format a row is in; raises naming the line when it is none."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise _bad_line(line_no, "'messages' must be a non-empty list")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise _bad_line(line_no, f"messages[{i}] must be an object")
            if msg.get("role") not in ROLES:
                raise _bad_line(line_no, f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}")
            if not isinstance(msg.get("content"), str):
                raise _bad_line(line_no, f"messages[{i}].content must be a string")
        return CHAT
    if "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise _bad_line(line_no, f"preference row lacks '{key}'")
        return PREFERENCE
    if set(row) == {"text"}:
        if not isinstance(row["text"], str):
            raise _bad_line(line_no, "'text' must be a string")
        return TEXT
    if sum(isinstance(v, str) for v in row.values()) >= 2:
        # prompt/completion, or any input/output columns chosen by the job's prompt_*_column parameters
        return PROMPT_COMPLETION
    raise _bad_line(
        line_no,
        "unrecognised row: expected 'messages', 'prompt'/'completion' (or two text "
        "columns), 'chosen'/'rejected', or 'text'",
    )


def inspect_jsonl(lines: Iterable[bytes]) -> DatasetStats:
    """Validate JSONL line by line; the first bad line is reported by number."""
    stats = DatasetStats()
    seen_columns: dict[str, None] = {}
    for line_no, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad_line(line_no, f"not valid UTF-8 (byte {exc.start})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad_line(line_no, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise _bad_line(line_no, "each line must be a JSON object")
        row_format = classify_row(row, line_no)
        if stats.format and row_format != stats.format:
            raise _bad_line(line_no, f"row is {row_format} but earlier rows are {stats.format}")
        stats.format = row_format
        for key in row:
            if len(seen_columns) < MAX_REPORTED_COLUMNS:
                seen_columns.setdefault(key, None)
        stats.row_count += 1
    if stats.row_count == 0:
        raise InvalidArgument.for_field("content", "dataset has no rows")
    stats.columns = list(seen_columns)
    return stats
