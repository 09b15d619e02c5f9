"""Kill -9 a trainer agent and its runner again and again over one job (real agent processes, real sft-lora runners
on the tiny model, the jobs service on PostgreSQL): each attempt resumes from the latest stored checkpoint, the job
finishes, every metric step is stored exactly once, and the history says what happened."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import pytest
from sqlalchemy import select

from tests.integration.test_agent_failover import kill_with_children, serve_jobs, start_agent, wait_for
from tests.reliability.conftest import scale
from tests.reliability.prodstack import Pacer
from tuneforge_jobs import store
from tuneforge_jobs.main import reaper

KILLS = scale(2, 10)
SAVE_STEPS = 4
# Each attempt must get a checkpoint past the previous kill's step and train on past it before it is killed, and
# some steps must remain after the last kill. A kill may land a few steps late (the step is read every 0.3 s), and
# then the next attempt needs the checkpoint after that: room for twice the steps of kills landing on time.
MAX_STEPS = SAVE_STEPS * (2 * KILLS + 1) + 4
# The runner is held to this pace until its kill (prodstack.Pacer): the tiny model trains 10-80 steps a second on
# an idle machine, and at that speed the kills landed late enough that 10 of them outran max_steps.
STEPS_PER_S = 3
# Killed this many steps past its latest checkpoint, so those steps are trained twice and must be stored once.
PAST_CHECKPOINT = SAVE_STEPS // 2


@pytest.mark.timeout(scale(400, 1200))
async def test_kill_nines_over_one_job_ten_at_full_scale_each_resume_from_the_latest_checkpoint_and_it_finishes(
    postgres_url, tmp_path, figures
):
    jobs, server, port = await serve_jobs(postgres_url, tmp_path, lease_ttl_seconds=3)
    jobs.max_attempts = KILLS + 1  # every kill costs an attempt; the last one must still be allowed
    reaping = asyncio.create_task(reaper(jobs, 0.5))
    agents: list[subprocess.Popen] = []
    began = time.monotonic()
    try:
        job = await jobs.submit("tiny", "chat", "sft-lora", {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS})
        agents.append(start_agent("agent-0", port, tmp_path))
        kill_steps: list[int] = []  # the step the job had reached when its agent died
        latest_at_kill: list[int] = []  # the latest stored checkpoint then: where the next attempt must resume
        # The attempt's steps since it started (from its resume point), as last read: the pacer holds it to them.
        progress = {"step": 0, "from": 0}
        for k in range(KILLS):
            floor = kill_steps[-1] if kill_steps else 0

            async def past_a_new_checkpoint(floor: int = floor, attempt: int = k + 1) -> Any:
                current = await jobs.get(job.id)
                kept = await jobs.checkpoints(job.id)
                if current.attempt == attempt:
                    progress["step"] = current.current_step
                if current.attempt != attempt or not kept or kept[-1].step <= floor:
                    return None
                return kept if current.current_step >= kept[-1].step + PAST_CHECKPOINT else None

            with Pacer(agents[-1], lambda: max(0, progress["step"] - progress["from"]), STEPS_PER_S):
                kept = await wait_for(
                    past_a_new_checkpoint, 180, f"attempt {k + 1} to train past a checkpoint > {floor}"
                )
                kill_with_children(agents[-1])
            killed_at = time.monotonic()
            # Nothing reports after the kill; a batch the service was storing as it died is in once this second is
            # up: what is stored then is what the next attempt has to resume from.
            await asyncio.sleep(1)
            kill_steps.append((await jobs.get(job.id)).current_step)
            latest_at_kill.append(max(c.step for c in await jobs.checkpoints(job.id)))
            assert latest_at_kill[-1] >= kept[-1].step
            agents.append(start_agent(f"agent-{k + 1}", port, tmp_path))

            async def running_again(attempt: int = k + 2) -> Any:
                current = await jobs.get(job.id)
                return current if current.attempt == attempt and current.state == "RUNNING" else None

            resumed = await wait_for(running_again, 120, f"attempt {k + 2} to run")
            progress.update(step=resumed.resumed_from_step, **{"from": resumed.resumed_from_step})
            recovery = time.monotonic() - killed_at
            figures.record(f"kill {k + 1}: kill to RUNNING again", recovery, "s", goal="< 30 s")
            figures.record(f"kill {k + 1}: at step / resumed from", f"{kill_steps[-1]} / {resumed.resumed_from_step}")
            figures.record(f"kill {k + 1}: steps redone", kill_steps[-1] - resumed.resumed_from_step, "steps")
            assert resumed.resumed_from_step == latest_at_kill[-1], (resumed.resumed_from_step, latest_at_kill)

        async def finished() -> Any:
            current = await jobs.get(job.id)
            return current if current.state in ("SUCCEEDED", "FAILED", "CANCELLED") else None

        done = await wait_for(finished, 300, "the job to finish")
        total = time.monotonic() - began
        logs = "\n".join((tmp_path / f"agent-{n}.log").read_text()[-800:] for n in range(KILLS + 1))
        assert done.state == "SUCCEEDED", f"{done.state_reason}\n{logs}"
        assert done.attempt == KILLS + 1
        assert all(s > r for s, r in zip(kill_steps, latest_at_kill, strict=True))  # each kill cost trained steps

        # Every step once; the steps two attempts trained (past the resume point, up to the kill) keep the value
        # of the later attempt, which the final model continued from.
        points = await jobs.metrics(job.id, ["loss"], 0, 100_000)
        assert sorted(p.step for p in points) == list(range(1, MAX_STEPS + 1))
        resumes = [0, *latest_at_kill]  # attempt a (1-based) trained the steps after resumes[a - 1]
        for p in points:
            assert p.attempt == max(a for a in range(1, KILLS + 2) if resumes[a - 1] < p.step), (p.step, p.attempt)

        # The history: each kill is RUNNING -> QUEUED naming the lost agent, then a fresh assignment resuming from
        # the checkpoint; at the end SUCCEEDED. The outbox carries the same transitions for the event bus.
        async with jobs.engine.connect() as conn:
            agent_names = {r.id: r.name for r in await conn.execute(select(store.agents.c.id, store.agents.c.name))}
            outbox = [
                json.loads(r.payload)
                for r in await conn.execute(
                    select(store.outbox.c.payload)
                    .where(store.outbox.c.subject == "t.jobs.job.state_changed")
                    .order_by(store.outbox.c.seq)
                )
            ]
        history = await jobs.events(job.id, 0, 1000)
        requeues = [e for e in history if e.to_state == "QUEUED" and e.from_state == "RUNNING"]
        assert [e.attempt for e in requeues] == list(range(1, KILLS + 1))
        for e, n in zip(requeues, range(KILLS), strict=True):
            assert "agent lost during attempt" in e.reason
            assert any(agent_id in e.reason for agent_id, name in agent_names.items() if name == f"agent-{n}"), e.reason
        starts = [e for e in history if e.to_state == "STARTING"]
        assert len(starts) == KILLS + 1
        for e, step in zip(starts[1:], latest_at_kill, strict=True):
            assert f"resumes from step {step}" in e.reason
        assert history[-1].to_state == "SUCCEEDED"
        mine = [(o["from"], o["to"], o["attempt"]) for o in outbox if o["job_id"] == job.id]
        assert mine == [(e.from_state, e.to_state, e.attempt) for e in history]

        figures.record("kills survived", KILLS)
        figures.record("attempts", done.attempt, goal=f"= kills + 1 = {KILLS + 1}")
        figures.record("steps redone in total", sum(kill_steps) - sum(latest_at_kill), "steps")
        figures.record("max_steps / save_steps", f"{MAX_STEPS} / {SAVE_STEPS}")
        figures.record("total wall time", total, "s")
    finally:
        for proc in agents:
            if proc.poll() is None:
                kill_with_children(proc)
        reaping.cancel()
        await server.stop(None)
        await jobs.engine.dispose()
