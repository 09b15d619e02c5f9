"""Gateway process: uvicorn serving the FastAPI app."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from pydantic import Field

from tuneforge_common.config import CommonSettings
from tuneforge_common.logs import setup_logging

from .app import MAX_UPLOAD_BYTES, UPLOAD_TTL_S, create_app


class GatewaySettings(CommonSettings):
    gateway_host: str = Field("127.0.0.1", description="Address the HTTP gateway binds to.")
    gateway_port: int = Field(8080, description="HTTP port; 0 picks a free one.")
    catalog_address: str = Field("127.0.0.1:50051", description="host:port of the catalog service.")
    jobs_address: str = Field("127.0.0.1:50052", description="host:port of the jobs service.")
    gateway_upload_dir: str = Field(
        "", description="Where resumable uploads are kept between chunks; empty: tuneforge-uploads in the temp dir."
    )
    gateway_max_upload_bytes: int = Field(
        MAX_UPLOAD_BYTES, description="Largest dataset upload accepted (keep it equal to the catalog's limit)."
    )
    gateway_upload_ttl_seconds: float = Field(
        UPLOAD_TTL_S, description="A resumable upload untouched this long is deleted."
    )


async def serve(settings: GatewaySettings) -> None:
    app = create_app(
        settings.catalog_address,
        settings.jobs_address,
        upload_dir=settings.gateway_upload_dir or None,
        max_upload_bytes=settings.gateway_max_upload_bytes,
        upload_ttl_s=settings.gateway_upload_ttl_seconds,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.gateway_host, settings.gateway_port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=settings.log_level.lower(), access_log=False)
    server = uvicorn.Server(config)
    print(f"TUNEFORGE_READY gateway http={port}", flush=True)
    await server.serve(sockets=[sock])


def main() -> None:
    settings = GatewaySettings()
    setup_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
