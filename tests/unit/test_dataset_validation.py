"""Dataset rules (tuneforge_catalog.datasets): format detection, line-by-line validation, token statistics,
reproducible splits and the text a row trains on. The malformed-file corpus is in test_bad_dataset_corpus.py."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tuneforge_catalog.datasets import (
    MAX_PROBLEMS,
    Problem,
    ValidationReport,
    check_row,
    detect_format,
    guess_columns,
    row_text,
    split_indices,
    token_stats,
    validate_jsonl,
)


def jsonl(*rows: Any, newline: bytes = b"\n") -> list[bytes]:
    """Binary lines as a file handle yields them: dicts are dumped, strings are taken as the raw line."""
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + newline for r in rows]


def problems(report: ValidationReport) -> list[tuple[int, str, str]]:
    return [(p.line, p.field, p.message) for p in report.problems]


CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is LoRA?"},
        {"role": "assistant", "content": "A low-rank adapter."},
    ]
}
PC_ROW = {"prompt": "Translate to French: cat", "completion": "chat"}
ALPACA_ROW = {"instruction": "Summarise.", "input": "LoRA trains two small matrices.", "output": "LoRA is cheap."}
QA_ROW = {"question": "2+2?", "answer": "4"}
PREF_ROW = {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."}
PA_ROW = {"prompt": "What is 6*7? Answer with a number.", "answer": "42"}
TEXT_ROW = {"text": "Raw text for continued pre-training."}


# --- format detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,fmt",
    [
        (CHAT_ROW, "chat"),
        (PC_ROW, "prompt_completion"),
        (ALPACA_ROW, "instruction"),
        ({"instruction": "Name a colour.", "output": "Blue."}, "instruction"),
        (QA_ROW, "columns"),
        (PREF_ROW, "preference"),
        ({"chosen": "Hello!", "rejected": "Go away."}, "preference"),
        (PA_ROW, "prompt_answer"),
        (TEXT_ROW, "text"),
    ],
)
def test_each_format_is_detected_from_the_first_row_keys(row, fmt):
    assert detect_format(row) == fmt
    report = validate_jsonl(jsonl(row, row))
    assert (report.format, report.row_count, report.valid) == (fmt, 2, True)


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"messages": [], "prompt": "x", "completion": "y"}, "chat"),
        ({"prompt": "x", "chosen": "a", "rejected": "b", "answer": "c"}, "preference"),
        ({"prompt": "x", "completion": "y", "answer": "z"}, "prompt_completion"),
        ({"instruction": "x", "output": "y", "answer": "z"}, "instruction"),
    ],
)
def test_detection_prefers_the_more_specific_format_when_keys_overlap(row, fmt):
    assert detect_format(row) == fmt


def test_text_is_detected_when_no_other_format_fits_even_with_extra_keys():
    assert detect_format({"text": "a", "source": "web"}) == "text"


def test_unrecognised_keys_leave_the_format_undetected_and_name_the_keys_on_the_first_row():
    report = validate_jsonl(jsonl({"title": "Notes", "body": "..."}, {"title": "More", "body": "..."}))

    assert report.format == ""
    assert [(p.line, p.field) for p in report.problems] == [(1, "")]
    assert report.problems[0].message.startswith("can't tell the format from the keys title, body: expected messages")


def test_empty_first_row_is_named_as_having_no_keys():
    report = validate_jsonl(jsonl({}))

    assert report.problems[0].message.startswith("can't tell the format from the keys (none):")


def test_declared_format_overrides_detection():
    report = validate_jsonl(jsonl(PC_ROW, PC_ROW), declared_format="text")

    assert report.format == "text"
    assert problems(report) == [(1, "text", "is missing"), (2, "text", "is missing")]


def test_declared_format_that_matches_the_rows_is_valid():
    report = validate_jsonl(jsonl(PA_ROW, PA_ROW), declared_format="prompt_answer")

    assert (report.format, report.valid) == ("prompt_answer", True)


@pytest.mark.parametrize(
    "row,pair",
    [
        (QA_ROW, ("question", "answer")),
        ({"query": "q", "response": "r"}, ("query", "response")),
        ({"input": "i", "output": "o"}, ("input", "output")),
        ({"question": "q", "completion": "c"}, ("question", "completion")),
        ({"question": "q", "notes": "n"}, ("", "")),
        ({"answer": "a"}, ("", "")),
    ],
)
def test_prompt_and_answer_columns_are_guessed_from_known_names(row, pair):
    assert guess_columns(row) == pair


def test_question_answer_rows_are_columns_with_the_guessed_pair_reported():
    report = validate_jsonl(jsonl(QA_ROW, {"question": "3+3?", "answer": "6"}))

    assert (report.format, report.valid) == ("columns", True)
    assert (report.prompt_input_column, report.prompt_output_column) == ("question", "answer")
    assert report.columns == ["question", "answer"]


def test_guessed_columns_are_checked_on_every_row():
    report = validate_jsonl(jsonl(QA_ROW, {"question": "3+3?", "answer": ""}))

    assert problems(report) == [(2, "answer", "is empty")]


def test_explicit_column_mapping_selects_columns_with_any_names():
    rows = jsonl({"ask": "2+2?", "reply": "4", "id": 1}, {"ask": "3+3?", "reply": "6", "id": 2})
    report = validate_jsonl(rows, prompt_input_column="ask", prompt_output_column="reply")

    assert (report.format, report.valid) == ("columns", True)
    assert (report.prompt_input_column, report.prompt_output_column) == ("ask", "reply")
    assert report.columns == ["ask", "reply", "id"]


def test_explicit_column_mapping_wins_over_a_known_pair_and_over_other_formats():
    row = {"messages": "not used", "question": "2+2?", "answer": "4", "context": "arithmetic"}

    assert detect_format(row, "context", "answer") == "columns"
    report = validate_jsonl(jsonl(row), prompt_input_column="context", prompt_output_column="answer")
    assert (report.format, report.prompt_input_column, report.valid) == ("columns", "context", True)


def test_explicit_mapping_to_a_column_the_rows_lack_is_reported_once_naming_the_setting():
    report = validate_jsonl(jsonl(QA_ROW, QA_ROW), prompt_input_column="question", prompt_output_column="reply")

    assert problems(report) == [
        (1, "prompt_output_column", "column 'reply' is not in the file (its columns: question, answer)")
    ]


def test_declared_columns_format_without_a_mapping_guesses_well_known_columns():
    report = validate_jsonl(jsonl(QA_ROW), declared_format="columns")

    assert report.valid and (report.prompt_input_column, report.prompt_output_column) == ("question", "answer")


def test_declared_columns_format_with_unguessable_columns_is_a_file_level_problem():
    report = validate_jsonl(jsonl({"q": "2+2?", "a": "4"}), declared_format="columns")

    assert problems(report) == [
        (0, "prompt_input_column", "is required for the columns format"),
        (0, "prompt_output_column", "is required for the columns format"),
    ]


# --- validation mechanics ----------------------------------------------------------------------------


def test_only_the_first_100_problems_are_listed_but_all_are_counted():
    report = validate_jsonl(jsonl(TEXT_ROW, *[{"text": ""}] * 250))

    assert MAX_PROBLEMS == 100
    assert (len(report.problems), report.problem_count, report.truncated, report.valid) == (100, 250, True, False)
    assert [p.line for p in report.problems] == list(range(2, 102))


def test_max_problems_sets_how_many_are_listed():
    report = validate_jsonl(jsonl(*["[]"] * 5), max_problems=2)

    assert (len(report.problems), report.problem_count, report.truncated) == (2, 5, True)


def test_a_report_with_every_problem_listed_is_not_truncated():
    report = validate_jsonl(jsonl(TEXT_ROW, "[]", "[]"))

    assert (report.problem_count, report.truncated) == (2, False)


def test_blank_lines_are_skipped_but_counted_in_line_numbers():
    report = validate_jsonl(jsonl(PC_ROW, "", "   ", "\t", {"prompt": "", "completion": "x"}, "", PC_ROW))

    assert report.row_count == 3
    assert problems(report) == [(5, "prompt", "is empty")]


def test_crlf_line_endings_are_accepted():
    report = validate_jsonl(jsonl(CHAT_ROW, "", CHAT_ROW, newline=b"\r\n"))

    assert (report.valid, report.row_count, report.format) == (True, 2, "chat")


def test_crlf_and_a_last_line_without_newline_are_accepted():
    report = validate_jsonl([json.dumps(PC_ROW).encode() + b"\r\n", json.dumps(PC_ROW).encode()])

    assert (report.valid, report.row_count) == (True, 2)


def test_line_length_limit_counts_characters_without_the_line_ending():
    def text_line(length: int) -> str:
        head, tail = '{"text": "', '"}'
        return head + "é" * (length - len(head) - len(tail)) + tail

    at_limit = validate_jsonl(jsonl(text_line(4000), newline=b"\r\n"))
    over = validate_jsonl(jsonl(TEXT_ROW, text_line(4001)))

    assert at_limit.valid  # 4000 characters, about 8000 bytes of UTF-8
    assert problems(over) == [(2, "", "line is 4001 characters; the limit is 4000")]


def test_rows_whose_keys_differ_from_the_first_row_are_named_once_and_not_checked_further():
    report = validate_jsonl(jsonl(PC_ROW, {"prompt": "", "answer": ""}))

    assert problems(report) == [(2, "", "keys differ from line 1: missing completion; unexpected answer")]


def test_an_empty_file_has_no_rows():
    assert problems(validate_jsonl([])) == [(0, "", "the file has no rows")]


def test_an_assistant_turn_that_calls_a_tool_may_have_no_content():
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "weather"}}]},
            {"role": "tool", "content": '{"temp_c": 4}'},
            {"role": "assistant", "content": "4 °C in Oslo."},
        ]
    }
    assert validate_jsonl(jsonl(row)).valid


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("42", []),
        (42, []),
        (4.5, []),
        (True, [("answer", "must be a string or a number, got boolean")]),
        ([4, 2], [("answer", "must be a string or a number, got array")]),
    ],
)
def test_prompt_answer_accepts_a_string_or_number_answer(answer, expected):
    assert check_row({"prompt": "What is 6*7?", "answer": answer}, "prompt_answer") == expected


def test_preference_prompt_and_answers_may_be_message_lists():
    row = {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    assert check_row(row, "preference") == []


def test_identical_chosen_and_rejected_messages_are_rejected():
    turn = [{"role": "assistant", "content": "Hello!"}]
    assert check_row({"chosen": turn, "rejected": list(turn)}, "preference") == [
        ("rejected", "is identical to chosen, so the pair teaches nothing")
    ]


def test_check_row_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        check_row(TEXT_ROW, "csv")


# --- token statistics ----------------------------------------------------------------------------------


def test_token_stats_summarise_min_mean_percentiles_max_and_total():
    stats = token_stats([5, 1, 3, 10, 7])

    assert stats == {
        "rows": 5,
        "min": 1,
        "mean": 5.2,
        "p50": 5,
        "p95": 10,
        "max": 10,
        "total": 26,
        "rows_truncated": 0,
    }


def test_token_stats_percentiles_are_nearest_rank_values_from_the_data():
    stats = token_stats(list(range(100, 0, -1)))

    assert (stats["p50"], stats["p95"]) == (50, 95)
    assert (token_stats([7])["p50"], token_stats([7])["p95"]) == (7, 7)
    assert token_stats([1, 2, 3, 4])["p50"] == 2


def test_rows_truncated_counts_rows_longer_than_max_seq_length():
    assert token_stats([100, 512, 513, 2000], max_seq_length=512)["rows_truncated"] == 2


@pytest.mark.parametrize("max_seq_length", [None, 0])
def test_without_a_max_seq_length_no_row_is_truncated(max_seq_length):
    assert token_stats([100, 100_000], max_seq_length)["rows_truncated"] == 0


def test_token_stats_of_no_rows_are_zero():
    assert token_stats([], max_seq_length=512) == {
        "rows": 0,
        "min": 0,
        "mean": 0.0,
        "p50": 0,
        "p95": 0,
        "max": 0,
        "total": 0,
        "rows_truncated": 0,
    }


# --- splits --------------------------------------------------------------------------------------------


def test_split_is_reproducible_for_the_same_count_ratio_and_seed():
    assert split_indices(100, 0.1, seed=42) == split_indices(100, 0.1, seed=42)


def test_different_seeds_give_different_splits():
    assert split_indices(100, 0.1, seed=1)[1] != split_indices(100, 0.1, seed=2)[1]


def test_split_is_disjoint_sorted_and_covers_every_row():
    train, validation = split_indices(100, 0.1, seed=7)

    assert (len(train), len(validation)) == (90, 10)
    assert set(train).isdisjoint(validation)
    assert sorted(train + validation) == list(range(100))
    assert train == sorted(train) and validation == sorted(validation)


@pytest.mark.parametrize("ratio", [0, -0.1, 0.51, 1.0, math.nan])
def test_validation_ratio_outside_zero_to_half_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"must be in \(0, 0.5\]"):
        split_indices(100, ratio, seed=0)


def test_validation_ratio_of_one_half_is_allowed():
    train, validation = split_indices(10, 0.5, seed=0)
    assert (len(train), len(validation)) == (5, 5)


@pytest.mark.parametrize("row_count", [0, 1])
def test_fewer_than_two_rows_cannot_be_split(row_count):
    with pytest.raises(ValueError, match="at least 2 rows"):
        split_indices(row_count, 0.1, seed=0)


@pytest.mark.parametrize("row_count,ratio", [(2, 0.01), (2, 0.5), (3, 0.1), (5, 0.05)])
def test_tiny_datasets_keep_at_least_one_row_on_each_side(row_count, ratio):
    train, validation = split_indices(row_count, ratio, seed=3)

    assert len(validation) == 1 and len(train) == row_count - 1


# --- the text a row trains on --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,fmt,columns,text",
    [
        (CHAT_ROW, "chat", (), "system: Be brief.\nuser: What is LoRA?\nassistant: A low-rank adapter."),
        (PC_ROW, "prompt_completion", (), "Translate to French: cat\nchat"),
        (ALPACA_ROW, "instruction", (), "Summarise.\nLoRA trains two small matrices.\nLoRA is cheap."),
        ({"instruction": "Name a colour.", "input": "", "output": "Blue."}, "instruction", (), "Name a colour.\nBlue."),
        ({"ask": "2+2?", "reply": "4", "id": 9}, "columns", ("ask", "reply"), "2+2?\n4"),
        (PREF_ROW, "preference", (), "Say hi\nGo away."),
        ({"chosen": "Hello there!", "rejected": "No."}, "preference", (), "Hello there!"),
        (
            {
                "prompt": [{"role": "user", "content": "Say hi."}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Hi"}],
            },
            "preference",
            (),
            "user: Say hi.\nassistant: Hello!",
        ),
        ({"prompt": "What is 6*7?", "answer": 42}, "prompt_answer", (), "What is 6*7?\n42"),
        (TEXT_ROW, "text", (), "Raw text for continued pre-training."),
    ],
    ids=[
        "chat",
        "prompt_completion",
        "instruction",
        "instruction_empty_input",
        "columns",
        "preference_longer_answer",
        "preference_no_prompt",
        "preference_messages",
        "prompt_answer_number",
        "text",
    ],
)
def test_row_text_is_what_the_row_trains_on(row, fmt, columns, text):
    assert row_text(row, fmt, *columns) == text


# --- the report ----------------------------------------------------------------------------------------


def test_validation_report_round_trips_through_json():
    report = validate_jsonl(jsonl(QA_ROW, {"question": "", "answer": "4"}, "[]"), max_problems=1)
    stored = json.loads(json.dumps(report.to_json()))

    again = ValidationReport.from_json(stored)
    assert again == report
    assert again.problems == [Problem(2, "question", "is empty")]
    assert (again.problem_count, again.truncated, again.valid) == (2, True, False)
    assert (again.prompt_input_column, again.prompt_output_column) == ("question", "answer")


def test_report_from_empty_json_is_an_empty_valid_report():
    assert ValidationReport.from_json({}) == ValidationReport()
    assert ValidationReport.from_json({}).valid


# --- bugs found by the corpus, fixed ---------------------------------------------------------------------


@pytest.mark.parametrize("declared_format", ["", "columns"])
def test_a_mapping_with_only_the_input_column_guesses_the_output_as_the_trainer_does(declared_format):
    report = validate_jsonl(jsonl(QA_ROW, QA_ROW), declared_format=declared_format, prompt_input_column="question")

    assert report.valid and report.prompt_output_column == "answer"


@pytest.mark.parametrize("declared_format", ["", "columns"])
def test_a_mapping_with_only_the_input_column_and_no_known_output_names_the_missing_output(declared_format):
    rows = jsonl({"question": "2+2?", "reply": "4"})
    report = validate_jsonl(rows, declared_format=declared_format, prompt_input_column="question")

    assert problems(report) == [(0, "prompt_output_column", "is required for the columns format")]


def test_nan_and_infinity_are_not_accepted_as_json():
    report = validate_jsonl(
        jsonl(PA_ROW, '{"prompt": "0/0?", "answer": NaN}', '{"prompt": "1/0?", "answer": Infinity}')
    )

    assert [(p.line, p.field) for p in report.problems] == [(2, ""), (3, "")]
    assert all(p.message.startswith("not valid JSON") for p in report.problems)


def test_alpaca_rows_with_a_response_column_use_the_instruction_as_prompt_like_the_trainer():
    rows = [
        {"instruction": "Write a haiku about rain.", "input": "", "response": "Soft rain on the roof"},
        {"instruction": "Translate.", "input": "Good night", "response": "Bonne nuit"},
    ]
    report = validate_jsonl(jsonl(*rows))

    assert (report.prompt_input_column, report.prompt_output_column) == ("instruction", "response")
    assert report.valid


def test_a_utf16_file_gets_no_problem_past_its_last_line():
    data = (json.dumps(TEXT_ROW) + "\n" + json.dumps(TEXT_ROW) + "\n").encode("utf-16")
    report = validate_jsonl(data.splitlines(keepends=True))

    assert report.problems and max(p.line for p in report.problems) <= 2


# --- bounded reading and hostile input ------------------------------------------------------------------


def test_read_lines_gives_every_line_across_block_boundaries():
    import io

    from tuneforge_catalog.datasets import read_lines

    data = b"a\nbb\n\nccc\r\nlast-without-newline"
    assert list(read_lines(io.BytesIO(data), max_bytes=100, block_size=3)) == data.splitlines(keepends=True)


def test_read_lines_skips_an_overlong_line_keeping_its_size_not_its_bytes():
    import io

    from tuneforge_catalog.datasets import OverlongLine, read_lines

    data = b'{"text": "ok"}\n' + b"x" * 10_000 + b"\n" + b'{"text": "after"}\n'
    lines = list(read_lines(io.BytesIO(data), max_bytes=100, block_size=64))
    assert lines[0] == b'{"text": "ok"}\n' and lines[2] == b'{"text": "after"}\n'
    assert isinstance(lines[1], OverlongLine) and lines[1].size == 10_001 and len(lines[1]) == 64


def test_an_overlong_line_is_reported_by_size_and_the_rest_is_still_checked():
    import io

    from tuneforge_catalog.datasets import max_line_bytes, read_lines

    data = b'{"text": "ok"}\n' + b"x" * 50_000 + b"\n" + b'{"text": ""}\n'
    report = validate_jsonl(read_lines(io.BytesIO(data), max_line_bytes(100)), max_line_chars=100)
    assert problems(report) == [
        (2, "", "line is 50001 bytes, over the limit of 100 characters"),
        (3, "text", "is empty"),
    ]


def test_deeply_nested_json_is_a_line_problem_not_a_crash():
    deep = '{"text": ' + "[" * 1500 + "]" * 1500 + "}"
    report = validate_jsonl(jsonl(TEXT_ROW, deep))
    assert problems(report) == [(2, "", "nested too deeply to read")]


def test_the_same_column_on_both_sides_of_the_mapping_is_refused():
    report = validate_jsonl(jsonl(QA_ROW), prompt_input_column="question", prompt_output_column="question")
    assert problems(report) == [(0, "prompt_output_column", "must differ from prompt_input_column ('question')")]
