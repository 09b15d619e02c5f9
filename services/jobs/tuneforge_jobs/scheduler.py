"""Placement decisions: pure, fed with snapshots."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    priority: int
    created_at: dt.datetime


def order_queue(jobs: list[QueuedJob]) -> list[QueuedJob]:
    """Higher priority first, then oldest first; id breaks ties so the order is total."""
    return sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.job_id))


def free_slots(slots: int, jobs_on_agent: int) -> int:
    return max(0, slots - jobs_on_agent)
