"""The order one WatchJob pass sends a job's transitions, snapshot, points and lines in (jobs api.watch_updates)."""

from __future__ import annotations

from tuneforge.jobs.v1 import jobs_pb2 as pb
from tuneforge_jobs.api import watch_updates


def _events(*ids: int) -> list[tuple[int, pb.JobEvent]]:
    return [(i, pb.JobEvent(reason=f"transition {i}")) for i in ids]


def _points(*ids: int) -> list[tuple[int, pb.MetricPoint]]:
    return [(i, pb.MetricPoint(name="loss", step=i)) for i in ids]


def _lines(*ids: int) -> list[tuple[int, pb.LogLine]]:
    return [(i, pb.LogLine(text=f"line {i}")) for i in ids]


def _kinds(updates: list[tuple[pb.WatchJobResponse, tuple[int, int, int]]]) -> list[str]:
    return [f"{r.WhichOneof('update')}@{r.cursor}" for r, _ in updates]


def _snapshot(state: str = "RUNNING"):
    return lambda: pb.Job(state_reason=state)


def test_a_running_job_gets_its_transitions_and_snapshot_before_its_points_and_lines():
    updates, end = watch_updates(
        (0, 0, 0), _events(1, 2), _snapshot(), _points(5, 6), _lines(9), finished=False, cut=False
    )
    assert _kinds(updates) == [
        "event@e1.m0.l0",
        "event@e2.m0.l0",
        "job@e2.m0.l0",
        "metric@e2.m5.l0",
        "metric@e2.m6.l0",
        "log@e2.m6.l9",
    ]
    assert end == (2, 6, 9)
    assert [at for _, at in updates][-1] == end


def test_an_ended_job_gets_every_point_and_line_before_its_terminal_transition_and_snapshot_last():
    # Points reported during a database outage are stored, with the end, once it is back: one pass finds both.
    updates, end = watch_updates(
        (3, 60, 3), _events(4), _snapshot("SUCCEEDED"), _points(61, 62), _lines(4), finished=True, cut=False
    )
    assert _kinds(updates) == [
        "metric@e3.m61.l3",
        "metric@e3.m62.l3",
        "log@e3.m62.l4",
        "event@e4.m62.l4",
        "job@e4.m62.l4",
    ]
    assert updates[-1][0].job.state_reason == "SUCCEEDED"
    assert end == (4, 62, 4)


def test_an_ended_job_cut_at_the_page_size_holds_its_terminal_transition_for_a_later_pass():
    updates, end = watch_updates(
        (3, 60, 3), _events(4), _snapshot("SUCCEEDED"), _points(61, 62), [], finished=True, cut=True
    )
    assert _kinds(updates) == ["metric@e3.m61.l3", "metric@e3.m62.l3"]
    assert end == (3, 62, 3)  # the event cursor stays: the next pass reads the transition again
    later, end = watch_updates(end, _events(4), _snapshot("SUCCEEDED"), _points(63), [], finished=True, cut=False)
    assert _kinds(later) == ["metric@e3.m63.l3", "event@e4.m63.l3", "job@e4.m63.l3"]


def test_rows_at_or_before_the_watchers_cursor_are_skipped_and_no_snapshot_goes_without_a_new_transition():
    snapshots = []

    def snapshot() -> pb.Job:
        snapshots.append(1)
        return pb.Job()

    # A feed pass reads from the lowest cursor of a job's watchers: this one is ahead in every kind.
    updates, end = watch_updates(
        (2, 6, 9), _events(1, 2), snapshot, _points(5, 6, 7), _lines(8, 9), finished=False, cut=False
    )
    assert _kinds(updates) == ["metric@e2.m7.l9"]
    assert snapshots == []
    assert end == (2, 7, 9)
