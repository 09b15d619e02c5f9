"""One upstream `JobService.WatchJob` stream per job, shared by every SSE watcher of that job.

A WatchJob cursor is "e<event_id>.m<metric_id>.l<log_id>": three ids, each only growing, that say "every event,
metric point and log line up to these ids has been sent". The hub keeps, per job, one upstream call, a bounded
replay buffer of its recent items (with their parsed cursors), and a count of the watchers reading it. Each
watcher reads the buffer at its own sequence number; nothing is queued per watcher, so memory is the buffer's.

The rule (pure, in `Position`), with P a watcher's position (the cursor it has everything up to):

- An item is *after* P by its own component: an event when its event id > P.e, a metric point when its
  metric id > P.m, a log line when its log id > P.l. A `job` snapshot goes with the events and carries the cursor
  of the event before it, so it is after P when its e > P.e, or when its e == P.e and P's last event item was
  not yet followed by a snapshot (`snapshot_owed`). A resumed cursor owes no snapshot, as the jobs service
  itself sends none for events before the cursor.
- Delivering an item moves P to the component-wise maximum of P and the item's cursor; that maximum is the
  `id:` sent with the item, so a browser's Last-Event-ID resumes exactly there even when P was ahead of the
  shared stream in some component.
- The buffer *covers* P when its start S (the position after everything evicted from it, or the cursor the
  upstream was opened at) is <= P in all three components, and S owes the snapshot P is owed if S.e == P.e.
  A covered watcher scans the buffer from its start delivering only items after P, then reads on live.
- A watcher that is not covered (a Last-Event-ID older than the buffer, or a reader that fell behind the buffer
  start because it reads slowly) catches up on a WatchJob call of its own from P, in its own request context
  (its credentials), until the buffer covers its position; then it closes that call and goes back to the
  shared buffer by the same scan. A slow reader so never blocks the shared stream and never makes the hub
  hold more than the buffer, and its browser sees no error or reconnect: falling behind costs one temporary
  upstream while it lasts, which is cheaper for everyone than an error event and a full reconnect.

Upstream failures: UNAVAILABLE (the jobs service restarting, a dropped connection) reconnects from the last
position with exponential backoff and jitter; since the service resends nothing before the cursor, watchers see
no gap or duplicate (and to get a snapshot still owed the hub asks from e-1 and drops the repeated event). Any
other code ends the job's watchers with that code. The upstream ending cleanly means the job reached a
terminal state: watchers get the rest of the buffer and their streams end. A job's entry goes away when its
last watcher leaves (its upstream is cancelled) or when its upstream ends; a later watcher starts a new one.

The shared upstream runs in a fresh `contextvars.Context`, so it never carries one watcher's credentials;
each watcher is authorised by the gateway's own `GetJob` before it subscribes.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
from prometheus_client import Gauge

from tuneforge.jobs.v1 import jobs_pb2 as jpb

UPSTREAM_WATCHES = Gauge(
    "tuneforge_gateway_upstream_watches", "JobService.WatchJob calls open now (shared and catch-up)"
)
# Codes after which the same call may work again; anything else (NOT_FOUND, PERMISSION_DENIED, ...) is final.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

# Opens a WatchJob call (a grpc.aio UnaryStreamCall) in the calling task's context.
OpenWatch = Callable[[jpb.WatchJobRequest], Any]
T = TypeVar("T")


@dataclass(frozen=True)
class WatchSettings:
    # Items kept per watched job for watchers that start or resume a little behind (about 30 s of a job
    # reporting 10 steps of 3 values a second); one further behind catches up on a call of its own. At 10,000
    # the buffers of 50 such jobs took 5.5 minutes to fill and the gateway grew by 80 MB a minute until they did
    # (tests/reliability/load.py); at 1,000 they are full after half a minute, some 25 MB for 50 jobs.
    buffer_size: int = 1_000
    keepalive_s: float = 15.0
    retry_first_s: float = 0.25
    retry_max_s: float = 15.0

    def retry_delay(self, failures: int) -> float:
        """Exponential backoff, jittered so that many gateways reconnecting after a restart spread out."""
        ceiling = min(self.retry_max_s, self.retry_first_s * 2 ** min(failures, 30))
        return random.uniform(ceiling / 2, ceiling)


class WatchFailed(Exception):
    """The job's watch ended with a gRPC code other than a clean end."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


