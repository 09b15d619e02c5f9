"""JobService and AgentService gRPC surfaces: decode, call the use case, encode."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import datetime as dt
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as pb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common.errors import InvalidArgument, NotFound
from tuneforge_common.grpcutil import ServiceBinding, map_errors
from tuneforge_common.paging import decode_token, encode_token, page_size, struct, timestamp

from . import estimates, scheduler
from .activity import Item, Place
from .estimates import Estimate
from .inference import InferenceRouter
from .lifecycle import ON_AGENT, TERMINAL, JobState
from .notify import Notifier
from .series import Series
from .service import Jobs, Report, ReportAcks

log = logging.getLogger(__name__)

MAX_PAGE = 1000
DEFAULT_PAGE = 100
WATCH_POLL_S = 1.0
WATCH_PASS_S = 0.25
# The agents' assignment streams are looked at again this often without a wake-up (a commit on this replica wakes
# them at once): what it finds is another replica's doing. Every second, 50 idle agents' streams took a sixth of the
# jobs service's CPU under load (tests/reliability/load.py); heartbeats (every 3 s) also carry cancellations.
ASSIGN_POLL_S = 3.0
# The shared feed's pass: one for every watcher of this replica, so it can come often.
FEED_PASS_S = 0.1
FEED_PAGE = 5000
WATCH_BATCH_BYTES = 1 << 20
FEED_PASS_TIMEOUT_S = 30.0
# A watcher whose stream holds this many items it has not taken (a slow client) leaves the feed and reads on
# with passes of its own from where it is, so the feed never holds more than this for it.
FEED_BACKLOG = 4 * MAX_PAGE
REPORT_BATCH = 1000
MAX_REPORTS_PER_MESSAGE = REPORT_BATCH
# Report transactions at once (ReportWriter): one stores while the next is being prepared.
REPORT_WRITERS = 2
_REPORTED = {
    apb.REPORTED_STATE_RUNNING: JobState.RUNNING,
    apb.REPORTED_STATE_SUCCEEDED: JobState.SUCCEEDED,
    apb.REPORTED_STATE_FAILED: JobState.FAILED,
    apb.REPORTED_STATE_CANCELLED: JobState.CANCELLED,
    apb.REPORTED_STATE_PAUSED: JobState.PAUSED,
}


# Parameters texts longer than this are converted each time rather than kept: the cache stays under ~64 MiB.
CACHED_PARAMETERS_CHARS = 16_384


def _parameters_struct(parameters_json: str) -> bytes:
    """A job's stored parameters as a serialized Struct. They never change once submitted, and filling a Struct
    key by key in Python cost about 250 us a job: most of ListJobs' CPU (py-spy, bench_gateway)."""
    if len(parameters_json) > CACHED_PARAMETERS_CHARS:
        return _serialized_struct(parameters_json)
    return _cached_serialized_struct(parameters_json)


def _serialized_struct(parameters_json: str) -> bytes:
    return struct(json.loads(parameters_json)).SerializeToString()


_cached_serialized_struct = functools.lru_cache(maxsize=4096)(_serialized_struct)


def job_to_pb(row: Any, now: dt.datetime | None = None) -> pb.Job:
    elapsed, remaining = timing(row, now or dt.datetime.now(dt.UTC))
    job = pb.Job(
        id=row.id,
        project_id=row.project_id or "",
        name=row.name,
        model_id=row.model_id,
        dataset_id=row.dataset_id,
        method_id=row.method_id,
        state=pb.JobState.Value(f"JOB_STATE_{row.state}"),
        state_reason=row.state_reason,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        priority=row.priority,
        agent_id=row.agent_id or "",
        output_uri=row.output_uri,
        current_step=row.current_step,
        total_steps=row.total_steps,
        progress_percent=row.progress,
        create_time=timestamp(row.created_at),
        start_time=timestamp(row.started_at),
        end_time=timestamp(row.ended_at),
        update_time=timestamp(row.updated_at),
        submitted_by=row.submitted_by,
        labels=json.loads(row.labels or "{}"),
        resources=resources_to_pb(json.loads(row.resources or "{}")),
        method_version=row.method_version,
        catalog_version=row.catalog_version,
        epoch=row.epoch,
        tokens_seen=row.tokens_seen,
        elapsed_seconds=elapsed,
        remaining_seconds=remaining,
        copied_from_job_id=row.copied_from_job_id or "",
        resumed_from_step=row.resumed_from_step,
        validation_dataset_id=row.validation_dataset_id,
        kind=pb.JobKind.Value(f"JOB_KIND_{row.kind.upper()}"),
        result_model_id=row.result_model_id,
    )
    job.parameters.MergeFromString(_parameters_struct(row.parameters))
    return job


def resources_to_pb(data: dict[str, Any]) -> pb.ResourceRequest:
    return pb.ResourceRequest(
        gpu_count=int(data.get("gpu_count", 0)),
        min_gpu_memory_bytes=int(data.get("min_gpu_memory_bytes", 0)),
        agent_labels=dict(data.get("agent_labels", {})),
    )


def resources_from_pb(msg: pb.ResourceRequest) -> dict[str, Any]:
    return {
        "gpu_count": msg.gpu_count,
        "min_gpu_memory_bytes": msg.min_gpu_memory_bytes,
        "agent_labels": dict(msg.agent_labels),
    }


