"""Gateway process: uvicorn serving the FastAPI app."""

from __future__ import annotations

import asyncio
import socket
import ssl

import uvicorn
from pydantic import Field

from tuneforge_common.config import CommonSettings, require_service_token
from tuneforge_common.logs import setup_logging
from tuneforge_common.tls import TlsConfig, check_cert_and_key

from .app import MAX_UPLOAD_BYTES, UPLOAD_TTL_S, create_app

# Seconds in-flight requests get to finish after SIGTERM before uvicorn cancels them (open SSE streams included).
SHUTDOWN_GRACE_S = 5


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
    gateway_https_cert_file: str = Field(
        "",
        description="PEM certificate the HTTP side serves HTTPS with, when browsers need another one than the "
        "services' tls_cert_file (a public certificate, while services use an internal CA). Empty: tls_cert_file; "
        "neither set: plain HTTP. Browsers are never asked for a client certificate, even with "
        "tls_require_client_cert (that is mTLS between services).",
    )
    gateway_https_key_file: str = Field(
        "", description="PEM private key of gateway_https_cert_file (set both or neither). Empty: tls_key_file."
    )


def https_files(settings: GatewaySettings, tls: TlsConfig) -> tuple[str, str] | None:
    """The certificate and key the HTTP side serves with, checked now; None: plain HTTP."""
    if settings.gateway_https_cert_file or settings.gateway_https_key_file:
        cert, key = settings.gateway_https_cert_file, settings.gateway_https_key_file
        check_cert_and_key(cert, key, "TUNEFORGE_GATEWAY_HTTPS_CERT_FILE", "TUNEFORGE_GATEWAY_HTTPS_KEY_FILE")
        return cert, key
    return (tls.cert_file, tls.key_file) if tls.enabled else None


async def serve(settings: GatewaySettings) -> None:
    require_service_token(settings)
    tls = TlsConfig.from_settings(settings)
    https = https_files(settings, tls)
    app = create_app(
        settings.catalog_address,
        settings.jobs_address,
        upload_dir=settings.gateway_upload_dir or None,
        max_upload_bytes=settings.gateway_max_upload_bytes,
        upload_ttl_s=settings.gateway_upload_ttl_seconds,
        tls=tls,
        service_token=settings.service_token,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.gateway_host, settings.gateway_port))
    port = sock.getsockname()[1]
    # Listen before saying READY: until uvicorn starts serving, connections wait in the backlog instead of
    # being refused, so the READY line is true the moment it is printed.
    sock.listen(2048)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level.lower(),
        access_log=False,
        ssl_certfile=https[0] if https else None,
        ssl_keyfile=https[1] if https else None,
        ssl_cert_reqs=ssl.CERT_NONE,  # browsers have no client certificate; mTLS is between services only
        # On SIGTERM in-flight requests get this long to finish; SSE streams never finish by themselves, so
        # without a bound the gateway waited on its watchers until it was killed. Cut, they resume with
        # Last-Event-ID on another replica or the restarted one.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = uvicorn.Server(config)
    print(f"TUNEFORGE_READY gateway {'https' if https else 'http'}={port}", flush=True)
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
