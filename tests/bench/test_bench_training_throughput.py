"""Smoke test of bench/bench_training_throughput.py: `--quick` runs, prints its tables and writes the JSON.

Shape only: no timing is asserted (the quick size measures nothing). The token counts are, since every run's
numerator must be the same count: the packed runs train the same tokens, and so do the padded ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_training_throughput.py"
RUNS = {"platform", "bare-same", "bare-defaults", "platform-padded"}


def test_quick_run_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "result.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
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
