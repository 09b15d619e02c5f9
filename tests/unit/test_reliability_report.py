"""tools/reliability_report.py: the figures a reliability run recorded become the report and docs' table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import reliability_report  # noqa: E402

RUN = {
    "mode": "full",
    "started": 1796000000,
    "seconds": 754.2,
    "exit_status": 0,
    "outcomes": {"tests/reliability/test_load.py::test_load": "passed"},
    "figures": [
        {
            "test": "tests/reliability/test_load.py::test_load",
            "name": "p95 latency",
            "value": 0.21,
            "unit": "s",
            "goal": "< 1 s",
        },
        {"test": "tests/reliability/test_load.py::test_load", "name": "p50 latency", "value": 0.1, "unit": "s"},
        {
            "test": "tests/reliability/test_new.py::test_x",
            "name": "points | lost",
            "value": 12345,
            "unit": "",
            "goal": "",
        },
    ],
}


def write(tmp_path: Path, run: dict) -> Path:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(run))
    return path


def test_the_report_groups_figures_by_module_under_a_title_with_value_unit_and_goal(tmp_path):
    assert reliability_report.main([str(write(tmp_path, RUN))]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "scale **full**, 754 s in all: 1 tests passed, 0 failed" in text
    assert "### Load: simulated agents and live watchers against one jobs service" in text
    assert "| test_load | p95 latency | 0.21 s | < 1 s |" in text
    assert "|  | p50 latency | 0.1 s |  |" in text  # the test is named once, on its first row
    # A module the tool has no title for still shows, and a pipe in a name can't break the table.
    assert "### test_new" in text and "| test_x | points \\| lost | 12,345 |  |" in text


def test_the_docs_page_is_refreshed_between_its_markers_only(tmp_path):
    page = tmp_path / "reliability.md"
    page.write_text(
        f"# Reliability\n\nintro\n\n{reliability_report.START}\nold figures\n{reliability_report.END}\n\nafter\n"
    )
    reliability_report.main([str(write(tmp_path, RUN)), "--docs", str(page)])
    text = page.read_text()
    assert text.startswith("# Reliability\n\nintro\n\n") and text.endswith("\n\nafter\n")
    assert "old figures" not in text and "p95 latency" in text


def test_a_failed_test_fails_the_run_and_is_named_but_its_figures_are_kept(tmp_path):
    failed = {**RUN, "exit_status": 1, "outcomes": {"tests/reliability/test_load.py::test_load": "failed"}}
    assert reliability_report.main([str(write(tmp_path, failed))]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "0 tests passed, 1 failed" in text and "- `tests/reliability/test_load.py::test_load`" in text
    assert "p95 latency" in text


def test_a_page_without_markers_is_an_error_not_a_silent_skip(tmp_path):
    page = tmp_path / "reliability.md"
    page.write_text("# Reliability\n")
    with pytest.raises(SystemExit, match="markers"):
        reliability_report.main([str(write(tmp_path, RUN)), "--docs", str(page)])


def test_a_missing_report_fails(tmp_path):
    assert reliability_report.main([str(tmp_path / "absent.json")]) == 1


def test_runs_of_parts_of_the_suite_merge_into_one_report(tmp_path):
    first = write(tmp_path, RUN)
    second = tmp_path / "second.json"
    second.write_text(
        json.dumps(
            {
                **RUN,
                "mode": "fast",
                "started": 1795999000,
                "seconds": 10,
                "exit_status": 1,
                "outcomes": {"tests/reliability/test_new.py::test_x": "failed"},
            }
        )
    )
    assert reliability_report.main([str(first), str(second)]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "scale **mixed**, 764 s in all: 1 tests passed, 1 failed" in text
    assert text.count("p95 latency") == 2 and text.count("p50 latency") == 2


def test_a_test_run_again_in_a_later_run_replaces_its_earlier_outcome_and_figures(tmp_path):
    node = next(iter(RUN["outcomes"]))
    first = write(tmp_path, {**RUN, "exit_status": 1, "outcomes": {**RUN["outcomes"], node: "failed"}})
    again = tmp_path / "again.json"
    kept = [f for f in RUN["figures"] if f["test"] == node][:1]
    again.write_text(
        json.dumps({**RUN, "started": 1795999000, "exit_status": 0, "outcomes": {node: "passed"}, "figures": kept})
    )
    assert reliability_report.main([str(first), str(again)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "1 tests passed, 0 failed" in text
    assert text.count("p95 latency") == 1  # the later run's only
    assert "p50 latency" not in text  # the earlier run's figures of that test are gone
    assert "12,345" in text  # another test's figures stay
