"""The real catalog and jobs services on in-process gRPC servers (port 0), wired to each other as in production.

Shared by the integration tests and the gateway's property-based run; each service gets its own database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.helpers import write_fake_model_dir
from tuneforge.catalog.v1 import catalog_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_catalog import api as catalog_api
from tuneforge_catalog import auth_api
from tuneforge_catalog.jobs_client import GrpcJobs
from tuneforge_catalog.keys import Keys
from tuneforge_catalog.main import CatalogSettings, build_catalog
from tuneforge_common.auth import KeyAuthenticator, ServerAuthInterceptor
from tuneforge_common.auth_client import remote_key_lookup
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api as jobs_api
from tuneforge_jobs.catalog_client import GrpcCatalog
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs

# The built-in model every stack starts with (a fake Hugging Face directory, registered at catalog start).
SEED_MODEL_ID = "tiny-test"


@dataclass
class Services:
    catalog: catalog_pb2_grpc.CatalogServiceStub
    jobs: jobs_pb2_grpc.JobServiceStub
    jobs_server: grpc.aio.Server
    catalog_address: str
    jobs_address: str


@asynccontextmanager
async def catalog_and_jobs(
    catalog_database_url: str,
    jobs_database_url: str,
    root: Path,
    *,
    service_token: str = "",
    admin_key: str = "",
    join_tokens: tuple[str, ...] = (),
) -> AsyncIterator[Services]:
    """Both services with their artifacts under `root`, the catalog seeded with the model SEED_MODEL_ID.

    With a service_token they check every call's key as their main() wires them (auth cache off, so a
    revocation shows at once), admin_key being the first start's superuser; without one they trust every
    caller (the returned stubs carry no key)."""
    model_dir = write_fake_model_dir(root / "models" / SEED_MODEL_ID)
    catalog, _ = await build_catalog(
        CatalogSettings(
            catalog_database_url=catalog_database_url,
            artifact_root=str(root / "artifacts"),
            catalog_seed_models=str(model_dir),
        )
    )
    keys = Keys(catalog.engine)
    catalog_bindings = [catalog_api.binding(catalog), auth_api.binding(keys)]
    catalog_guard = []
    if service_token:
        await keys.bootstrap_admin(admin_key)
        catalog_guard = [ServerAuthInterceptor(KeyAuthenticator(keys.lookup, service_token, cache_seconds=0))]
    catalog_server, catalog_port = await start_server(catalog_bindings, "127.0.0.1", 0, interceptors=catalog_guard)
    engine = make_engine(jobs_database_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    catalog_client = GrpcCatalog(f"127.0.0.1:{catalog_port}", service_token=service_token)
    jobs = Jobs(
        engine=engine,
        catalog=catalog_client,
        artifact_root=str(root / "artifacts"),
        subject_root="t",
        join_tokens=join_tokens,
    )
    jobs_guard = []
    if service_token:
        lookup = remote_key_lookup(catalog_client.channel)
        authenticate = KeyAuthenticator(lookup, service_token, agent_lookup=jobs.agent_principal, cache_seconds=0)
        jobs_guard = [ServerAuthInterceptor(authenticate)]
    jobs_server, jobs_port = await start_server(
        jobs_api.bindings(jobs, Notifier()), "127.0.0.1", 0, interceptors=jobs_guard
    )
    catalog.jobs = jobs_client = GrpcJobs(f"127.0.0.1:{jobs_port}", service_token=service_token)
    catalog_channel = grpc.aio.insecure_channel(f"127.0.0.1:{catalog_port}")
    jobs_channel = grpc.aio.insecure_channel(f"127.0.0.1:{jobs_port}")
    try:
        yield Services(
            catalog_pb2_grpc.CatalogServiceStub(catalog_channel),
            jobs_pb2_grpc.JobServiceStub(jobs_channel),
            jobs_server,
            f"127.0.0.1:{catalog_port}",
            f"127.0.0.1:{jobs_port}",
        )
    finally:
        for closable in (catalog_channel, jobs_channel, jobs_client, catalog_client):
            await closable.close()
        await jobs_server.stop(None)
        await catalog_server.stop(None)
        await catalog.close()
        await catalog.engine.dispose()
        await engine.dispose()
