"""The gateway's job event streams: all SSE watchers of a job share one upstream WatchJob call (watch_hub.py).

A fake JobService on an in-process grpc.aio server serves one job's history with the jobs service's cursor
rules and counts its WatchJob calls; the gateway runs under a real uvicorn on port 0 so that every watcher is
a real streaming HTTP connection that can be read slowly, dropped and reconnected with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import uvicorn

from tests.rpc.test_gateway_catalog import Recorder
from tuneforge.jobs.v1 import jobs_pb2 as jpb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common.grpcutil import ServiceBinding, start_server
from tuneforge_gateway.app import create_app
from tuneforge_gateway.watch_hub import Delivery, Item, Position, WatchHub, WatchSettings

JOB = "job-1"
TERMINAL = {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED}
FAST_RETRY = {"retry_first_s": 0.05, "retry_max_s": 0.2}
UPSTREAMS, SSE_STREAMS = "tuneforge_gateway_upstream_watches", "tuneforge_gateway_open_streams"


class JobHistory(Recorder, jobs_pb2_grpc.JobServiceServicer):
    """One job's stored history, written by the test and served as the jobs service serves it: after the
    cursor, new events, then (when there were any) a snapshot of the job carrying the last event's cursor,
    then metric points, then log lines; again on every change; the stream ends once the job is finished.
    Event and log ids are sparse, as the real ones are."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[jpb.JobEvent] = []
        self.metrics: list[jpb.MetricPoint] = []  # a point's id is its index + 1
        self.logs: list[jpb.LogLine] = []
        self.state: jpb.JobState.ValueType = jpb.JOB_STATE_QUEUED
        self.changed = asyncio.Event()
        self.open_watches = 0
        self.cancelled_watches = 0
        # The next WatchJob call fails with UNAVAILABLE right after sending this many items.
        self.unavailable_after: int | None = None
        # Open watches end with this code at the next change (the job deleted, access revoked).
        self.end_with: grpc.StatusCode | None = None

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def transition(self, to_state: jpb.JobState.ValueType) -> None:
        seq = 7 * (len(self.events) + 1)
        self.events.append(jpb.JobEvent(seq=seq, from_state=self.state, to_state=to_state))
        self.state = to_state
        self._notify()

    def metric(self, count: int = 1, text: str = "") -> None:
        for _ in range(count):
            step = len(self.metrics) + 1
            self.metrics.append(jpb.MetricPoint(name="loss" + text, step=step, value=1.0 / step))
        self._notify()

    def log(self, count: int = 1) -> None:
        for _ in range(count):
            seq = 10 * (len(self.logs) + 1)
            self.logs.append(jpb.LogLine(seq=seq, stream="stdout", text=f"line {seq}"))
        self._notify()

    def fail(self, code: grpc.StatusCode) -> None:
        self.end_with = code
        self._notify()

    async def GetJob(self, request: jpb.GetJobRequest, context: Any) -> jpb.GetJobResponse:
        await self.enter("GetJob", request, context)
        return jpb.GetJobResponse(job=jpb.Job(id=request.job_id, state=self.state))

    async def WatchJob(self, request: jpb.WatchJobRequest, context: Any) -> AsyncIterator[jpb.WatchJobResponse]:
        await self.enter("WatchJob", request, context)
        found = re.fullmatch(r"e(\d+)\.m(\d+)\.l(\d+)", request.after_cursor)
        e, m, lg = (int(x) for x in found.groups()) if found else (0, 0, 0)
        fail_after, self.unavailable_after = self.unavailable_after, None
        self.open_watches += 1
        try:
            while True:
                changed, finished = self.changed, self.state in TERMINAL
                batch: list[jpb.WatchJobResponse] = []
                for event in [x for x in self.events if x.seq > e]:
                    e = event.seq
                    batch.append(jpb.WatchJobResponse(cursor=f"e{e}.m{m}.l{lg}", event=event))
                if batch:
                    job = jpb.Job(id=request.job_id, state=self.state)
                    batch.append(jpb.WatchJobResponse(cursor=f"e{e}.m{m}.l{lg}", job=job))
                for point in self.metrics[m:]:
                    m += 1
                    batch.append(jpb.WatchJobResponse(cursor=f"e{e}.m{m}.l{lg}", metric=point))
                for line in [x for x in self.logs if x.seq > lg]:
                    lg = line.seq
                    batch.append(jpb.WatchJobResponse(cursor=f"e{e}.m{m}.l{lg}", log=line))
                for update in batch:
                    yield update
                    if fail_after is not None:
                        fail_after -= 1
                        if fail_after == 0:
                            await context.abort(grpc.StatusCode.UNAVAILABLE, "jobs service restarting")
                if finished:
                    return
                if self.end_with is not None:
                    await context.abort(self.end_with, "gone")
                await changed.wait()
        except asyncio.CancelledError:
            self.cancelled_watches += 1
            raise
        finally:
            self.open_watches -= 1


