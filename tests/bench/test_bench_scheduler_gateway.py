"""Smoke tests of bench/bench_scheduler.py and bench/bench_gateway.py: tiny sizes run on the real PostgreSQL,
print their tables and write their figures. Shape only: no timing is asserted (tiny sizes measure nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import PG_ADMIN_URL, require

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, figures: Path, *args: str) -> str:
    require(PG_ADMIN_URL, 5432, "PostgreSQL")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--pg-url", PG_ADMIN_URL, "--figures", str(figures), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_scheduler_bench_assigns_every_job_and_writes_its_figures(tmp_path):
    figures = tmp_path / "figures.json"
    out = run_bench(
        "bench_scheduler.py", figures, "--jobs", "20", "--agents", "5", "--baseline-jobs", "3", "--run-ms", "20"
    )
    assert "| 20 jobs, 5 agents | 20 |" in out and "| baseline: 3 jobs, 1 agent(s) | 3 |" in out
    written = {f["figure"]: f for f in json.loads(figures.read_text())}
    decision = written["scheduling decision p95 (20 queued, 5 agents)"]
    assert decision["unit"] == "ms" and decision["value"] > 0 and isinstance(decision["met"], bool)
    assert written["priority inversions"]["goal"] == "0"


def test_gateway_bench_measures_both_paths_and_writes_its_figures(tmp_path):
    figures = tmp_path / "figures.json"
    out = run_bench(
        "bench_gateway.py", figures, "--jobs", "10", "--concurrency", "4", "--seconds", "0.5", "--warmup", "0.2"
    )
    for row in ("| gateway GET /api/v1/jobs/{id} |", "| baseline gRPC GetJob |", "| baseline gRPC ListJobs"):
        assert row in out
    written = json.loads(figures.read_text())
    assert [f["unit"] for f in written] == ["requests/s", "ms", "requests/s", "ms"]
    assert all(f["value"] > 0 and f["bench"] == "bench_gateway" for f in written)
