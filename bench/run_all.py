"""Run every benchmark (make bench), one after another so none measures the others' load, and gather their
figures into one table: .tuneforge/bench/results.{json,md}, and docs/performance.md between its markers.

Each benchmark is a script under bench/ that takes --figures PATH and writes its figures there (_support.Figure);
its own output (the detailed tables) goes to .tuneforge/bench/<script>.log. A benchmark that fails or runs past
its time limit is listed as such and the others still run; the command exits 1 then, after writing the table.

    python bench/run_all.py [--only bench_scheduler,...] [--docs docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tools"))
from doc_sections import replace_section  # noqa: E402  (tools/ holds the repository's own scripts)

OUT = REPO / ".tuneforge" / "bench"
START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"
PG_URL = os.environ.get("TUNEFORGE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# (script, its arguments for `make bench`, time limit in seconds). The sizes keep the whole run under 15 minutes
# on a 2-core machine; each script's --help gives the full-size options.
BENCHES: list[tuple[str, list[str], int]] = [
    ("bench_training_throughput", [], 480),
    ("bench_platform_overhead", ["--runs", "3", "--steps", "5"], 300),
    ("bench_metric_ingest", ["--agents", "10", "--steps", "4000", "--names", "7"], 180),
    ("bench_watch_latency", ["--agents", "10", "--rate", "10", "--watchers", "20", "--seconds", "45"], 180),
    ("bench_scheduler", ["--pg-url", PG_URL], 180),
    ("bench_gateway", ["--pg-url", PG_URL], 180),
    (
        "bench_metric_query",
        ["--steps", "200000", "--names", "5", "--max-points", "1500", "--reps", "20", "--baseline-reps", "3"],
        240,
    ),
]


def machine() -> str:
    cpus = os.cpu_count() or 0
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 0.0
    gpu = "no GPU"
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        gpu = names.replace("\n", ", ") or gpu
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{platform.machine()}, {cpus} CPUs, {mem_gib:.0f} GiB, {gpu}, Python {platform.python_version()}"


def run_one(script: str, args: list[str], limit: int) -> tuple[list[dict[str, Any]], str, float]:
    """The figures one benchmark wrote, its outcome ("ok", "failed (exit N)", "timed out") and its wall time."""
    figures_path = OUT / f"{script}.json"
    figures_path.unlink(missing_ok=True)
    log_path = OUT / f"{script}.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / f"{script}.py"), *args, "--figures", str(figures_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            code = proc.wait(limit)
            outcome = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            # SIGTERM first: the benchmarks then drop their databases and stop the processes they started.
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            outcome = f"timed out after {limit} s"
    wall = time.monotonic() - started
    figures = json.loads(figures_path.read_text()) if figures_path.exists() else []
    return figures, outcome, wall


def _value(figure: dict[str, Any]) -> str:
    value, unit = figure["value"], figure["unit"]
    if isinstance(value, float) and math.isnan(value):
        return "not measured here"
    if unit == "x":
        return f"{value:.2f}x"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.2f} {unit}"
    return f"{value:,.0f} {unit}"


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Run of {results['when']} on {results['machine']}: {results['total_s']:.0f} s in all.",
        "",
        "| benchmark | figure | value | baseline (side by side) | goal | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for bench in results["benches"]:
        if bench["outcome"] != "ok":
            lines.append(
                f"| {bench['script']} | **{bench['outcome']}** (see .tuneforge/bench/{bench['script']}.log) | | | | |"
            )
        for f in bench["figures"]:
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            lines.append(f"| {bench['script']} | {f['figure']} | {_value(f)} | {f['baseline']} | {f['goal']} | {met} |")
    notes = [f for b in results["benches"] for f in b["figures"] if f.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {f['figure']}: {f['note']}" for f in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scripts to run (default: all)")
    parser.add_argument("--docs", type=Path, help="refresh this page's results section (docs/performance.md)")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    OUT.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "benches": [],
    }
    for script, script_args, limit in BENCHES:
        if only and script not in only:
            continue
        print(f"{script} ...", flush=True)
        figures, outcome, wall = run_one(script, script_args, limit)
        results["benches"].append({"script": script, "outcome": outcome, "wall_s": wall, "figures": figures})
        print(f"{script}: {outcome} in {wall:.0f} s, {len(figures)} figures", flush=True)
    results["total_s"] = time.monotonic() - began
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (OUT / "results.md").write_text(text)
    print()
    print(text)
    if args.docs:
        replace_section(args.docs, START, END, text)
    if any(b["outcome"] != "ok" for b in results["benches"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
