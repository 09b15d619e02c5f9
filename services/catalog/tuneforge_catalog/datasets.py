"""Dataset rules: formats, line-by-line validation, token statistics and splits. Pure functions, no I/O."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tuneforge_common.params import json_kind

CHAT = "chat"
PROMPT_COMPLETION = "prompt_completion"
PREFERENCE = "preference"
TEXT = "text"
INSTRUCTION = "instruction"
COLUMNS = "columns"
PROMPT_ANSWER = "prompt_answer"
FORMATS = (CHAT, PROMPT_COMPLETION, INSTRUCTION, COLUMNS, PREFERENCE, PROMPT_ANSWER, TEXT)
ROLES = ("system", "user", "assistant", "tool")
MAX_PROBLEMS = 100
# Column pairs detected without a mapping, in the order the trainer tries them.
PROMPT_COLUMN_NAMES = ("question", "instruction", "query", "input", "prompt")
ANSWER_COLUMN_NAMES = ("answer", "response", "output", "completion")


class OverlongLine(bytes):
    """Stands for a line too long to hold in memory: its first bytes, and its full size in bytes."""

    size: int

    @classmethod
    def of(cls, head: bytes, size: int) -> OverlongLine:
        line = cls(head)
        line.size = size
        return line


def read_lines(fh: Any, max_bytes: int, block_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary file with bounded memory: a line over max_bytes comes back as an OverlongLine."""
    pending = bytearray()
    skipped = 0  # bytes of the over-long line being skipped
    head = b""
    while block := fh.read(block_size):
        start = 0
        while True:
            newline = block.find(b"\n", start)
            piece = block[start : newline + 1] if newline >= 0 else block[start:]
            if skipped:
                skipped += len(piece)
            elif len(pending) + len(piece) > max_bytes:
                head, skipped = bytes((pending + piece)[:64]), len(pending) + len(piece)
                pending.clear()
            else:
                pending += piece
            if newline < 0:
                break
            if skipped:
                yield OverlongLine.of(head, skipped)
                skipped = 0
            else:
                yield bytes(pending)
                pending.clear()
            start = newline + 1
    if skipped:
        yield OverlongLine.of(head, skipped)
    elif pending:
        yield bytes(pending)


def max_line_bytes(max_line_chars: int) -> int:
    return 4 * max_line_chars + 2  # UTF-8 takes at most 4 bytes a character, plus \r\n


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based; 0 for the file as a whole
    field: str
    message: str