def estimate_to_pb(estimate: Estimate) -> pb.JobEstimate:
    return pb.JobEstimate(
        parameters=struct(estimate.parameters),
        dataset_rows=estimate.dataset_rows,
        dataset_tokens=estimate.dataset_tokens,
        epochs=estimate.epochs,
        total_steps=estimate.total_steps,
        estimated_seconds=estimate.estimated_seconds,
    )


def checkpoint_to_pb(row: Any) -> pb.Checkpoint:
    return pb.Checkpoint(
        step=row.step,
        uri=row.uri,
        metrics=json.loads(row.metrics or "{}"),
        attempt=row.attempt,
        create_time=timestamp(row.created_at),
    )


def timing(row: Any, now: dt.datetime) -> tuple[float, float]:
    """(seconds run over all attempts, estimate of the seconds left at the current attempt's pace)."""
    this_attempt = 0.0
    if JobState(row.state) in ON_AGENT and row.attempt_started_at is not None:
        this_attempt = max(0.0, (now - row.attempt_started_at).total_seconds())
    steps_done = row.current_step - row.resumed_from_step
    remaining = estimates.remaining_seconds(this_attempt, steps_done, row.total_steps - row.current_step)
    return row.run_seconds + this_attempt, remaining


def metric_to_pb(row: Any) -> pb.MetricPoint:
    return pb.MetricPoint(
        name=row.name, step=row.step, value=row.value, time=timestamp(row.recorded_at), attempt=row.attempt
    )


def log_to_pb(row: Any) -> pb.LogLine:
    return pb.LogLine(
        seq=row.id, time=timestamp(row.recorded_at), stream=row.stream, text=row.text, attempt=row.attempt
    )


def _state(value: str | None) -> pb.JobState.ValueType:
    return pb.JobState.Value(f"JOB_STATE_{value}") if value else pb.JOB_STATE_UNSPECIFIED


def event_to_pb(row: Any) -> pb.JobEvent:
    return pb.JobEvent(
        seq=row.id,
        time=timestamp(row.recorded_at),
        from_state=_state(row.from_state),
        to_state=_state(row.to_state),
        attempt=row.attempt,
        reason=row.reason,
    )


async def _page_after(read: Any, job_id: str, requested_size: int, page_token: str) -> tuple[list[Any], str]:
    """One page of rows stored after the token's row id; the next token is the last row's id."""
    size = page_size(requested_size, DEFAULT_PAGE, MAX_PAGE)
    rows = await read(job_id, after_id=decode_token(page_token), limit=size + 1)
    return rows[:size], encode_token(rows[size - 1].id) if len(rows) > size else ""


def _activity_after(request: pb.ListJobEventsRequest | pb.ListJobMetricsRequest) -> tuple[str, int] | None:
    """The request's `after` item of the job's activity, ("seq" or "step", key); None when it names none."""
    kind = request.after.WhichOneof("item") if request.HasField("after") else None
    return (kind, getattr(request.after, kind)) if kind else None


def _activity_place(page_token: str) -> Place | None:
    """Where a newest-first list goes on after the page that gave this token: its last item's place."""
    if not page_token:
        return None
    try:
        kind, second, key = base64.urlsafe_b64decode(page_token.encode()).decode().split(":")
        if kind != "a":
            raise ValueError
        return int(second), int(key)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.for_field("page_token", "invalid page token") from None


def _activity_token(last: Item) -> str:
    return base64.urlsafe_b64encode(f"a:{last.second}:{last.key}".encode()).decode()


def _refuse_after_without_newest_first(request: pb.ListJobEventsRequest | pb.ListJobMetricsRequest) -> None:
    if request.HasField("after"):
        raise InvalidArgument.for_field("after", "applies to newest_first lists only")


def _cursor(event_id: int, metric_id: int, log_id: int) -> str:
    return f"e{event_id}.m{metric_id}.l{log_id}"


