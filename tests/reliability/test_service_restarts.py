"""Restarting the jobs service, then the catalog, then the gateway while a real job trains (issue 11).

Real processes on PostgreSQL and a private NATS: the job must go on untouched (one attempt), the trainer agent and
the SSE watcher reconnect by themselves, and nothing reported in between is lost or repeated: the stored metric
series, the watcher's stream and the log each have every step or line exactly once.
"""

from __future__ import annotations

import re
import time

from tests.reliability.conftest import scale
from tests.reliability.prodstack import GrpcWatcher, Pacer, SseWatcher, prod_stack, wait_until

# Three restarts take 10-25 s on an idle machine and up to about 75 s on a loaded CI one, where the tiny model
# trains about 1 step/s; on an idle one it trains 10-80 steps/s, so the job is paced (prodstack.Pacer) to last
# at least MAX_STEPS / STEPS_PER_S seconds wherever it runs.
MAX_STEPS = scale(200, 1000)
STEPS_PER_S = scale(3, 5)
# The pacer reads the step off the runner's checkpoints, which go on while the services are down.
SAVE_STEPS = 5
# New metric points the watcher must see after each restart: the job visibly runs on.
POINTS_BETWEEN = scale(3, 10)


def test_jobs_catalog_and_gateway_restarts_lose_and_repeat_nothing_of_a_running_job(
    tmp_path, postgres_url, second_postgres_url, figures
):
    started = time.monotonic()
    with prod_stack(tmp_path / "stack", postgres_url, second_postgres_url) as stack:
        dataset = stack.upload_sample_dataset()
        job = stack.submit_tiny_job(dataset, MAX_STEPS, SAVE_STEPS)
        watcher = SseWatcher(job_id=job["id"], url=stack.url, key=stack.key).start()
        grpc_watcher = GrpcWatcher(
            job_id=job["id"], address=f"127.0.0.1:{stack.embedded.ports['jobs']}", key=stack.key
        ).start()
        try:

            def steps() -> int:
                return max(len(watcher.steps()), stack.trained_steps(job["id"]))

            with Pacer(stack.embedded.procs["trainer"], steps, STEPS_PER_S) as pacer:
                wait_until(lambda: len(watcher.steps()) >= POINTS_BETWEEN, "the first metric points", 180)
                back_to_point: dict[str, float] = {}
                for service in ("jobs", "catalog", "gateway"):
                    back = stack.restart(service)
                    # Points produced after the service is back, not ones still in flight while it was stopping.
                    wait_until(
                        lambda: watcher.points_after(back) >= POINTS_BETWEEN,  # noqa: B023 (used in this iteration)
                        f"new metric points after the {service} restart",
                        120,
                    )
                    back_to_point[service] = watcher.first_metric_after(back) - back
                assert watcher.done.wait(300), f"the watcher never saw the job end: {stack.job(job['id'])}"
                assert grpc_watcher.done.wait(30), grpc_watcher.errors
        finally:
            watcher.stop()
            grpc_watcher.stop()
        final = stack.job(job["id"])
        stored = stack.metric_steps(job["id"])
        log_seqs = stack.log_seqs(job["id"])
        agent_log = stack.log("trainer")
        history = [e["to_state"] for e in stack.history(job["id"])]

    expected = list(range(1, MAX_STEPS + 1))
    delays = [float(d) for d in re.findall(r"connection to jobs service lost .*; reconnecting in ([\d.]+)s", agent_log)]
    # Figures first, so a failing run still reports what it measured.
    lost = len(set(expected) - set(watcher.steps()))
    duplicates = len(watcher.steps()) - len(set(watcher.steps()))
    for service, seconds in back_to_point.items():
        figures.record(f"{service} restart: back up to next metric point at the watcher", seconds, "s")
    figures.record("metric points lost (stored and watched)", lost + len(set(expected) - set(stored)), goal="0")
    figures.record(
        "metric points duplicated (stored and watched)", duplicates + len(stored) - len(set(stored)), goal="0"
    )
    for service, (seconds, _) in stack.stops.items():
        figures.record(f"{service} stop on SIGTERM", seconds, "s", goal="< 15 s (no SIGKILL)")
    figures.record("SSE reconnects", watcher.connects - 1)
    figures.record("gRPC WatchJob reconnects", grpc_watcher.connects - 1)
    figures.record("agent reconnect delays", ", ".join(f"{d:.1f}" for d in delays), "s")
    figures.record("training held by the pacer", pacer.stopped_s, "s")
    figures.record("test runtime", time.monotonic() - started, "s")

    # The job went on: never requeued, the agent kept its lease through the jobs service's restart.
    assert (final["state"], final["attempt"]) == ("SUCCEEDED", 1), final
    assert history == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"], history
    # Every step once, stored and watched; the watcher's log lines are the stored log with no gap.
    assert stored == expected
    assert watcher.steps() == expected
    watched_logs = [int(s.data["seq"]) for s in watcher.seen if s.kind == "log"]
    assert watched_logs == log_seqs
    # The gRPC watcher, whose service restarted under it, resumed from its cursor just as well.
    assert grpc_watcher.steps() == expected
    assert [int(s.data["seq"]) for s in grpc_watcher.seen if s.kind == "log"] == log_seqs
    assert grpc_watcher.connects >= 2, grpc_watcher.errors
    # Each service honoured SIGTERM: it ended by itself within the grace period, open streams and all.
    assert all(graceful for _, graceful in stack.stops.values()), stack.stops
    # The watcher had to reconnect (the gateway went away) and did so with Last-Event-ID.
    assert watcher.connects >= 2, watcher.errors
    # The agent noticed the jobs service leave and came back on its own, after a jittered backoff.
    assert delays, agent_log[-3000:]
    assert "resumed=True" in agent_log
