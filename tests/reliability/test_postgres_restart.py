"""Stopping PostgreSQL while a real job trains, then starting it again (issue 11).

The stack's databases live on a private PostgreSQL cluster of this test (the shared server is never stopped).
During the outage the gateway must refuse DB-backed reads with a clear 503, never a 500 or exception text; after it
every service reconnects by itself (same processes), the running job finishes with each step stored once, no job is
left in a state it can't leave, and a job submitted right after the recovery runs.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import httpx

from tests.reliability.conftest import scale
from tests.reliability.prodstack import PrivatePostgres, SseWatcher, prod_stack, wait_until

OUTAGE_S = scale(5, 30)
# Long enough to train on through the outage and the reconnects (about 3-10 steps/s on a CPU).
MAX_STEPS = scale(150, 600)
SAVE_STEPS = 50
# Text that would mean an exception's insides reached a client.
LEAKS = ("Traceback", "asyncpg", "sqlalchemy", "OperationalError", "Connection refused", "ConnectionRefusedError")


def test_postgres_outage_gets_503s_then_services_reconnect_and_jobs_finish(tmp_path, figures):
    started = time.monotonic()
    pg = PrivatePostgres()
    try:
        pg.start()
        suffix = uuid.uuid4().hex[:8]
        catalog_db, jobs_db = pg.create_database(f"catalog_{suffix}"), pg.create_database(f"jobs_{suffix}")
        with prod_stack(tmp_path / "stack", catalog_db, jobs_db) as stack:
            pids = {name: proc.pid for name, proc in stack.embedded.procs.items()}
            dataset = stack.upload_sample_dataset()
            job = stack.submit_tiny_job(dataset, MAX_STEPS, SAVE_STEPS)
            watcher = SseWatcher(job_id=job["id"], url=stack.url, key=stack.key).start()
            try:
                wait_until(lambda: len(watcher.steps()) >= 3, "the first metric points", 180)

                pg.stop()
                down = time.monotonic()
                refused: Counter[int] = Counter()
                answered: list[tuple[str, int, str]] = []
                # DB-backed reads through the gateway, as a dashboard keeps polling them.
                reads = [
                    f"/api/v1/jobs/{job['id']}",
                    "/api/v1/jobs",
                    "/api/v1/datasets",
                    f"/api/v1/jobs/{job['id']}/metrics",
                ]
                while time.monotonic() - down < OUTAGE_S:
                    for path in reads:
                        try:
                            resp = stack.http.get(path, timeout=10)
                        except httpx.HTTPError as exc:
                            answered.append((path, 0, type(exc).__name__))
                            continue
                        answered.append((path, resp.status_code, resp.text[:300]))
                        if resp.status_code != 200:
                            refused[resp.status_code] += 1
                    time.sleep(0.5)
                pg.start()
                up = time.monotonic()
                outage = up - down

                def read_works() -> bool:
                    try:
                        return stack.http.get(f"/api/v1/jobs/{job['id']}", timeout=5).status_code == 200
                    except httpx.HTTPError:
                        return False

                wait_until(read_works, "a successful read after PostgreSQL is back", 120, every=0.1)
                first_ok = time.monotonic() - up

                final = stack.wait_job(job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 300)
                assert watcher.done.wait(60), "the watcher never saw the job end"
            finally:
                watcher.stop()
            # A job submitted after the recovery is scheduled and runs (the agent is registered again).
            after = stack.submit_tiny_job(dataset, 3, 0)
            after_final = stack.wait_job(after["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 180)
            stored = stack.metric_steps(job["id"])
            jobs = stack.http.get("/api/v1/jobs", params={"page_size": 100}).json()["jobs"]
            still = {name: proc.pid for name, proc in stack.embedded.procs.items() if proc.poll() is None}
    finally:
        pg.remove()

    # Figures first, so a failing run still reports what it measured.
    figures.record("PostgreSQL outage", outage, "s")
    figures.record("first successful read after PostgreSQL is back", first_ok, "s")
    figures.record("requests refused during the outage", sum(refused.values()))
    figures.record("status codes of refused requests", ", ".join(f"{c}x{n}" for c, n in sorted(refused.items())))
    figures.record("metric steps lost", len(set(range(1, MAX_STEPS + 1)) - set(stored)), goal="0")
    figures.record("metric steps duplicated", len(stored) - len(set(stored)), goal="0")
    figures.record("test runtime", time.monotonic() - started, "s")

    # During the outage: refusals are clear 503s, never a 500, a hang or an exception's text.
    statuses = {status for _, status, _ in answered}
    assert statuses <= {200, 503}, answered
    assert refused[503] > 0, answered  # the outage was seen, so the check above had something to check
    for path, status, body in answered:
        assert not any(leak in body for leak in LEAKS), (path, status, body)
    # Afterwards: the same processes (they reconnected, nobody restarted them), the job ran on to the end.
    assert still == pids
    assert (final["state"], final["attempt"]) == ("SUCCEEDED", 1), final
    assert stored == list(range(1, MAX_STEPS + 1))
    assert watcher.steps() == stored
    assert not [j for j in jobs if j["state"] in ("STARTING", "CANCELLING", "QUEUED", "RUNNING")], jobs
    assert after_final["state"] == "SUCCEEDED", after_final


def test_database_connection_failures_are_unavailable_and_other_errors_are_not():
    """The one error mapper answers UNAVAILABLE (HTTP 503, retry) for a database that is down or restarting."""
    import asyncpg
    import grpc
    from sqlalchemy.exc import DBAPIError, OperationalError

    from tuneforge_common.errors import is_unavailable
    from tuneforge_common.grpcutil import status_for

    dropped = DBAPIError("SELECT 1", {}, Exception("connection is closed"), connection_invalidated=True)
    down = [
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        dropped,
    ]
    wrapped = OperationalError("SELECT 1", {}, Exception("x"))
    wrapped.__cause__ = asyncpg.exceptions.CannotConnectNowError("the database system is shutting down")
    down.append(wrapped)
    for exc in down:
        assert is_unavailable(exc), exc
        assert status_for(exc).code == grpc.StatusCode.UNAVAILABLE
    for exc in [ValueError("bad"), OSError(28, "No space left on device"), KeyError("x")]:
        assert not is_unavailable(exc), exc
        assert status_for(exc).code == grpc.StatusCode.INTERNAL


async def test_the_reaper_judges_agents_lost_only_after_hearing_them_for_a_whole_lease():
    """After the jobs service starts, or after its database was unreachable, no heartbeat could have been recorded:
    reaping at once would requeue every job of agents that were only waiting to reconnect."""
    import asyncio

    from tuneforge_jobs.main import reaper

    class Passes:
        lease_ttl_seconds = 1
        down = False

        def __init__(self) -> None:
            self.lost_passes: list[float] = []

        async def reap_lost_agents(self) -> int:
            if self.down:
                raise ConnectionRefusedError(111, "Connect call failed")
            self.lost_passes.append(time.monotonic())
            return 0

        async def reap_stuck_jobs(self) -> int:
            if self.down:
                raise ConnectionRefusedError(111, "Connect call failed")
            return 0

    passes = Passes()
    began = time.monotonic()
    task = asyncio.create_task(reaper(passes, 0.1))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(1.5)
        assert passes.lost_passes and passes.lost_passes[0] - began >= 1.0  # not before a lease after the start
        passes.down = True
        await asyncio.sleep(0.5)
        passes.down, back = False, time.monotonic()
        count = len(passes.lost_passes)
        await asyncio.sleep(1.5)
        after = passes.lost_passes[count:]
        assert after and after[0] - back >= 0.9  # and not before a lease after the database came back
    finally:
        task.cancel()