def _parse_cursor(cursor: str) -> tuple[int, int, int]:
    if not cursor:
        return 0, 0, 0
    try:
        e, m, lg = cursor.split(".")
        if e[0] != "e" or m[0] != "m" or lg[0] != "l":
            raise ValueError
        return int(e[1:]), int(m[1:]), int(lg[1:])
    except (ValueError, IndexError):
        raise InvalidArgument.for_field("after_cursor", "invalid cursor") from None


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: Jobs, changes: Notifier) -> None:
        self.jobs = jobs
        self.changes = changes
        self.feed = WatchFeed(jobs, changes)

    @map_errors
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.SubmitJobResponse:
        row, estimate = await self.jobs.submit_job(
            request.model_id,
            request.dataset_id,
            request.method_id,
            json_format.MessageToDict(request.parameters),
            request.priority,
            request.name,
            labels=dict(request.labels),
            resources=resources_from_pb(request.resources),
            submitted_by=request.submitted_by,
            dry_run=request.dry_run,
            validation_dataset_id=request.validation_dataset_id,
        )
        return pb.SubmitJobResponse(job=job_to_pb(row) if row else None, estimate=estimate_to_pb(estimate))

    @map_errors
    async def CopyJob(self, request: pb.CopyJobRequest, context: Any) -> pb.CopyJobResponse:
        row, estimate = await self.jobs.copy(
            request.job_id,
            json_format.MessageToDict(request.parameter_overrides),
            dataset_id=request.dataset_id,
            model_id=request.model_id,
            name=request.name,
            dry_run=request.dry_run,
            validation_dataset_id=request.validation_dataset_id,
            clear_validation_dataset=request.clear_validation_dataset,
        )
        return pb.CopyJobResponse(job=job_to_pb(row) if row else None, estimate=estimate_to_pb(estimate))

    @map_errors
    async def PauseJob(self, request: pb.PauseJobRequest, context: Any) -> pb.PauseJobResponse:
        return pb.PauseJobResponse(job=job_to_pb(await self.jobs.pause(request.job_id)))

    @map_errors
    async def ResumeJob(self, request: pb.ResumeJobRequest, context: Any) -> pb.ResumeJobResponse:
        return pb.ResumeJobResponse(job=job_to_pb(await self.jobs.resume(request.job_id)))

    @map_errors
    async def DeleteJob(self, request: pb.DeleteJobRequest, context: Any) -> pb.DeleteJobResponse:
        await self.jobs.delete(request.job_id)
        return pb.DeleteJobResponse()

    @map_errors
    async def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context: Any) -> pb.ListCheckpointsResponse:
        rows = await self.jobs.checkpoints(request.job_id)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_to_pb(r) for r in rows])

    @map_errors
    async def PublishCheckpoint(
        self, request: pb.PublishCheckpointRequest, context: Any
    ) -> pb.PublishCheckpointResponse:
        model_id = await self.jobs.publish_checkpoint(request.job_id, request.step, request.name, request.description)
        return pb.PublishCheckpointResponse(model_id=model_id)

    @map_errors
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=job_to_pb(await self.jobs.get(request.job_id)))

    @map_errors
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        size, offset = page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE), decode_token(request.page_token)
        states = [pb.JobState.Name(v).removeprefix("JOB_STATE_") for v in request.states if v]
        rows = await self.jobs.list_jobs(
            size + 1,
            offset,
            states,
            request.model_id,
            request.dataset_id,
            request.method_id,
            dict(request.labels),
            after_job_id=request.after_job_id,
            kinds=[pb.JobKind.Name(k).removeprefix("JOB_KIND_").lower() for k in request.kinds if k],
        )
        token = encode_token(offset + size) if len(rows) > size else ""
        return pb.ListJobsResponse(jobs=[job_to_pb(r) for r in rows[:size]], next_page_token=token)

    @map_errors
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=job_to_pb(await self.jobs.cancel(request.job_id)))

    @map_errors
    async def ListJobMetrics(self, request: pb.ListJobMetricsRequest, context: Any) -> pb.ListJobMetricsResponse:
        """Raw points page by page (as stored, or step by step newest first); with max_points, one page of series
        downsampled in the database."""
        if request.max_points < 0:
            raise InvalidArgument.for_field("max_points", "must not be negative")
        if request.max_points and request.newest_first:
            raise InvalidArgument.for_field("newest_first", "lists raw points: not with max_points")
        names = list(request.names)
        if request.max_points:
            found = await self.jobs.metric_series(
                request.job_id, names, request.max_points, request.min_step, request.max_step
            )
            return pb.ListJobMetricsResponse(series=[self._series_pb(s) for s in found])
        if request.newest_first:
            size, after = page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE), _activity_after(request)
            place = _activity_place(request.page_token)
            steps = await self.jobs.steps_newest_first(
                request.job_id, names, after, size + 1, request.min_step, request.max_step, place
            )
            token = _activity_token(steps[size - 1]) if len(steps) > size else ""
            points = [metric_to_pb(r) for step in steps[:size] for r in step.row]
            return pb.ListJobMetricsResponse(points=points, next_page_token=token)
        _refuse_after_without_newest_first(request)
        read = functools.partial(self.jobs.metrics, names=names, min_step=request.min_step, max_step=request.max_step)
        rows, token = await _page_after(read, request.job_id, request.page_size, request.page_token)
        return pb.ListJobMetricsResponse(points=[metric_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def CompareJobs(self, request: pb.CompareJobsRequest, context: Any) -> pb.CompareJobsResponse:
        found = await self.jobs.compare(list(request.job_ids), list(request.metric_names), request.max_points)
        return pb.CompareJobsResponse(
            jobs=[job_to_pb(row) for row in found.jobs],
            differing_parameters=[
                json_format.ParseDict({"name": name, "values": values}, pb.ParameterDifference())
                for name, values in found.differences
            ],
            metrics=[
                pb.ComparedMetric(name=m.name, series=[self._series_pb(s) for s in m.series]) for m in found.metrics
            ],
        )

    @staticmethod
    def _series_pb(found: Series) -> pb.MetricSeries:
        return pb.MetricSeries(
            job_id=found.job_id,
            name=found.name,
            points=[
                pb.SeriesPoint(step=p.step, value=p.value, min=p.min, max=p.max, count=p.count) for p in found.points
            ],
        )

    @map_errors
    async def ListJobLogs(self, request: pb.ListJobLogsRequest, context: Any) -> pb.ListJobLogsResponse:
        rows, token = await _page_after(self.jobs.logs, request.job_id, request.page_size, request.page_token)
        return pb.ListJobLogsResponse(lines=[log_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def ListJobEvents(self, request: pb.ListJobEventsRequest, context: Any) -> pb.ListJobEventsResponse:
        if request.newest_first:
            size, after = page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE), _activity_after(request)
            place = _activity_place(request.page_token)
            found = await self.jobs.events_newest_first(request.job_id, after, size + 1, place)
            token = _activity_token(found[size - 1]) if len(found) > size else ""
            return pb.ListJobEventsResponse(events=[event_to_pb(i.row) for i in found[:size]], next_page_token=token)
        _refuse_after_without_newest_first(request)
        rows, token = await _page_after(self.jobs.events, request.job_id, request.page_size, request.page_token)
        return pb.ListJobEventsResponse(events=[event_to_pb(r) for r in rows], next_page_token=token)

    @map_errors
    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.WatchJobResponse]:
        """Every state transition (with the job as it is now after the last one), metric point and log line,
        each once, in the order they were stored; ends after the job reaches a terminal state.

        A watcher reads on passes of its own (in its own context: the first one authorises it) until it has
        caught up, then follows the replica's shared WatchFeed, which reads for every watcher at once; one that
        falls behind the feed (a slow client) goes back to passes of its own from where it is."""
        event_id, metric_id, log_id = _parse_cursor(request.after_cursor)
        passed = 0.0
        while True:
            # At most one pass per WATCH_PASS_S: a job reporting 10 steps a second is sent a few steps per pass,
            # and a burst of state changes (50 jobs starting) wakes every watcher once, not once per change.
            await asyncio.sleep(passed + WATCH_PASS_S - time.monotonic())
            passed = time.monotonic()
            events, job, metrics, logs = await self.jobs.watch_page(
                request.job_id, event_id, metric_id, log_id, MAX_PAGE
            )
            finished = JobState(job.state) in TERMINAL
            cut = max(len(events), len(metrics), len(logs)) >= MAX_PAGE
            updates, (event_id, metric_id, log_id) = watch_updates(
                (event_id, metric_id, log_id),
                [(r.id, event_to_pb(r)) for r in events],
                lambda: job_to_pb(job),  # noqa: B023 (called before the loop goes on)
                [(r.id, metric_to_pb(r)) for r in metrics],
                [(r.id, log_to_pb(r)) for r in logs],
                finished=finished,
                cut=cut,
            )
            found = [response for response, _ in updates]
            for message in _sent(found, request.batched):
                yield message
            if cut:
                continue  # more is stored already (a watcher starting behind, or catching up after the end)
            if finished:
                return
            # Caught up: follow the shared feed from here.
            with self.feed.follow(request.job_id, (event_id, metric_id, log_id)) as follower:
                while True:
                    items, done = await follower.take()
                    if items:
                        event_id, metric_id, log_id = items[-1][1]
                    for message in _sent([response for response, _ in items], request.batched):
                        yield message
                    if done:
                        return
                    if follower.behind:
                        break  # dropped by the feed: passes of its own from the last item sent


Cursor = tuple[int, int, int]  # (event id, metric id, log id) sent up to


def watch_updates(
    at: Cursor,
    events: list[tuple[int, pb.JobEvent]],
    snapshot: Callable[[], pb.Job],
    metrics: list[tuple[int, pb.MetricPoint]],
    logs: list[tuple[int, pb.LogLine]],
    *,
    finished: bool,
    cut: bool,
) -> tuple[list[tuple[pb.WatchJobResponse, Cursor]], Cursor]:
    """What one pass sends a watcher at `at` (each response with the cursor it reaches), and where it ends.

    Rows at or before the cursor are skipped. Transitions go first, then the job as it is after them, then
    points and lines, except for a job that has ended: its terminal state is the agent's last report, so every
    point and line was stored before it, and they go first; when the pass was `cut` at its page size (more
    points or lines are stored), its transitions wait for a later pass. A watcher (a browser, the dashboard)
    may so stop at the terminal snapshot: nothing comes after it. Points reported during a database outage
    and stored together with the end once it was back came after the snapshot before this rule, and a watcher
    that stopped there missed them (tests/reliability/test_postgres_restart.py).
    """
    e, m, lg = at
    out: list[tuple[pb.WatchJobResponse, Cursor]] = []

    def send_events() -> None:
        nonlocal e
        sent = False
        for row_id, event in events:
            if row_id > e:
                e, sent = row_id, True
                out.append((pb.WatchJobResponse(cursor=_cursor(e, m, lg), event=event), (e, m, lg)))
        if sent:
            out.append((pb.WatchJobResponse(cursor=_cursor(e, m, lg), job=snapshot()), (e, m, lg)))

    if not finished:
        send_events()
    for row_id, point in metrics:
        if row_id > m:
            m = row_id
            out.append((pb.WatchJobResponse(cursor=_cursor(e, m, lg), metric=point), (e, m, lg)))
    for row_id, line in logs:
        if row_id > lg:
            lg = row_id
            out.append((pb.WatchJobResponse(cursor=_cursor(e, m, lg), log=line), (e, m, lg)))
    if finished and not cut:
        send_events()
    return out, (e, m, lg)


def _sent(updates: list[pb.WatchJobResponse], batched: bool) -> list[pb.WatchJobResponse]:
    """The messages that send these updates: one each, or all in one batch for a watcher that asked for it.

    Each message is a round trip of the stream's own (the next is sent when the last is done): with 100 streams
    following 30 points a second on a loaded 2-core machine, a message took 27-35 ms, so a stream could send
    little more than its points, fell behind and its points arrived seconds late (tests/reliability/load.py)."""
    if not batched or len(updates) <= 1:
        return updates
    messages: list[pb.WatchJobResponse] = []
    batch: list[pb.WatchJobResponse] = []
    size = 0
    for update in updates:
        # Under gRPC's default 4 MiB limit on a message received, however long the log lines.
        if batch and size + update.ByteSize() > WATCH_BATCH_BYTES:
            messages.append(pb.WatchJobResponse(cursor=batch[-1].cursor, batch=pb.WatchJobBatch(updates=batch)))
            batch, size = [], 0
        batch.append(update)
        size += update.ByteSize() + 8
    messages.append(pb.WatchJobResponse(cursor=batch[-1].cursor, batch=pb.WatchJobBatch(updates=batch)))
    return messages


class _Follower:
    """One WatchJob stream on the feed: the responses queued for it, and the cursor they reach."""

    def __init__(self, job_id: str, at: tuple[int, int, int]) -> None:
        self.job_id = job_id
        self.at = at
        self.items: list[tuple[pb.WatchJobResponse, tuple[int, int, int]]] = []
        self.wake = asyncio.Event()
        self.finished = False
        self.behind = False
        self.error: BaseException | None = None

    async def take(self) -> tuple[list[tuple[pb.WatchJobResponse, tuple[int, int, int]]], bool]:
        """What is queued (waiting for some), and whether the stream ends after it; raises the feed's error."""
        while not (self.items or self.finished or self.behind or self.error):
            self.wake.clear()
            await self.wake.wait()
        if self.error is not None:
            raise self.error
        items, self.items = self.items, []
        return items, self.finished

    def push(self, response: pb.WatchJobResponse, at: tuple[int, int, int]) -> None:
        self.items.append((response, at))
        self.at = at


class WatchFeed:
    """Reads for every caught-up WatchJob stream of this replica at once: one pass (Jobs.watch_pages, a few
    queries) per FEED_PASS_S at most for all of them, when a report or change of one of their jobs commits here,
    and every WATCH_POLL_S anyway, for what another replica stored (the database stays the source of truth).

    Before it, each stream made a pass of its own (four queries) on every commit of its job, at most one per
    0.25 s: 100 watchers of 50 jobs reporting 10 steps a second (tests/reliability/load.py) made some 1,600
    queries a second, saturated the 2-core machine and every point reached its watcher 11-14 s late (p50/p95).
    Each stream still gets every row of its job after its own cursor, once and in order.
    """

    def __init__(self, jobs: Jobs, changes: Notifier) -> None:
        self.jobs = jobs
        self.followers: dict[str, set[_Follower]] = {}
        self.dirty: set[str] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        changes.listen(self._changed)

    def _changed(self, keys: tuple[str, ...]) -> None:
        touched = self.followers.keys() if not keys else [k for k in keys if k in self.followers]
        if touched:
            self.dirty.update(touched)
            self.wake.set()

    @contextlib.contextmanager
    def follow(self, job_id: str, at: tuple[int, int, int]) -> Iterator[_Follower]:
        follower = _Follower(job_id, at)
        self.followers.setdefault(job_id, set()).add(follower)
        self.dirty.add(job_id)  # what committed since the stream's own pass
        self.wake.set()
        if self.task is None or self.task.done():
            # Its own context: it reads for every watcher, so it carries none's credentials.
            self.task = asyncio.create_task(self._run(), context=contextvars.Context())
        try:
            yield follower
        finally:
            self._drop(follower)

    def _drop(self, follower: _Follower) -> None:
        followers = self.followers.get(follower.job_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self.followers[follower.job_id]

    async def _run(self) -> None:
        passed = polled = 0.0
        while self.followers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, polled + WATCH_POLL_S - time.monotonic()))
            await asyncio.sleep(passed + FEED_PASS_S - time.monotonic())
            self.wake.clear()
            passed = time.monotonic()
            if passed - polled >= WATCH_POLL_S:
                polled, self.dirty = passed, set(self.followers)
            job_ids, self.dirty = self.dirty & self.followers.keys(), set()
            if not job_ids:
                continue
            try:
                # Bounded: a read that never comes back would stall every watcher of this replica.
                async with asyncio.timeout(FEED_PASS_TIMEOUT_S):
                    await self._pass(job_ids)
            except Exception:
                # The database may be away (a restart): the streams wait, and the next pass reads it all.
                log.warning("watch feed pass failed; retrying", exc_info=True)
                self.dirty |= job_ids
                await asyncio.sleep(WATCH_POLL_S)

    async def _pass(self, job_ids: set[str]) -> None:
        # Only the followers there now: one that joins during the read may be behind what it reads from (it is
        # marked to be read for, and the next pass reads from its cursor).
        readers = {job_id: list(self.followers[job_id]) for job_id in job_ids}
        cursors: dict[str, tuple[int, int, int]] = {}
        for job_id, followers in readers.items():
            ats = [f.at for f in followers]
            cursors[job_id] = (min(a[0] for a in ats), min(a[1] for a in ats), min(a[2] for a in ats))
        events, jobs, metrics, logs, full = await self.jobs.watch_pages(cursors, FEED_PAGE)
        by_job: dict[str, tuple[list[Any], list[Any], list[Any]]] = {j: ([], [], []) for j in cursors}
        for kind, rows in enumerate((events, metrics, logs)):
            for row in rows:
                by_job[row.job_id][kind].append(row)
        for job_id, (job_events, job_metrics, job_logs) in by_job.items():
            job = jobs.get(job_id)
            followers = readers[job_id]
            if job is None:
                for follower in followers:
                    follower.error = NotFound(f"job {job_id!r} not found")
                    follower.wake.set()
                continue
            snapshot = functools.cache(functools.partial(job_to_pb, job))  # made once, for the first follower
            event_pairs = [(r.id, event_to_pb(r)) for r in job_events]
            metric_pairs = [(r.id, metric_to_pb(r)) for r in job_metrics]
            log_pairs = [(r.id, log_to_pb(r)) for r in job_logs]
            finished = JobState(job.state) in TERMINAL
            for follower in followers:
                updates, _ = watch_updates(
                    follower.at, event_pairs, snapshot, metric_pairs, log_pairs, finished=finished, cut=full
                )
                for response, at in updates:
                    follower.push(response, at)
                if full:
                    self.dirty.add(job_id)  # more is stored already: read on before calling it finished
                    self.wake.set()
                elif finished:
                    follower.finished = True
                if len(follower.items) > FEED_BACKLOG:
                    # A slow reader: it reads on by itself from the last item it took.
                    follower.items, follower.behind = [], True
                    self._drop(follower)
                follower.wake.set()


class ReportWriter:
    """Stores the batches of every agent's ReportJob stream together: each transaction takes what the streams
    have sent while the ones before it were being stored.

    One transaction per stream's batch means 500 transactions a second of one report each with 50 agents at
    10 reports/s (tests/reliability/load.py); storing them together cut the jobs service's CPU per report by a
    quarter at 10 agents (3.8 -> 2.8 ms, on a busy machine), more as agents are added. Up to REPORT_WRITERS
    transactions run at once, on batches of different jobs: with one, this process prepared a batch while
    PostgreSQL idled and then waited while PostgreSQL stored it, one core busy of two. A stream still waits for
    its own batch to be stored before it acknowledges it and sends the next, so each stream's reports keep their
    order; a batch whose job another transaction is storing (an agent's old stream and its new one) waits for
    it. When a combined transaction fails, each batch in it is stored on its own, so one agent's bad report
    fails only its own stream, as before.
    """

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.waiting: list[tuple[list[Report], asyncio.Future[ReportAcks]]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.storing: set[str] = set()  # the jobs of the batches in the running transactions

    async def apply(self, reports: list[Report]) -> ReportAcks:
        """The acknowledgements of these reports (only theirs) once they are stored."""
        future: asyncio.Future[ReportAcks] = asyncio.get_running_loop().create_future()
        self.waiting.append((reports, future))
        self._start()
        return await future

    def _start(self) -> None:
        while len(self.tasks) < REPORT_WRITERS:
            batches, jobs = self._take()
            if not batches:
                return
            self.storing |= jobs
            # Its own context: the writer stores every caller's reports, so it carries none's credentials.
            task = asyncio.create_task(self._store(batches), context=contextvars.Context())
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._stored, jobs))

    def _stored(self, jobs: set[str], task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.storing -= jobs
        if not task.cancelled() and (exc := task.exception()) is not None:  # a bug: _store answers every caller
            log.error("report writer failed", exc_info=exc)
        self._start()

    def _take(self) -> tuple[list[tuple[list[Report], asyncio.Future[ReportAcks]]], set[str]]:
        """Waiting batches, in arrival order, up to REPORT_BATCH reports, of none of the jobs being stored; and
        their jobs."""
        taken: list[tuple[list[Report], asyncio.Future[ReportAcks]]] = []
        left: list[tuple[list[Report], asyncio.Future[ReportAcks]]] = []
        size, busy, taken_jobs = 0, set(self.storing), set[str]()
        for reports, future in self.waiting:
            if future.done():  # its caller is gone
                continue
            jobs = {r.job_id for r in reports}
            if (taken and size + len(reports) > REPORT_BATCH) or jobs & busy:
                left.append((reports, future))
                busy |= jobs  # a later batch of the same job waits behind this one
                continue
            taken.append((reports, future))
            size += len(reports)
            busy |= jobs
            taken_jobs |= jobs
        self.waiting = left
        return taken, taken_jobs

    async def _store(self, batches: list[tuple[list[Report], asyncio.Future[ReportAcks]]]) -> None:
        try:
            acks = await self.jobs.apply_reports([r for reports, _ in batches for r in reports])
        except Exception as exc:
            if len(batches) == 1:
                # Its stream may have gone meanwhile (a cancelled future): setting it then would raise and
                # end this task with the other streams' batches still waiting.
                if not batches[0][1].done():
                    batches[0][1].set_exception(exc)
                return
            for reports, future in batches:
                try:
                    own = await self.jobs.apply_reports(reports)
                except Exception as exc:
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(own)
            return
        for reports, future in batches:
            if not future.done():
                future.set_result(_acks_of(acks, reports))


def _acks_of(acks: ReportAcks, reports: list[Report]) -> ReportAcks:
    """The acknowledgements of these reports' (job, attempt)s only: an agent hears of no other agent's jobs."""
    keys = {(r.job_id, r.attempt) for r in reports}
    own = ReportAcks()
    own.update((key, seq) for key, seq in acks.items() if key in keys)
    own.fenced = {key: why for key, why in acks.fenced.items() if key in keys}
    return own


class AssignmentWake:
    """One assignment stream's wake-up: set when its agent could take a job or has jobs to stop (`stops`)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.stops = True  # a new stream sends the stops there are


class AssignmentWakes:
    """Wakes only the assignment streams of this replica that could act on a change, after one look at all of
    their agents (Jobs.agents_to_wake): one with a free slot while a job is queued, one with jobs to stop.

    Every job that ends wakes every scheduler on the Notifier. Each of 100 agents' streams then claimed on its
    own, most of them full: their claims took the connections and the event loop from the claims that could
    take a job, which waited 0.5-1.5 s (bench/bench_scheduler.py). The look also replaces each stream's own poll
    for other replicas' changes.
    """

    def __init__(self, jobs: Jobs, changes: Notifier) -> None:
        self.jobs = jobs
        self.changes = changes
        self.streams: dict[str, set[AssignmentWake]] = {}
        self.task: asyncio.Task[None] | None = None

    def enter(self, agent_id: str) -> AssignmentWake:
        wake = AssignmentWake()
        self.streams.setdefault(agent_id, set()).add(wake)
        if self.task is None or self.task.done():
            # Its own context: it looks for every agent's stream, so it carries none's credentials.
            self.task = asyncio.create_task(self.run(), context=contextvars.Context())
        return wake

    def leave(self, agent_id: str, wake: AssignmentWake) -> None:
        streams = self.streams.get(agent_id, set())
        streams.discard(wake)
        if not streams:
            self.streams.pop(agent_id, None)
        if not self.streams and self.task is not None:
            self.task.cancel()
            self.task = None

    async def run(self) -> None:
        while True:
            ticket = self.changes.ticket()  # before the look: a change that commits meanwhile makes another
            try:
                woken = await self.jobs.agents_to_wake(list(self.streams))
            except Exception:
                log.exception("looking for the agents to assign to failed; every assignment stream looks itself")
                woken = dict.fromkeys(self.streams, True)
            for agent_id, stops in woken.items():
                for wake in self.streams.get(agent_id, ()):
                    wake.stops |= stops
                    wake.event.set()
            await self.changes.wait(ASSIGN_POLL_S, ticket=ticket)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, jobs: Jobs, changes: Notifier, router: InferenceRouter) -> None:
        self.jobs = jobs
        self.changes = changes
        self.router = router
        self.writer = ReportWriter(jobs)
        self.assignments = AssignmentWakes(jobs, changes)

    @map_errors
    async def ServeInference(
        self, request_iterator: AsyncIterator[apb.ServeInferenceRequest], context: Any
    ) -> AsyncIterator[apb.ServeInferenceResponse]:
        from .lifecycle_api import serve_inference  # it imports this module's encoders

        async for call in serve_inference(self.jobs, self.router, request_iterator):
            yield call

    @map_errors
    async def JoinAgent(self, request: apb.JoinAgentRequest, context: Any) -> apb.JoinAgentResponse:
        credential_id, credential = await self.jobs.join_agent(request.join_token, request.name)
        return apb.JoinAgentResponse(credential=credential, credential_id=credential_id)

    @map_errors
    async def RegisterAgent(self, request: apb.RegisterAgentRequest, context: Any) -> apb.RegisterAgentResponse:
        resources = json_format.MessageToDict(request.resources, preserving_proto_field_name=True)
        agent_id, resumed = await self.jobs.register_agent(
            request.name, resources, request.resources.slots or 1, request.resume_agent_id
        )
        return apb.RegisterAgentResponse(
            agent_id=agent_id,
            heartbeat_interval_seconds=self.jobs.heartbeat_interval_seconds,
            lease_ttl_seconds=self.jobs.lease_ttl_seconds,
            resumed=resumed,
        )

    @map_errors
    async def Heartbeat(self, request: apb.HeartbeatRequest, context: Any) -> apb.HeartbeatResponse:
        await self.jobs.check_agent_caller(request.agent_id)
        stop = await self.jobs.heartbeat(request.agent_id, list(request.running_job_ids))
        return apb.HeartbeatResponse(cancel_job_ids=stop)

    @map_errors
    async def StreamAssignments(
        self, request: apb.StreamAssignmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[apb.StreamAssignmentsResponse]:
        """Assignments as jobs fit the agent, then stops for its jobs: a cancellation for a terminate, one with
        checkpoint_first for a pause. Each stop is sent once per stream (a reconnect sends it again)."""
        await self.jobs.check_agent_caller(request.agent_id)
        stops_sent: set[tuple[str, bool]] = set()
        wake = self.assignments.enter(request.agent_id)
        try:
            while True:
                wake.event.clear()  # before the claim: a wake-up while it runs makes another
                job = await self.jobs.claim_next(request.agent_id)
                if job is not None:
                    stops_sent = {s for s in stops_sent if s[0] != job.id}  # a new attempt may be stopped again
                    yield apb.StreamAssignmentsResponse(
                        assignment=apb.JobAssignment(
                            job_id=job.id,
                            attempt=job.attempt,
                            method_id=job.method_id,
                            entrypoint=job.entrypoint,
                            model_uri=job.model_uri,
                            dataset_uri=job.dataset_uri,
                            parameters=struct(json.loads(job.parameters)),
                            output_uri=job.output_uri,
                            resume_from_uri=job.resume_from_uri,
                            resume_from_step=job.resume_from_step,
                            checkpoint_uri=job.checkpoint_uri,
                            python_env=job.python_env,
                            saving_entrypoint=job.saving_entrypoint,
                            saving_python_env=job.saving_python_env,
                            validation_dataset_uri=job.validation_dataset_uri,
                            kind=job.kind,
                            adapter_uri=job.adapter_uri,
                            gpu_count=scheduler.ResourceRequest.from_json(job.resources).gpu_count,
                        )
                    )
                    if not job.agent_full:
                        continue
                    # Full: claiming again would only read that; a slot that frees wakes this stream.
                if wake.stops:
                    wake.stops = False
                    for stop in await self.jobs.cancelling_jobs(request.agent_id):
                        if stop not in stops_sent:
                            stops_sent.add(stop)
                            job_id, checkpoint_first = stop
                            yield apb.StreamAssignmentsResponse(
                                cancellation=apb.JobCancellation(job_id=job_id, checkpoint_first=checkpoint_first)
                            )
                await wake.event.wait()
        finally:
            self.assignments.leave(request.agent_id, wake)

    @map_errors
    async def ReportJob(
        self, request_iterator: AsyncIterator[apb.ReportJobRequest], context: Any
    ) -> AsyncIterator[apb.ReportJobResponse]:
        """Reports that arrive while a batch is being stored are stored together in the next transaction."""
        queue: asyncio.Queue[apb.ReportJobRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    queue.put_nowait(req)
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        checked_agents: set[str] = set()
        try:
            while (first := await queue.get()) is not None:
                batch, ended = decode_reports(first), False
                while len(batch) < REPORT_BATCH and not queue.empty():
                    item = queue.get_nowait()
                    if item is None:
                        ended = True
                        break
                    batch += decode_reports(item)
                for agent_id in {r.agent_id for r in batch} - checked_agents:
                    await self.jobs.check_agent_caller(agent_id)  # then job ownership is fenced per report
                    checked_agents.add(agent_id)
                acks = await self.writer.apply(batch)
                for (job_id, attempt), seq in acks.items():
                    # A fenced attempt no longer owns its job: its reports were refused and the agent must stop it.
                    why = acks.fenced.get((job_id, attempt), "")
                    yield apb.ReportJobResponse(
                        job_id=job_id, attempt=attempt, acked_seq=seq, stop=bool(why), reason=why
                    )
                if ended:
                    break
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def decode_reports(req: apb.ReportJobRequest) -> list[Report]:
    """The reports of one message: its own (when it has one), then `reports` in their order."""
    if len(req.reports) > MAX_REPORTS_PER_MESSAGE:
        # One message is one transaction's worth at most (an agent sends 500): more would make one batch of it.
        raise InvalidArgument.for_field("reports", f"must hold at most {MAX_REPORTS_PER_MESSAGE} reports")
    own = [decode_report(req, req.agent_id)] if req.WhichOneof("report") or not req.reports else []
    return own + [decode_report(r, req.agent_id, f"reports[{i}].") for i, r in enumerate(req.reports)]


def decode_report(req: apb.ReportJobRequest | apb.JobReport, agent_id: str, where: str = "") -> Report:
    """One report, from a request's own fields or one of its `reports` (`where` prefixes the field names
    that errors name)."""
    when = dt.datetime.fromtimestamp(req.time_unix, dt.UTC) if req.time_unix else dt.datetime.now(dt.UTC)
    head = functools.partial(Report, req.job_id, req.attempt, req.seq, time=when, agent_id=agent_id)
    kind = req.WhichOneof("report")
    if kind == "state":
        state = _REPORTED.get(req.state.state)
        if state is None:
            raise InvalidArgument.for_field(f"{where}state.state", "must be set")
        return head(kind="state", state=state, reason=req.state.reason, output_uri=req.state.output_uri)
    if kind == "metric":
        m = req.metric
        return head(
            kind="metric",
            step=m.step,
            values=dict(m.values),
            total_steps=m.total_steps,
            progress=m.progress_percent,
        )
    if kind == "log":
        return head(kind="log", stream=req.log.stream, text=req.log.text)
    if kind == "checkpoint":
        c = req.checkpoint
        if not c.uri:
            raise InvalidArgument.for_field(f"{where}checkpoint.uri", "is required")
        return head(kind="checkpoint", step=c.step, output_uri=c.uri, values=dict(c.metrics))
    raise InvalidArgument.for_field(f"{where}report", "one of state, metric, log or checkpoint is required")


def bindings(jobs: Jobs, changes: Notifier, router: InferenceRouter | None = None) -> list[ServiceBinding]:
    """JobService, AgentService, ModelLifecycleService and InferenceService; `router` holds the agents' inference
    streams (a local one, without NATS, when not given: enough for one replica)."""
    from . import lifecycle_api  # it imports this module's encoders
    from .model_lifecycle import ModelLifecycle

    router = router or InferenceRouter()
    return [
        ServiceBinding(
            jobs_pb2_grpc.add_JobServiceServicer_to_server,
            JobServicer(jobs, changes),
            pb.DESCRIPTOR.services_by_name["JobService"].full_name,
        ),
        ServiceBinding(
            agent_pb2_grpc.add_AgentServiceServicer_to_server,
            AgentServicer(jobs, changes, router),
            apb.DESCRIPTOR.services_by_name["AgentService"].full_name,
        ),
        *lifecycle_api.bindings(ModelLifecycle(jobs, router), router),
    ]
