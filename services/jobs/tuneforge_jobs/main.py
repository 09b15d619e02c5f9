"""Jobs service process: migrate, serve JobService, AgentService, ModelLifecycleService and InferenceService,
reap lost agents, publish merged models and events."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from pydantic import Field

from tuneforge_common.artifacts import ArtifactStore
from tuneforge_common.auth import KeyAuthenticator, ServerAuthInterceptor
from tuneforge_common.auth_client import remote_key_lookup
from tuneforge_common.config import CommonSettings, require_service_token
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.errors import is_unavailable
from tuneforge_common.events import OutboxPublisher
from tuneforge_common.grpcutil import serve_metrics, start_server
from tuneforge_common.logs import setup_logging
from tuneforge_common.runtime import run_service, wait_for_shutdown_signal
from tuneforge_common.tls import TlsConfig

from . import api, store
from .catalog_client import GrpcCatalog
from .inference import InferenceRouter
from .model_lifecycle import ModelLifecycle
from .notify import Notifier
from .service import Jobs

log = logging.getLogger("tuneforge.jobs")
MIGRATIONS = Path(__file__).parent / "migrations"


class JobsSettings(CommonSettings):
    jobs_database_url: str = Field(
        "sqlite+aiosqlite:///.tuneforge/jobs.db", description="Jobs database (PostgreSQL or SQLite URL)."
    )
    jobs_grpc_port: int = Field(50052, description="Jobs gRPC port; 0 picks a free one.")
    catalog_address: str = Field("127.0.0.1:50051", description="host:port of the catalog service.")
    jobs_max_attempts: int = Field(3, description="Attempts before a job whose agent keeps getting lost fails.")
    jobs_lease_ttl_seconds: int = Field(15, description="An agent silent this long is lost.")
    jobs_heartbeat_interval_seconds: int = Field(3, description="How often agents send heartbeats.")
    jobs_start_timeout_seconds: float = Field(
        600.0,
        description="A job STARTING this long without its agent confirming the start (the assignment was lost, "
        "e.g. in a restart) is requeued, the attempt counted; it covers staging the model and data onto the node. "
        "0 turns it off.",
    )
    jobs_cancel_timeout_seconds: float = Field(
        300.0,
        description="A job CANCELLING this long without its agent confirming the stop is CANCELLED anyway (the "
        "agent, if alive, is told again to stop). 0 turns it off.",
    )
    agent_join_tokens: str = Field(
        "",
        description="Comma-separated secrets a new trainer node presents once (JoinAgent) to get its own "
        "credential; remove one to stop new nodes joining with it (joined nodes keep their credentials).",
    )


async def reaper(jobs: Jobs, interval: float) -> None:
    """Lost agents' jobs, then jobs stuck STARTING or CANCELLING on a live agent, every `interval` seconds.

    An agent is judged lost only once this process has been able to hear it for a whole lease: while this process
    was not running, or its database was unreachable, no heartbeat could be recorded, so an agent whose lease looks
    lapsed in the table may have been heartbeating all along (it reconnects with backoff). Reaping it at once would
    requeue every running job after a jobs-service restart or a database outage longer than the lease.
    """
    hearing_since = time.monotonic()
    while True:
        try:
            if time.monotonic() - hearing_since >= jobs.lease_ttl_seconds:
                await jobs.reap_lost_agents()
            await jobs.reap_stuck_jobs()
        except Exception as exc:  # keep reaping after a transient DB error
            if is_unavailable(exc):
                log.warning("reaper pass skipped: the database is unavailable")
            else:
                log.exception("reaper pass failed")
            hearing_since = time.monotonic()
        await asyncio.sleep(interval)


async def serve() -> None:
    settings = JobsSettings()
    setup_logging(settings.log_level)
    tls = TlsConfig.from_settings(settings)  # a bad TLS file stops the start before migrations run
    engine = make_engine(settings.jobs_database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    publisher = OutboxPublisher(
        engine, store.outbox, settings.nats_url, settings.events_stream, settings.events_subject_root
    )
    changes = Notifier()
    require_service_token(settings)
    catalog = GrpcCatalog(settings.catalog_address, tls, settings.service_token)
    jobs = Jobs(
        engine=engine,
        catalog=catalog,
        artifact_root=ArtifactStore(settings.artifact_root).root,
        subject_root=settings.events_subject_root,
        max_attempts=settings.jobs_max_attempts,
        lease_ttl_seconds=settings.jobs_lease_ttl_seconds,
        heartbeat_interval_seconds=settings.jobs_heartbeat_interval_seconds,
        start_timeout_seconds=settings.jobs_start_timeout_seconds,
        cancel_timeout_seconds=settings.jobs_cancel_timeout_seconds,
        on_event=publisher.notify,
        on_change=changes.notify,
        join_tokens=tuple(t for t in settings.agent_join_tokens.split(",") if t),
    )
    authenticate = KeyAuthenticator(
        remote_key_lookup(catalog.channel),
        settings.service_token,
        agent_lookup=jobs.agent_principal,
        cache_seconds=settings.auth_cache_seconds,
    )
    router = InferenceRouter(settings.nats_url)
    await router.start()
    publisher.start()
    reaper_task = asyncio.create_task(reaper(jobs, max(1.0, settings.jobs_lease_ttl_seconds / 5)))
    # A merge's complete model is published once it succeeds, and after a restart for any not published yet.
    merges_task = asyncio.create_task(ModelLifecycle(jobs, router).run_publisher(changes))
    server, port = await start_server(
        api.bindings(jobs, changes, router),
        settings.grpc_host,
        settings.jobs_grpc_port,
        interceptors=[ServerAuthInterceptor(authenticate)],
        tls=tls,
    )
    log.info("jobs serving on %s:%d", settings.grpc_host, port)
    metrics = serve_metrics(settings.metrics_port, settings.grpc_host)
    print(f"TUNEFORGE_READY jobs grpc={port} metrics={metrics}", flush=True)
    await wait_for_shutdown_signal()
    await server.stop(grace=5)
    reaper_task.cancel()
    merges_task.cancel()
    await router.close()
    await publisher.stop()
    await catalog.close()
    await engine.dispose()


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
