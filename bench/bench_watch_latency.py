"""Report -> watcher latency: a metric point from an agent's report to a dashboard's SSE stream, side by side with
the same point to a gRPC WatchJob on the jobs service directly (the baseline: the gateway's own upstream).

Runs tests/reliability/load.py at a moderate size: real catalog, jobs and gateway processes on a fresh PostgreSQL
database (and the given NATS), `--agents` simulated trainer agents each reporting `--rate` metric reports a second
through the trainer's Reporter, and `--watchers` watchers, half on the gateway's `GET /api/v1/jobs/{id}/events`
(SSE), half on the jobs service's `WatchJob`, opened before the first report. The latency of a point is when a
watcher read it minus when its agent queued it, on one monotonic clock; the figures are p50 and p95 of the points
sent after `--warmup-s` (agents joining and every stream's first catch-up left out). Every watcher must get every
step once and in order, else the run fails.

    python bench/bench_watch_latency.py [--agents 10] [--rate 10] [--watchers 20] [--seconds 45]
    python bench/bench_watch_latency.py --agents 50 --watchers 100 --seconds 600    # the issue's full size
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from _support import Figure, add_figures_argument, write_figures  # bench/ is the script's directory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.reliability.load

from tests.reliability.load import NAMES, NATS_URL, LoadConfig, LoadResult, run_load  # noqa: E402

BENCH = "bench_watch_latency"
P95_GOAL_S = 1.0  # the goal, as tests/reliability/test_load.py holds it


def figures(result: LoadResult, config: LoadConfig) -> list[Figure]:
    sse, grpc_ = result.steady_latency_s["sse"], result.steady_latency_s["grpc"]
    settings = (
        f"{config.agents} agents x {config.rate:g} reports/s of {len(config.names)} values, "
        f"{config.sse_watchers} SSE + {config.grpc_watchers} gRPC watchers, {config.seconds:g} s, "
        f"points after the {config.warmup_s:g} s warm-up"
    )
    out = [
        Figure(
            BENCH,
            f"report -> SSE watcher latency {q}",
            sse[q] * 1000,
            "ms",
            baseline=f"gRPC WatchJob on the jobs service {q} {grpc_[q] * 1000:.0f} ms",
            goal=f"< {P95_GOAL_S * 1000:.0f} ms" if q == "p95" else "",
            met=sse[q] < P95_GOAL_S if q == "p95" else None,
            note=settings if q == "p50" else "",
        )
        for q in ("p50", "p95")
    ]
    out.append(
        Figure(
            BENCH,
            "report -> gRPC WatchJob latency p95",
            grpc_["p95"] * 1000,
            "ms",
            baseline=f"gRPC p50 {grpc_['p50'] * 1000:.0f} ms",
            goal=f"< {P95_GOAL_S * 1000:.0f} ms",
            met=grpc_["p95"] < P95_GOAL_S,
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--rate", type=float, default=10.0, help="metric reports per second per agent")
    parser.add_argument("--watchers", type=int, default=20, help="half SSE, half gRPC")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long each agent reports")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="points sent before this are left out")
    parser.add_argument("--names", default=",".join(NAMES), help="metric names in each report, comma-separated")
    parser.add_argument("--nats-url", default=NATS_URL)
    add_figures_argument(parser)
    args = parser.parse_args()
    config = LoadConfig(
        agents=args.agents,
        rate=args.rate,
        sse_watchers=args.watchers // 2,
        grpc_watchers=args.watchers - args.watchers // 2,
        seconds=args.seconds,
        names=tuple(n for n in args.names.split(",") if n),
        warmup_s=args.warmup_s,
    )
    result = asyncio.run(run_load(config, args.nats_url))
    print(result.summary())
    if result.errors or not result.steady_latency_s.get("sse") or not result.steady_latency_s.get("grpc"):
        sys.exit(f"the load run failed ({result.errors} errors) or measured no point after the warm-up")
    found = figures(result, config)
    for f in found:
        print(f"{f.figure}: {f.value:.0f} {f.unit} (baseline: {f.baseline}; goal {f.goal or '-'})")
    write_figures(args.figures, found)


if __name__ == "__main__":
    main()
