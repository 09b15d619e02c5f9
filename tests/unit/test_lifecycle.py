"""Job state machine rules."""

import pytest

from tuneforge_common.errors import FailedPrecondition
from tuneforge_jobs.lifecycle import ALLOWED, TERMINAL, JobState, after_agent_lost, cancel_target, check_transition


def test_happy_path_is_allowed():
    for a, b in [("QUEUED", "STARTING"), ("STARTING", "RUNNING"), ("RUNNING", "SUCCEEDED")]:
        check_transition(JobState(a), JobState(b))


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_never_change(terminal):
    for target in JobState:
        with pytest.raises(FailedPrecondition):
            check_transition(terminal, target)


def test_a_queued_job_cannot_jump_to_succeeded():
    with pytest.raises(FailedPrecondition, match="QUEUED"):
        check_transition(JobState.QUEUED, JobState.SUCCEEDED)


def test_terminate_goes_straight_to_cancelled_when_no_agent_holds_the_job():
    assert cancel_target(JobState.QUEUED) == JobState.CANCELLED
    assert cancel_target(JobState.RUNNING) == JobState.CANCELLING
    with pytest.raises(FailedPrecondition):
        cancel_target(JobState.SUCCEEDED)


def test_lost_agent_requeues_until_the_attempt_limit():
    assert after_agent_lost(1, 3, JobState.RUNNING)[0] == JobState.QUEUED
    state, reason = after_agent_lost(3, 3, JobState.RUNNING)
    assert state == JobState.FAILED and "attempt limit of 3" in reason
    assert after_agent_lost(1, 3, JobState.CANCELLING)[0] == JobState.CANCELLED


def test_every_state_has_a_rule():
    assert set(ALLOWED) == set(JobState)


def test_pause_is_immediate_when_queued_and_asked_of_the_agent_when_running():
    from tuneforge_jobs.lifecycle import pause_action

    assert pause_action(JobState.QUEUED) == "now"
    assert pause_action(JobState.RUNNING) == pause_action(JobState.STARTING) == "ask"
    for state in (JobState.PAUSED, JobState.CANCELLING, JobState.SUCCEEDED):
        with pytest.raises(FailedPrecondition, match="only queued or running"):
            pause_action(state)


def test_only_paused_jobs_resume_and_only_finished_jobs_are_deleted():
    from tuneforge_jobs.lifecycle import check_deletable, check_resumable

    check_resumable(JobState.PAUSED)
    with pytest.raises(FailedPrecondition):
        check_resumable(JobState.RUNNING)
    for state in TERMINAL:
        check_deletable(state)
    for state in set(JobState) - TERMINAL:
        with pytest.raises(FailedPrecondition, match="terminate it first"):
            check_deletable(state)
