"""The reaper's pure rules: when a STARTING or CANCELLING job has waited too long for its agent, where it goes and
why; which late state reports from an agent still apply."""

import datetime as dt

import pytest

from tuneforge_jobs.lifecycle import (
    ALLOWED,
    JobState,
    after_agent_lost,
    after_cancel_unconfirmed,
    after_start_unconfirmed,
    overdue,
    report_applies,
)

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_a_state_is_overdue_from_the_moment_its_timeout_has_passed():
    assert not overdue(NOW - dt.timedelta(seconds=9.9), NOW, 10)
    assert overdue(NOW - dt.timedelta(seconds=10), NOW, 10)


def test_a_timeout_of_zero_or_an_unknown_start_never_reaps():
    # 0 turns the reaper off for that state; a row without a timestamp is left to the lost-agent path.
    assert not overdue(NOW - dt.timedelta(days=30), NOW, 0)
    assert not overdue(None, NOW, 10)


def test_an_unconfirmed_start_requeues_and_names_the_agent_and_the_timeout():
    state, reason = after_start_unconfirmed(1, 3, "agent-7", 30)
    assert state == JobState.QUEUED
    assert "agent-7" in reason and "never confirmed the start of attempt 1" in reason and "30 s" in reason


def test_an_unconfirmed_start_on_the_last_attempt_fails_the_job():
    state, reason = after_start_unconfirmed(3, 3, "agent-7", 30)
    assert state == JobState.FAILED and "attempt limit of 3" in reason


def test_an_unconfirmed_cancel_cancels_saying_the_agent_never_confirmed():
    state, reason = after_cancel_unconfirmed("agent-7", 60)
    assert state == JobState.CANCELLED and "agent-7 never confirmed the stop within 60 s" in reason


def test_the_reapers_targets_are_transitions_the_state_machine_allows():
    assert after_start_unconfirmed(1, 3, "a", 1)[0] in ALLOWED[JobState.STARTING]
    assert after_start_unconfirmed(3, 3, "a", 1)[0] in ALLOWED[JobState.STARTING]
    assert after_cancel_unconfirmed("a", 1)[0] in ALLOWED[JobState.CANCELLING]


def test_a_lost_agents_reason_names_the_agent():
    state, reason = after_agent_lost(2, 3, JobState.RUNNING, "abc (node-1)")
    assert state == JobState.QUEUED and "agent lost during attempt 2" in reason and "abc (node-1)" in reason


@pytest.mark.parametrize(
    ("current", "reported", "applies"),
    [
        (JobState.STARTING, JobState.RUNNING, True),
        (JobState.RUNNING, JobState.SUCCEEDED, True),
        (JobState.CANCELLING, JobState.CANCELLED, True),
        (JobState.CANCELLING, JobState.SUCCEEDED, True),  # it finished before the terminate reached it
        # A terminate took the starting job to CANCELLING before the agent's RUNNING arrived: it stays CANCELLING.
        (JobState.CANCELLING, JobState.RUNNING, False),
        # The reaper cancelled (or failed) the job first: the agent's late outcome does not reopen it.
        (JobState.CANCELLED, JobState.SUCCEEDED, False),
        (JobState.FAILED, JobState.FAILED, True),  # the same state: a no-op, not an error
    ],
)
def test_a_late_state_report_applies_only_where_the_state_machine_allows_it(current, reported, applies):
    assert report_applies(current, reported) is applies