@dataclass(frozen=True, slots=True)
class Position:
    """Everything up to these ids has been delivered; `snapshot_owed`: the last event still awaits its job."""

    event: int = 0
    metric: int = 0
    log: int = 0
    snapshot_owed: bool = False

    @classmethod
    def parse(cls, cursor: str) -> Position:
        """A WatchJob cursor ("" is the beginning); ValueError when it is not one."""
        if not cursor:
            return cls()
        parts = cursor.split(".")
        if len(parts) != 3 or [p[:1] for p in parts] != ["e", "m", "l"] or not all(p[1:].isdigit() for p in parts):
            raise ValueError(f"not a watch cursor: {cursor!r}")
        return cls(int(parts[0][1:]), int(parts[1][1:]), int(parts[2][1:]))

    @property
    def cursor(self) -> str:
        return f"e{self.event}.m{self.metric}.l{self.log}"

    def resume_cursor(self) -> str:
        """Where to ask the jobs service to resume: one event back when a snapshot is owed, since the service
        sends a job snapshot only after events it sends (the repeated event is then not after this position)."""
        if self.snapshot_owed:
            return replace(self, event=self.event - 1, snapshot_owed=False).cursor
        return "" if self == Position() else self.cursor

    def admits(self, item: Item) -> bool:
        at = item.at
        if item.kind == "event":
            return at.event > self.event
        if item.kind == "job":
            return at.event > self.event or (at.event == self.event and self.snapshot_owed)
        if item.kind == "metric":
            return at.metric > self.metric
        return at.log > self.log

    def advance(self, item: Item) -> Position:
        at = item.at
        owed = item.kind == "event" if item.kind in ("event", "job") else self.snapshot_owed
        return Position(max(self.event, at.event), max(self.metric, at.metric), max(self.log, at.log), owed)

    def covers(self, position: Position) -> bool:
        """As a buffer's start: the buffer holds every item after `position`."""
        behind = self.event <= position.event and self.metric <= position.metric and self.log <= position.log
        snapshot_kept = not position.snapshot_owed or self.snapshot_owed or self.event < position.event
        return behind and snapshot_kept


@dataclass(frozen=True, slots=True)
class Item:
    kind: str  # which of the update oneof: "event", "job", "metric" or "log"
    at: Position
    update: jpb.WatchJobResponse

    @classmethod
    def of(cls, update: jpb.WatchJobResponse) -> Item:
        return cls(update.WhichOneof("update") or "", Position.parse(update.cursor), update)


@dataclass(frozen=True, slots=True)
class Delivery:
    kind: str  # which of the update oneof: "event", "job", "metric" or "log"
    cursor: str  # the SSE id: where this watcher resumes after this item
    update: jpb.WatchJobResponse


async def watch_items(
    open_watch: OpenWatch, job_id: str, position: Position, settings: WatchSettings
) -> AsyncGenerator[Item, None]:
    """The items after `position`, each once, from WatchJob calls: reconnects on UNAVAILABLE from the last
    item's position; ends when the job's stream ends; raises WatchFailed for a final code."""
    failures = 0
    while True:
        # Batched: what each pass of the jobs service finds comes in one message, not one per point.
        call = open_watch(jpb.WatchJobRequest(job_id=job_id, after_cursor=position.resume_cursor(), batched=True))
        UPSTREAM_WATCHES.inc()
        try:
            async for message in call:
                updates = message.batch.updates if message.WhichOneof("update") == "batch" else [message]
                for update in updates:
                    try:
                        item = Item.of(update)
                    except ValueError:
                        raise WatchFailed(grpc.StatusCode.INTERNAL) from None
                    if position.admits(item):
                        position = position.advance(item)
                        failures = 0
                        yield item
            return
        except grpc.aio.AioRpcError as err:
            if err.code() not in RETRYABLE:
                raise WatchFailed(err.code()) from None
        finally:
            UPSTREAM_WATCHES.dec()
            call.cancel()
        await asyncio.sleep(settings.retry_delay(failures))
        failures += 1


