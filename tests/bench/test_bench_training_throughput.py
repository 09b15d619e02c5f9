"""Smoke test of bench/bench_training_throughput.py: `--quick` runs, prints its tables, writes the JSON and the
figures file that bench/run_all.py gathers.

Shape only: no timing is asserted (the quick size measures nothing). The token counts are, since every run's
numerator must be the same count: the packed runs train the same tokens, and so do the padded ones.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_training_throughput.py"
RUNS = {"platform", "bare-same", "bare-defaults", "platform-padded"}


def test_quick_run_prints_table_and_writes_json_and_figures(tmp_path):
    out, figures_path = tmp_path / "result.json", tmp_path / "figures.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--figures", str(figures_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    lines = result.stdout.splitlines()
    header = "| scenario | baseline | baseline tok/s | platform tok/s | ratio | goal | met |"
    assert header in lines
    rows = lines[lines.index(header) + 2 : lines.index(header) + 5]
    assert [r.split(" | ")[0] for r in rows] == ["| 1. same settings: platform sft-lora vs bare TRL script",
                                                 "| 2. defaults: platform vs TRL SFTConfig defaults",
                                                 "| 3. packing vs padding (platform runner)"]  # fmt: skip
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7 and cells[4].endswith("x") and cells[5].startswith(">= ")
        assert cells[6] in ("met", "missed")

    report = json.loads(out.read_text())
    assert {"model", "dataset", "settings", "runs", "scenarios"} <= report.keys()
    assert report["settings"]["quick"] is True
    runs = {r["name"]: r for r in report["runs"]}
    assert runs.keys() == RUNS
    assert all(r["tokens"] > 0 and r["train_runtime"] > 0 and r["tokens_per_s"] > 0 for r in runs.values())
    # The same numerator on both sides: Trainer's non-padding count over the same data and batches.
    assert runs["platform"]["tokens"] == runs["bare-same"]["tokens"]
    assert runs["platform-padded"]["tokens"] == runs["bare-defaults"]["tokens"]
    scenarios = report["scenarios"]
    assert [(s["baseline"], s["platform"], s["goal"]) for s in scenarios] == [
        ("bare-same", "platform", 1.0),
        ("bare-defaults", "platform", 1.3),
        ("platform-padded", "platform", 1.4),
    ]
    for s in scenarios:
        assert s["baseline_tokens_per_s"] > 0 and s["platform_tokens_per_s"] > 0
        assert abs(s["ratio"] - s["platform_tokens_per_s"] / s["baseline_tokens_per_s"]) < 0.01
        assert isinstance(s["met"], bool)
    assert all(r["peak_rss_mib"] > 0 for r in runs.values())
    assert report["memory"]["baseline"] == "bare-same" and isinstance(report["memory"]["met"], bool)

    figures = json.loads(figures_path.read_text())
    assert [f["unit"] for f in figures] == ["x"] * 6
    assert all(f["bench"] == "bench_training_throughput" and f["baseline"] for f in figures)
    measured, unmeasured = figures[:4], figures[4:]
    assert [f["goal"] for f in measured] == [">= 1.0x", ">= 1.3x", ">= 1.4x", "<= 1.1x"]
    for figure, scenario in zip(measured, scenarios + [report["memory"]], strict=True):
        assert figure["value"] == scenario["ratio"] and figure["met"] == scenario["met"]
    # Liger and QLoRA need a CUDA GPU: no value, no verdict, and the reason in the note.
    for figure in unmeasured:
        assert math.isnan(figure["value"]) and figure["met"] is None
        assert "not measurable here" in figure["note"] and "CUDA" in figure["note"]
