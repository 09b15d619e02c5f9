"""The dataset corpus: each malformed file gets exactly the problems a user should read, each good file passes.

tests/data/datasets/bad/expected.json holds, per file, the validation options (a declared format, a column
mapping, a line limit) and the problems written down from the rules: line, field and message. An entry with
`known_bug` describes a validator bug: the expectation is what a user should see, and the test is a strict
xfail until datasets.py is fixed. Files are read as the catalog reads them: binary lines from a file handle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuneforge_catalog.datasets import FORMATS, ValidationReport, validate_jsonl

CORPUS = Path(__file__).resolve().parents[1] / "data" / "datasets"
BAD = json.loads((CORPUS / "bad" / "expected.json").read_text(encoding="utf-8"))
GOOD = json.loads((CORPUS / "good" / "expected.json").read_text(encoding="utf-8"))
MIN_BAD_FILES = 30


def validate_file(path: Path, **options: Any) -> ValidationReport:
    with path.open("rb") as fh:
        return validate_jsonl(fh, **options)


def bad_case(name: str) -> Any:
    known_bug = BAD[name].get("known_bug")
    marks = [pytest.mark.xfail(strict=True, reason=known_bug)] if known_bug else []
    return pytest.param(name, id=name, marks=marks)


def test_corpus_has_enough_bad_files_and_every_file_has_an_expectation():
    on_disk = {p.name for p in (CORPUS / "bad").glob("*.jsonl")}
    assert len(on_disk) >= MIN_BAD_FILES
    assert on_disk == set(BAD)
    assert {p.name for p in (CORPUS / "good").glob("*.jsonl")} == set(GOOD)


def test_corpus_files_are_small():
    too_big = [p.name for p in CORPUS.glob("*/*.jsonl") if p.stat().st_size >= 4096]
    assert too_big == []


def test_good_corpus_has_one_file_per_format():
    assert sorted(entry["format"] for entry in GOOD.values()) == sorted(FORMATS)


@pytest.mark.parametrize("name", [bad_case(name) for name in sorted(BAD)])
def test_bad_file_reports_exactly_its_expected_problems(name: str):
    expected = BAD[name]
    report = validate_file(CORPUS / "bad" / name, **expected.get("options", {}))

    assert report.to_json()["problems"] == expected["problems"]
    assert report.problem_count == expected["problem_count"]
    assert not report.valid
    assert report.truncated == (expected["problem_count"] > len(expected["problems"]))


def test_many_problems_file_lists_the_first_100_and_counts_all_150():
    report = validate_file(CORPUS / "bad" / "many_problems_150_empty_texts.jsonl")

    assert (len(report.problems), report.problem_count, report.truncated) == (100, 150, True)
    assert report.problems[-1].line == 101


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_file_is_valid_with_its_format_row_count_and_columns(name: str):
    expected = GOOD[name]
    report = validate_file(CORPUS / "good" / name)

    assert report.problems == []
    assert report.valid
    assert (report.format, report.row_count, report.columns) == (
        expected["format"],
        expected["row_count"],
        expected["columns"],
    )
    assert (report.prompt_input_column, report.prompt_output_column) == (
        expected.get("prompt_input_column", ""),
        expected.get("prompt_output_column", ""),
    )
