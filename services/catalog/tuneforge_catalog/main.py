"""Catalog service process: migrate, seed built-ins, serve gRPC, publish events."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from pydantic import Field

from tuneforge_common.artifacts import ArtifactStore
from tuneforge_common.auth import KeyAuthenticator, ServerAuthInterceptor
from tuneforge_common.config import CommonSettings, require_service_token
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.events import OutboxPublisher
from tuneforge_common.grpcutil import serve_metrics, start_server
from tuneforge_common.logs import setup_logging
from tuneforge_common.runtime import run_service, wait_for_shutdown_signal
from tuneforge_common.tls import TlsConfig

from . import api, auth_api, store
from .jobs_client import GrpcJobs
from .keys import Keys
from .service import Catalog

log = logging.getLogger("tuneforge.catalog")
MIGRATIONS = Path(__file__).parent / "migrations"


class CatalogSettings(CommonSettings):
    catalog_database_url: str = Field(
        "sqlite+aiosqlite:///.tuneforge/catalog.db", description="Catalog database (PostgreSQL or SQLite URL)."
    )
    catalog_grpc_port: int = Field(50051, description="Catalog gRPC port; 0 picks a free one.")
    catalog_max_dataset_bytes: int = Field(512 * 1024 * 1024, description="Largest dataset upload accepted.")
    jobs_address: str = Field("127.0.0.1:50052", description="host:port of the jobs service (delete checks).")
    catalog_max_line_chars: int = Field(4000, description="Longest dataset line accepted, in characters.")
    catalog_validation_wait_seconds: float = Field(
        30.0, description="How long an upload waits for validation before answering VALIDATING."
    )
    bootstrap_admin_key: str = Field(
        "",
        description="On the first start (no API key stored yet) this key becomes a superuser admin of the "
        "'default' project. Make one with `python -m tuneforge_common.auth`; `tuneforge up` does it for you.",
    )
    catalog_seed_models: str = Field(
        "",
        description="os.pathsep-separated model directories registered "
        "as built-in models at start (name = directory name).",
    )


async def build_catalog(settings: CatalogSettings) -> tuple[Catalog, OutboxPublisher]:
    engine = make_engine(settings.catalog_database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_catalog")
    publisher = OutboxPublisher(
        engine, store.outbox, settings.nats_url, settings.events_stream, settings.events_subject_root
    )
    catalog = Catalog(
        jobs=GrpcJobs(settings.jobs_address, TlsConfig.from_settings(settings), settings.service_token),
        max_line_chars=settings.catalog_max_line_chars,
        validation_wait_seconds=settings.catalog_validation_wait_seconds,
        engine=engine,
        artifacts=ArtifactStore(settings.artifact_root),
        subject_root=settings.events_subject_root,
        max_dataset_bytes=settings.catalog_max_dataset_bytes,
        on_event=publisher.notify,
    )
    await catalog.sync_builtin_methods()
    await asyncio.to_thread(catalog.clean_scratch)
    await catalog.resume_validations()
    for entry in filter(None, settings.catalog_seed_models.split(":")):
        path = Path(entry)
        await catalog.register_model_dir(path, name=path.name, description="Built-in model", builtin=True)
    return catalog, publisher


async def serve() -> None:
    settings = CatalogSettings()
    setup_logging(settings.log_level)
    tls = TlsConfig.from_settings(settings)  # a bad TLS file stops the start before migrations run
    require_service_token(settings)
    catalog, publisher = await build_catalog(settings)
    keys = Keys(catalog.engine)
    if settings.bootstrap_admin_key and await keys.bootstrap_admin(settings.bootstrap_admin_key):
        log.info("stored the bootstrap admin key (superuser, admin of project 'default')")
    authenticate = KeyAuthenticator(keys.lookup, settings.service_token, cache_seconds=settings.auth_cache_seconds)
    server, port = await start_server(
        [api.binding(catalog), auth_api.binding(keys)],
        settings.grpc_host,
        settings.catalog_grpc_port,
        interceptors=[ServerAuthInterceptor(authenticate)],
        tls=tls,
    )
    publisher.start()
    log.info("catalog serving on %s:%d", settings.grpc_host, port)
    metrics = serve_metrics(settings.metrics_port, settings.grpc_host)
    print(f"TUNEFORGE_READY catalog grpc={port} metrics={metrics}", flush=True)
    await wait_for_shutdown_signal()
    await server.stop(grace=5)
    await publisher.stop()
    await catalog.close()
    await catalog.engine.dispose()


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
