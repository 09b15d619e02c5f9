"""Jobs use cases. Every state change is one transaction: compare-and-set on the row plus its outbox event."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tuneforge_common.db import new_id, utcnow
from tuneforge_common.errors import FailedPrecondition, InvalidArgument, NotFound, ViolationCollector
from tuneforge_common.events import write_event

from . import lifecycle, scheduler, store
from .lifecycle import JobState

log = logging.getLogger(__name__)
MAX_NAME = 255


@dataclass(frozen=True)
class CatalogInputs:
    model_uri: str
    dataset_uri: str
    entrypoint: str
    parameters: dict[str, Any]


class CatalogPort(Protocol):
    """What the jobs service needs from the catalog (gRPC in production)."""

    async def resolve_inputs(
        self, model_id: str, dataset_id: str, method_id: str, parameters: dict[str, Any]
    ) -> CatalogInputs: ...


@dataclass(frozen=True)
class Report:
    """One agent report, decoded from the wire."""

    job_id: str
    attempt: int
    seq: int
    kind: str  # state, metric, log
    time: dt.datetime
    agent_id: str = ""
    state: JobState | None = None
    reason: str = ""
    output_uri: str = ""
    step: int = 0
    values: dict[str, float] = field(default_factory=dict)
    total_steps: int = 0
    progress: float = 0.0
    stream: str = ""
    text: str = ""


@dataclass
class Jobs:
    engine: AsyncEngine
    catalog: CatalogPort
    artifact_root: str
    subject_root: str
    max_attempts: int = 3
    lease_ttl_seconds: int = 15
    heartbeat_interval_seconds: int = 3
    clock: Callable[[], dt.datetime] = utcnow
    on_event: Callable[[], None] | None = None  # wakes the outbox publisher
    on_change: Callable[[], None] | None = None  # wakes schedulers and watchers

    def _after_commit(self) -> None:
        for hook in (self.on_event, self.on_change):
            if hook:
                hook()

    # -- users ----------------------------------------------------------------

    async def submit(
        self,
        model_id: str,
        dataset_id: str,
        method_id: str,
        parameters: dict[str, Any],
        priority: int = 0,
        name: str = "",
    ) -> Any:
        errors = ViolationCollector()
        for field_name, value in (("model_id", model_id), ("dataset_id", dataset_id), ("method_id", method_id)):
            if not value:
                errors.add(field_name, "is required")
        if not -1000 <= priority <= 1000:
            errors.add("priority", "must be between -1000 and 1000")
        if len(name) > MAX_NAME:
            errors.add("name", f"must be at most {MAX_NAME} characters")
        errors.raise_if_any()
        inputs = await self.catalog.resolve_inputs(model_id, dataset_id, method_id, parameters)
        job_id = new_id("job")
        now = self.clock()
        async with self.engine.begin() as conn:
            await conn.execute(
                store.jobs.insert().values(
                    id=job_id,
                    name=name,
                    model_id=model_id,
                    dataset_id=dataset_id,
                    method_id=method_id,
                    model_uri=inputs.model_uri,
                    dataset_uri=inputs.dataset_uri,
                    entrypoint=inputs.entrypoint,
                    parameters=json.dumps(inputs.parameters),
                    state=JobState.QUEUED,
                    state_reason="",
                    attempt=0,
                    max_attempts=self.max_attempts,
                    priority=priority,
                    output_uri="",
                    current_step=0,
                    total_steps=0,
                    progress=0.0,
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            await self._state_event(conn, job_id, None, JobState.QUEUED, 0, "submitted")
        self._after_commit()
        return await self.get(job_id)

    async def get(self, job_id: str) -> Any:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(store.jobs).where(store.jobs.c.id == job_id))).first()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return row

    async def list_jobs(
        self,
        limit: int,
        offset: int,
        states: list[str] | None = None,
        model_id: str = "",
        dataset_id: str = "",
        method_id: str = "",
    ) -> list[Any]:
        query = select(store.jobs)
        if states:
            query = query.where(store.jobs.c.state.in_(states))
        for column, value in (("model_id", model_id), ("dataset_id", dataset_id), ("method_id", method_id)):
            if value:
                query = query.where(store.jobs.c[column] == value)
        query = query.order_by(store.jobs.c.created_at.desc(), store.jobs.c.id).offset(offset).limit(limit)
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def cancel(self, job_id: str) -> Any:
        job = await self.get(job_id)
        target = lifecycle.cancel_target(JobState(job.state))
        await self.transition(job_id, target, reason="terminated by user", expect_version=job.version)
        return await self.get(job_id)

    async def metrics(self, job_id: str, names: list[str], after_id: int, limit: int) -> list[Any]:
        await self.get(job_id)
        query = (
            select(store.metric_points)
            .where(store.metric_points.c.job_id == job_id, store.metric_points.c.id > after_id)
            .order_by(store.metric_points.c.id)
            .limit(limit)
        )
        if names:
            query = query.where(store.metric_points.c.name.in_(names))
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def events(self, job_id: str, after_id: int, limit: int) -> list[Any]:
        await self.get(job_id)
        async with self.engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(store.job_events)
                        .where(store.job_events.c.job_id == job_id, store.job_events.c.id > after_id)
                        .order_by(store.job_events.c.id)
                        .limit(limit)
                    )
                ).all()
            )

    async def logs(self, job_id: str, after_id: int, limit: int) -> list[Any]:
        await self.get(job_id)
        async with self.engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(store.log_lines)
                        .where(store.log_lines.c.job_id == job_id, store.log_lines.c.id > after_id)
                        .order_by(store.log_lines.c.id)
                        .limit(limit)
                    )
                ).all()
            )

    # -- state machine --------------------------------------------------------

    async def _state_event(
        self,
        conn: AsyncConnection,
        job_id: str,
        from_state: JobState | None,
        to_state: JobState,
        attempt: int,
        reason: str,
    ) -> None:
        """History row and outbox event, in the transaction that changes the state."""
        await conn.execute(
            store.job_events.insert().values(
                job_id=job_id,
                from_state=from_state,
                to_state=to_state,
                attempt=attempt,
                reason=reason,
                recorded_at=self.clock(),
            )
        )
        await write_event(
            conn,
            store.outbox,
            f"{self.subject_root}.jobs.job.state_changed",
            {"job_id": job_id, "from": from_state, "to": to_state, "attempt": attempt, "reason": reason},
        )

    async def _transition_in(
        self, conn: AsyncConnection, job: Any, target: JobState, reason: str, **values: Any
    ) -> bool:
        """Compare-and-set the state inside the caller's transaction; False when another writer won."""
        current = JobState(job.state)
        lifecycle.check_transition(current, target)
        now = self.clock()
        if target == JobState.RUNNING and job.started_at is None:
            values["started_at"] = now
        if target in lifecycle.TERMINAL:
            values["ended_at"] = now
        result = await conn.execute(
            update(store.jobs)
            .where(store.jobs.c.id == job.id, store.jobs.c.version == job.version)
            .values(state=target, state_reason=reason, version=job.version + 1, updated_at=now, **values)
        )
        if result.rowcount != 1:
            return False
        await self._state_event(conn, job.id, current, target, values.get("attempt", job.attempt), reason)
        return True

    async def transition(
        self, job_id: str, target: JobState, reason: str = "", expect_version: int | None = None, **values: Any
    ) -> None:
        async with self.engine.begin() as conn:
            job = (await conn.execute(select(store.jobs).where(store.jobs.c.id == job_id))).first()
            if job is None:
                raise NotFound(f"job {job_id!r} not found")
            if expect_version is not None and job.version != expect_version:
                raise FailedPrecondition("job changed concurrently; read it again and retry")
            if not await self._transition_in(conn, job, target, reason, **values):
                raise FailedPrecondition("job changed concurrently; read it again and retry")
        self._after_commit()

    # -- agents ---------------------------------------------------------------

    async def register_agent(
        self, name: str, resources: dict[str, Any], slots: int, resume_agent_id: str = ""
    ) -> tuple[str, bool]:
        """A new lease, or the old one back when the agent reconnects before it lapsed."""
        if not name:
            raise InvalidArgument.for_field("name", "is required")
        now = self.clock()
        async with self.engine.begin() as conn:
            if resume_agent_id:
                resumed = await conn.execute(
                    update(store.agents)
                    .where(store.agents.c.id == resume_agent_id, store.agents.c.status == "ACTIVE")
                    .values(last_heartbeat_at=now, resources=json.dumps(resources), slots=max(1, slots))
                )
                if resumed.rowcount == 1:
                    return resume_agent_id, True
            agent_id = new_id("agent")
            await conn.execute(
                store.agents.insert().values(
                    id=agent_id,
                    name=name,
                    resources=json.dumps(resources),
                    slots=max(1, slots),
                    status="ACTIVE",
                    registered_at=now,
                    last_heartbeat_at=now,
                )
            )
        return agent_id, False

    async def _active_agent(self, conn: AsyncConnection, agent_id: str) -> Any:
        agent = (await conn.execute(select(store.agents).where(store.agents.c.id == agent_id))).first()
        if agent is None or agent.status != "ACTIVE":
            raise NotFound(f"agent {agent_id!r} is not registered or its lease expired; register again")
        return agent

    async def heartbeat(self, agent_id: str) -> list[str]:
        """Renew the lease; answer with the agent's jobs that should be stopped."""
        async with self.engine.begin() as conn:
            await self._active_agent(conn, agent_id)
            await conn.execute(
                update(store.agents).where(store.agents.c.id == agent_id).values(last_heartbeat_at=self.clock())
            )
            rows = await conn.execute(
                select(store.jobs.c.id).where(
                    store.jobs.c.agent_id == agent_id, store.jobs.c.state == JobState.CANCELLING
                )
            )
            return [r.id for r in rows]

    async def claim_next(self, agent_id: str) -> Any | None:
        """Hand the best queued job to this agent if it has a free slot; never to two agents."""
        async with self.engine.begin() as conn:
            agent = await self._active_agent(conn, agent_id)
            busy = (
                await conn.execute(
                    select(func.count())
                    .select_from(store.jobs)
                    .where(
                        store.jobs.c.agent_id == agent_id, store.jobs.c.state.in_([s.value for s in lifecycle.ON_AGENT])
                    )
                )
            ).scalar_one()
            if scheduler.free_slots(agent.slots, busy) == 0:
                return None
            query = (
                select(store.jobs.c.id, store.jobs.c.priority, store.jobs.c.created_at)
                .where(store.jobs.c.state == JobState.QUEUED)
                .order_by(store.jobs.c.priority.desc(), store.jobs.c.created_at, store.jobs.c.id)
                .limit(20)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            candidates = scheduler.order_queue(
                [scheduler.QueuedJob(r.id, r.priority, r.created_at) for r in await conn.execute(query)]
            )
            for candidate in candidates:
                job = (await conn.execute(select(store.jobs).where(store.jobs.c.id == candidate.job_id))).first()
                if job is None or job.state != JobState.QUEUED:
                    continue
                attempt = job.attempt + 1
                output_uri = f"{self.artifact_root}/jobs/{job.id}/output"
                # The version check makes the claim safe across replicas even without row locks (SQLite).
                if await self._transition_in(
                    conn,
                    job,
                    JobState.STARTING,
                    f"assigned to agent {agent_id}",
                    agent_id=agent_id,
                    attempt=attempt,
                    output_uri=output_uri,
                ):
                    claimed = job.id
                    break
            else:
                return None
        self._after_commit()
        return await self.get(claimed)

    async def cancelling_jobs(self, agent_id: str) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(store.jobs.c.id).where(
                    store.jobs.c.agent_id == agent_id, store.jobs.c.state == JobState.CANCELLING
                )
            )
            return [r.id for r in rows]

    async def reap_lost_agents(self) -> int:
        """Agents whose lease lapsed lose their jobs: requeued for another attempt, or failed past the limit."""
        deadline = self.clock() - dt.timedelta(seconds=self.lease_ttl_seconds)
        reaped = 0
        async with self.engine.begin() as conn:
            lost = [
                r.id
                for r in await conn.execute(
                    select(store.agents.c.id).where(
                        store.agents.c.status == "ACTIVE", store.agents.c.last_heartbeat_at < deadline
                    )
                )
            ]
            for agent_id in lost:
                await conn.execute(update(store.agents).where(store.agents.c.id == agent_id).values(status="LOST"))
                jobs = (
                    await conn.execute(
                        select(store.jobs).where(
                            store.jobs.c.agent_id == agent_id,
                            store.jobs.c.state.in_([s.value for s in lifecycle.ON_AGENT]),
                        )
                    )
                ).all()
                for job in jobs:
                    target, reason = lifecycle.after_agent_lost(job.attempt, job.max_attempts, JobState(job.state))
                    extra = {"agent_id": None} if target == JobState.QUEUED else {}
                    if await self._transition_in(conn, job, target, reason, **extra):
                        reaped += 1
        if lost:
            log.warning("agents lost: %s (%d jobs moved)", lost, reaped)
            self._after_commit()
        return reaped

    # -- reports --------------------------------------------------------------

    async def apply_report(self, agent_id: str, report: Report) -> int:
        """Store one report exactly once; returns the highest sequence number stored for (job, attempt)."""
        acks = await self.apply_reports([dataclasses.replace(report, agent_id=agent_id)])
        return acks[(report.job_id, report.attempt)]

    async def apply_reports(self, reports: list[Report]) -> dict[tuple[str, int], int]:
        """Store a batch of reports in one transaction, each exactly once and in order.

        Returns, per (job, attempt), the highest sequence number stored: the agent's acknowledgement.
        """
        acks: dict[tuple[str, int], int] = {}
        changed: set[tuple[str, int]] = set()
        async with self.engine.begin() as conn:
            keys = {(r.job_id, r.attempt) for r in reports}
            stored: dict[tuple[str, int], int] = {}
            for job_id, attempt in keys:
                last = (
                    await conn.execute(
                        select(store.report_acks.c.last_seq).where(
                            store.report_acks.c.job_id == job_id, store.report_acks.c.attempt == attempt
                        )
                    )
                ).scalar_one_or_none()
                if last is not None:
                    stored[(job_id, attempt)] = last
            batch = _ReportBatch(self, conn)
            for r in reports:
                key = (r.job_id, r.attempt)
                last = acks.get(key, stored.get(key))
                if last is not None and r.seq <= last:
                    acks[key] = last  # a resend after reconnect: already stored
                    continue
                job = await batch.job(r.job_id)
                if job.agent_id != r.agent_id or job.attempt != r.attempt:
                    # From an attempt that no longer owns the job (e.g. after a requeue): acknowledged, dropped.
                    acks[key] = r.seq
                    continue
                await batch.add(job, r)
                acks[key] = r.seq
                changed.add(key)
            await batch.flush()
            for key in changed:
                values = {"last_seq": acks[key]}
                if key in stored:
                    await conn.execute(
                        update(store.report_acks)
                        .where(and_(store.report_acks.c.job_id == key[0], store.report_acks.c.attempt == key[1]))
                        .values(**values)
                    )
                else:
                    await conn.execute(store.report_acks.insert().values(job_id=key[0], attempt=key[1], **values))
        if changed:
            self._after_commit()
        return acks