@dataclass
class ValidationReport:
    row_count: int = 0
    format: str = ""
    columns: list[str] = field(default_factory=list)
    prompt_input_column: str = ""
    prompt_output_column: str = ""
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def valid(self) -> bool:
        return self.problem_count == 0

    @property
    def truncated(self) -> bool:
        return self.problem_count > len(self.problems)

    def add(self, line: int, field_name: str, message: str, max_problems: int) -> None:
        self.problem_count += 1
        if len(self.problems) < max_problems:
            self.problems.append(Problem(line, field_name, message))

    def to_json(self) -> dict[str, Any]:
        return {
            "row_count": self.row_count,
            "format": self.format,
            "columns": self.columns,
            "prompt_input_column": self.prompt_input_column,
            "prompt_output_column": self.prompt_output_column,
            "problems": [{"line": p.line, "field": p.field, "message": p.message} for p in self.problems],
            "problem_count": self.problem_count,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ValidationReport:
        return cls(
            row_count=data.get("row_count", 0),
            format=data.get("format", ""),
            columns=list(data.get("columns", [])),
            prompt_input_column=data.get("prompt_input_column", ""),
            prompt_output_column=data.get("prompt_output_column", ""),
            problems=[Problem(**p) for p in data.get("problems", [])],
            problem_count=data.get("problem_count", 0),
        )


def detect_format(row: dict[str, Any], prompt_input_column: str = "", prompt_output_column: str = "") -> str:
    """The format a first row is in, from its keys; "" when none fits."""
    keys = set(row)
    if prompt_input_column or prompt_output_column:
        return COLUMNS
    if "messages" in keys:
        return CHAT
    if {"chosen", "rejected"} <= keys:
        return PREFERENCE
    if {"prompt", "completion"} <= keys:
        return PROMPT_COMPLETION
    if {"instruction", "output"} <= keys:
        return INSTRUCTION
    if {"prompt", "answer"} <= keys:
        return PROMPT_ANSWER
    if guess_columns(row) != ("", ""):
        return COLUMNS
    if "text" in keys:
        return TEXT
    return ""


def guess_columns(row: dict[str, Any], prompt: str = "", answer: str = "") -> tuple[str, str]:
    """Fill an unnamed side of the column mapping from well-known names; ("", "") when a side stays unknown."""
    prompt = prompt or next((c for c in PROMPT_COLUMN_NAMES if c in row and c != answer), "")
    answer = answer or next((c for c in ANSWER_COLUMN_NAMES if c in row and c != prompt), "")
    return (prompt, answer) if prompt and answer else ("", "")


def _nonempty_text(row: dict[str, Any], key: str) -> str | None:
    """Why row[key] is not usable text, or None when it is."""
    if key not in row:
        return "is missing"
    value = row[key]
    if not isinstance(value, str):
        return f"must be a string, got {json_kind(value)}"
    if not value.strip():
        return "is empty"
    return None


def _check_messages(value: Any, path: str, need_assistant: bool) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        return [(path, f"must be a list of messages, got {json_kind(value)}")]
    if not value:
        return [(path, "is empty")]
    problems: list[tuple[str, str]] = []
    for i, msg in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(msg, dict):
            problems.append((where, f"must be an object, got {json_kind(msg)}"))
            continue
        role = msg.get("role")
        if "role" not in msg:
            problems.append((f"{where}.role", "is missing"))
        elif role not in ROLES:
            problems.append((f"{where}.role", f"must be one of {', '.join(ROLES)}, got {json.dumps(role)}"))
        elif role == "system" and i > 0:
            problems.append((f"{where}.role", "system is only allowed as the first message"))
        if msg.get("tool_calls") and role == "assistant":
            continue  # an assistant turn that calls a tool may have no content
        why = _nonempty_text(msg, "content")
        if why:
            problems.append((f"{where}.content", why))
    roles = [m.get("role") for m in value if isinstance(m, dict)]
    if need_assistant and "assistant" not in roles:
        problems.append((path, "has no assistant turn to learn from"))
    return problems


def _check_text_or_messages(row: dict[str, Any], key: str, need_assistant: bool) -> list[tuple[str, str]]:
    value = row.get(key)
    if isinstance(value, list):
        return _check_messages(value, key, need_assistant)
    if key in row and not isinstance(value, str):
        return [(key, f"must be a string or a list of messages, got {json_kind(value)}")]
    why = _nonempty_text(row, key)
    return [(key, why)] if why else []


def check_row(row: dict[str, Any], fmt: str, in_col: str = "", out_col: str = "") -> list[tuple[str, str]]:
    """(field, message) for each way the row fails its format."""
    if fmt == CHAT:
        return (
            _check_messages(row.get("messages"), "messages", need_assistant=True)
            if "messages" in row
            else [("messages", "is missing")]
        )
    if fmt in (PROMPT_COMPLETION, INSTRUCTION, COLUMNS, TEXT):
        keys = {
            PROMPT_COMPLETION: ("prompt", "completion"),
            INSTRUCTION: ("instruction", "output"),
            COLUMNS: (in_col, out_col),
            TEXT: ("text",),
        }[fmt]
        # An unnamed mapped column is reported once for the file, not on every row.
        problems = [(k, why) for k in keys if k and (why := _nonempty_text(row, k))]
        if fmt == INSTRUCTION and "input" in row and not isinstance(row["input"], str):
            problems.append(("input", f"must be a string, got {json_kind(row['input'])}"))
        return problems
    if fmt == PREFERENCE:
        problems = []
        if "prompt" in row:
            problems += _check_text_or_messages(row, "prompt", need_assistant=False)
        for key in ("chosen", "rejected"):
            problems += _check_text_or_messages(row, key, need_assistant=isinstance(row.get(key), list))
        if not problems and row["chosen"] == row["rejected"]:
            problems.append(("rejected", "is identical to chosen, so the pair teaches nothing"))
        return problems
    if fmt == PROMPT_ANSWER:
        problems = _check_text_or_messages(row, "prompt", need_assistant=False)
        answer = row.get("answer")
        if "answer" not in row:
            problems.append(("answer", "is missing"))
        elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            problems.append(("answer", f"must be a string or a number, got {json_kind(answer)}"))
        elif isinstance(answer, str) and not answer.strip():
            problems.append(("answer", "is empty"))
        return problems
    raise ValueError(f"unknown format {fmt!r}")


def validate_jsonl(
    lines: Iterable[bytes],
    declared_format: str = "",
    max_line_chars: int = 4000,
    max_problems: int = MAX_PROBLEMS,
    prompt_input_column: str = "",
    prompt_output_column: str = "",
) -> ValidationReport:
    """Check every line and report every problem with its line number (the first max_problems kept)."""
    report = ValidationReport(format=declared_format)
    first_keys: list[str] | None = None
    first_line = 0
    for line_no, raw in enumerate(lines, start=1):
        if isinstance(raw, OverlongLine):
            report.add(
                line_no, "", f"line is {raw.size} bytes, over the limit of {max_line_chars} characters", max_problems
            )
            continue
        if line_no == 1 and raw.startswith(UTF16_BOMS):
            report.add(1, "", "the file is UTF-16; save it as UTF-8", max_problems)
            return report
        if line_no == 1:
            raw = raw.removeprefix(UTF8_BOM)  # editors on Windows add it; it is not part of the data
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add(line_no, "", f"not valid UTF-8 (byte {exc.start + 1} of the line)", max_problems)
            continue
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        if len(text) > max_line_chars:
            report.add(line_no, "", f"line is {len(text)} characters; the limit is {max_line_chars}", max_problems)
            continue
        try:
            row = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            # Some of json's messages already end in "at" ("Unterminated string starting at").
            where = "column" if exc.msg.endswith(" at") else "at column"
            report.add(line_no, "", f"not valid JSON: {exc.msg} {where} {exc.colno}", max_problems)
            continue
        except RecursionError:
            report.add(line_no, "", "nested too deeply to read", max_problems)
            continue
        if "\\ud" in text.lower() and _has_lone_surrogate(row):
            report.add(line_no, "", "has an escaped lone surrogate (\\udXXX) that is not a character", max_problems)
            continue
        if not isinstance(row, dict):
            report.add(line_no, "", f"must be a JSON object, got {json_kind(row)}", max_problems)
            continue
        report.row_count += 1
        if first_keys is None:
            first_keys, first_line = list(row), line_no
            report.columns = first_keys
            if not report.format:
                report.format = detect_format(row, prompt_input_column, prompt_output_column)
            if report.format == COLUMNS:
                prompt_input_column, prompt_output_column = _column_mapping(
                    report, row, line_no, prompt_input_column, prompt_output_column, max_problems
                )
            if not report.format:
                report.add(
                    line_no,
                    "",
                    f"can't tell the format from the keys {', '.join(first_keys) or '(none)'}: expected messages, "
                    "prompt/completion, instruction/output, chosen/rejected, prompt/answer or text, or name the "
                    "columns with prompt_input_column and prompt_output_column",
                    max_problems,
                )
        elif set(row) != set(first_keys):
            missing = [k for k in first_keys if k not in row]
            extra = [k for k in row if k not in first_keys]
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unexpected {', '.join(extra)}"] if extra else []
            )
            report.add(line_no, "", f"keys differ from line {first_line}: {'; '.join(parts)}", max_problems)
            continue
        if report.format:
            for field_name, message in check_row(row, report.format, prompt_input_column, prompt_output_column):
                report.add(line_no, field_name, message, max_problems)
    if report.row_count == 0:
        only_blank_lines = report.problem_count == 0
        if report.format == COLUMNS:
            _column_mapping(report, {}, 0, prompt_input_column, prompt_output_column, max_problems)
        if only_blank_lines:
            report.add(0, "", "the file has no rows", max_problems)
    return report


UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _column_mapping(
    report: ValidationReport, row: dict[str, Any], line_no: int, given_in: str, given_out: str, max_problems: int
) -> tuple[str, str]:
    """The columns format's mapping: named ones checked against the first row, unnamed ones guessed.

    A problem is reported once here; the row checks then skip the side that is unusable.
    """
    guessed = guess_columns(row, given_in, given_out)
    mapping = [given_in or guessed[0], given_out or guessed[1]]
    for i, setting in enumerate(("prompt_input_column", "prompt_output_column")):
        if not mapping[i]:
            report.add(0, setting, "is required for the columns format", max_problems)
        elif row and mapping[i] not in row:
            report.add(
                line_no,
                setting,
                f"column {mapping[i]!r} is not in the file (its columns: {', '.join(row)})",
                max_problems,
            )
            mapping[i] = ""
    if mapping[0] and mapping[0] == mapping[1]:
        report.add(0, "prompt_output_column", f"must differ from prompt_input_column ({mapping[0]!r})", max_problems)
        mapping[1] = ""
    report.prompt_input_column, report.prompt_output_column = mapping[0], mapping[1]
    return mapping[0], mapping[1]


def row_text(row: dict[str, Any], fmt: str, in_col: str = "", out_col: str = "") -> str:
    """The text a row trains on, for counting tokens. Chat turns are joined as role: content lines."""

    def text_of(value: Any) -> str:
        if isinstance(value, list):
            return "\n".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in value if isinstance(m, dict))
        return "" if value is None else str(value)

    if fmt == CHAT:
        return text_of(row.get("messages"))
    if fmt == PREFERENCE:
        # Each of chosen and rejected is trained together with the prompt; the longer pair bounds truncation.
        longer = max(text_of(row.get("chosen")), text_of(row.get("rejected")), key=len)
        return f"{text_of(row.get('prompt'))}\n{longer}".strip("\n")
    keys = {
        PROMPT_COMPLETION: ("prompt", "completion"),
        INSTRUCTION: ("instruction", "input", "output"),
        COLUMNS: (in_col, out_col),
        PROMPT_ANSWER: ("prompt", "answer"),
        TEXT: ("text",),
    }.get(fmt, tuple(row))
    return "\n".join(text_of(row.get(k)) for k in keys if row.get(k) not in (None, ""))