class _JobWatch:
    """One job's shared upstream and its replay buffer; items are numbered by a sequence that only grows."""

    def __init__(self, job_id: str, start: Position, size: int) -> None:
        self.job_id = job_id
        self.start = start
        self.items: deque[Item] = deque()
        self.size = size
        self.first_seq = 0
        self.watchers = 0
        self.ended = False
        self.failure: grpc.StatusCode | None = None
        # Replaced on every change, so a waiter awaits the one that the next change sets.
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def next_seq(self) -> int:
        return self.first_seq + len(self.items)

    def append(self, item: Item) -> None:
        if len(self.items) == self.size:
            self.start = self.start.advance(self.items.popleft())
            self.first_seq += 1
        self.items.append(item)
        self._notify()

    def end(self, failure: grpc.StatusCode | None) -> None:
        if not self.ended:
            self.ended, self.failure = True, failure
            self._notify()

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class WatchHub:
    def __init__(self, open_watch: OpenWatch, settings: WatchSettings | None = None) -> None:
        self.open_watch = open_watch
        self.settings = settings or WatchSettings()
        self._watches: dict[str, _JobWatch] = {}

    async def watch(self, job_id: str, position: Position) -> AsyncGenerator[Delivery, None]:
        """Every item of the job after `position`, each once, in order; ends when the job's stream ends.

        The caller must have authorised this watcher for the job. A catch-up call runs in the caller's context.
        """
        shared = self._join(job_id, position)
        try:
            seq: int | None = None  # the next buffer item to read; None until this watcher reads the buffer
            while True:
                if seq is None or seq < shared.first_seq:
                    if not shared.start.covers(position):
                        caught_up = False
                        own = watch_items(self.open_watch, job_id, position, self.settings)
                        async with aclosing(own) as items:
                            async for item in items:
                                position = position.advance(item)
                                yield Delivery(item.kind, position.cursor, item.update)
                                if shared.start.covers(position):
                                    caught_up = True
                                    break
                        if not caught_up:
                            return  # the own call ran to the end of the job
                    seq = shared.first_seq  # rescan the whole buffer: only items after the position pass
                if seq < shared.next_seq:
                    item = shared.items[seq - shared.first_seq]
                    seq += 1
                    if position.admits(item):
                        position = position.advance(item)
                        yield Delivery(item.kind, position.cursor, item.update)
                elif shared.ended:
                    if shared.failure is not None:
                        raise WatchFailed(shared.failure)
                    return
                else:
                    await shared.changed.wait()
        finally:
            self._leave(shared)

    async def close(self) -> None:
        """Ends every watch with UNAVAILABLE, so browsers reconnect (to another replica) with Last-Event-ID."""
        watches, self._watches = list(self._watches.values()), {}
        for shared in watches:
            shared.end(grpc.StatusCode.UNAVAILABLE)
            if shared.task is not None:
                shared.task.cancel()
        for shared in watches:
            if shared.task is not None:
                with suppress(asyncio.CancelledError):
                    await shared.task

    def _join(self, job_id: str, position: Position) -> _JobWatch:
        shared = self._watches.get(job_id)
        if shared is None:
            shared = self._watches[job_id] = _JobWatch(job_id, position, self.settings.buffer_size)
            # A fresh context: the shared call must not carry the credentials of the watcher that started it.
            shared.task = asyncio.create_task(self._pump(shared), context=contextvars.Context())
        shared.watchers += 1
        return shared

    def _leave(self, shared: _JobWatch) -> None:
        shared.watchers -= 1
        if shared.watchers == 0 and self._watches.get(shared.job_id) is shared:
            del self._watches[shared.job_id]
            if shared.task is not None:
                shared.task.cancel()

    async def _pump(self, shared: _JobWatch) -> None:
        failure: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE  # unless it ends or fails otherwise
        try:
            async with aclosing(watch_items(self.open_watch, shared.job_id, shared.start, self.settings)) as items:
                async for item in items:
                    shared.append(item)
            failure = None
        except WatchFailed as failed:
            failure = failed.code
        finally:
            shared.end(failure)
            if self._watches.get(shared.job_id) is shared:
                del self._watches[shared.job_id]


async def with_keepalive(items: AsyncGenerator[T, None], every_s: float) -> AsyncGenerator[T | None, None]:
    """The items, and None after each `every_s` seconds without one (an SSE comment keeps proxies open).

    The next item is awaited in a task that outlives a quiet interval, so no read is ever cancelled halfway.
    """

    async def next_item() -> T:
        return await anext(items)

    pending: asyncio.Task[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(next_item())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await items.aclose()