class _ReportBatch:
    """Accumulates one transaction's log lines, metric points and progress; state changes apply in order."""

    def __init__(self, jobs: Jobs, conn: AsyncConnection) -> None:
        self.jobs = jobs
        self.conn = conn
        self.rows: dict[str, Any] = {}
        self.logs: list[dict[str, Any]] = []
        self.points: list[dict[str, Any]] = []
        self.progress: dict[str, dict[str, Any]] = {}

    async def job(self, job_id: str) -> Any:
        if job_id not in self.rows:
            row = (await self.conn.execute(select(store.jobs).where(store.jobs.c.id == job_id))).first()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            self.rows[job_id] = row
        return self.rows[job_id]

    async def add(self, job: Any, r: Report) -> None:
        if r.kind == "log":
            self.logs.append(
                dict(job_id=job.id, attempt=r.attempt, stream=r.stream or "stdout", text=r.text, recorded_at=r.time)
            )
        elif r.kind == "metric":
            self.points += [
                dict(job_id=job.id, attempt=r.attempt, name=name, step=r.step, value=value, recorded_at=r.time)
                for name, value in r.values.items()
            ]
            before = self.progress.get(job.id, {"current_step": job.current_step, "total_steps": job.total_steps})
            total = r.total_steps or before["total_steps"]
            self.progress[job.id] = {
                "current_step": max(before["current_step"], r.step),
                "total_steps": total,
                "progress": r.progress or lifecycle.progress_percent(r.step, total),
            }
        elif r.kind == "state" and r.state is not None:
            await self.flush()  # progress and lines before the state that follows them
            target = r.state
            if target == JobState.CANCELLED and job.state != JobState.CANCELLING:
                target = JobState.FAILED  # the process stopped without a terminate: say so
            if JobState(job.state) == target:
                return
            extra: dict[str, Any] = {}
            if target == JobState.SUCCEEDED:
                extra = {"output_uri": r.output_uri or job.output_uri, "progress": 100.0}
            if not await self.jobs._transition_in(self.conn, job, target, r.reason, **extra):
                raise FailedPrecondition("job changed concurrently")
            del self.rows[job.id]  # reload: version and state changed

    async def flush(self) -> None:
        if self.logs:
            await self.conn.execute(store.log_lines.insert(), self.logs)
        if self.points:
            await self.conn.execute(store.metric_points.insert(), self.points)
        for job_id, values in self.progress.items():
            await self.conn.execute(
                update(store.jobs).where(store.jobs.c.id == job_id).values(updated_at=self.jobs.clock(), **values)
            )
            self.rows.pop(job_id, None)
        self.logs, self.points, self.progress = [], [], {}
