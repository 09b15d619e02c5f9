"""Placement decisions: pure, fed with snapshots.

The jobs service reads a snapshot of the queue and of one agent (what it has, what its running jobs use)
and asks `candidates` which queued jobs that agent should take, best first; the claim itself (row locks,
compare-and-set) is the store's business.

Order: higher priority first, then oldest, then id, so the order is total and every replica agrees.

Backfilling: a job that does not fit this agent (too few free GPUs, too little memory per GPU, a label
the agent lacks) is skipped, and the next job in order that fits goes instead, even one of lower
priority. A job that fits no agent therefore waits in the queue without holding up the jobs behind it,
and no GPU stays idle while something runnable waits. The price: a large job on a busy agent may wait
while smaller ones keep taking GPUs as they free up; raise its priority, or give large jobs agents of
their own by label, when that matters. (Reserving GPUs for the blocked job would idle them for an unknown
time, since runs have no duration estimate to backfill against.)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def _int(value: Any) -> int:
    # Resources come from protobuf JSON, where 64-bit integers are strings.
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _loads(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ResourceRequest:
    """What one job needs from the agent that runs it."""

    gpu_count: int = 0
    min_gpu_memory_bytes: int = 0  # per GPU
    agent_labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None) -> ResourceRequest:
        value = value or {}
        return cls(
            gpu_count=max(0, _int(value.get("gpu_count"))),
            min_gpu_memory_bytes=max(0, _int(value.get("min_gpu_memory_bytes"))),
            agent_labels=_labels(value.get("agent_labels")),
        )

    @classmethod
    def from_json(cls, text: str | None) -> ResourceRequest:
        """From the jobs.resources column."""
        return _request_from_json(text)


@functools.lru_cache(maxsize=1024)
def _request_from_json(text: str | None) -> ResourceRequest:
    # Parsed once per distinct text: every claim reads a page of 100 queued jobs, most with the same few requests.
    return ResourceRequest.from_dict(_loads(text))


@dataclass(frozen=True)
class AgentCapacity:
    """What one agent has, as it registered it."""

    slots: int = 1
    gpu_count: int = 0
    gpu_memory_bytes: int = 0  # per GPU; the smallest one's when they differ
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None, slots: int) -> AgentCapacity:
        """From the agents.resources column (AgentResources as protobuf JSON) and the agent's slots."""
        value = value or {}
        return cls(
            slots=max(0, slots),
            gpu_count=max(0, _int(value.get("gpu_count"))),
            gpu_memory_bytes=max(0, _int(value.get("gpu_memory_bytes"))),
            labels=_labels(value.get("labels")),
        )

    @classmethod
    def from_json(cls, text: str | None, slots: int) -> AgentCapacity:
        return cls.from_dict(_loads(text), slots)


@dataclass(frozen=True)
class AgentSnapshot:
    capacity: AgentCapacity
    running: tuple[ResourceRequest, ...] = ()  # the requests of the jobs the agent holds now

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity.slots - len(self.running))

    @property
    def free_gpus(self) -> int:
        return max(0, self.capacity.gpu_count - sum(r.gpu_count for r in self.running))


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    priority: int
    created_at: dt.datetime
    request: ResourceRequest = ResourceRequest()


def order_queue(jobs: Iterable[QueuedJob]) -> list[QueuedJob]:
    """Higher priority first, then oldest first; id breaks ties so the order is total."""
    return sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.job_id))


def free_slots(slots: int, jobs_on_agent: int) -> int:
    return max(0, slots - jobs_on_agent)


def misfit(request: ResourceRequest, agent: AgentSnapshot) -> str:
    """Why the job cannot start on the agent now; empty when it can."""
    if agent.free_slots == 0:
        return "no free slot"
    if request.gpu_count > agent.free_gpus:
        return f"needs {request.gpu_count} GPU(s), {agent.free_gpus} free"
    if (request.gpu_count > 0 or request.min_gpu_memory_bytes > 0) and (
        agent.capacity.gpu_memory_bytes < request.min_gpu_memory_bytes or agent.capacity.gpu_count == 0
    ):
        return f"needs {request.min_gpu_memory_bytes} bytes per GPU, agent has {agent.capacity.gpu_memory_bytes}"
    for key, value in request.agent_labels.items():
        if agent.capacity.labels.get(key) != value:
            return f"needs label {key}={value}"
    return ""


def fits(request: ResourceRequest, agent: AgentSnapshot) -> bool:
    return not misfit(request, agent)


def candidates(queue: Sequence[QueuedJob], agent: AgentSnapshot) -> list[QueuedJob]:
    """The queued jobs the agent could start now, best first (backfilling past those that do not fit)."""
    if agent.free_slots == 0:
        return []
    return [job for job in order_queue(queue) if fits(job.request, agent)]


def pick(queue: Sequence[QueuedJob], agent: AgentSnapshot) -> QueuedJob | None:
    """The one job the agent should take next, or None."""
    found = candidates(queue, agent)
    return found[0] if found else None
