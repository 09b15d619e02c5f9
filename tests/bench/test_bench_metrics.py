"""Smoke tests of the metric benchmarks (bench_metric_ingest, bench_metric_query, bench_watch_latency): each runs
at a tiny size on the machine's PostgreSQL (and NATS), exits 0 and writes its figures in _support.Figure's shape.

Shape only: the tiny sizes measure nothing, so no value is held to its goal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NATS_URL, PG_ADMIN_URL

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"bench", "figure", "value", "unit", "baseline", "goal", "met", "note"}


def run_bench(script: str, args: list[str], figures: Path, timeout: float = 120) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{script}.py"), *args, "--figures", str(figures)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    found = json.loads(figures.read_text())
    assert found, "no figures written"
    for figure in found:
        assert figure.keys() == FIELDS and figure["bench"] == script
        assert isinstance(figure["value"], float | int) and figure["value"] > 0
        assert figure["baseline"], f"{figure['figure']}: no side-by-side baseline named"
    return found


@pytest.mark.timeout(60)
def test_metric_ingest_writes_its_rate_against_bulk_insert(tmp_path):
    found = run_bench(
        "bench_metric_ingest",
        ["--agents", "2", "--steps", "200", "--names", "3", "--pg-url", PG_ADMIN_URL],
        tmp_path / "f.json",
    )
    rate = next(f for f in found if f["unit"] == "points/s")
    assert rate["goal"] == ">= 50,000 points/s" and isinstance(rate["met"], bool)
    assert "bulk INSERT" in rate["baseline"]


@pytest.mark.timeout(60)
def test_metric_query_writes_the_chart_p95_against_raw_rows(tmp_path):
    args = ["--steps", "3000", "--names", "2", "--reps", "3", "--baseline-reps", "1", "--pg-url", PG_ADMIN_URL]
    found = run_bench("bench_metric_query", args, tmp_path / "f.json")
    assert len(found) == 2
    for figure in found:
        assert figure["unit"] == "ms" and figure["goal"] == "< 200 ms" and isinstance(figure["met"], bool)
        assert "max_points=1500" in figure["figure"]


@pytest.mark.timeout(90)
def test_watch_latency_writes_sse_and_grpc_percentiles(tmp_path):
    args = ["--agents", "2", "--rate", "10", "--watchers", "2", "--seconds", "3", "--warmup-s", "0"]
    found = run_bench("bench_watch_latency", [*args, "--nats-url", NATS_URL], tmp_path / "f.json", timeout=80)
    assert [f["figure"] for f in found] == [
        "report -> SSE watcher latency p50",
        "report -> SSE watcher latency p95",
        "report -> gRPC WatchJob latency p95",
    ]
    assert all(f["unit"] == "ms" for f in found)
    assert found[1]["goal"] == "< 1000 ms" and isinstance(found[1]["met"], bool)