def token_stats(counts: list[int], max_seq_length: int | None = None) -> dict[str, Any]:
    """Summary of per-row token counts; rows_truncated counts rows longer than max_seq_length."""
    if not counts:
        return {"rows": 0, "min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0, "total": 0, "rows_truncated": 0}
    ordered = sorted(counts)
    return {
        "rows": len(ordered),
        "min": ordered[0],
        "mean": sum(ordered) / len(ordered),
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1],
        "total": sum(ordered),
        "rows_truncated": sum(1 for c in ordered if max_seq_length and c > max_seq_length),
    }


def _percentile(ordered: list[int], pct: float) -> int:
    # Nearest-rank: the smallest value with at least pct% of rows at or below it.
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def split_indices(row_count: int, validation_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices for train and validation; the same count, ratio and seed always give the same split."""
    if not 0 < validation_ratio <= 0.5:
        raise ValueError(f"must be in (0, 0.5], got {validation_ratio}")
    if row_count < 2:
        raise ValueError("the dataset needs at least 2 rows to split")
    # Rounded down (at least one row) so validation never takes more than the ratio asks for.
    n_validation = min(row_count - 1, max(1, math.floor(row_count * validation_ratio)))
    order = list(range(row_count))
    random.Random(seed).shuffle(order)
    return sorted(order[n_validation:]), sorted(order[:n_validation])
