"""Turn the JSON that `make reliability` writes into a Markdown report, and refresh docs/reliability.md's figures.

    python tools/reliability_report.py .tuneforge/reliability/report.json [more.json ...] --docs docs/reliability.md

Several JSON files (runs of parts of the suite) are merged into one report. Writes report.md beside the first;
with --docs, replaces the part of that page between the two markers below.
Exits 1 when the run had a failed test (after writing the report, so the failure's figures are still there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from doc_sections import replace_section  # tools/ is the script's directory

START = "<!-- reliability-figures:start -->"
END = "<!-- reliability-figures:end -->"

# Section titles by test module; a module not named here is titled by its file name.
TITLES = {
    "test_agent_kills": "Trainer agent killed with SIGKILL mid-run, repeatedly, over one job",
    "test_service_restarts": "Jobs service, catalog and gateway restarted mid-run",
    "test_nats_outage": "NATS stopped mid-run",
    "test_postgres_restart": "PostgreSQL stopped and started mid-run",
    "test_stuck_states": "Reaper for STARTING and CANCELLING jobs whose agent never confirmed",
    "test_checkpoint_store_faults": "Artifact store full or read-only while saving a checkpoint",
    "test_load": "Load: simulated agents and live watchers against one jobs service",
    "test_bad_input": "Malformed requests and files",
    "test_validator_fuzz": "Property-based fuzzing of the domain validators",
    "test_security": "Authentication and authorisation",
    "test_secrets_stay_secret": "Secrets in logs and events",
}


def module_of(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(report: dict[str, Any]) -> str:
    outcomes: dict[str, str] = report.get("outcomes", {})
    passed = sum(1 for o in outcomes.values() if o == "passed")
    failed = sorted(n for n, o in outcomes.items() if o == "failed")
    when = dt.datetime.fromtimestamp(report.get("started", 0), dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run of {when}, scale **{report.get('mode', '?')}**, {report.get('seconds', 0):,.0f} s in all: "
        f"{passed} tests passed, {len(failed)} failed.",
        "",
    ]
    if failed:
        lines += ["Failed:", *[f"- `{n}`" for n in failed], ""]
    by_module: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for figure in report.get("figures", []):
        by_module[module_of(figure["test"])].append(figure)
    order = [m for m in TITLES if m in by_module] + sorted(m for m in by_module if m not in TITLES)
    for module in order:
        rows = by_module[module]
        lines += [f"### {TITLES.get(module, module)}", "", f"`tests/reliability/{module}.py`", ""]
        lines += ["| test | figure | value | goal |", "| --- | --- | --- | --- |"]
        previous = ""
        for f in rows:
            test = f["test"].split("::", 1)[-1]
            test, previous = ("" if test == previous else test), test  # each test named once, on its first row
            value = fmt(f["value"]) + (f" {f['unit']}" if f.get("unit") else "")
            cells = (test, f["name"], value, f.get("goal", ""))
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of runs of parts of the suite: their figures and outcomes together, the first start, the
    seconds added up; the scale is "mixed" unless they agree. A test in a later run replaces its earlier run
    (outcome and figures): a test fixed and run again counts as it ran last. The run failed if a test's last
    outcome did, or a run ended badly otherwise (exit status above 1: interrupted, a collection error)."""
    modes = {run.get("mode", "?") for run in runs}
    outcomes: dict[str, str] = {}
    figures: list[dict[str, Any]] = []
    for run in runs:
        again = set(run.get("outcomes", {}))
        figures = [f for f in figures if f.get("test") not in again]
        figures += run.get("figures", [])
        outcomes.update(run.get("outcomes", {}))
    worst_other = max((s for run in runs if (s := run.get("exit_status", 0)) > 1), default=0)
    return {
        "mode": modes.pop() if len(modes) == 1 else "mixed",
        "started": min(run.get("started", 0) for run in runs),
        "seconds": sum(run.get("seconds", 0) for run in runs),
        "exit_status": worst_other or int("failed" in outcomes.values()),
        "outcomes": outcomes,
        "figures": figures,
    }


def refresh_docs(page: Path, body: str) -> None:
    replace_section(page, START, END, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="the JSON written by the reliability run(s)")
    parser.add_argument("--docs", type=Path, help="a page whose figures section to refresh")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.reports if not p.exists()]
    if missing:
        print(f"{', '.join(missing)}: no report (did the run start?)", file=sys.stderr)
        return 1
    report = merge([json.loads(p.read_text()) for p in args.reports])
    body = render(report)
    args.reports[0].with_suffix(".md").write_text(body)
    if args.docs:
        refresh_docs(args.docs, body)
    print(body)
    failed = [n for n, o in report.get("outcomes", {}).items() if o == "failed"]
    return 1 if failed or report.get("exit_status", 0) != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
