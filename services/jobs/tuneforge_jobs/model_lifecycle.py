"""Use cases of the lifecycle after training: merge, evaluate, deploy, undeploy, and the choice of the
deployment that answers a chat completion. The rules are in operations.py; the jobs they make are stored
and scheduled by Jobs like any training."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select, update

from tuneforge_common import auth
from tuneforge_common.auth import Principal, Role
from tuneforge_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tuneforge_common.operations import EvaluateParams, MergeParams, ServeParams, resolve_operation_parameters

from . import operations as ops
from . import store
from .inference import InferenceRouter
from .lifecycle import JobState
from .notify import Notifier
from .service import Jobs

log = logging.getLogger("tuneforge.jobs.lifecycle")
EVALUATES_LABEL = "tuneforge.evaluates-job"  # an evaluation's training job, so ListJobs finds its evaluations


MAX_GENERATIONS = 100


def read_evaluation(output_uri: str) -> tuple[dict[str, float], list[dict]]:
    """metrics.json's numbers and the first generations.jsonl lines of an evaluation's output (empty when the
    files are gone: an evaluation's record outlives its artifacts)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output_uri)
    metrics: dict[str, float] = {}
    generations: list[dict] = []
    try:
        with fs.open(f"{root.rstrip('/')}/metrics.json", "r") as fh:
            loaded = json.load(fh)
        metrics = {k: float(v) for k, v in loaded.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with fs.open(f"{root.rstrip('/')}/generations.jsonl", "r") as fh:
            for line in fh:
                if len(generations) >= MAX_GENERATIONS:
                    break
                row = json.loads(line) if line.strip() else None
                if isinstance(row, dict):
                    generations.append({k: str(row.get(k, "")) for k in ("prompt", "reference", "generated")})
    except (OSError, ValueError):
        log.warning("evaluation output at %s is incomplete", output_uri)
    return metrics, generations


@contextlib.contextmanager
def _acting_as(principal: Principal) -> Iterator[None]:
    """Calls in the block act as `principal` (the catalog scopes them to its project); then as before."""
    before = auth.current()
    auth.act_as(principal)
    try:
        yield
    finally:
        auth.act_as(before)


class ModelLifecycle:
    def __init__(self, jobs: Jobs, router: InferenceRouter) -> None:
        self.jobs = jobs
        self.catalog = jobs.catalog
        self.router = router

    # -- merge ---------------------------------------------------------------------------------------------

    async def merge(self, model_id: str, name: str, description: str, quantize: str, resources: dict[str, Any]) -> Any:
        """A merge job over a CUSTOMIZED model; its complete model is published when it succeeds."""
        auth.current().require(Role.MEMBER, "merging a model")
        model = await self.catalog.model_inputs(model_id)
        plan = ops.plan(ops.MERGE, model)
        if plan.entrypoint == ops.BUILTIN_ENTRYPOINTS[ops.MERGE]:
            parameters = resolve_operation_parameters(MergeParams, {"quantize": quantize})
            if parameters["quantize"] != "none" and not resources.get("gpu_count"):
                raise InvalidArgument.for_field(
                    "resources.gpu_count", f"a {parameters['quantize']} quantized copy needs a GPU: ask for one"
                )
        else:
            # The method's own saving file takes the training's parameters, as it does after a training.
            parameters = await self._training_parameters(model.lineage.get("job_id", ""))
        return await self.jobs.submit_operation(
            plan,
            model_id=model_id,
            name=f"merge {model.name}",
            parameters=parameters,
            resources=resources,
            operation={
                "result_name": ops.complete_model_name(model.name, name),
                "description": description,
                "lineage": {**model.lineage, "base_model_id": model.base_model_id, "source_model_id": model_id},
            },
        )

    async def _training_parameters(self, job_id: str) -> dict[str, Any]:
        if not job_id:
            return {}
        try:
            return json.loads((await self.jobs.get(job_id)).parameters)
        except NotFound:
            return {}

    async def publish_merged(self) -> int:
        """Publish the complete model of each succeeded merge not published yet (again after a restart), acting
        in the merge's project; how many were published."""
        j = store.jobs.c
        async with self.jobs.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(store.jobs).where(
                        j.kind == ops.MERGE, j.state == JobState.SUCCEEDED, j.result_model_id == ""
                    )
                )
            ).all()
        published = 0
        for job in rows:
            operation = json.loads(job.operation or "{}")
            principal = Principal(kind="system", name="merge", project=job.project_id)
            lineage = {k: v for k, v in operation.get("lineage", {}).items() if v not in (None, "")}
            lineage["operation_job_id"] = job.id
            name = operation.get("result_name") or f"{job.model_id}-complete"
            with _acting_as(principal):
                try:
                    model_id = await self._publish(name, operation.get("description", ""), job.output_uri, lineage)
                except (InvalidArgument, FailedPrecondition, NotFound) as exc:
                    log.warning("merge %s: its complete model could not be published: %s", job.id, exc)
                    model_id = "-"  # not retried: the reason is in the job's log
                    await self.jobs.append_log(job.id, job.attempt, f"publishing the complete model failed: {exc}")
                except Exception:  # the catalog is down, or a bug: retried on the next pass, the others go on
                    log.exception("merge %s: publishing its complete model failed; will retry", job.id)
                    continue
            async with self.jobs.engine.begin() as conn:
                await conn.execute(update(store.jobs).where(j.id == job.id).values(result_model_id=model_id))
            published += model_id != "-"
        return published

    async def _publish(self, name: str, description: str, uri: str, lineage: dict[str, Any]) -> str:
        for candidate in (name, f"{name}-{lineage['operation_job_id'][-6:]}"):
            try:
                return await self.catalog.publish_model(candidate, description, uri, "COMPLETE", lineage)
            except AlreadyExists:
                continue
        raise FailedPrecondition(f"a model named {name!r} exists")

    async def run_publisher(self, changes: Notifier, interval_s: float = 2.0) -> None:
        while True:
            try:
                await self.publish_merged()
            except Exception:  # keep publishing after a transient catalog or DB error
                log.exception("publishing merged models failed")
            await changes.wait(interval_s)

    # -- evaluate ------------------------------------------------------------------------------------------

    async def evaluate(
        self, model_id: str, dataset_id: str, parameters: dict[str, Any], resources: dict[str, Any], job_id: str
    ) -> Any:
        auth.current().require(Role.MEMBER, "evaluating a model")
        if not dataset_id:
            raise InvalidArgument.for_field("dataset_id", "is required")
        model = await self.catalog.model_inputs(model_id)
        plan = ops.plan(ops.EVALUATE, model)
        resolved = resolve_operation_parameters(EvaluateParams, parameters)
        dataset_uri = await self.catalog.evaluation_dataset(dataset_id)
        trained_by = job_id or model.lineage.get("job_id", "")
        if job_id:
            await self.jobs.get(job_id)  # NOT_FOUND unless the caller sees it
        return await self.jobs.submit_operation(
            plan,
            model_id=model_id,
            dataset_id=dataset_id,
            dataset_uri=dataset_uri,
            name=f"evaluate {model.name}",
            parameters=resolved,
            resources=resources,
            labels={EVALUATES_LABEL: trained_by} if trained_by else {},
            operation={"evaluates_job_id": trained_by},
        )

    async def evaluations(self, job_id: str, offset: int, limit: int) -> list[tuple[Any, dict[str, float], list[dict]]]:
        """The evaluations of a training job, newest first: (evaluation job, metrics, generations); metrics and
        generations are read from a succeeded evaluation's output."""
        await self.jobs.get(job_id)  # NOT_FOUND unless the caller sees the training
        rows = await self.jobs.list_jobs(limit, offset, labels={EVALUATES_LABEL: job_id}, kinds=[ops.EVALUATE])
        found = []
        for row in rows:
            metrics: dict[str, float] = {}
            generations: list[dict] = []
            if row.state == JobState.SUCCEEDED and row.output_uri:
                metrics, generations = await asyncio.to_thread(read_evaluation, row.output_uri)
            found.append((row, metrics, generations))
        return found

    # -- deploy --------------------------------------------------------------------------------------------

    async def deploy(self, model_id: str, parameters: dict[str, Any], resources: dict[str, Any]) -> Any:
        auth.current().require(Role.MEMBER, "deploying a model")
        model = await self.catalog.model_inputs(model_id)
        plan = ops.plan(ops.SERVE, model)
        resolved = resolve_operation_parameters(ServeParams, parameters)
        return await self.jobs.submit_operation(
            plan,
            model_id=model_id,
            name=f"deploy {model.name}",
            parameters={**resolved, "served_model_name": model_id},
            resources=resources,
            operation={},
        )

    async def deployment(self, deployment_id: str) -> Any:
        job = await self.jobs.get(deployment_id)
        if job.kind != ops.SERVE:
            raise NotFound(f"deployment {deployment_id!r} not found")
        return job

    async def undeploy(self, deployment_id: str) -> Any:
        job = await self.deployment(deployment_id)
        if JobState(job.state) in (JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED, JobState.CANCELLING):
            return job  # stopped or stopping already: undeploying again changes nothing
        return await self.jobs.cancel(deployment_id)

    async def deployments(self, model_id: str, include_ended: bool, offset: int, limit: int) -> list[Any]:
        states = None if include_ended else [s.value for s in ops.ACTIVE_STATES]
        return await self.jobs.list_jobs(limit, offset, states, model_id, kinds=[ops.SERVE])

    # -- chat ----------------------------------------------------------------------------------------------

    async def live_deployment(self, model_id: str) -> Any:
        """The live deployment of `model_id` that answers next: the one with the fewest calls in flight here."""
        auth.current().require(Role.VIEWER, "chatting with a model")
        active = await self.deployments(model_id, include_ended=False, offset=0, limit=100) if model_id else []
        live = [d for d in active if d.state == JobState.RUNNING and d.agent_id]
        if live:
            return min(live, key=lambda d: (self.router.in_flight.get(d.id, 0), d.request_count))
        if not model_id:
            raise InvalidArgument.for_field("model", "is required")
        if not active:
            await self.catalog.model_inputs(model_id)  # NOT_FOUND for a model the caller can't see
            raise FailedPrecondition(f"model {model_id!r} is not deployed; deploy it first")
        # UNAVAILABLE, so clients that retry (the openai package does) get the answer once it is up.
        raise Unavailable(f"model {model_id!r} is not live yet: its deployment is starting; retry shortly")

    async def count_call(self, deployment_id: str, failed: bool) -> None:
        j = store.jobs.c
        column = j.error_count if failed else j.request_count
        async with self.jobs.engine.begin() as conn:
            await conn.execute(update(store.jobs).where(j.id == deployment_id).values({column: column + 1}))
