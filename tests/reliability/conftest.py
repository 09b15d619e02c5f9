"""The reliability and security suite (issue 11).

Every test here runs in CI at a small scale ("fast"); `make reliability` runs the same tests at full scale
(TUNEFORGE_RELIABILITY=full: 10 agent kills, a 30 s NATS outage, 10 minutes of load, ...) and writes the
figures they record to a JSON report that tools/reliability_report.py turns into docs/reliability.md's table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

FULL = os.environ.get("TUNEFORGE_RELIABILITY") == "full"
REPORT_PATH = os.environ.get("TUNEFORGE_RELIABILITY_REPORT", "")


def scale(fast: Any, full: Any) -> Any:
    """The CI size of a fault or a load, or its full size under `make reliability`."""
    return full if FULL else fast


@dataclass
class Figure:
    test: str
    name: str
    value: float | int | str
    unit: str = ""
    goal: str = ""


@dataclass
class Recorded:
    figures: list[Figure] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


_RECORDED = Recorded()


class Figures:
    """What a test measured, for the report: `figures.record("p95 latency", 0.21, "s", goal="< 1 s")`."""

    def __init__(self, test: str) -> None:
        self.test = test

    def record(self, name: str, value: float | int | str, unit: str = "", goal: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 4)
        _RECORDED.figures.append(Figure(self.test, name, value, unit, goal))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        _RECORDED.outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REPORT_PATH:
        return
    path = Path(REPORT_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "mode": "full" if FULL else "fast",
                "started": _RECORDED.started,
                "seconds": round(time.time() - _RECORDED.started, 1),
                "exit_status": int(exitstatus),
                "outcomes": _RECORDED.outcomes,
                "figures": [asdict(f) for f in _RECORDED.figures],
            },
            indent=2,
        )
    )
