"""Placement rules, pure: which queued job an agent takes, given snapshots of the queue and of the agent."""

from __future__ import annotations

import datetime as dt
import random

from tuneforge_jobs.scheduler import (
    AgentCapacity,
    AgentSnapshot,
    QueuedJob,
    ResourceRequest,
    candidates,
    fits,
    misfit,
    pick,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
GIB = 1024**3


def job(job_id: str, priority: int = 0, age_s: int = 0, **request) -> QueuedJob:
    """A job submitted age_s seconds before T0."""
    return QueuedJob(job_id, priority, T0 - dt.timedelta(seconds=age_s), ResourceRequest(**request))


def agent(slots: int = 1, gpus: int = 0, memory: int = 0, labels=None, running=()) -> AgentSnapshot:
    return AgentSnapshot(
        AgentCapacity(slots=slots, gpu_count=gpus, gpu_memory_bytes=memory, labels=labels or {}), tuple(running)
    )


def test_priority_first_then_the_oldest_then_the_id():
    queue = [job("c", 0, age_s=50), job("b", 5, age_s=1), job("a", 5, age_s=1), job("d", 5, age_s=9)]
    assert [j.job_id for j in candidates(queue, agent())] == ["d", "a", "b", "c"]


def test_a_job_needs_enough_free_gpus_counting_those_its_running_jobs_use():
    node = agent(slots=4, gpus=4, memory=80 * GIB, running=[ResourceRequest(gpu_count=3)])
    assert fits(ResourceRequest(gpu_count=1), node)
    assert misfit(ResourceRequest(gpu_count=2), node) == "needs 2 GPU(s), 1 free"
    assert not fits(ResourceRequest(gpu_count=1), agent(slots=2, gpus=0))


def test_per_gpu_memory_must_reach_the_request():
    node = agent(gpus=2, memory=24 * GIB)
    assert fits(ResourceRequest(gpu_count=1, min_gpu_memory_bytes=24 * GIB), node)
    assert "per GPU" in misfit(ResourceRequest(gpu_count=1, min_gpu_memory_bytes=40 * GIB), node)
    # A memory floor alone still asks for a GPU: a CPU-only agent never meets it.
    assert not fits(ResourceRequest(min_gpu_memory_bytes=1), agent(gpus=0))


def test_every_requested_label_must_be_on_the_agent_with_the_same_value():
    node = agent(labels={"zone": "eu", "pool": "a100"})
    assert fits(ResourceRequest(agent_labels={"zone": "eu"}), node)
    assert fits(ResourceRequest(agent_labels={"zone": "eu", "pool": "a100"}), node)
    assert misfit(ResourceRequest(agent_labels={"zone": "us"}), node) == "needs label zone=us"
    assert not fits(ResourceRequest(agent_labels={"rack": "7"}), node)


def test_a_cpu_job_runs_anywhere_with_a_free_slot():
    assert fits(ResourceRequest(), agent(gpus=8, memory=80 * GIB, labels={"zone": "eu"}))
    assert misfit(ResourceRequest(), agent(slots=1, running=[ResourceRequest()])) == "no free slot"


def test_a_full_agent_takes_nothing():
    assert pick([job("a")], agent(slots=2, running=[ResourceRequest(), ResourceRequest()])) is None


def test_a_job_that_does_not_fit_is_passed_over_by_a_lower_priority_one_that_does():
    # Backfilling: the 8-GPU job fits no agent here, yet the 1-GPU job behind it still runs.
    queue = [job("big", priority=10, gpu_count=8), job("small", priority=0, gpu_count=1)]
    node = agent(gpus=4, memory=80 * GIB)
    assert pick(queue, node).job_id == "small"
    # Once the big one fits, priority decides again.
    assert pick(queue, agent(gpus=8, memory=80 * GIB)).job_id == "big"


def test_the_pick_follows_the_agent_it_is_for():
    queue = [
        job("gpu", priority=3, gpu_count=2, min_gpu_memory_bytes=40 * GIB),
        job("eu", priority=2, agent_labels={"zone": "eu"}),
        job("cpu", priority=1),
    ]
    assert pick(queue, agent(gpus=2, memory=80 * GIB)).job_id == "gpu"
    assert pick(queue, agent(gpus=2, memory=16 * GIB, labels={"zone": "eu"})).job_id == "eu"
    assert pick(queue, agent()).job_id == "cpu"


def test_resources_read_from_protobuf_json_where_64_bit_numbers_are_strings():
    request = ResourceRequest.from_json('{"gpu_count": 2, "min_gpu_memory_bytes": "85899345920", "agent_labels": {}}')
    assert request == ResourceRequest(gpu_count=2, min_gpu_memory_bytes=80 * GIB)
    capacity = AgentCapacity.from_json(
        '{"gpu_count": 8, "gpu_memory_bytes": "85899345920", "labels": {"zone": "eu"}, "slots": 4}', slots=4
    )
    assert capacity == AgentCapacity(slots=4, gpu_count=8, gpu_memory_bytes=80 * GIB, labels={"zone": "eu"})
    assert ResourceRequest.from_json("{}") == ResourceRequest() == ResourceRequest.from_json("not json")
    assert AgentCapacity.from_json("{}", slots=1) == AgentCapacity()


def random_request(rng: random.Random) -> ResourceRequest:
    return ResourceRequest(
        gpu_count=rng.randint(0, 4),
        min_gpu_memory_bytes=rng.choice([0, 16 * GIB, 40 * GIB, 80 * GIB]),
        agent_labels=random_labels(rng),
    )


def random_labels(rng: random.Random) -> dict[str, str]:
    return {k: rng.choice("ab") for k in rng.sample(["zone", "pool"], rng.randint(0, 2))}


def test_candidates_are_exactly_the_fitting_jobs_in_priority_then_age_order():
    rng = random.Random(7)
    for _ in range(2000):
        queue = [
            QueuedJob(f"j{i}", rng.randint(-2, 2), T0 + dt.timedelta(seconds=rng.randint(0, 5)), random_request(rng))
            for i in rng.sample(range(100), rng.randint(0, 12))
        ]
        node = AgentSnapshot(
            AgentCapacity(
                slots=rng.randint(0, 3),
                gpu_count=rng.randint(0, 8),
                gpu_memory_bytes=rng.choice([0, 16 * GIB, 80 * GIB]),
                labels=random_labels(rng),
            ),
            tuple(random_request(rng) for _ in range(rng.randint(0, 3))),
        )
        found = candidates(queue, node)
        assert {j.job_id for j in found} == {j.job_id for j in queue if fits(j.request, node)}
        keys = [(-j.priority, j.created_at, j.job_id) for j in found]
        assert keys == sorted(keys)
        # Nothing that fits waits behind the pick: every job ahead of it in the order does not fit.
        best = pick(queue, node)
        if best is not None:
            best_key = (-best.priority, best.created_at, best.job_id)
            assert not any(fits(j.request, node) for j in queue if (-j.priority, j.created_at, j.job_id) < best_key)
            assert node.free_slots > 0 and best.request.gpu_count <= node.free_gpus