@pytest.fixture
async def jobs() -> AsyncIterator[JobHistory]:
    fake = JobHistory()
    binding = ServiceBinding(jobs_pb2_grpc.add_JobServiceServicer_to_server, fake, "tuneforge.jobs.v1.JobService")
    server, port = await start_server([binding], "127.0.0.1", 0)
    fake.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield fake
    await server.stop(None)


@asynccontextmanager
async def gateway(jobs: JobHistory, tmp_path: Any, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app under a real uvicorn on port 0, and an HTTP client for it."""
    app = create_app(jobs.address, jobs.address, upload_dir=tmp_path / "spool", watch=WatchSettings(**settings))  # type: ignore[attr-defined]
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


@dataclass(frozen=True)
class Message:
    id: str
    event: str
    data: dict[str, Any]

    @property
    def key(self) -> tuple[str, Any]:
        """What the message is about: an event or log line by its id, a metric point by its step, a job
        snapshot by its state and cursor."""
        if self.event == "metric":
            return ("metric", int(self.data["step"]))
        if self.event == "job":
            return ("job", (self.data["state"], self.id))
        return (self.event, self.data.get("seq", self.data.get("code")))


class Watcher:
    """One browser's EventSource: a streaming GET of the job's events, kept until the stream ends or close()."""

    def __init__(self, http: httpx.AsyncClient, last_event_id: str = "") -> None:
        self.http, self.last_event_id = http, last_event_id
        self.messages: list[Message] = []
        self.comments: list[str] = []
        self.status: int | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        async with self.http.stream("GET", f"/api/v1/jobs/{JOB}/events", headers=headers) as resp:
            self.status = resp.status_code
            fields: dict[str, str] = {}
            async for line in resp.aiter_lines():
                if line.startswith(":"):
                    self.comments.append(line)
                elif line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                elif fields:
                    self.messages.append(Message(fields.get("id", ""), fields["event"], json.loads(fields["data"])))
                    fields = {}

    @property
    def keys(self) -> list[tuple[str, Any]]:
        return [m.key for m in self.messages]

    async def until(self, what: str, done: Callable[[], bool]) -> None:
        def done_or_ended() -> bool:
            assert done() or not self.task.done(), f"the stream ended before {what}: {self.keys}"
            return done()

        await eventually(what, done_or_ended)

    async def ended(self) -> list[tuple[str, Any]]:
        await asyncio.wait_for(asyncio.shield(self.task), 10)
        return self.keys

    async def close(self) -> None:
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task


async def eventually(what: str, done: Callable[[], bool], seconds: float = 10) -> None:
    """Polls `done`: the fakes' and the HTTP client's state changes have no event to await."""
    for _ in range(int(seconds / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {seconds} s: {what}")


def gauge(metrics_text: str, name: str) -> float:
    return float(next(x for x in metrics_text.splitlines() if x.startswith(name + " ")).split()[1])


def content(jobs: JobHistory) -> dict[str, list[Any]]:
    """What every watcher from the beginning must get, kind by kind, each once and in order."""
    return {
        "event": [e.seq for e in jobs.events],
        "metric": [p.step for p in jobs.metrics],
        "log": [x.seq for x in jobs.logs],
    }


def by_kind(keys: list[tuple[str, Any]]) -> dict[str, list[Any]]:
    return {kind: [k for kd, k in keys if kd == kind] for kind in ("event", "metric", "log")}


def cursors_only_grow(messages: list[Message]) -> bool:
    positions = [tuple(int(x) for x in re.findall(r"\d+", m.id)) for m in messages]
    return all(all(a <= b for a, b in zip(p, q, strict=True)) for p, q in itertools.pairwise(positions))


# -- the rule, as pure functions -------------------------------------------------------------------------------


def item(kind: str, cursor: str) -> Item:
    update = jpb.WatchJobResponse(cursor=cursor)
    {"event": update.event, "job": update.job, "metric": update.metric, "log": update.log}[kind].SetInParent()
    return Item.of(update)


def test_an_item_is_after_a_cursor_by_its_own_component_and_a_snapshot_goes_with_its_event():
    at = Position.parse("e5.m50.l500")
    assert at.admits(item("event", "e6.m0.l0")) and not at.admits(item("event", "e5.m99.l999"))
    assert at.admits(item("metric", "e0.m51.l0")) and not at.admits(item("metric", "e9.m50.l999"))
    assert at.admits(item("log", "e0.m0.l501")) and not at.admits(item("log", "e9.m99.l500"))
    # A resumed cursor owes no snapshot for its last event (the jobs service resends none)...
    assert not at.admits(item("job", "e5.m50.l500")) and at.admits(item("job", "e6.m0.l0"))
    # ...but right after that event arrives, its snapshot is due, and only once.
    after_event = at.advance(item("event", "e6.m50.l500"))
    assert after_event.snapshot_owed and after_event.admits(item("job", "e6.m50.l500"))
    after_snapshot = after_event.advance(item("job", "e6.m50.l500"))
    assert not after_snapshot.snapshot_owed and not after_snapshot.admits(item("job", "e6.m50.l500"))


def test_delivering_moves_the_position_to_the_componentwise_maximum_and_resumes_one_event_back_when_owed():
    ahead_in_metrics = Position.parse("e1.m90.l0")
    moved = ahead_in_metrics.advance(item("event", "e2.m40.l3"))
    assert moved.cursor == "e2.m90.l3"  # the id sent never takes a component back
    assert moved.resume_cursor() == "e1.m90.l3"  # so that the service sends event 2's snapshot again
    assert moved.advance(item("job", "e2.m40.l3")).resume_cursor() == "e2.m90.l3"


def test_a_buffer_covers_a_cursor_only_when_its_start_is_at_or_before_it_in_every_component():
    start = Position.parse("e3.m30.l300")
    assert start.covers(Position.parse("e3.m30.l300")) and start.covers(Position.parse("e9.m31.l999"))
    assert not start.covers(Position.parse("e9.m29.l999"))  # metric points 30 and before are gone
    assert not start.covers(Position.parse("e2.m99.l999"))
    # A watcher still owed event 3's snapshot needs a buffer that still holds it.
    owed = Position.parse("e2.m30.l300").advance(item("event", "e3.m30.l300"))
    assert not start.covers(owed)
    assert start.advance(item("event", "e3.m0.l0")).covers(owed)


def test_a_cursor_that_is_not_a_watch_cursor_is_refused():
    assert Position.parse("") == Position()
    for bad in ("c-1", "e1.m2", "e1.m2.lx", "m1.e2.l3", "e-1.m0.l0"):
        with pytest.raises(ValueError):
            Position.parse(bad)


# -- through the gateway ---------------------------------------------------------------------------------------


async def test_twenty_watchers_of_one_job_share_one_upstream_watch_and_each_get_every_item_once_in_order(
    jobs, tmp_path
):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    jobs.metric(5)
    jobs.log(3)
    async with gateway(jobs, tmp_path) as http:
        before = (await http.get("/metrics")).text
        watchers = [Watcher(http) for _ in range(20)]
        for w in watchers:
            await w.until("the history so far", lambda w=w: len(w.messages) == 10)
        now = (await http.get("/metrics")).text
        assert gauge(now, UPSTREAMS) == gauge(before, UPSTREAMS) + 1
        assert gauge(now, SSE_STREAMS) == gauge(before, SSE_STREAMS) + 20

        jobs.metric(30)
        jobs.log(10)
        jobs.transition(jpb.JOB_STATE_SUCCEEDED)
        received = [await w.ended() for w in watchers]

        assert len(jobs.calls("WatchJob")) == 1
        assert all(keys == received[0] for keys in received)
        assert by_kind(received[0]) == content(jobs)
        assert len(set(received[0])) == len(received[0])
        assert [k for kind, k in received[0] if kind == "job"][-1][0] == "SUCCEEDED"
        assert all(cursors_only_grow(w.messages) for w in watchers)
        after = (await http.get("/metrics")).text
        assert (gauge(after, UPSTREAMS), gauge(after, SSE_STREAMS)) == (
            gauge(before, UPSTREAMS),
            gauge(before, SSE_STREAMS),
        )


async def test_a_reconnect_with_last_event_id_mid_stream_gets_the_rest_without_gap_or_duplicate(jobs, tmp_path):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    jobs.metric(8)
    jobs.log(4)
    async with gateway(jobs, tmp_path) as http:
        steady = Watcher(http)  # keeps the job's shared stream open across the reconnect
        dropping = Watcher(http)
        await dropping.until("part of the history", lambda: len(dropping.messages) >= 7)
        await dropping.close()
        seen = list(dropping.messages)
        jobs.metric(5)
        jobs.log(2)
        reconnected = Watcher(http, last_event_id=seen[-1].id)
        await reconnected.until("the new items", lambda: len(reconnected.messages) >= 1)
        jobs.transition(jpb.JOB_STATE_SUCCEEDED)
        rest = await reconnected.ended()
        await steady.ended()

    together = [m.key for m in seen] + rest
    assert by_kind(together) == content(jobs)
    assert len(set(together)) == len(together)
    assert len(jobs.calls("WatchJob")) == 1  # the reconnect was served from the shared stream's buffer


async def test_a_last_event_id_older_than_the_buffer_catches_up_on_its_own_call_then_joins_the_shared_one(
    jobs, tmp_path
):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    jobs.metric(3)
    async with gateway(jobs, tmp_path, buffer_size=5) as http:
        steady = Watcher(http)
        await steady.until("the first items", lambda: len(steady.messages) == 5)
        old_cursor = steady.messages[-1].id  # after event, snapshot and metric points 1 to 3
        for count in range(6, 28):  # one at a time, so that the steady watcher keeps up with the small buffer
            jobs.metric(1) if count < 26 else jobs.log(1)
            await steady.until("the new item", lambda count=count: len(steady.messages) == count)
        # The shared buffer now holds the last 5 of them: it starts far after the old cursor.

        late = Watcher(http, last_event_id=old_cursor)
        await late.until("the catch-up", lambda: len(late.messages) == 22)
        assert [c.after_cursor for c in jobs.calls("WatchJob")] == ["", old_cursor]
        # Caught up, it leaves its own call and reads on from the shared one.
        await eventually("the catch-up call is cancelled", lambda: jobs.open_watches == 1)
        jobs.metric(4)
        jobs.transition(jpb.JOB_STATE_SUCCEEDED)
        rest = await late.ended()
        await steady.ended()

    assert len(jobs.calls("WatchJob")) == 2
    everything = [m.key for m in steady.messages]
    assert by_kind(rest) == by_kind(everything[5:])
    assert len(set(rest)) == len(rest)
    assert cursors_only_grow(late.messages)


async def test_a_watcher_of_a_finished_job_gets_everything_and_its_stream_ends(jobs, tmp_path):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    jobs.metric(6)
    jobs.log(3)
    jobs.transition(jpb.JOB_STATE_SUCCEEDED)
    async with gateway(jobs, tmp_path) as http:
        first = await Watcher(http).ended()
        second = await Watcher(http).ended()  # the finished job's entry went away; a new call serves it
        metrics = (await http.get("/metrics")).text
    assert by_kind(first) == content(jobs) and second == first
    assert [k for kind, k in first if kind == "job"][-1][0] == "SUCCEEDED"
    assert jobs.open_watches == 0 and len(jobs.calls("WatchJob")) == 2
    assert gauge(metrics, UPSTREAMS) == 0


async def test_an_unavailable_upstream_is_resumed_from_the_last_cursor_without_gap_or_duplicate(jobs, tmp_path):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    jobs.metric(6)
    jobs.log(3)
    jobs.unavailable_after = 5  # event, snapshot, metric points 1 to 3; then the jobs service goes away
    async with gateway(jobs, tmp_path, **FAST_RETRY) as http:
        watchers = [Watcher(http) for _ in range(3)]
        for w in watchers:
            await w.until("the history so far", lambda w=w: len(w.messages) == 11)
        jobs.metric(2)
        jobs.transition(jpb.JOB_STATE_SUCCEEDED)
        received = [await w.ended() for w in watchers]

    calls = jobs.calls("WatchJob")
    assert [c.after_cursor for c in calls] == ["", watchers[0].messages[4].id]
    for keys in received:
        assert by_kind(keys) == content(jobs) and len(set(keys)) == len(keys)


async def test_an_upstream_lost_between_an_event_and_its_snapshot_still_delivers_the_snapshot_once(jobs, tmp_path):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    jobs.unavailable_after = 1  # the event goes out, its job snapshot does not
    async with gateway(jobs, tmp_path, **FAST_RETRY) as http:
        watcher = Watcher(http)
        await watcher.until("the event and its snapshot", lambda: len(watcher.messages) == 2)
        jobs.transition(jpb.JOB_STATE_SUCCEEDED)
        keys = await watcher.ended()

    first, second = jobs.events
    assert jobs.calls("WatchJob")[1].after_cursor == f"e{first.seq - 1}.m0.l0"  # one event back, for its snapshot
    assert keys == [
        ("event", first.seq),
        ("job", ("RUNNING", f"e{first.seq}.m0.l0")),
        ("event", second.seq),
        ("job", ("SUCCEEDED", f"e{second.seq}.m0.l0")),
    ]


async def test_the_upstream_watch_is_cancelled_when_the_last_watcher_disconnects(jobs, tmp_path):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    async with gateway(jobs, tmp_path) as http:
        watchers = [Watcher(http), Watcher(http)]
        for w in watchers:
            await w.until("the history so far", lambda w=w: len(w.messages) == 2)
        await watchers[0].close()
        jobs.metric(1)  # a write to the open connection is how the gateway sees a browser has gone
        await watchers[1].until("the new point", lambda: len(watchers[1].messages) == 3)
        assert (jobs.open_watches, jobs.cancelled_watches) == (1, 0)
        await watchers[1].close()
        await eventually("the upstream call is cancelled", lambda: jobs.cancelled_watches == 1)
        assert jobs.open_watches == 0
        assert gauge((await http.get("/metrics")).text, UPSTREAMS) == 0


async def test_a_job_gone_mid_stream_ends_its_watchers_with_an_error_event_and_no_retry(jobs, tmp_path):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    async with gateway(jobs, tmp_path, **FAST_RETRY) as http:
        watcher = Watcher(http)
        await watcher.until("the history so far", lambda: len(watcher.messages) == 2)
        jobs.fail(grpc.StatusCode.NOT_FOUND)
        keys = await watcher.ended()
    assert keys[-1] == ("error", "NOT_FOUND")
    assert len(jobs.calls("WatchJob")) == 1


async def test_a_quiet_stream_sends_keepalive_comments(jobs, tmp_path):
    jobs.transition(jpb.JOB_STATE_RUNNING)
    async with gateway(jobs, tmp_path, keepalive_s=0.05) as http:
        watcher = Watcher(http)
        await watcher.until("two keepalives", lambda: len(watcher.comments) >= 2)
        jobs.metric(1)
        await watcher.until("the new point", lambda: len(watcher.messages) == 3)
        await watcher.close()
    assert set(watcher.comments) == {": keepalive"}


async def test_a_last_event_id_that_is_no_cursor_is_a_400(jobs, tmp_path):
    async with gateway(jobs, tmp_path) as http:
        resp = await http.get(f"/api/v1/jobs/{JOB}/events", headers={"Last-Event-ID": "c-1"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert jobs.calls("WatchJob") == []


# -- the hub on its own ----------------------------------------------------------------------------------------


@pytest.fixture
async def stub(jobs: JobHistory) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    async with grpc.aio.insecure_channel(jobs.address) as channel:  # type: ignore[attr-defined]
        yield jobs_pb2_grpc.JobServiceStub(channel)


def keys_of(deliveries: list[Delivery]) -> list[tuple[str, int]]:
    out = []
    for d in deliveries:
        kind = d.update.WhichOneof("update")
        what = getattr(d.update, kind)
        out.append((kind, what.step if kind == "metric" else what.state if kind == "job" else what.seq))
    return out


async def test_a_slow_watcher_does_not_delay_a_fast_one_and_catches_up_on_its_own_call(jobs, stub):
    hub = WatchHub(stub.WatchJob, WatchSettings(buffer_size=20))
    jobs.transition(jpb.JOB_STATE_RUNNING)
    slow, fast = hub.watch(JOB, Position()), hub.watch(JOB, Position())
    slow_got = [await anext(slow), await anext(slow)]  # the event and its snapshot; then nothing for a while
    fast_got: list[Delivery] = []

    async def read_fast() -> None:
        async for delivery in fast:
            fast_got.append(delivery)

    reading = asyncio.create_task(read_fast())
    jobs.metric(300)
    jobs.log(100)
    jobs.transition(jpb.JOB_STATE_SUCCEEDED)
    await asyncio.wait_for(reading, 10)  # done while the slow one still sits on its first item
    slow_got += [d async for d in slow]
    await hub.close()

    assert keys_of(slow_got) == keys_of(fast_got)
    assert len(fast_got) == 2 + 300 + 100 + 2
    # The slow one fell behind the 20-item buffer and caught up on a call of its own from where it stopped.
    assert slow_got[1].cursor in [c.after_cursor for c in jobs.calls("WatchJob")[1:]]
    await eventually("every call has ended", lambda: jobs.open_watches == 0)


CREDENTIAL: contextvars.ContextVar[str] = contextvars.ContextVar("credential", default="none")


async def test_the_shared_call_carries_no_watchers_context_and_a_catch_up_call_carries_its_own(jobs, stub):
    opened_with: list[tuple[str, str]] = []

    def open_watch(request: jpb.WatchJobRequest) -> Any:
        opened_with.append((request.after_cursor, CREDENTIAL.get()))  # as a credentials interceptor reads it
        return stub.WatchJob(request)

    hub = WatchHub(open_watch, WatchSettings(buffer_size=3))
    jobs.transition(jpb.JOB_STATE_RUNNING)
    jobs.metric(2)
    leave = asyncio.Event()

    async def watch_as(credential: str, position: Position, got: list[Delivery], count: int) -> None:
        CREDENTIAL.set(credential)
        async with aclosing(hub.watch(JOB, position)) as deliveries:
            async for delivery in deliveries:
                got.append(delivery)
                if len(got) == count:
                    await leave.wait()
                    return

    alice_got: list[Delivery] = []
    bob_got: list[Delivery] = []
    alice = asyncio.create_task(watch_as("alice", Position(), alice_got, count=2 + 2 + 10))
    await eventually("alice reads the history", lambda: len(alice_got) == 4)
    jobs.metric(10)
    await eventually("alice reads the new points", lambda: len(alice_got) == 14)  # the 3-item buffer: 10 to 12
    bob = asyncio.create_task(watch_as("bob", Position.parse(f"e{jobs.events[0].seq}.m1.l0"), bob_got, count=11))
    await eventually("bob catches up", lambda: len(bob_got) == 11)
    leave.set()
    await asyncio.wait_for(asyncio.gather(alice, bob), 10)
    await hub.close()

    assert opened_with == [("", "none"), (f"e{jobs.events[0].seq}.m1.l0", "bob")]
    assert keys_of(bob_got) == [("metric", step) for step in range(2, 13)]
