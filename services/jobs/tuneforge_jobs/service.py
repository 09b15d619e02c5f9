"""Jobs use cases. Every state change is one transaction: compare-and-set on the row plus its outbox event."""

from __future__ import annotations

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

    async def list(self, limit: int, offset: int) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(store.jobs)
                        .order_by(store.jobs.c.created_at.desc(), store.jobs.c.id)
                        .offset(offset)
                        .limit(limit)
                    )
                ).all()
            )

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

    async def register_agent(self, name: str, resources: dict[str, Any], slots: int) -> str:
        if not name:
            raise InvalidArgument.for_field("name", "is required")
        agent_id = new_id("agent")
        now = self.clock()
        async with self.engine.begin() as conn:
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
        return agent_id

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
        async with self.engine.begin() as conn:
            ack = (
                await conn.execute(
                    select(store.report_acks.c.last_seq).where(
                        store.report_acks.c.job_id == report.job_id, store.report_acks.c.attempt == report.attempt
                    )
                )
            ).scalar_one_or_none()
            if ack is not None and report.seq <= ack:
                return ack  # a resend after reconnect: already stored
            job = (await conn.execute(select(store.jobs).where(store.jobs.c.id == report.job_id))).first()
            if job is None:
                raise NotFound(f"job {report.job_id!r} not found")
            if job.agent_id != agent_id or job.attempt != report.attempt:
                # A report from an attempt that no longer owns the job (e.g. after a requeue): drop it.
                return report.seq
            await self._apply(conn, job, report)
            if ack is None:
                await conn.execute(
                    store.report_acks.insert().values(job_id=report.job_id, attempt=report.attempt, last_seq=report.seq)
                )
            else:
                await conn.execute(
                    update(store.report_acks)
                    .where(
                        and_(store.report_acks.c.job_id == report.job_id, store.report_acks.c.attempt == report.attempt)
                    )
                    .values(last_seq=report.seq)
                )
        self._after_commit()
        return report.seq

    async def _apply(self, conn: AsyncConnection, job: Any, report: Report) -> None:
        if report.kind == "log":
            await conn.execute(
                store.log_lines.insert().values(
                    job_id=job.id,
                    attempt=report.attempt,
                    stream=report.stream or "stdout",
                    text=report.text,
                    recorded_at=report.time,
                )
            )
        elif report.kind == "metric":
            if report.values:
                await conn.execute(
                    store.metric_points.insert(),
                    [
                        dict(
                            job_id=job.id,
                            attempt=report.attempt,
                            name=name,
                            step=report.step,
                            value=value,
                            recorded_at=report.time,
                        )
                        for name, value in report.values.items()
                    ],
                )
            total = report.total_steps or job.total_steps
            progress = report.progress or lifecycle.progress_percent(report.step, total)
            await conn.execute(
                update(store.jobs)
                .where(store.jobs.c.id == job.id)
                .values(
                    current_step=max(job.current_step, report.step),
                    total_steps=total,
                    progress=progress,
                    updated_at=self.clock(),
                )
            )
        elif report.kind == "state" and report.state is not None:
            target = report.state
            if target == JobState.CANCELLED and job.state != JobState.CANCELLING:
                target = JobState.FAILED  # the process stopped without a terminate: say so
            if JobState(job.state) == target:
                return
            extra: dict[str, Any] = {}
            if target == JobState.SUCCEEDED:
                extra = {"output_uri": report.output_uri or job.output_uri, "progress": 100.0}
            if not await self._transition_in(conn, job, target, report.reason, **extra):
                raise FailedPrecondition("job changed concurrently")
