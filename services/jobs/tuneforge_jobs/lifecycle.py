"""The job state machine: pure rules, no I/O."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from tuneforge_common.errors import FailedPrecondition


class JobState(StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    PAUSED = "PAUSED"


S = JobState
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
# States in which an agent holds the job.
ON_AGENT = frozenset({S.STARTING, S.RUNNING, S.CANCELLING})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.STARTING, S.CANCELLED, S.FAILED, S.PAUSED}),
    # STARTING/RUNNING -> QUEUED: the agent was lost and the job is retried.
    # STARTING/RUNNING -> PAUSED: the agent stopped the run after a pause was asked.
    S.STARTING: frozenset({S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLING, S.QUEUED, S.PAUSED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLING, S.QUEUED, S.PAUSED}),
    # The run may finish on its own before the terminate reaches it.
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def check_transition(current: JobState, target: JobState) -> None:
    if target not in ALLOWED[current]:
        raise FailedPrecondition(f"job is {current}; it cannot become {target}")


def cancel_target(current: JobState) -> JobState:
    """Where a terminate request takes a job: at once when no agent holds it, else via CANCELLING."""
    if current in (S.QUEUED, S.PAUSED):
        return S.CANCELLED
    if current in (S.STARTING, S.RUNNING):
        return S.CANCELLING
    raise FailedPrecondition(f"job is {current}; only queued, paused or running jobs can be terminated")


def pause_action(current: JobState) -> str:
    """What pausing does now: "now" (no agent holds it), "ask" (the agent checkpoints and stops it)."""
    if current == S.QUEUED:
        return "now"
    if current in (S.STARTING, S.RUNNING):
        return "ask"
    raise FailedPrecondition(f"job is {current}; only queued or running jobs can be paused")


def check_resumable(current: JobState) -> None:
    if current != S.PAUSED:
        raise FailedPrecondition(f"job is {current}; only paused jobs can be resumed")


def check_deletable(current: JobState) -> None:
    if current not in TERMINAL:
        raise FailedPrecondition(f"job is {current}; only finished jobs can be deleted (terminate it first)")


def after_agent_lost(attempt: int, max_attempts: int, current: JobState, agent: str = "") -> tuple[JobState, str]:
    """A lost agent's job is retried until its attempts are spent. `agent` names it in the reason."""
    who = f" (agent {agent} stopped heartbeating: its lease lapsed)" if agent else ""
    if current == S.CANCELLING:
        return S.CANCELLED, f"agent lost while cancelling{who}"
    if attempt >= max_attempts:
        return S.FAILED, f"agent lost; attempt limit of {max_attempts} reached{who}"
    return S.QUEUED, f"agent lost during attempt {attempt}; requeued{who}"


def overdue(since: dt.datetime | None, now: dt.datetime, timeout_seconds: float) -> bool:
    """Whether a state entered at `since` has waited out its timeout (0 or less: never)."""
    if timeout_seconds <= 0 or since is None:
        return False
    return (now - since).total_seconds() >= timeout_seconds


def after_start_unconfirmed(
    attempt: int, max_attempts: int, agent: str, timeout_seconds: float
) -> tuple[JobState, str]:
    """A job STARTING on a live agent that never confirmed the start (the assignment was lost, say, when the
    jobs service or its database restarted) is retried like a lost agent's: the attempt counts."""
    what = f"agent {agent} never confirmed the start of attempt {attempt} within {timeout_seconds:g} s"
    if attempt >= max_attempts:
        return S.FAILED, f"{what}; attempt limit of {max_attempts} reached"
    return S.QUEUED, f"{what}; requeued"


def after_cancel_unconfirmed(agent: str, timeout_seconds: float) -> tuple[JobState, str]:
    """A job CANCELLING whose agent never confirmed the stop is cancelled without it (the agent, if alive, is told
    again to stop: it owns no cancelled job)."""
    return (
        S.CANCELLED,
        f"cancelled without confirmation: agent {agent} never confirmed the stop within {timeout_seconds:g} s",
    )


def report_applies(current: JobState, reported: JobState) -> bool:
    """Whether an agent's state report still applies: not when the job moved on first (a terminate took a starting
    job to CANCELLING before its RUNNING arrived; the reaper cancelled or failed it). Such a late word is kept in
    the log, not applied, and never blocks the reports after it."""
    return reported == current or reported in ALLOWED[current]


def progress_percent(step: int, total: int) -> float:
    if total <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * step / total))
