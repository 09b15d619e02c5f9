"""Which assignment streams a change wakes: only those of agents that could act on it (a free slot while a job is
queued, a job to stop, a lapsed lease), so a job ending does not make every full agent claim in vain."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tests.integration.test_jobs_service import jobs  # noqa: F401 (the fixture)
from tuneforge_jobs.api import AssignmentWakes
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs


async def test_a_look_wakes_agents_with_a_free_slot_while_jobs_queue_and_those_with_jobs_to_stop(jobs: Jobs):  # noqa: F811
    full, roomy, idle = [
        (await jobs.register_agent(name, {}, slots))[0] for name, slots in [("f", 1), ("r", 2), ("i", 1)]
    ]
    assert await jobs.agents_to_wake([full, roomy, idle]) == {}  # nothing queued: nobody could take anything

    for _ in range(2):
        await jobs.submit("m1", "d1", "sft-lora", {})
    assert await jobs.agents_to_wake([full, roomy, idle]) == {full: False, roomy: False, idle: False}

    first = await jobs.claim_next(full)
    assert first.agent_full
    assert not (await jobs.claim_next(roomy)).agent_full
    await jobs.submit("m1", "d1", "sft-lora", {})
    # The full agent would only read that it is full; an unknown id's claim says the lease lapsed.
    assert await jobs.agents_to_wake([full, roomy, idle, "agent-gone"]) == {
        roomy: False,
        idle: False,
        "agent-gone": False,
    }

    await jobs.cancel(first.id)  # a stop for the full agent to send
    assert (await jobs.agents_to_wake([full]))[full] is True
    assert await jobs.cancelling_jobs(full) == [(first.id, False)]


class LookingJobs:
    """The one Jobs method AssignmentWakes uses: answers `woken`, or fails when it is None."""

    def __init__(self, woken: dict[str, bool] | None) -> None:
        self.woken = woken
        self.looks: list[list[str]] = []

    async def agents_to_wake(self, agent_ids: Sequence[str]) -> dict[str, bool]:
        self.looks.append(sorted(agent_ids))
        if self.woken is None:
            raise ConnectionError("database away")
        return self.woken


async def test_a_change_wakes_only_the_streams_the_look_names_and_a_failed_look_wakes_every_stream():
    changes = Notifier()
    looking = LookingJobs({"a": True})
    wakes = AssignmentWakes(looking, changes)  # type: ignore[arg-type]
    a, b = wakes.enter("a"), wakes.enter("b")
    for wake in (a, b):
        wake.stops = False
    await asyncio.sleep(0.01)  # the first look
    a.event.clear()

    changes.notify()
    await asyncio.wait_for(a.event.wait(), 1)
    assert a.stops and not b.event.is_set() and not b.stops
    assert looking.looks[-1] == ["a", "b"]

    looking.woken = None
    changes.notify()
    await asyncio.wait_for(b.event.wait(), 1)
    assert b.stops

    wakes.leave("a", a)
    wakes.leave("b", b)
    assert wakes.task is None and not wakes.streams  # the last stream gone, the looks stop
