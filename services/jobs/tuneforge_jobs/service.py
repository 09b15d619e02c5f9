"""Jobs use cases. Every state change is one transaction: compare-and-set on the row plus its outbox event."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Float,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tuneforge_common import auth
from tuneforge_common.auth import Principal, Role
from tuneforge_common.db import new_id, owning_project, project_scope, utcnow
from tuneforge_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    ViolationCollector,
)
from tuneforge_common.events import write_event
from tuneforge_common.methods import greater_is_better

from . import activity, estimates, lifecycle, operations, scheduler, series, store
from .estimates import Estimate
from .lifecycle import JobState

log = logging.getLogger(__name__)
MAX_NAME = 255
# Queued jobs read per page while looking for one that fits an agent: each claim reads a page, so a page much
# longer than the claims under way at once (those jobs are taken or locked) costs every claim for nothing.
QUEUE_PAGE = 100
CLAIM_WINDOW = 25  # candidates one claim statement considers (ids bound in its IN list)
MAX_WALK_CHUNK = 10_000  # metric points read per query while walking a job's steps newest first
STEPS_PER_QUERY = 500  # steps whose points one query reads (bound parameters stay well under the engines' limits)


@dataclass(frozen=True)
class CatalogInputs:
    model_uri: str
    dataset_uri: str
    entrypoint: str
    parameters: dict[str, Any]
    method_version: str = ""
    catalog_version: str = ""
    dataset_rows: int = 0
    # An added method's training environment (stages.training.env); empty for built-ins.
    python_env: str = ""
    # An added method's saving stage (stages.saving: file, env), run after the training; empty when it has none.
    saving_entrypoint: str = ""
    saving_python_env: str = ""


class CatalogPort(Protocol):
    """What the jobs service needs from the catalog (gRPC in production)."""

    async def resolve_inputs(
        self,
        model_id: str,
        dataset_id: str,
        method_id: str,
        parameters: dict[str, Any],
        base: dict[str, Any] | None = None,
    ) -> CatalogInputs: ...

    async def validation_dataset_uri(self, dataset_id: str, method_id: str) -> str:
        """The URI of a dataset the job evaluates on, once checked as a training dataset is (READY, a format the
        method trains on) and the method is one that evaluates (it has validation_ratio)."""
        ...

    async def dataset_tokens(self, dataset_id: str, model_id: str, max_seq_length: int) -> tuple[int, int]: ...

    async def publish_model(self, name: str, description: str, uri: str, kind: str, lineage: dict[str, Any]) -> str: ...

    async def model_inputs(self, model_id: str) -> operations.ModelInputs:
        """A model as a merge, evaluation or deployment needs it (NOT_FOUND naming model_id)."""
        ...

    async def evaluation_dataset(self, dataset_id: str) -> str:
        """The URI of a READY dataset to evaluate on."""
        ...


LABEL_KEY_MAX = LABEL_VALUE_MAX = 63
MAX_LABELS = 32


def _remove_uris(uris: list[str]) -> None:
    import fsspec

    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not remove dropped checkpoint %s", uri, exc_info=True)


def checkpoint_retention(
    checkpoints: list[tuple[int, dict[str, float]]], keep_last: int, metric: str = "eval_loss"
) -> set[int]:
    """Steps to keep: the last keep_last, plus the best by the chosen metric (loss when no checkpoint has it)."""
    steps = sorted(step for step, _ in checkpoints)
    kept = set(steps[-keep_last:]) if keep_last > 0 else set()
    for name in dict.fromkeys((metric, "loss")):
        scored = [(metrics[name], step) for step, metrics in checkpoints if name in metrics]
        if scored:
            kept.add((max if greater_is_better(name) else min)(scored)[1])
            break
    return kept


def _run_seconds(job: Any) -> float:
    """Time a finished job ran; jobs from before run_seconds was kept fall back to start and end."""
    if job.run_seconds:
        return float(job.run_seconds)
    if job.started_at and job.ended_at:
        return (job.ended_at - job.started_at).total_seconds()
    return 0.0


def _check_labels(errors: ViolationCollector, field_name: str, labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        errors.add(field_name, f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not key or len(key) > LABEL_KEY_MAX:
            errors.add(f"{field_name}.{key}", f"label names are 1 to {LABEL_KEY_MAX} characters")
        elif len(value) > LABEL_VALUE_MAX:
            errors.add(f"{field_name}.{key}", f"label values are at most {LABEL_VALUE_MAX} characters")


def _check_resources(errors: ViolationCollector, resources: dict[str, Any]) -> None:
    if not 0 <= int(resources.get("gpu_count", 0)) <= 64:
        errors.add("resources.gpu_count", "must be between 0 and 64")
    if int(resources.get("min_gpu_memory_bytes", 0)) < 0:
        errors.add("resources.min_gpu_memory_bytes", "must not be negative")
    _check_labels(errors, "resources.agent_labels", dict(resources.get("agent_labels", {})))


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


class ReportAcks(dict[tuple[str, int], int]):
    """Per (job, attempt), the highest report sequence number stored: the agent's acknowledgement.

    `fenced` holds the (job, attempt)s whose reports were refused because that attempt no longer owns the
    job, each with the reason; the agent must stop those runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fenced: dict[tuple[str, int], str] = {}


@dataclass(frozen=True)
class ClaimedJob:
    """A job just handed to an agent: its row (readable as the row itself: claimed.id, claimed.attempt, ...)
    and where the attempt starts from."""

    job: Any
    resume_from_uri: str = ""  # the latest checkpoint; empty for a fresh start
    resume_from_step: int = 0
    checkpoint_uri: str = ""  # where the attempt saves checkpoints, each under <uri>/checkpoint-<step>
    agent_full: bool = False  # no slot of the agent's is left free: no use claiming for it until one frees

    def __getattr__(self, name: str) -> Any:
        if name == "job":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.job, name)


# Another name for the jobs table: the queue looked at beside the jobs an agent holds. Made once: an alias builds
# its columns anew, which took a tenth of the service's time under load (bench/bench_scheduler.py).
_QUEUED_JOB = store.jobs.alias("queued_job")


def _to_stop() -> Any:
    """A job its agent should stop: cancelled, or asked to pause (it saves a checkpoint first)."""
    j = store.jobs.c
    return or_(
        j.state == JobState.CANCELLING,
        and_(j.pause_requested.is_(True), j.state.in_([JobState.STARTING, JobState.RUNNING])),
    )


def _agent_gone(agent_id: str) -> NotFound:
    return NotFound(f"agent {agent_id!r} is not registered or its lease expired; register again")


def _training(job: Any, action: str) -> Any:
    """The job, if it is a training: merges, evaluations and deployments are not copied, paused or published."""
    if job.kind != operations.TRAIN:
        what = {"merge": "a merge", "evaluate": "an evaluation", "serve": "a deployment"}.get(job.kind, job.kind)
        raise FailedPrecondition(f"job {job.id!r} is {what}; only trainings are {action}")
    return job


def _agent_protocol_caller() -> Principal:
    """The caller of an AgentService call: a trainer agent, or internal code acting for one."""
    caller = auth.current()
    if not caller.internal and caller.kind != "agent":
        raise PermissionDenied("only trainer agents use the agent protocol")
    return caller


