"""Platform overhead with the tiny model: submit -> first training step, and last step -> SUCCEEDED with the
adapter stored, side by side with the same training run by hand.

Three ways, in one run on one machine:

- platform, warm runners: the embedded stack (catalog, jobs, gateway and a trainer agent as processes, SQLite,
  NATS), whose agent forks each runner from its preloaded server (TUNEFORGE_AGENT_WARM_RUNNERS, the default);
- platform, cold runners: the same stack with the agent restarted with warm runners off, so each runner is a
  fresh `python -m tuneforge_trainer.methods.sft_lora`;
- by hand: that same command run directly, timed from its start to its first step and from its last step to
  its exit (it stores nothing: the platform's figure includes storing the adapter, the script's does not).

The first step is the moment the runner printed it (the metric point's time, stamped by the agent as the line
arrives); SUCCEEDED is the event's time in the job's history. Both are wall-clock times of this machine.

    python bench/bench_platform_overhead.py [--runs 3] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _support import Figure, add_figures_argument, write_figures  # bench/ is the script's directory

from tuneforge_cli.embedded import EmbeddedStack
from tuneforge_trainer.sdk import parse_log_data

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "datasets" / "sample-chat.jsonl"
GOAL_S = 5.0


def parameters(steps: int) -> dict[str, Any]:
    # The platform's defaults for sft-lora, but a short run: overhead is what is measured, not training.
    return {"max_steps": steps, "logging_steps": 1, "save_steps": 0, "batch_size": 2, "max_seq_length": 64}


def _seconds(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def platform_job(http: httpx.Client, dataset_id: str, steps: int) -> tuple[float, float, float]:
    """(submit -> first step, last step -> SUCCEEDED, submit -> SUCCEEDED) of one job, in seconds."""
    submitted = time.time()
    resp = http.post(
        "/api/v1/jobs",
        json={
            "model_id": "tiny-chat",
            "dataset_id": dataset_id,
            "method_id": "sft-lora",
            "parameters": parameters(steps),
        },
    )
    resp.raise_for_status()
    job_id = resp.json()["id"]
    deadline = time.monotonic() + 600
    while (state := http.get(f"/api/v1/jobs/{job_id}").json()["state"]) not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state}")
        time.sleep(0.05)
    if state != "SUCCEEDED":
        raise RuntimeError(f"job {job_id} ended {state}: {http.get(f'/api/v1/jobs/{job_id}').json()}")
    points = http.get(f"/api/v1/jobs/{job_id}/metrics", params={"name": "loss"}).json()["points"]
    first, last = _seconds(points[0]["time"]), _seconds(points[-1]["time"])
    events = http.get(f"/api/v1/jobs/{job_id}/history").json()["events"]
    succeeded = next(_seconds(e["time"]) for e in events if e["to_state"] == "SUCCEEDED")
    return first - submitted, succeeded - last, succeeded - submitted


def by_hand(model_dir: Path, steps: int, workdir: Path) -> tuple[float, float, float]:
    """(start -> first step, last step -> exit, start -> exit) of the same training run as a plain command."""
    flags = [f"--{k}={v}" for k, v in parameters(steps).items()]
    out = workdir / f"out-{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        "-m",
        "tuneforge_trainer.methods.sft_lora",
        *flags,
        f"--model_path={model_dir}",
        f"--dataset_path={SAMPLE}",
        f"--output_dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    first = last = 0.0
    assert proc.stdout is not None
    for line in proc.stdout:
        parsed = parse_log_data(line.strip())
        details = parsed.get("details") if parsed is not None else None
        if isinstance(details, dict) and "loss" in details:
            last = time.time()
            first = first or last
    code = proc.wait()
    ended = time.time()
    if code != 0 or not first:
        raise RuntimeError(f"the training command exited {code} (first step seen: {bool(first)})")
    return first - started, ended - last, ended - started


def wait_warm(stack: EmbeddedStack, timeout: float = 300) -> None:
    log = stack.data_dir / "logs" / "trainer.log"
    deadline = time.monotonic() + timeout
    while "warm runners ready" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError("the agent's warm runners never said ready")
        time.sleep(0.2)


def restart_agent(stack: EmbeddedStack, warm: bool) -> None:
    stack.stop_one("trainer")
    args, env = stack.commands["trainer"]
    stack.commands["trainer"] = (args, {**env, "TUNEFORGE_AGENT_WARM_RUNNERS": "true" if warm else "false"})
    stack.start_one("trainer", timeout=120)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="jobs (and commands) per way")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    add_figures_argument(parser)
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float, float]]] = {"warm": [], "cold": [], "by hand": []}
    with tempfile.TemporaryDirectory(prefix="tf-bench-overhead-") as tmp:
        stack = EmbeddedStack(data_dir=Path(tmp) / "stack", gateway_port=0)
        stack.start(progress=lambda msg: print(f"  {msg}", file=sys.stderr))
        try:
            http = httpx.Client(
                base_url=stack.gateway_url, timeout=30, headers={"Authorization": f"Bearer {stack.admin_key}"}
            )
            with SAMPLE.open("rb") as fh:
                resp = http.post("/api/v1/datasets", files={"file": ("sample-chat.jsonl", fh)}, data={"name": "s"})
            resp.raise_for_status()
            dataset_id = resp.json()["id"]
            for way in ("warm", "cold"):
                restart_agent(stack, warm=way == "warm")
                if way == "warm":
                    wait_warm(stack)  # a node's agent is up long before a job comes
                for run in range(args.runs):
                    results[way].append(platform_job(http, dataset_id, args.steps))
                    print(f"  platform, {way} runners, job {run + 1}: {results[way][-1]}", file=sys.stderr)
            for run in range(args.runs):
                results["by hand"].append(by_hand(stack.model_dir, args.steps, Path(tmp)))
                print(f"  by hand, run {run + 1}: {results['by hand'][-1]}", file=sys.stderr)
        finally:
            stack.stop(grace=10)

    rows = []
    for way, label in (("warm", "platform, warm runners"), ("cold", "platform, cold runners"), ("by hand", "by hand")):
        first, tail, total = (median([r[i] for r in results[way]]) for i in range(3))
        rows.append({"way": label, "to_first_step_s": first, "last_step_to_end_s": tail, "total_s": total})
    hand = rows[2]
    print(f"platform overhead, tiny model, sft-lora {args.steps} steps, median of {args.runs} runs each")
    print(f"{'':26} {'to first step':>14} {'last step to end':>17} {'total':>8}")
    for row in rows:
        print(
            f"{row['way']:26} {row['to_first_step_s']:13.2f}s {row['last_step_to_end_s']:16.2f}s {row['total_s']:7.2f}s"
        )
    warm = rows[0]
    print(
        f"warm platform vs by hand: first step {hand['to_first_step_s'] / warm['to_first_step_s']:.2f}x sooner, "
        f"total {hand['total_s'] / warm['total_s']:.2f}x"
    )
    verdict = "met" if warm["to_first_step_s"] <= GOAL_S and warm["last_step_to_end_s"] <= GOAL_S else "MISSED"
    print(f"goal <= {GOAL_S:g} s each (warm platform): {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "runs": args.runs, "rows": rows}, indent=2))
    cold = rows[1]
    settings = f"tiny model, sft-lora {args.steps} steps, median of {args.runs}"
    write_figures(
        args.figures,
        [
            Figure(
                "bench_platform_overhead",
                "submit -> first training step (warm runners)",
                warm["to_first_step_s"],
                "s",
                baseline=f"cold runners {cold['to_first_step_s']:.2f} s; by hand, start -> first step "
                f"{hand['to_first_step_s']:.2f} s",
                goal=f"<= {GOAL_S:g} s",
                met=warm["to_first_step_s"] <= GOAL_S,
                note=settings,
            ),
            Figure(
                "bench_platform_overhead",
                "last step -> SUCCEEDED, adapter stored (warm runners)",
                warm["last_step_to_end_s"],
                "s",
                baseline=f"by hand, last step -> exit {hand['last_step_to_end_s']:.2f} s (stores nothing)",
                goal=f"<= {GOAL_S:g} s",
                met=warm["last_step_to_end_s"] <= GOAL_S,
            ),
            Figure(
                "bench_platform_overhead",
                "whole job: by hand / platform (warm)",
                hand["total_s"] / warm["total_s"],
                "x",
                baseline=f"by hand {hand['total_s']:.2f} s, platform {warm['total_s']:.2f} s (submit -> SUCCEEDED)",
                goal="> 1.0x (the platform job finishes sooner)",
                met=hand["total_s"] > warm["total_s"],
            ),
        ],
    )


if __name__ == "__main__":
    main()