@dataclass
class Jobs:
    engine: AsyncEngine
    catalog: CatalogPort
    artifact_root: str
    subject_root: str
    max_attempts: int = 3
    lease_ttl_seconds: int = 15
    heartbeat_interval_seconds: int = 3
    # A job STARTING this long without its agent's confirmation is requeued; one CANCELLING this long is cancelled.
    start_timeout_seconds: float = 600.0
    cancel_timeout_seconds: float = 300.0
    clock: Callable[[], dt.datetime] = utcnow
    on_event: Callable[[], None] | None = None  # wakes the outbox publisher
    on_change: Callable[..., None] | None = None  # wakes schedulers and watchers (with job ids: theirs only)
    checkpoint_keep: int = 3  # checkpoints kept per job when its parameters don't say (save_total_limit)
    join_tokens: tuple[str, ...] = ()  # the operator's secrets that let a new trainer node join

    def _after_commit(self, *job_ids: str) -> None:
        """Wake the outbox publisher, and the schedulers and watchers (only these jobs' watchers when given)."""
        if self.on_event:
            self.on_event()
        if self.on_change:
            self.on_change(*job_ids)

    # -- users ----------------------------------------------------------------

    async def submit(
        self,
        model_id: str,
        dataset_id: str,
        method_id: str,
        parameters: dict[str, Any],
        priority: int = 0,
        name: str = "",
        **options: Any,
    ) -> Any:
        """submit_job for callers that only want the stored job."""
        job, _ = await self.submit_job(model_id, dataset_id, method_id, parameters, priority, name, **options)
        return job

    async def submit_job(
        self,
        model_id: str,
        dataset_id: str,
        method_id: str,
        parameters: dict[str, Any],
        priority: int = 0,
        name: str = "",
        *,
        labels: dict[str, str] | None = None,
        resources: dict[str, Any] | None = None,
        submitted_by: str = "",
        dry_run: bool = False,
        copied_from: Any = None,
        validation_dataset_id: str = "",
    ) -> tuple[Any | None, Estimate]:
        """Validate and resolve, then store the job QUEUED (or, for a dry run, only say what it would do).

        copied_from: the job a copy starts from; its resolved parameters are the base `parameters` override.
        validation_dataset_id: a dataset to evaluate on instead of holding out validation_ratio of the rows.
        """
        caller = auth.current()
        caller.require(Role.MEMBER, "submitting a job")
        submitted_by = submitted_by or caller.name
        labels, resources = labels or {}, resources or {}
        errors = ViolationCollector()
        for field_name, value in (("model_id", model_id), ("dataset_id", dataset_id), ("method_id", method_id)):
            if not value:
                errors.add(field_name, "is required")
        if not -1000 <= priority <= 1000:
            errors.add("priority", "must be between -1000 and 1000")
        if len(name) > MAX_NAME:
            errors.add("name", f"must be at most {MAX_NAME} characters")
        if len(submitted_by) > MAX_NAME:
            errors.add("submitted_by", f"must be at most {MAX_NAME} characters")
        _check_labels(errors, "labels", labels)
        _check_resources(errors, resources)
        errors.raise_if_any()
        base = json.loads(copied_from.parameters) if copied_from is not None else None
        inputs = await self.catalog.resolve_inputs(model_id, dataset_id, method_id, parameters, base)
        validation_uri = await self._validation_uri(validation_dataset_id, method_id, inputs.parameters)
        estimate = await self._estimate(inputs, model_id, dataset_id, method_id, count_tokens=dry_run)
        if dry_run:
            return None, estimate
        job_id = new_id("job")
        now = self.clock()
        async with self.engine.begin() as conn:
            await conn.execute(
                store.jobs.insert().values(
                    id=job_id,
                    name=name,
                    model_id=model_id,
                    dataset_id=dataset_id,
                    validation_dataset_id=validation_dataset_id,
                    method_id=method_id,
                    model_uri=inputs.model_uri,
                    dataset_uri=inputs.dataset_uri,
                    validation_dataset_uri=validation_uri,
                    entrypoint=inputs.entrypoint,
                    python_env=inputs.python_env,
                    saving_entrypoint=inputs.saving_entrypoint,
                    saving_python_env=inputs.saving_python_env,
                    parameters=json.dumps(inputs.parameters),
                    state=JobState.QUEUED,
                    state_reason="",
                    attempt=0,
                    max_attempts=self.max_attempts,
                    priority=priority,
                    output_uri="",
                    current_step=0,
                    total_steps=estimate.total_steps,
                    progress=0.0,
                    version=1,
                    created_at=now,
                    updated_at=now,
                    submitted_by=submitted_by,
                    project_id=owning_project(),
                    labels=json.dumps(labels, sort_keys=True),
                    resources=json.dumps(resources, sort_keys=True),
                    method_version=inputs.method_version,
                    catalog_version=inputs.catalog_version[:255],
                    copied_from_job_id=copied_from.id if copied_from is not None else None,
                )
            )
            reason = f"copied from {copied_from.id}" if copied_from is not None else "submitted"
            await self._state_event(conn, job_id, None, JobState.QUEUED, 0, reason)
        self._after_commit()
        return await self.get(job_id), estimate

    async def submit_operation(
        self,
        plan: operations.OperationPlan,
        *,
        model_id: str,
        name: str,
        parameters: dict[str, Any],
        resources: dict[str, Any],
        operation: dict[str, Any],
        dataset_id: str = "",
        dataset_uri: str = "",
        labels: dict[str, str] | None = None,
    ) -> Any:
        """Store a merge, evaluation or deployment QUEUED: a job like a training, scheduled the same way. The
        caller (model_lifecycle) has checked the model and the parameters; merges and evaluations write their
        output where a training would."""
        caller = auth.current()
        errors = ViolationCollector()
        _check_resources(errors, resources)
        errors.raise_if_any()
        job_id, now = new_id("job"), self.clock()
        async with self.engine.begin() as conn:
            await conn.execute(
                store.jobs.insert().values(
                    id=job_id,
                    kind=plan.kind,
                    name=name[:MAX_NAME],
                    model_id=model_id,
                    dataset_id=dataset_id,
                    method_id="",
                    model_uri=plan.model_uri,
                    adapter_uri=plan.adapter_uri,
                    dataset_uri=dataset_uri,
                    entrypoint=plan.entrypoint,
                    python_env=plan.python_env,
                    parameters=json.dumps(parameters),
                    operation=json.dumps(operation),
                    state=JobState.QUEUED,
                    state_reason="",
                    attempt=0,
                    max_attempts=self.max_attempts,
                    priority=0,
                    output_uri="",
                    version=1,
                    created_at=now,
                    updated_at=now,
                    submitted_by=caller.name[:MAX_NAME],
                    project_id=owning_project(),
                    labels=json.dumps(labels or {}, sort_keys=True),
                    resources=json.dumps(resources, sort_keys=True),
                )
            )
            await self._state_event(conn, job_id, None, JobState.QUEUED, 0, f"{plan.kind} submitted")
        self._after_commit()
        return await self.get(job_id)

    async def append_log(self, job_id: str, attempt: int, text: str, stream: str = "service") -> None:
        """A line of the service's own in a job's log (what happened after its agent was done with it)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                store.log_lines.insert().values(
                    job_id=job_id, attempt=attempt, stream=stream, text=_printable(text), recorded_at=self.clock()
                )
            )
        self._after_commit()

    async def _validation_uri(self, dataset_id: str, method_id: str, parameters: dict[str, Any]) -> str:
        """The validation dataset's URI ("" without one); with one, no share of the training rows is held out."""
        if not dataset_id:
            return ""
        ratio = parameters.get("validation_ratio") or 0
        if ratio > 0:
            # Two validation sets would be one too many: say which knob to drop rather than pick one silently.
            raise InvalidArgument.for_field(
                "parameters.validation_ratio",
                f"is {ratio}, which holds out that share of the training rows for validation, while "
                f"validation_dataset_id {dataset_id!r} gives the validation rows: set validation_ratio to 0 or "
                "leave out the validation dataset",
            )
        return await self.catalog.validation_dataset_uri(dataset_id, method_id)

    async def _estimate(
        self, inputs: CatalogInputs, model_id: str, dataset_id: str, method_id: str, count_tokens: bool
    ) -> Estimate:
        params = inputs.parameters
        total_steps, epochs = estimates.steps_and_epochs(inputs.dataset_rows, params)
        async with self.engine.connect() as conn:
            j = store.jobs.c
            finished = await conn.execute(
                select(j.run_seconds, j.started_at, j.ended_at, j.total_steps)
                .where(j.model_id == model_id, j.method_id == method_id, j.state == JobState.SUCCEEDED)
                # Method names are per project: another project's "my-sft" is another method.
                .where(project_scope(j.project_id, shared=False))
                .order_by(j.ended_at.desc())
                .limit(5)
            )
            history = [(_run_seconds(r), r.total_steps) for r in finished]
        tokens = 0
        if count_tokens:
            tokens, _ = await self.catalog.dataset_tokens(dataset_id, model_id, int(params.get("max_seq_length", 0)))
        return Estimate(
            parameters=params,
            dataset_rows=inputs.dataset_rows,
            epochs=epochs,
            total_steps=total_steps,
            estimated_seconds=estimates.seconds_per_step(history) * total_steps,
            dataset_tokens=tokens,
        )

    async def copy(
        self,
        job_id: str,
        overrides: dict[str, Any],
        *,
        dataset_id: str = "",
        model_id: str = "",
        name: str = "",
        submitted_by: str = "",
        dry_run: bool = False,
        validation_dataset_id: str = "",
        clear_validation_dataset: bool = False,
    ) -> tuple[Any | None, Estimate]:
        """A new job from an old one's exact resolved parameters, with overrides (DeepExtension's Copy); it keeps
        the old job's validation dataset unless given another or told to clear it."""
        if clear_validation_dataset and validation_dataset_id:
            raise InvalidArgument.for_field(
                "clear_validation_dataset", "give either validation_dataset_id or clear_validation_dataset, not both"
            )
        old = _training(await self._changeable(job_id, "copying a job"), "copied")
        inherited = "" if clear_validation_dataset else old.validation_dataset_id
        return await self.submit_job(
            model_id or old.model_id,
            dataset_id or old.dataset_id,
            old.method_id,
            overrides,
            old.priority,
            name or (f"{old.name} (copy)" if old.name else f"copy of {old.id}")[:MAX_NAME],
            labels=json.loads(old.labels or "{}"),
            resources=json.loads(old.resources or "{}"),
            submitted_by=submitted_by or old.submitted_by,
            dry_run=dry_run,
            copied_from=old,
            validation_dataset_id=validation_dataset_id or inherited,
        )

    async def _changeable(self, job_id: str, action: str) -> Any:
        """The job, if the caller sees it (NOT_FOUND otherwise) and may change it (PERMISSION_DENIED)."""
        job = await self.get(job_id)
        auth.current().require(Role.MEMBER, action)
        return job

    async def pause(self, job_id: str) -> Any:
        """Queued: paused at once. Running: the agent is asked to checkpoint and stop; the job becomes PAUSED
        when it reports so (or, if its agent is lost meanwhile, when the reaper finds the request)."""
        job = _training(await self._changeable(job_id, "pausing a job"), "paused")
        if lifecycle.pause_action(JobState(job.state)) == "now":
            await self.transition(job_id, JobState.PAUSED, reason="paused by user", expect_version=job.version)
            return await self.get(job_id)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(store.jobs)
                .where(store.jobs.c.id == job_id, store.jobs.c.version == job.version)
                .values(pause_requested=True, version=job.version + 1, updated_at=self.clock())
            )
            if result.rowcount != 1:
                raise FailedPrecondition("job changed concurrently; read it again and retry")
            await write_event(conn, store.outbox, f"{self.subject_root}.jobs.job.pause_requested", {"job_id": job_id})
        self._after_commit()
        return await self.get(job_id)

    async def resume(self, job_id: str) -> Any:
        job = await self._changeable(job_id, "resuming a job")
        lifecycle.check_resumable(JobState(job.state))
        await self.transition(
            job_id,
            JobState.QUEUED,
            reason="resumed by user",
            expect_version=job.version,
            pause_requested=False,
            agent_id=None,
            # A pause is not a failure: the attempts it took don't count against the lost-agent limit.
            max_attempts=job.attempt + self.max_attempts,
        )
        return await self.get(job_id)

    async def delete(self, job_id: str) -> None:
        """A finished job with its history, metrics, logs, checkpoints and artifacts."""
        job = await self._changeable(job_id, "deleting a job")
        lifecycle.check_deletable(JobState(job.state))
        async with self.engine.begin() as conn:
            for table in (
                store.metric_points,
                store.metric_blocks,
                store.log_lines,
                store.job_events,
                store.report_acks,
                store.checkpoints,
            ):
                await conn.execute(delete(table).where(table.c.job_id == job_id))
            await conn.execute(delete(store.jobs).where(store.jobs.c.id == job_id))
            await write_event(conn, store.outbox, f"{self.subject_root}.jobs.job.deleted", {"job_id": job_id})
        await asyncio.to_thread(self._remove_artifacts, job_id)
        self._after_commit()

    def _remove_artifacts(self, job_id: str) -> None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(f"{self.artifact_root}/jobs/{job_id}")
        if fs.exists(path):
            fs.rm(path, recursive=True)

    async def get(self, job_id: str, scoped: bool = True) -> Any:
        """The job if the caller's project owns it (another project's job is as absent as a missing one);
        scoped=False for the agent protocol, whose callers act on whatever they were assigned."""
        query = select(store.jobs).where(store.jobs.c.id == job_id)
        if scoped:
            query = query.where(project_scope(store.jobs.c.project_id, shared=False))
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
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
        labels: dict[str, str] | None = None,
        after_job_id: str = "",
        kinds: list[str] | None = None,
    ) -> list[Any]:
        """Newest first (then by id); after_job_id starts the list after that job, as a cursor of ids does.
        Trainings only unless `kinds` names others (merge, evaluate, serve)."""
        mine = project_scope(store.jobs.c.project_id, shared=False)
        query = select(store.jobs).where(mine, store.jobs.c.kind.in_(kinds or [operations.TRAIN]))
        if after_job_id:
            async with self.engine.connect() as conn:
                after = (
                    await conn.execute(select(store.jobs.c.created_at).where(store.jobs.c.id == after_job_id, mine))
                ).first()
            if after is None:
                raise InvalidArgument.for_field("after_job_id", f"no job {after_job_id!r} to list after")
            j = store.jobs.c
            query = query.where(
                or_(j.created_at < after.created_at, and_(j.created_at == after.created_at, j.id > after_job_id))
            )
        if states:
            query = query.where(store.jobs.c.state.in_(states))
        for key, value in (labels or {}).items():
            # Labels are stored as sorted-key JSON; each pair appears as this exact fragment.
            fragment = json.dumps({key: value})[1:-1]
            query = query.where(store.jobs.c.labels.contains(fragment, autoescape=True))
        for column, value in (("model_id", model_id), ("method_id", method_id)):
            if value:
                query = query.where(store.jobs.c[column] == value)
        if dataset_id:  # trained or evaluated on: either way the catalog must not delete it under the job
            j = store.jobs.c
            query = query.where(or_(j.dataset_id == dataset_id, j.validation_dataset_id == dataset_id))
        query = query.order_by(store.jobs.c.created_at.desc(), store.jobs.c.id).offset(offset).limit(limit)
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def cancel(self, job_id: str) -> Any:
        job = await self._changeable(job_id, "cancelling a job")
        target = lifecycle.cancel_target(JobState(job.state))
        await self.transition(job_id, target, reason="terminated by user", expect_version=job.version)
        return await self.get(job_id)

    async def checkpoints(self, job_id: str) -> list[Any]:
        await self.get(job_id)
        async with self.engine.connect() as conn:
            query = select(store.checkpoints).where(store.checkpoints.c.job_id == job_id)
            return list((await conn.execute(query.order_by(store.checkpoints.c.step))).all())

    async def _record_checkpoint(self, conn: AsyncConnection, job: Any, r: Report) -> list[str]:
        """Store a checkpoint once, then apply retention: the last K (save_total_limit, else
        checkpoint_keep) plus the best by eval_loss (else loss). Returns the dropped ones' URIs, whose files go
        once the transaction commits (a rolled-back drop keeps them)."""
        c = store.checkpoints.c
        exists = await conn.execute(select(c.step).where(c.job_id == job.id, c.step == r.step))
        if exists.first() is None:
            await conn.execute(
                store.checkpoints.insert().values(
                    job_id=job.id,
                    step=r.step,
                    attempt=r.attempt,
                    uri=r.output_uri,
                    metrics=json.dumps(r.values),
                    created_at=r.time,
                )
            )
        rows = (await conn.execute(select(c.step, c.uri, c.metrics).where(c.job_id == job.id))).all()
        params = json.loads(job.parameters)
        keep_last = int(params.get("save_total_limit", 0) or 0) or self.checkpoint_keep
        metric = str(params.get("checkpoint_metric") or "eval_loss")
        kept = checkpoint_retention([(row.step, json.loads(row.metrics)) for row in rows], keep_last, metric)
        dropped = [row for row in rows if row.step not in kept]
        if dropped:
            dropped_steps = [d.step for d in dropped]
            await conn.execute(delete(store.checkpoints).where(c.job_id == job.id, c.step.in_(dropped_steps)))
        return [d.uri for d in dropped]

    async def publish_checkpoint(self, job_id: str, step: int, name: str, description: str = "") -> str:
        """A kept checkpoint as a catalog model with lineage; with step 0, the best of the kept checkpoints and a
        succeeded job's final output (by eval_loss when they have it, else loss; the final output on a tie).
        Returns the model id; the step published is in the event and the model's lineage."""
        job = _training(await self._changeable(job_id, "publishing a checkpoint"), "published")
        if step == 0:
            uri, step = await self._best_output(job)
        else:
            async with self.engine.connect() as conn:
                c = store.checkpoints.c
                row = (await conn.execute(select(c.uri).where(c.job_id == job_id, c.step == step))).first()
            if row is None:
                raise NotFound(f"step: job {job_id!r} has no kept checkpoint at step {step}")
            uri = row.uri
        if not name.strip():
            raise InvalidArgument.for_field("name", "is required")
        lineage = {
            "base_model_id": job.model_id,
            "job_id": job.id,
            "checkpoint_step": step,
            "method_id": job.method_id,
            "dataset_id": job.dataset_id,
        }
        model_id = await self.catalog.publish_model(name.strip(), description, uri, "", lineage)
        async with self.engine.begin() as conn:
            await write_event(
                conn,
                store.outbox,
                f"{self.subject_root}.jobs.job.published",
                {"job_id": job.id, "step": step, "model_id": model_id},
            )
        self._after_commit()
        return model_id

    async def _best_output(self, job: Any) -> tuple[str, int]:
        """(uri, step) of the best kept checkpoint or the final output (see publish_checkpoint)."""
        async with self.engine.connect() as conn:
            c = store.checkpoints.c
            kept = (await conn.execute(select(c.step, c.uri, c.metrics).where(c.job_id == job.id))).all()
            scores = [(r.step, r.uri, json.loads(r.metrics or "{}")) for r in kept]
            metric = "eval_loss" if any("eval_loss" in m for _, _, m in scores) else "loss"
            if job.state == JobState.SUCCEEDED:
                p = store.metric_points.c
                last = (
                    await conn.execute(
                        select(p.value)
                        .where(p.job_id == job.id, p.name == metric)
                        .order_by(p.step.desc(), p.attempt.desc())
                        .limit(1)
                    )
                ).scalar()
                # Listed first, so a checkpoint must be strictly better to win.
                scores.insert(0, (job.current_step, job.output_uri, {metric: last} if last is not None else {}))
        if not scores:
            raise FailedPrecondition(f"job is {job.state} and kept no checkpoint: there is nothing to publish yet")
        scored = [s for s in scores if isinstance(s[2].get(metric), (int, float))]
        if not scored:  # no metric to choose by: the final output, else the latest checkpoint
            step, uri, _ = scores[0] if job.state == JobState.SUCCEEDED else max(scores, key=lambda s: s[0])
            return uri, step
        sign = -1 if greater_is_better(metric) else 1
        step, uri, _ = min(scored, key=lambda s: sign * s[2][metric])
        return uri, step

    async def metrics(
        self, job_id: str, names: list[str], after_id: int, limit: int, min_step: int = 0, max_step: int = 0
    ) -> list[Any]:
        """Raw points in the order they were stored (their id is the page cursor), optionally only some names
        and steps within [min_step, max_step] (max_step 0: no upper bound)."""
        series.check_step_range(min_step, max_step)
        mp = store.metric_points.c
        conditions: list[Any] = [mp.name.in_(names)] if names else []
        conditions += [mp.step >= min_step] if min_step else []
        conditions += [mp.step <= max_step] if max_step else []
        return await self._rows_after(store.metric_points, job_id, after_id, limit, *conditions)

    async def _rows_after(self, table: Any, job_id: str, after_id: int, limit: int, *conditions: Any) -> list[Any]:
        """A job's rows of one table in the order they were stored, after a cursor (their id)."""
        await self.get(job_id)
        query = (
            select(table)
            .where(table.c.job_id == job_id, table.c.id > after_id, *conditions)
            .order_by(table.c.id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def metric_series(
        self, job_id: str, names: list[str], max_points: int, min_step: int = 0, max_step: int = 0
    ) -> list[series.Series]:
        """Each named metric (every one the job has when none is named, by name) downsampled in the database
        to at most max_points buckets over steps within [min_step, max_step] (max_step 0: no upper bound).

        All series of one answer share one step range (the union of theirs within the bounds), so their buckets
        line up across charts. Only the buckets leave the database: a job of a million points answers with at
        most max_points rows per name.
        """
        series.check_step_range(min_step, max_step)
        if max_points < 1:
            raise InvalidArgument.for_field("max_points", "must be at least 1 for a downsampled series")
        max_points = min(max_points, series.MAX_POINTS_LIMIT)
        job = await self.get(job_id)
        async with self.engine.connect() as conn:
            names = list(dict.fromkeys(names)) or await self._metric_names(conn, job_id)
            span = series.common_range(await self._step_spans(conn, job, names, min_step, max_step))
            points = await self._downsampled(conn, job, names, span, max_points) if span else {}
        return [series.Series(job_id, name, points.get(name, [])) for name in names]

    async def compare(self, job_ids: list[str], metric_names: list[str], max_points: int) -> series.Comparison:
        """Jobs side by side: the parameters that differ and, per metric, one series per job in the given
        order, all downsampled over one step range (the union of the jobs') so that their buckets line up.

        Without metric names, the metrics every one of the jobs has are compared; max_points 0 is the default.
        """
        errors = ViolationCollector()
        if not 2 <= len(job_ids) <= series.MAX_COMPARED_JOBS:
            errors.add("job_ids", f"must name between 2 and {series.MAX_COMPARED_JOBS} jobs")
        if not all(job_ids):
            errors.add("job_ids", "must not contain an empty id")
        elif len(set(job_ids)) != len(job_ids):
            errors.add("job_ids", "must not name a job twice")
        if max_points < 0:
            errors.add("max_points", "must not be negative")
        errors.raise_if_any()
        max_points = min(max_points or series.DEFAULT_MAX_POINTS, series.MAX_POINTS_LIMIT)
        async with self.engine.connect() as conn:
            found = {
                r.id: r
                for r in await conn.execute(
                    select(store.jobs).where(
                        store.jobs.c.id.in_(job_ids), project_scope(store.jobs.c.project_id, shared=False)
                    )
                )
            }
            missing = [job_id for job_id in job_ids if job_id not in found]
            if missing:
                raise NotFound(f"job {', '.join(repr(m) for m in missing)} not found")
            rows = [found[job_id] for job_id in job_ids]
            if metric_names:
                names = list(dict.fromkeys(metric_names))
            else:
                shared = set(await self._metric_names(conn, job_ids[0]))
                for job_id in job_ids[1:]:
                    shared &= set(await self._metric_names(conn, job_id))
                names = sorted(shared)
            span = series.common_range([s for row in rows for s in await self._step_spans(conn, row, names, 0, 0)])
            per_job = [await self._downsampled(conn, row, names, span, max_points) if span else {} for row in rows]
        metrics = [
            series.ComparedMetric(
                name, [series.Series(row.id, name, got.get(name, [])) for row, got in zip(rows, per_job, strict=True)]
            )
            for name in names
        ]
        return series.Comparison(rows, series.parameter_differences([json.loads(r.parameters) for r in rows]), metrics)

    @staticmethod
    async def _metric_names(conn: AsyncConnection, job_id: str) -> list[str]:
        """The job's metric names, sorted: a skip scan over the (job_id, name, step) index, one probe per name,
        instead of reading every point."""
        mp = store.metric_points
        names = select(func.min(mp.c.name).label("name")).where(mp.c.job_id == job_id).cte("names", recursive=True)
        after = select(func.min(mp.c.name)).where(mp.c.job_id == job_id, mp.c.name > names.c.name).scalar_subquery()
        names = names.union_all(select(after).where(names.c.name.is_not(None)))
        rows = await conn.execute(select(names.c.name).where(names.c.name.is_not(None)))
        return sorted(r.name for r in rows)

    @staticmethod
    def _current_points(job: Any) -> list[Any]:
        """Conditions for the job's points that stand: when an attempt resumed from a checkpoint, the earlier
        attempts' points past that step are superseded. Resuming deletes them in the same transaction; this
        keeps every query on that line as well."""
        mp = store.metric_points
        conditions = [mp.c.job_id == job.id]
        if job.attempt > 1:
            conditions.append(or_(mp.c.attempt == job.attempt, mp.c.step <= job.resumed_from_step))
        return conditions

    @classmethod
    async def _step_spans(
        cls, conn: AsyncConnection, job: Any, names: list[str], min_step: int, max_step: int
    ) -> list[tuple[int, int] | None]:
        """First and last step of each named series within [min_step, max_step] (0: no upper bound); None when
        empty. One statement of two index probes per name (separate subqueries so that SQLite, too, reads each
        from an end of the index): a round trip per name cost more than its probes."""
        mp = store.metric_points
        probes = []
        for name in names:
            where = [*cls._current_points(job), mp.c.name == name, mp.c.step >= min_step]
            if max_step:
                where.append(mp.c.step <= max_step)
            probes += [
                select(func.min(mp.c.step)).where(*where).scalar_subquery(),
                select(func.max(mp.c.step)).where(*where).scalar_subquery(),
            ]
        spans: list[tuple[int, int] | None] = []
        for at in range(0, len(probes), 400):  # within PostgreSQL's 1,664 and SQLite's 2,000 columns
            row = (await conn.execute(select(*probes[at : at + 400]))).one()
            spans += [None if row[i] is None else (int(row[i]), int(row[i + 1])) for i in range(0, len(row), 2)]
        return spans

    @classmethod
    async def _downsampled(
        cls, conn: AsyncConnection, job: Any, names: list[str], span: tuple[int, int], max_points: int
    ) -> dict[str, list[series.SeriesPoint]]:
        """The job's series of these names within span as at most max_points buckets each: series.downsample's
        rule, in the database.

        Buckets of a block's width or more (series.bucket_width makes them whole blocks) are summed from the
        rollups in metric_blocks, save for the blocks at the span's ends that hold steps outside it, whose
        points are read; narrower buckets from the points. A series of at most max_points points comes back as
        it is.
        """
        lo, hi = span
        width = series.bucket_width(lo, hi, max_points)
        if conn.dialect.name == "postgresql":
            # For this transaction only: plan with the actual step range (a cached generic plan guesses a narrow
            # one and walks the index over a whole series), and no JIT, whose compiling costs more than it saves
            # on a query that answers in milliseconds.
            await conn.exec_driver_sql(
                "SELECT set_config('plan_cache_mode', 'force_custom_plan', true), set_config('jit', 'off', true)"
            )
        block = series.BLOCK_STEPS
        first, last = -(-lo // block), (hi + 1) // block - 1  # the blocks wholly within [lo, hi]
        if width % block or first > last:
            from_points = [(lo, hi)]
            found = []
        else:
            from_points = [(a, b) for a, b in ((lo, first * block - 1), ((last + 1) * block, hi)) if a <= b]
            found = await cls._bucketed_blocks(conn, job, names, first, last, width // block)
        if from_points:
            found += await cls._bucketed_points(conn, job, names, from_points, width)
        buckets: dict[str, dict[int, series.SeriesPoint]] = {}
        for name, point in found:  # blocks and points hold disjoint steps: merged in any order
            of_name = buckets.setdefault(name, {})
            b = point.step // width
            of_name[b] = of_name[b].merged(point) if b in of_name else point
        out = {name: [of_name[b] for b in sorted(of_name)] for name, of_name in buckets.items()}
        short = [n for n, ps in out.items() if sum(p.count for p in ps) <= max_points and any(p.count > 1 for p in ps)]
        if short:
            mp = store.metric_points
            raw = select(mp.c.name, mp.c.step, mp.c.value).where(
                *cls._current_points(job), mp.c.name.in_(short), mp.c.step >= lo, mp.c.step <= hi
            )
            for n in short:
                out[n] = []
            for p in await conn.execute(raw.order_by(mp.c.name, mp.c.step, mp.c.attempt, mp.c.id)):
                out[p.name].append(series.SeriesPoint.single(int(p.step), float(p.value)))
        return out

    @staticmethod
    async def _bucketed_blocks(
        conn: AsyncConnection, job: Any, names: list[str], first: int, last: int, per_bucket: int
    ) -> list[tuple[str, series.SeriesPoint]]:
        """(name, bucket) of the rollup blocks first..last, per_bucket blocks to a bucket: one row per bucket, its
        value the last value of the bucket's last block."""
        mb = store.metric_blocks
        bucket = (mb.c.block // per_bucket).label("bucket")
        # OFFSET 0 keeps PostgreSQL from merging this subquery into the grouping: over a computed column it then
        # expects few groups and hashes them in one pass, rather than sorting every block by bucket.
        blocks = (
            select(mb.c.name, mb.c.n, mb.c.low, mb.c.high, mb.c.last_step, mb.c.last_value, bucket)
            .where(mb.c.job_id == job.id, mb.c.name.in_(names), mb.c.block >= first, mb.c.block <= last)
            .offset(0)
            .subquery("blocks")
        )
        extremes = [
            blocks.c.name,
            cast(func.sum(blocks.c.n), BigInteger).label("n"),  # not PostgreSQL's numeric, slow to convert
            func.min(blocks.c.low).label("low"),
            func.max(blocks.c.high).label("high"),
        ]
        if conn.dialect.name == "postgresql":
            # The last step's value in the same pass: the greatest [last step, last value] pair (steps are exact
            # as doubles up to 2**53). A probe per bucket for it took as long as the aggregation itself.
            # Its two elements taken in SQL (PostgreSQL computes the one aggregate once): an array per row cost
            # more to convert in Python than the rest of the row.
            pair = postgresql.array([cast(blocks.c.last_step, Float), blocks.c.last_value])
            last_pair = func.max(pair, type_=postgresql.ARRAY(Float))
            query = select(*extremes, last_pair[1].label("last_step"), last_pair[2].label("value")).group_by(
                blocks.c.name, blocks.c.bucket
            )
            rows: Any = await conn.execute(query)  # rows unpacked, not read by name: 7,000 of them for a chart
            return [
                (name, series.SeriesPoint(int(last_step), value, low, high, n))
                for name, n, low, high, last_step, value in rows
            ]
        agg = (
            select(*extremes, func.max(blocks.c.last_step).label("last_step"))
            .group_by(blocks.c.name, blocks.c.bucket)
            .subquery("agg")
        )
        last_value = (  # SQLite: a probe of the block that holds the bucket's last step
            select(mb.c.last_value)
            .where(mb.c.job_id == job.id, mb.c.name == agg.c.name, mb.c.block == agg.c.last_step // series.BLOCK_STEPS)
            .scalar_subquery()
        )
        rows = select(agg.c.name, agg.c.last_step, last_value.label("value"), agg.c.low, agg.c.high, agg.c.n)
        return [
            (r.name, series.SeriesPoint(int(r.last_step), float(r.value), float(r.low), float(r.high), int(r.n)))
            for r in await conn.execute(rows)
        ]

    @classmethod
    async def _bucketed_points(
        cls, conn: AsyncConnection, job: Any, names: list[str], ranges: list[tuple[int, int]], width: int
    ) -> list[tuple[str, series.SeriesPoint]]:
        """(name, bucket) of the points in these step ranges, in buckets of width steps: one row per bucket, its
        value the one at its last step (an index probe; should two attempts hold that step, the latest one's)."""
        mp = store.metric_points
        in_ranges = or_(*[mp.c.step.between(a, b) for a, b in ranges])
        bucketed = (  # OFFSET 0: as in _bucketed_blocks
            select(mp.c.name, mp.c.step, mp.c.value, (mp.c.step // width).label("bucket"))
            .where(*cls._current_points(job), mp.c.name.in_(names), in_ranges)
            .offset(0)
            .subquery("bucketed")
        )
        agg = (
            select(
                bucketed.c.name,
                func.count().label("n"),
                func.min(bucketed.c.value).label("low"),
                func.max(bucketed.c.value).label("high"),
                func.max(bucketed.c.step).label("last_step"),
            )
            .group_by(bucketed.c.name, bucketed.c.bucket)
            .subquery("agg")
        )
        last_value = (
            select(mp.c.value)
            .where(mp.c.job_id == job.id, mp.c.name == agg.c.name, mp.c.step == agg.c.last_step)
            .order_by(mp.c.attempt.desc(), mp.c.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        query = select(agg.c.name, agg.c.last_step, last_value.label("value"), agg.c.low, agg.c.high, agg.c.n)
        return [
            (r.name, series.SeriesPoint(int(r.last_step), float(r.value), float(r.low), float(r.high), int(r.n)))
            for r in await conn.execute(query)
        ]

    async def events(self, job_id: str, after_id: int, limit: int) -> list[Any]:
        return await self._rows_after(store.job_events, job_id, after_id, limit)

    # -- the job's activity, newest first (activity.py) -------------------------------------------------------

    async def events_newest_first(
        self, job_id: str, after: tuple[str, int] | None, limit: int, place: activity.Place | None = None
    ) -> list[activity.Item]:
        """At most `limit` transitions after an item of the job's activity (("seq" or "step", key)), or after a
        place in their list (a page token's), else from the latest; newest first, each item's row the transition."""
        job = await self.get(job_id)
        je = store.job_events.c
        async with self.engine.connect() as conn:
            if after is not None and place is None:
                second, kind = await self._activity_second(conn, job, after, [])
                # Within a second the transitions come before the steps: after a step, none of its second's remain.
                place = (second, after[1] if kind == "seq" else activity.LAST_KEY)

            async def in_second(second: int, above: int, n: int) -> list[activity.Item]:
                query = (
                    select(store.job_events)
                    .where(
                        je.job_id == job.id,
                        je.recorded_at >= activity.start_of(second),
                        je.recorded_at < activity.start_of(second + 1),
                        je.id > above,
                    )
                    .order_by(je.id)
                    .limit(n)
                )
                return [activity.Item(second, r.id, r) for r in await conn.execute(query)]

            async def before(bound: int | None, n: int) -> list[activity.Item]:
                query = select(store.job_events).where(je.job_id == job.id)
                if bound is not None:
                    query = query.where(je.recorded_at < activity.start_of(bound))
                query = query.order_by(je.recorded_at.desc(), je.id.desc()).limit(n)
                return [activity.Item(activity.second_of(r.recorded_at), r.id, r) for r in await conn.execute(query)]

            return await activity.collect(in_second, before, place, limit)

    async def steps_newest_first(
        self,
        job_id: str,
        names: list[str],
        after: tuple[str, int] | None,
        limit: int,
        min_step: int = 0,
        max_step: int = 0,
        place: activity.Place | None = None,
    ) -> list[activity.Item]:
        """At most `limit` steps after an item of the job's activity (("seq" or "step", key)), or after a place
        in their list (a page token's), else from the latest; newest first, each item's row the list of its points
        (by attempt, then as stored).

        A step's time is its latest point's (of the names asked; all when none is). The points are walked from
        the latest down the (job_id, recorded_at) index, a step kept where its latest point is (its points read by
        the (job_id, name, step) index), so a page reads about its own steps' points and those of the seconds it
        starts and ends in, never the job's every point.
        """
        series.check_step_range(min_step, max_step)
        job = await self.get(job_id)
        mp = store.metric_points
        async with self.engine.connect() as conn:
            names = list(dict.fromkeys(names)) or await self._metric_names(conn, job.id)
            if after is not None and place is None:
                second, kind = await self._activity_second(conn, job, after, names)
                # Within a second the transitions come before the steps: after a transition, all of its second's.
                place = (second, after[1] if kind == "step" else activity.FIRST_KEY)
            if not names:
                return []
            selected = [*self._current_points(job), mp.c.name.in_(names)]
            selected += [mp.c.step >= min_step] if min_step else []
            selected += [mp.c.step <= max_step] if max_step else []

            async def latest_points(steps: set[int]) -> dict[int, tuple[dt.datetime, int]]:
                """Each step's latest point, (recorded_at, id): the steps' few points by (job_id, name, step), not a
                correlated subquery, which SQLite without statistics would answer walking the time index."""
                latest: dict[int, tuple[dt.datetime, int]] = {}
                ordered = sorted(steps)
                for start in range(0, len(ordered), STEPS_PER_QUERY):
                    batch = ordered[start : start + STEPS_PER_QUERY]
                    query = select(mp.c.step, mp.c.recorded_at, mp.c.id).where(*selected, mp.c.step.in_(batch))
                    for r in await conn.execute(query):
                        if r.step not in latest or (r.recorded_at, r.id) > latest[r.step]:
                            latest[r.step] = (r.recorded_at, r.id)
                return latest

            async def in_second(second: int, above: int, n: int) -> list[activity.Item]:
                query = select(mp.c.step, mp.c.recorded_at, mp.c.id).where(
                    *selected,
                    mp.c.recorded_at >= activity.start_of(second),
                    mp.c.recorded_at < activity.start_of(second + 1),
                    mp.c.step > above,
                )
                rows = (await conn.execute(query)).all()
                latest = await latest_points({r.step for r in rows})
                steps = {r.step for r in rows if latest[r.step] == (r.recorded_at, r.id)}
                return [activity.Item(second, step) for step in sorted(steps)[:n]]

            async def before(bound: int | None, n: int) -> list[activity.Item]:
                """Walk the points from the latest down (by the time index), in chunks, keeping each step where its
                latest point is."""
                found: list[activity.Item] = []
                last: tuple[dt.datetime, int] | None = None  # the last point walked, (recorded_at, id)
                chunk = min(n * len(names), MAX_WALK_CHUNK)  # about n steps' points when every step logs every name
                while len(found) < n:
                    where = list(selected)
                    if bound is not None:
                        where.append(mp.c.recorded_at < activity.start_of(bound))
                    if last is not None:
                        where += [mp.c.recorded_at <= last[0], or_(mp.c.recorded_at < last[0], mp.c.id < last[1])]
                    query = select(mp.c.step, mp.c.recorded_at, mp.c.id).where(*where)
                    query = query.order_by(mp.c.recorded_at.desc(), mp.c.id.desc()).limit(chunk)
                    rows = (await conn.execute(query)).all()
                    latest = await latest_points({r.step for r in rows})
                    found += [
                        activity.Item(activity.second_of(r.recorded_at), r.step)
                        for r in rows
                        if latest[r.step] == (r.recorded_at, r.id)
                    ]
                    if len(rows) < chunk:
                        break
                    last = (rows[-1].recorded_at, rows[-1].id)
                    chunk = min(chunk * 2, MAX_WALK_CHUNK)  # names logged rarely: read on in larger chunks
                return found[:n]

            steps = await activity.collect(in_second, before, place, limit)
            if not steps:
                return []
            points: dict[int, list[Any]] = {}
            query = select(mp).where(*selected, mp.c.step.in_([s.key for s in steps]))
            for r in await conn.execute(query.order_by(mp.c.step, mp.c.attempt, mp.c.id)):
                points.setdefault(r.step, []).append(r)
        return [activity.Item(s.second, s.key, points.get(s.key, [])) for s in steps]

    async def _activity_second(
        self, conn: AsyncConnection, job: Any, item: tuple[str, int], names: list[str]
    ) -> tuple[int, str]:
        """The second of an item of the job's activity, ("seq" or "step", key), and its kind; a step's is its
        latest point's among `names` (all when empty). One the job lacks is InvalidArgument naming `after`."""
        kind, key = item
        if kind == "seq":
            je = store.job_events.c
            query = select(je.recorded_at).where(je.job_id == job.id, je.id == key)
        else:
            mp = store.metric_points.c
            where = [*self._current_points(job), mp.step == key]
            names = names or await self._metric_names(conn, job.id)
            # The step's few points, their latest taken here: SQLite would find max() walking the time index.
            query = select(mp.recorded_at).where(*where, mp.name.in_(names))
        time = max((await conn.execute(query)).scalars(), default=None)
        if time is None:
            raise InvalidArgument.for_field("after", f"job {job.id!r} has no {kind} {key} to list after")
        return activity.second_of(time), kind

    async def logs(self, job_id: str, after_id: int, limit: int) -> list[Any]:
        return await self._rows_after(store.log_lines, job_id, after_id, limit)

    async def watch_page(
        self, job_id: str, event_id: int, metric_id: int, log_id: int, limit: int
    ) -> tuple[list[Any], Any, list[Any], list[Any]]:
        """One pass of a watch on one connection: (the job's transitions after event_id, the job as it is after
        them, its metric points after metric_id, its log lines after log_id), at most `limit` rows of each kind
        in the order stored; when the job is terminal, the transitions include any that committed before it was
        read. Each watcher makes one pass per wake-up, so under load one connection for it instead of one per
        read kept the pool free for the agents' reports and heartbeats (tests/reliability/load.py)."""

        def after(table: Any, after_id: int) -> Any:
            return (
                select(table).where(table.c.job_id == job_id, table.c.id > after_id).order_by(table.c.id).limit(limit)
            )

        query = select(store.jobs).where(
            store.jobs.c.id == job_id, project_scope(store.jobs.c.project_id, shared=False)
        )
        async with self.engine.connect() as conn:
            events = list((await conn.execute(after(store.job_events, event_id))).all())
            job = (await conn.execute(query)).first()
            if job is None:
                raise NotFound(f"job {job_id!r} not found")
            if JobState(job.state) in lifecycle.TERMINAL:
                # The terminal transition may have committed between the two reads; after it nothing changes.
                last = events[-1].id if events else event_id
                events += (await conn.execute(after(store.job_events, last))).all()
            metrics = list((await conn.execute(after(store.metric_points, metric_id))).all())
            logs = list((await conn.execute(after(store.log_lines, log_id))).all())
        return events, job, metrics, logs

    async def watch_pages(
        self, cursors: dict[str, tuple[int, int, int]], limit: int
    ) -> tuple[list[Any], dict[str, Any], list[Any], list[Any], bool]:
        """One pass for many watched jobs at once, on one connection and in five queries at most whatever their
        number: (their transitions, the jobs as they are after them, their metric points, their log lines, full).

        cursors: per job, (event id, metric id, log id) read up to. Rows of all the jobs come back together in the
        order stored, at most `limit` of each kind: `full` says a kind was cut there (read again from the new
        cursors before calling any job finished). A job that no longer exists is missing from the jobs. Each
        kind is one range from the lowest of the jobs' cursors (the rows after the others' cursors are left for
        the caller to drop), so the watchers of this replica cost the database a few queries per pass, not a
        few per watcher: 100 watchers of 50 jobs reporting 10 steps a second each (tests/reliability/load.py)
        made 1,600 queries a second and saturated a 2-core machine. Unscoped: the caller authorised each
        watcher for its job when it started (watch_page, in the watcher's own context).
        """
        ids = sorted(cursors)

        def after(table: Any, kind: int, job_ids: list[str], floor: int = 0) -> Any:
            # One range of ids from the lowest cursor (an index range on the primary key), and each job's rows
            # only after its own cursor: a job with no new events must not bring back the others' every pass.
            low = max(floor, min(cursors[j][kind] for j in job_ids))
            own = or_(*(and_(table.c.job_id == j, table.c.id > max(floor, cursors[j][kind])) for j in job_ids))
            return select(table).where(table.c.id > low, own).order_by(table.c.id).limit(limit)

        async with self.engine.connect() as conn:
            events = list((await conn.execute(after(store.job_events, 0, ids))).all())
            rows = {r.id: r for r in await conn.execute(select(store.jobs).where(store.jobs.c.id.in_(ids)))}
            terminal = sorted(j for j, r in rows.items() if JobState(r.state) in lifecycle.TERMINAL)
            if terminal and len(events) < limit:
                # A terminal transition may have committed between the two reads; after it nothing changes.
                last = events[-1].id if events else 0
                events += (await conn.execute(after(store.job_events, 0, terminal, last))).all()
            metrics = list((await conn.execute(after(store.metric_points, 1, ids))).all())
            logs = list((await conn.execute(after(store.log_lines, 2, ids))).all())
        full = max(len(events), len(metrics), len(logs)) >= limit
        return events, rows, metrics, logs, full

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
        if current in lifecycle.ON_AGENT and target not in lifecycle.ON_AGENT and job.attempt_started_at:
            # The attempt ends here (finished, paused, lost or requeued): bank the time it ran.
            values["run_seconds"] = job.run_seconds + max(0.0, (now - job.attempt_started_at).total_seconds())
            values["attempt_started_at"] = None
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

    async def join_agent(self, join_token: str, name: str) -> tuple[str, str]:
        """(credential id, credential) for a node that presents one of the operator's join tokens."""
        if not any(auth.same_secret(join_token, t) for t in self.join_tokens):
            raise Unauthenticated("invalid join token")
        if not name or len(name) > 255:
            raise InvalidArgument.for_field("name", "is required, at most 255 characters")
        credential_id, credential, secret_hash = auth.new_key(auth.AGENT_PREFIX)
        async with self.engine.begin() as conn:
            await conn.execute(
                store.agent_credentials.insert().values(
                    id=credential_id, name=name, secret_hash=secret_hash, created_at=self.clock()
                )
            )
        return credential_id, credential

    async def agent_principal(self, token: str) -> Principal:
        """The agent behind a credential from join_agent; unknown or revoked ones are UNAUTHENTICATED."""
        parsed = auth.parse_key(token)
        if parsed is None or parsed[0] != auth.AGENT_PREFIX:
            raise Unauthenticated("invalid agent credential")
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(store.agent_credentials).where(store.agent_credentials.c.id == parsed[1]))
            ).first()
        if not auth.stored_credential_valid(row, parsed[2]):
            raise Unauthenticated("invalid or revoked agent credential")
        return Principal(kind="agent", key_id=row.id, name=row.name)

    async def check_agent_caller(self, agent_id: str) -> None:
        """An agent speaks only for itself: the agent id must have been registered with its credential."""
        caller = _agent_protocol_caller()
        if caller.internal:
            return
        async with self.engine.connect() as conn:
            owner = (
                await conn.execute(select(store.agents.c.credential_id).where(store.agents.c.id == agent_id))
            ).scalar()
        if owner != caller.key_id:
            raise PermissionDenied(f"agent {agent_id!r} was not registered with this credential")

    async def register_agent(
        self, name: str, resources: dict[str, Any], slots: int, resume_agent_id: str = ""
    ) -> tuple[str, bool]:
        """A new lease, or the old one back when the agent reconnects before it lapsed."""
        if not name:
            raise InvalidArgument.for_field("name", "is required")
        caller = _agent_protocol_caller()
        credential_id = None if caller.internal else caller.key_id
        now = self.clock()
        async with self.engine.begin() as conn:
            if resume_agent_id:
                resumed = await conn.execute(
                    update(store.agents)
                    .where(
                        store.agents.c.id == resume_agent_id,
                        store.agents.c.status == "ACTIVE",
                        # Another node's id is not resumable: only the credential that registered it.
                        store.agents.c.credential_id.is_(None)
                        if credential_id is None
                        else store.agents.c.credential_id == credential_id,
                    )
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
                    credential_id=credential_id,
                )
            )
        return agent_id, False

    async def _active_agent(self, conn: AsyncConnection, agent_id: str) -> Any:
        """The agent's row if its lease holds."""
        agent = (await conn.execute(select(store.agents).where(store.agents.c.id == agent_id))).first()
        if agent is None or agent.status != "ACTIVE":
            raise _agent_gone(agent_id)
        return agent

    async def heartbeat(self, agent_id: str, running_job_ids: Sequence[str] = ()) -> list[str]:
        """Renew the lease; answer with the agent's jobs that should be stopped: those being cancelled, and
        those it says it runs that are no longer its own (requeued, or handed to another agent)."""
        j = store.jobs.c
        async with self.engine.connect() as conn:
            # No transaction: the renewal is one statement and the read after it needs no snapshot shared with it.
            # BEGIN and COMMIT were two of a heartbeat's round trips, 100 agents' every 3 s (bench/bench_scheduler.py).
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            # Conditional on ACTIVE: a reaper that marked the agent lost first wins, and the agent registers again.
            renewed = await conn.execute(
                update(store.agents)
                .where(store.agents.c.id == agent_id, store.agents.c.status == "ACTIVE")
                .values(last_heartbeat_at=self.clock())
            )
            if renewed.rowcount != 1:
                await self._active_agent(conn, agent_id)  # raises NotFound with the reason
            running = list(dict.fromkeys(running_job_ids))
            rows = (
                await conn.execute(
                    select(j.id, j.state).where(
                        j.agent_id == agent_id, or_(j.state == JobState.CANCELLING, j.id.in_(running))
                    )
                )
            ).all()
        stop = [r.id for r in rows if r.state == JobState.CANCELLING]
        # A job cancelled without the agent's confirmation (the reaper) is still stopped.
        owned = {r.id for r in rows if r.state != JobState.CANCELLED}
        return stop + [job_id for job_id in running if job_id not in owned]

    async def _agent_snapshot(
        self, conn: AsyncConnection, agent_id: str, lock: bool = False
    ) -> tuple[scheduler.AgentSnapshot, bool]:
        """The agent's capacity and the requests of the jobs it holds, and whether any job is queued: one statement
        (raises NotFound when its lease lapsed). lock: the agent's row held until the transaction ends."""
        a, held, queued = store.agents.c, store.jobs.c, _QUEUED_JOB.c
        query = (
            select(
                a.status,
                a.resources,
                a.slots,
                held.id.label("held_id"),
                held.resources.label("held_resources"),
                select(queued.id).where(queued.state == JobState.QUEUED).exists().label("queued"),
            )
            .select_from(
                store.agents.outerjoin(
                    store.jobs,
                    and_(held.agent_id == a.id, held.state.in_([s.value for s in lifecycle.ON_AGENT])),
                )
            )
            .where(a.id == agent_id)
        )
        if lock:
            # Held until the transaction ends, so that claims for one agent (e.g. from two replicas while it
            # reconnects) run one after the other and never overfill it.
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(of=store.agents)
            else:
                # SQLite has one writer: writing first takes its lock, which makes the whole claim serial.
                await conn.execute(update(store.agents).where(a.id == agent_id).values(status=a.status))
        rows = (await conn.execute(query)).all()
        if not rows or rows[0].status != "ACTIVE":
            raise _agent_gone(agent_id)
        snapshot = scheduler.AgentSnapshot(
            scheduler.AgentCapacity.from_json(rows[0].resources, rows[0].slots),
            tuple(scheduler.ResourceRequest.from_json(r.held_resources) for r in rows if r.held_id is not None),
        )
        return snapshot, bool(rows[0].queued)

    async def _queue_pages(self, conn: AsyncConnection) -> AsyncGenerator[list[scheduler.QueuedJob], None]:
        """The queue in scheduling order, a page at a time (keyset paging: no row is skipped or repeated)."""
        j = store.jobs.c
        after: scheduler.QueuedJob | None = None
        while True:
            query = (
                select(j.id, j.priority, j.created_at, j.resources)
                .where(j.state == JobState.QUEUED)
                .order_by(j.priority.desc(), j.created_at, j.id)
                .limit(QUEUE_PAGE)
            )
            if after is not None:
                query = query.where(
                    or_(
                        j.priority < after.priority,
                        and_(
                            j.priority == after.priority,
                            or_(
                                j.created_at > after.created_at,
                                and_(j.created_at == after.created_at, j.id > after.job_id),
                            ),
                        ),
                    )
                )
            page = [
                scheduler.QueuedJob(r.id, r.priority, r.created_at, scheduler.ResourceRequest.from_json(r.resources))
                for r in await conn.execute(query)
            ]
            if page:
                yield page
            if len(page) < QUEUE_PAGE:
                return
            after = page[-1]

    async def claim_next(self, agent_id: str) -> ClaimedJob | None:
        """Hand the best queued job that fits this agent to it; never one job to two agents.

        The best job: scheduler.candidates (priority, then age; jobs that do not fit are passed over). Across
        replicas on PostgreSQL a candidate is locked with FOR UPDATE SKIP LOCKED, so a row another replica
        is claiming is skipped rather than waited for; the compare-and-set on the version guards the claim
        on every engine (SQLite has a single writer).
        """
        # One connection and few statements: each statement is a round trip that waits its turn on a busy event
        # loop, and a claim that took three connections (with their pings) and ~27 round trips made 100 agents'
        # claims queue behind each other for 0.5-1 s (bench/bench_scheduler.py).
        async with self.engine.connect() as conn:
            if conn.dialect.name != "postgresql":
                # SQLite has one writer: the common cases (nothing queued, a full agent) take no lock. Then a new
                # transaction, as a read one cannot take the writer's lock once another write committed after it.
                snapshot, queued = await self._agent_snapshot(conn, agent_id)
                if not queued or snapshot.free_slots == 0:
                    return None
                await conn.rollback()
            snapshot, queued = await self._agent_snapshot(conn, agent_id, lock=True)
            claimed = (
                await self._claim_first_fitting(conn, snapshot, agent_id) if queued and snapshot.free_slots else None
            )
            if claimed is None:
                return None  # rolled back as the connection closes
            # The row as this claim wrote it, read in its own transaction rather than on another connection after.
            job = (await conn.execute(select(store.jobs).where(store.jobs.c.id == claimed.job.id))).one()
            await conn.commit()
        # Only the job's watchers: a claim frees no slot and queues nothing, and waking every agent's assignment
        # loop for each claim made each of 100 agents claim again in vain (bench/bench_scheduler.py).
        self._after_commit(claimed.job.id)
        return dataclasses.replace(claimed, job=job, agent_full=snapshot.free_slots == 1)

    async def _claim_first_fitting(
        self, conn: AsyncConnection, snapshot: scheduler.AgentSnapshot, agent_id: str
    ) -> ClaimedJob | None:
        j, cp = store.jobs.c, store.checkpoints.c
        latest = select(cp.step, cp.uri).where(cp.job_id == j.id).order_by(cp.step.desc()).limit(1)
        async with contextlib.aclosing(self._queue_pages(conn)) as pages:
            async for page in pages:
                ids = [candidate.job_id for candidate in scheduler.candidates(page, snapshot)]
                while ids:
                    # The best candidate still queued and not being claimed, in one statement: with many agents
                    # claiming at once, a statement per candidate made the k-th claim read the k-1 taken before it
                    # one by one (bench/bench_scheduler.py). LIMIT 1 locks only the row it returns.
                    # With its latest checkpoint (_claim_in resumes from it): a statement less per claim.
                    query = (
                        select(
                            store.jobs,
                            latest.with_only_columns(cp.step).scalar_subquery().label("latest_checkpoint_step"),
                            latest.with_only_columns(cp.uri).scalar_subquery().label("latest_checkpoint_uri"),
                        )
                        .where(j.id.in_(ids[:CLAIM_WINDOW]), j.state == JobState.QUEUED)
                        .order_by(j.priority.desc(), j.created_at, j.id)
                        .limit(1)
                    )
                    if conn.dialect.name == "postgresql":
                        query = query.with_for_update(skip_locked=True, of=store.jobs)
                    job = (await conn.execute(query)).first()
                    if job is None:  # these candidates claimed, cancelled or locked by another replica meanwhile
                        del ids[:CLAIM_WINDOW]
                        continue
                    claimed = await self._claim_in(conn, job, agent_id)
                    if claimed is not None:
                        return claimed
                    ids.remove(job.id)
        return None

    async def _claim_in(self, conn: AsyncConnection, job: Any, agent_id: str) -> ClaimedJob | None:
        """Start the job's next attempt on the agent, from its latest checkpoint when it has one."""
        attempt = job.attempt + 1
        resumes = job.latest_checkpoint_step is not None  # read with the row (_claim_first_fitting)
        step = int(job.latest_checkpoint_step) if resumes else 0
        values: dict[str, Any] = {
            "agent_id": agent_id,
            "attempt": attempt,
            "output_uri": f"{self.artifact_root}/jobs/{job.id}/output",
            "attempt_started_at": self.clock(),
            "resumed_from_step": step,
        }
        if attempt > 1:  # progress restarts where this attempt starts
            values["current_step"] = step
            values["progress"] = lifecycle.progress_percent(step, job.total_steps)
        reason = f"assigned to agent {agent_id}" + (f"; resumes from step {step}" if resumes else "")
        if not await self._transition_in(conn, job, JobState.STARTING, reason, **values):
            return None
        if attempt > 1:
            # The new attempt reports every step after the one it starts from again: drop the earlier attempts'
            # points past it, so no step is counted twice.
            await conn.execute(
                delete(store.metric_points).where(
                    store.metric_points.c.job_id == job.id,
                    store.metric_points.c.attempt < attempt,
                    store.metric_points.c.step > step,
                )
            )
            await rebuild_metric_blocks(conn, job.id, attempt, step)
        return ClaimedJob(
            job=job,
            resume_from_uri=job.latest_checkpoint_uri if resumes else "",
            resume_from_step=step,
            checkpoint_uri=f"{self.artifact_root}/jobs/{job.id}/checkpoints",
        )

    async def cancelling_jobs(self, agent_id: str) -> list[tuple[str, bool]]:
        """The agent's jobs to stop, as (job id, checkpoint first): cancelled ones, and paused ones, which save
        a checkpoint before they stop."""
        j = store.jobs.c
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(j.id, j.state).where(j.agent_id == agent_id, _to_stop()))
            return [(r.id, r.state != JobState.CANCELLING) for r in rows]

    async def agents_to_wake(self, agent_ids: Sequence[str]) -> dict[str, bool]:
        """Of these agents, those whose assignment loop could act now, each with whether it has jobs to stop
        (cancelling_jobs): one with a free slot while a job is queued, one with a job to stop, and one whose lease
        lapsed (its claim says so). The others, full with nothing to stop, would only read that again."""
        if not agent_ids:
            return {}
        a, j = store.agents.c, store.jobs.c
        held = (
            select(func.count())
            .select_from(store.jobs)
            .where(j.agent_id == a.id, j.state.in_([s.value for s in lifecycle.ON_AGENT]))
            .scalar_subquery()
        )
        query = select(
            a.id,
            a.status,
            (held < a.slots).label("free"),
            select(j.id).where(j.agent_id == a.id, _to_stop()).exists().label("stops"),
            select(j.id).where(j.state == JobState.QUEUED).exists().label("queued"),
        ).where(a.id.in_(list(agent_ids)))
        async with self.engine.connect() as conn:
            rows = {r.id: r for r in await conn.execute(query)}
        woken = {}
        for agent_id in agent_ids:
            r = rows.get(agent_id)
            if r is None or r.status != "ACTIVE" or r.stops or (r.free and r.queued):
                woken[agent_id] = bool(r is not None and r.stops)
        return woken

    async def reap_lost_agents(self) -> int:
        """Agents whose lease lapsed lose their jobs: requeued for another attempt, or failed past the limit;
        a job asked to pause that has a checkpoint becomes PAUSED instead."""
        now = self.clock()
        deadline = now - dt.timedelta(seconds=self.lease_ttl_seconds)
        reaped = 0
        lost: list[str] = []
        async with self.engine.begin() as conn:
            overdue = [
                (r.id, r.name)
                for r in await conn.execute(
                    select(store.agents.c.id, store.agents.c.name).where(
                        store.agents.c.status == "ACTIVE", store.agents.c.last_heartbeat_at < deadline
                    )
                )
            ]
            for agent_id, agent_name in overdue:
                # Conditional: a heartbeat that just renewed the lease, or another replica's reaper, wins.
                marked = await conn.execute(
                    update(store.agents)
                    .where(
                        store.agents.c.id == agent_id,
                        store.agents.c.status == "ACTIVE",
                        store.agents.c.last_heartbeat_at < deadline,
                    )
                    .values(status="LOST")
                )
                if marked.rowcount != 1:
                    continue
                lost.append(agent_id)
                jobs = (
                    await conn.execute(
                        select(store.jobs).where(
                            store.jobs.c.agent_id == agent_id,
                            store.jobs.c.state.in_([s.value for s in lifecycle.ON_AGENT]),
                        )
                    )
                ).all()
                who = f"{agent_id} ({agent_name})"
                for job in jobs:
                    target, reason = lifecycle.after_agent_lost(job.attempt, job.max_attempts, JobState(job.state), who)
                    if await self._release_in(conn, job, target, reason, "agent lost while pausing"):
                        reaped += 1
        if lost:
            log.warning("agents lost: %s (%d jobs moved)", lost, reaped)
            self._after_commit()
        return reaped

    async def reap_stuck_jobs(self) -> int:
        """Jobs an agent holds but never moved on: STARTING past the start timeout without the agent's
        confirmation (the assignment was lost) is requeued, the attempt counted (past the limit FAILED); CANCELLING
        past the cancel timeout is CANCELLED (the agent, if alive, is told again to stop by its heartbeat).

        Each move is a compare-and-set on the job's version, written with its event in the pass's transaction: a
        confirmation that commits first wins, and of two replicas reaping at once only one moves the job.
        """
        now = self.clock()
        j, je = store.jobs.c, store.job_events.c
        cancelling_since = (
            select(func.max(je.recorded_at))
            .where(je.job_id == j.id, je.to_state == JobState.CANCELLING)
            .scalar_subquery()
            .label("state_since")
        )
        async with self.engine.connect() as conn:
            starting = [
                r
                for r in await conn.execute(select(store.jobs).where(j.state == JobState.STARTING))
                if lifecycle.overdue(r.attempt_started_at or r.updated_at, now, self.start_timeout_seconds)
            ]
            cancelling = [
                r
                for r in await conn.execute(select(store.jobs, cancelling_since).where(j.state == JobState.CANCELLING))
                if lifecycle.overdue(r.state_since or r.updated_at, now, self.cancel_timeout_seconds)
            ]
        candidates = {r.id: r for r in [*starting, *cancelling]}
        if not candidates:
            return 0
        reaped = 0
        async with self.engine.begin() as conn:
            # One transaction for the pass. On PostgreSQL the rows are locked with SKIP LOCKED: a replica reaping at
            # the same time takes the others instead of waiting on these; the compare-and-set on the version (every
            # engine) lets a confirmation that committed first win, and a row reaped meanwhile is not moved again.
            query = select(store.jobs).where(j.id.in_(list(candidates))).order_by(j.id)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            moves: list[tuple[str, str]] = []
            for fresh in (await conn.execute(query)).all():
                seen = candidates[fresh.id]
                if fresh.state != seen.state or fresh.version != seen.version:
                    continue  # confirmed, cancelled or reaped meanwhile
                agent = fresh.agent_id or "(none)"
                if fresh.state == JobState.STARTING:
                    target, reason = lifecycle.after_start_unconfirmed(
                        fresh.attempt, fresh.max_attempts, agent, self.start_timeout_seconds
                    )
                    moved = await self._release_in(
                        conn, fresh, target, reason, f"agent {agent} never confirmed the start while pausing"
                    )
                else:
                    target, reason = lifecycle.after_cancel_unconfirmed(agent, self.cancel_timeout_seconds)
                    moved = await self._transition_in(conn, fresh, target, reason)
                if moved:
                    moves.append((fresh.id, reason))
                    reaped += 1
        for job_id, reason in moves:
            log.warning("job %s: %s", job_id, reason)
        if reaped:
            self._after_commit()
        return reaped

    async def _release_in(
        self, conn: AsyncConnection, job: Any, target: JobState, reason: str, pausing_reason: str
    ) -> bool:
        """Take a job from its agent, to `target` for `reason` (_transition_in banks the attempt's time in
        run_seconds); a job asked to pause that has a checkpoint becomes PAUSED instead (`pausing_reason`)."""
        current = JobState(job.state)
        values: dict[str, Any] = {}
        if job.pause_requested and current != JobState.CANCELLING:
            checkpointed = (
                await conn.execute(
                    select(store.checkpoints.c.step).where(store.checkpoints.c.job_id == job.id).limit(1)
                )
            ).first()
            values["pause_requested"] = False
            if checkpointed is not None:
                reason = f"{pausing_reason}; paused at the latest checkpoint"
                return await self._transition_in(conn, job, JobState.PAUSED, reason, agent_id=None, **values)
            reason += " (the pause was dropped: no checkpoint saved yet)"
        if target == JobState.QUEUED:
            values["agent_id"] = None
        return await self._transition_in(conn, job, target, reason, **values)

    # -- reports --------------------------------------------------------------

    async def apply_report(self, agent_id: str, report: Report) -> int:
        """Store one report exactly once; returns the highest sequence number stored for (job, attempt)."""
        acks = await self.apply_reports([dataclasses.replace(report, agent_id=agent_id)])
        return acks[(report.job_id, report.attempt)]

    async def apply_reports(self, reports: list[Report]) -> ReportAcks:
        """Store a batch of reports in one transaction, each exactly once and in order.

        Returns, per (job, attempt), the highest sequence number stored: the agent's acknowledgement. Reports
        from an attempt that no longer owns its job (fenced: requeued, handed to another agent, or sent under
        an agent id whose lease lapsed) are refused: nothing of them is stored, they are acknowledged so the
        agent stops resending, and `fenced` says why, for the agent to stop that run.
        """
        acks = ReportAcks()
        changed: set[tuple[str, int]] = set()
        async with self.engine.begin() as conn:
            # A fixed number of statements whatever the number of jobs in the batch (their acks, their rows, the
            # points and lines, the progress and the acks written back): each statement waits its turn on a busy
            # event loop, and one of each per job made a 25-job batch take 1.3 s under load
            # (tests/reliability/load.py), so acks and watchers fell further behind each second.
            keys = {(r.job_id, r.attempt) for r in reports}
            job_ids = sorted({job_id for job_id, _ in keys})
            ra = store.report_acks.c
            stored: dict[tuple[str, int], int] = {
                (row.job_id, row.attempt): row.last_seq
                for row in await conn.execute(select(ra.job_id, ra.attempt, ra.last_seq).where(ra.job_id.in_(job_ids)))
                if (row.job_id, row.attempt) in keys
            }
            batch = _ReportBatch(self, conn)
            await batch.preload(job_ids)
            for r in reports:
                key = (r.job_id, r.attempt)
                if key not in acks.fenced and (why := await _fence_reason(batch, r)):
                    acks.fenced[key] = why
                if key in acks.fenced:
                    acks[key] = max(r.seq, acks.get(key, stored.get(key, 0)))
                    continue
                last = acks.get(key, stored.get(key))
                if last is not None and r.seq <= last:
                    acks[key] = last  # a resend after reconnect: already stored
                    continue
                job = await batch.job(r.job_id)
                await batch.add(job, r)
                acks[key] = r.seq
                changed.add(key)
            await batch.flush()
            updates = [
                {"b_job": job_id, "b_attempt": attempt, "last_seq": acks[(job_id, attempt)]}
                for job_id, attempt in sorted(changed)
                if (job_id, attempt) in stored
            ]
            if updates:
                await conn.execute(
                    update(store.report_acks).where(
                        ra.job_id == bindparam("b_job"), ra.attempt == bindparam("b_attempt")
                    ),
                    updates,
                )
            inserts = [
                {"job_id": job_id, "attempt": attempt, "last_seq": acks[(job_id, attempt)]}
                for job_id, attempt in sorted(changed)
                if (job_id, attempt) not in stored
            ]
            if inserts:
                await conn.execute(store.report_acks.insert(), inserts)
        if changed:
            if all(r.kind in ("metric", "log") or r.state == JobState.RUNNING for r in reports):
                # Points, lines and a start change nothing a scheduler or another job's watcher reads (no slot is
                # freed, nothing queued): wake only theirs.
                self._after_commit(*{job_id for job_id, _ in changed})
            else:
                self._after_commit()
        if batch.dropped_uris:  # after the commit: a rolled-back drop keeps its files
            await asyncio.to_thread(_remove_uris, batch.dropped_uris)
        return acks


async def _fence_reason(batch: _ReportBatch, r: Report) -> str:
    """Why this report's attempt no longer owns its job; empty when it does."""
    try:
        job = await batch.job(r.job_id)
    except NotFound:
        return f"job {r.job_id} no longer exists"
    if job.attempt != r.attempt:
        return f"attempt {r.attempt} of job {r.job_id} was superseded by attempt {job.attempt}"
    if job.agent_id != r.agent_id:
        holder = f"agent {job.agent_id}" if job.agent_id else "no agent"
        return (
            f"job {r.job_id} attempt {r.attempt} no longer runs on agent {r.agent_id or '(none)'}: "
            f"the job is {job.state} on {holder} (the agent's lease lapsed, or the job was reassigned)"
        )
    return ""


def _printable(text: str) -> str:
    return text.replace("\0", "\ufffd")


_BLOCK_COLUMNS = ("job_id", "name", "block", "n", "low", "high", "last_step", "last_value")
# One statement for a batch's blocks: its arrays, one per column, unnested into rows merged with those stored. Not
# for an attempt that a claim superseded since the batch checked it (the claim rebuilt the blocks past its step
# from the points that stand, which these are not), unless every point of the block is at or before the step the
# new attempt resumed from: those points stand.
_UPSERT_BLOCKS_PG = """
INSERT INTO metric_blocks AS b (job_id, name, block, n, low, high, last_step, last_value)
SELECT u.job_id, u.name, u.block, u.n, u.low, u.high, u.last_step, u.last_value
FROM unnest($1::varchar[], $2::varchar[], $3::bigint[], $4::bigint[], $5::float8[], $6::float8[], $7::bigint[],
            $8::float8[], $9::integer[]) AS u(job_id, name, block, n, low, high, last_step, last_value, attempt)
WHERE EXISTS (
    SELECT 1 FROM jobs j WHERE j.id = u.job_id AND (j.attempt = u.attempt OR u.last_step <= j.resumed_from_step)
)
ON CONFLICT (job_id, name, block) DO UPDATE SET
    n = b.n + excluded.n, low = least(b.low, excluded.low), high = greatest(b.high, excluded.high),
    last_step = greatest(b.last_step, excluded.last_step),
    last_value = CASE WHEN excluded.last_step >= b.last_step THEN excluded.last_value ELSE b.last_value END
"""


async def add_to_metric_blocks(conn: AsyncConnection, points: list[tuple[str, int, str, int, float]]) -> None:
    """Merge points just stored, (job_id, attempt, name, step, value) in the order stored, one attempt per job,
    into their rollup blocks (series.roll_up): one statement whatever the number of blocks. Steps below 0, which
    no chart shows, have none."""
    attempts = {job_id: attempt for job_id, attempt, *_ in points}
    blocks = series.roll_up((job_id, name, step, value) for job_id, _, name, step, value in points if step >= 0)
    # In key order, so that two batches locking some of the same blocks lock them in the same order.
    rows = [(*key, b.count, b.min, b.max, b.step, b.value) for key, b in sorted(blocks.items())]
    if not rows:
        return
    if conn.dialect.driver == "asyncpg":
        raw = await conn.get_raw_connection()
        assert raw.driver_connection is not None
        columns = [list(column) for column in zip(*rows, strict=True)]
        await raw.driver_connection.execute(_UPSERT_BLOCKS_PG, *columns, [attempts[job_id] for job_id in columns[0]])
        return
    # SQLite: the points' INSERT began this transaction's write, so no claim commits until it ends; but the batch
    # checked its attempts before (pysqlite begins at the first write), so the same rule as above, read now.
    jobs = store.jobs.c
    current = {
        r.id: (r.attempt, r.resumed_from_step)
        for r in await conn.execute(
            select(jobs.id, jobs.attempt, jobs.resumed_from_step).where(jobs.id.in_(sorted(attempts)))
        )
    }
    rows = [
        row
        for row in rows
        if row[0] in current and (current[row[0]][0] == attempts[row[0]] or row[6] <= current[row[0]][1])
    ]
    if not rows:
        return
    mb = sqlite_insert(store.metric_blocks)
    new, old = mb.excluded, store.metric_blocks.c
    await conn.execute(
        mb.on_conflict_do_update(
            index_elements=[old.job_id, old.name, old.block],
            set_={
                "n": old.n + new.n,
                "low": func.min(old.low, new.low),  # SQLite's min and max of several arguments: the scalar ones
                "high": func.max(old.high, new.high),
                "last_step": func.max(old.last_step, new.last_step),
                "last_value": case((new.last_step >= old.last_step, new.last_value), else_=old.last_value),
            },
        ),
        [dict(zip(_BLOCK_COLUMNS, row, strict=True)) for row in rows],
    )


async def rebuild_metric_blocks(
    conn: AsyncConnection, job_id: str, attempt: int, from_step: int, first_step: int | None = None
) -> None:
    """The job's rollup blocks from the one holding from_step on (first_step, when given), made again from the
    points that stand: when attempt resumes from from_step, the earlier attempts' points past it no longer do.
    With from_step 0 and attempt 1, every block of the job (for points stored without them, as the query
    benchmark's COPY); with first_step 0 and the job's own attempt and resumed_from_step, every block of it."""
    mb, mp = store.metric_blocks, store.metric_points
    first = (from_step if first_step is None else first_step) // series.BLOCK_STEPS
    await conn.execute(delete(mb).where(mb.c.job_id == job_id, mb.c.block >= first))
    where = [mp.c.job_id == job_id, mp.c.step >= first * series.BLOCK_STEPS]
    if attempt > 1:
        where.append(or_(mp.c.attempt == attempt, mp.c.step <= from_step))
    # The block number rendered as a constant, so that PostgreSQL sees one expression in the select and the group.
    block = mp.c.step // literal_column(str(series.BLOCK_STEPS), BigInteger)
    grouped = (
        select(
            mp.c.name,
            block.label("block"),
            func.count().label("n"),
            func.min(mp.c.value).label("low"),
            func.max(mp.c.value).label("high"),
            func.max(mp.c.step).label("last_step"),
        )
        .where(*where)
        .group_by(mp.c.name, block)
        .subquery("grouped")
    )
    last_value = (  # the latest attempt's, then the latest stored: no superseded point is later than a standing one
        select(mp.c.value)
        .where(mp.c.job_id == job_id, mp.c.name == grouped.c.name, mp.c.step == grouped.c.last_step)
        .order_by(mp.c.attempt.desc(), mp.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = select(literal(job_id, String), *[grouped.c[c] for c in _BLOCK_COLUMNS[1:-1]], last_value)
    await conn.execute(mb.insert().from_select(list(_BLOCK_COLUMNS), rows))


async def rebuild_all_metric_blocks(engine: AsyncEngine, progress: Callable[[int, int], None] | None = None) -> int:
    """Every job's rollup blocks made again from its standing points, a job a transaction: for points stored
    without their blocks (a jobs service older than the blocks run against this schema). Returns the jobs done."""
    jc = store.jobs.c
    async with engine.connect() as conn:
        jobs = (await conn.execute(select(jc.id, jc.attempt, jc.resumed_from_step).order_by(jc.id))).all()
    for done, job in enumerate(jobs, 1):
        async with engine.begin() as conn:
            await rebuild_metric_blocks(conn, job.id, job.attempt, job.resumed_from_step, first_step=0)
        if progress is not None:
            progress(done, len(jobs))
    return len(jobs)


_POINT_COLUMNS = ("job_id", "attempt", "name", "step", "value", "recorded_at")
_RECORDED_AT: Any = store.metric_points.c.recorded_at.type  # a UtcDateTime (TypeDecorator): its bind check


class _ReportBatch:
    """Accumulates one transaction's log lines, metric points and progress; state changes apply in order."""

    def __init__(self, jobs: Jobs, conn: AsyncConnection) -> None:
        self.jobs = jobs
        self.conn = conn
        self.rows: dict[str, Any] = {}
        self.logs: list[dict[str, Any]] = []
        self.points: list[tuple[Any, ...]] = []  # rows in _POINT_COLUMNS order
        self.progress: dict[str, dict[str, Any]] = {}
        # Files of checkpoints retention dropped in this transaction: their own batch's, so that a transaction
        # storing beside this one (ReportWriter) or rolled back never removes another's.
        self.dropped_uris: list[str] = []

    async def preload(self, job_ids: list[str]) -> None:
        """The rows of these jobs, in one query."""
        for row in await self.conn.execute(select(store.jobs).where(store.jobs.c.id.in_(job_ids))):
            self.rows[row.id] = row

    async def job(self, job_id: str) -> Any:
        if job_id not in self.rows:
            row = (await self.conn.execute(select(store.jobs).where(store.jobs.c.id == job_id))).first()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            self.rows[job_id] = row
        return self.rows[job_id]

    async def add(self, job: Any, r: Report) -> None:
        if r.kind == "log":
            # A script may print anything, NUL included, which PostgreSQL's text refuses; one such line must not
            # fail the whole batch (and every retry of it), so it is kept with U+FFFD in the NUL's place.
            text, stream = _printable(r.text), _printable(r.stream or "stdout")
            self.logs.append(dict(job_id=job.id, attempt=r.attempt, stream=stream, text=text, recorded_at=r.time))
        elif r.kind == "metric":
            when = _RECORDED_AT.process_bind_param(r.time, None)  # refuses a naive time, as an INSERT does
            self.points += [
                (job.id, r.attempt, _printable(name), r.step, value, when) for name, value in r.values.items()
            ]
            before = self.progress.get(
                job.id,
                {
                    "current_step": job.current_step,
                    "total_steps": job.total_steps,
                    "epoch": job.epoch,
                    "tokens_seen": job.tokens_seen,
                },
            )
            total = r.total_steps or before["total_steps"]
            # The Trainer logs epoch and num_tokens (tokens seen so far) with its other metrics.
            tokens = r.values.get("num_tokens", r.values.get("tokens_seen"))
            self.progress[job.id] = {
                "current_step": max(before["current_step"], r.step),
                "total_steps": total,
                "progress": r.progress or lifecycle.progress_percent(r.step, total),
                "epoch": r.values.get("epoch", before["epoch"]),
                "tokens_seen": int(tokens) if tokens is not None else before["tokens_seen"],
            }
        elif r.kind == "checkpoint":
            self.dropped_uris += await self.jobs._record_checkpoint(self.conn, job, r)
        elif r.kind == "state" and r.state is not None:
            await self.flush()  # progress and lines before the state that follows them
            target = r.state
            extra: dict[str, Any] = {}
            if job.pause_requested and target in (JobState.CANCELLED, JobState.PAUSED):
                # Stopped as a pause asked: wait PAUSED; a resume continues from the latest checkpoint.
                target, extra = JobState.PAUSED, {"pause_requested": False, "agent_id": None}
            elif target == JobState.PAUSED:
                target = JobState.FAILED  # a runner can't pause on its own
            elif target == JobState.CANCELLED and job.state != JobState.CANCELLING:
                target = JobState.FAILED  # the process stopped without a terminate: say so
            if JobState(job.state) == target:
                return
            if not lifecycle.report_applies(JobState(job.state), target):
                # The job moved on first (a terminate, the reaper): the late word goes to the log, and the reports
                # after it are stored rather than refused with the whole batch, again on every resend.
                note = f"the agent reported {target} ({r.reason or 'no reason'}) after the job became {job.state}"
                self.logs.append(
                    dict(job_id=job.id, attempt=r.attempt, stream="service", text=note, recorded_at=r.time)
                )
                return
            if target == JobState.SUCCEEDED:
                extra = {"output_uri": r.output_uri or job.output_uri, "progress": 100.0}
            if not await self.jobs._transition_in(self.conn, job, target, r.reason, **extra):
                raise FailedPrecondition("job changed concurrently")
            self.rows.pop(job.id, None)  # reload: version and state changed

    async def flush(self) -> None:
        if self.logs:
            await self.conn.execute(store.log_lines.insert(), self.logs)
        if self.points:
            await self._store_points()
        if self.progress:
            now = self.jobs.clock()
            await self.conn.execute(
                update(store.jobs).where(store.jobs.c.id == bindparam("b_id")),
                [{"b_id": job_id, "updated_at": now, **values} for job_id, values in sorted(self.progress.items())],
            )
            for job_id in self.progress:
                self.rows.pop(job_id, None)
        self.logs, self.points, self.progress = [], [], {}

    async def _store_points(self) -> None:
        if self.conn.dialect.driver == "asyncpg":
            # COPY, in this transaction (begun already: the acks were read first). The INSERT spent more of the
            # service's time binding rows in SQLAlchemy than PostgreSQL took to store them: ingestion through
            # the ReportJob streams went from 0.45-0.6x a bare bulk INSERT's rate to 0.9-1.0x with COPY
            # (bench/bench_metric_ingest.py, 10 agents on a busy 2-core machine).
            raw = await self.conn.get_raw_connection()
            assert raw.driver_connection is not None  # a checked-out connection has its driver's
            await raw.driver_connection.copy_records_to_table(
                store.metric_points.name, records=self.points, columns=_POINT_COLUMNS
            )
        else:
            await self.conn.execute(
                store.metric_points.insert(), [dict(zip(_POINT_COLUMNS, p, strict=True)) for p in self.points]
            )
        await add_to_metric_blocks(self.conn, [p[:5] for p in self.points])
