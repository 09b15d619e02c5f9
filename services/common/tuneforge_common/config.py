"""Settings shared by every service, read from TUNEFORGE_* environment variables and an optional file
(pydantic-settings)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "TUNEFORGE_CONFIG_FILE"
CONFIG_FILE_SUFFIXES = (".toml", ".json", ".env")


def config_file_source(settings_cls: type[BaseSettings], path: str) -> PydanticBaseSettingsSource:
    """The source for the file TUNEFORGE_CONFIG_FILE names. TOML and JSON files hold the settings by field name
    (`nats_url = "..."`, one flat table); a .env file holds them by variable name (`TUNEFORGE_NATS_URL=...`).
    One file may serve every service: each reads its own fields and ignores the others'."""
    file = Path(path).expanduser()
    # pydantic-settings quietly skips a missing file; a named one that is missing is a mistake worth stopping on.
    if not file.is_file():
        raise ValueError(f"{CONFIG_FILE_ENV}={path}: no such file")
    suffix = file.suffix.lower() if file.suffix else file.name.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=file)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=file)
    if suffix == ".env":
        return DotEnvSettingsSource(settings_cls, env_file=file)
    raise ValueError(f"{CONFIG_FILE_ENV}={path}: the file must end in one of {', '.join(CONFIG_FILE_SUFFIXES)}")


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables win over the file, so one shared file can be overridden per process.
        path = os.environ.get(CONFIG_FILE_ENV, "")
        file = (config_file_source(settings_cls, path),) if path else ()
        return (init_settings, env_settings, *file, dotenv_settings, file_secret_settings)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server with JetStream.")
    events_stream: str = Field("TUNEFORGE", description="JetStream stream that holds all events.")
    events_subject_root: str = Field(
        "tuneforge", description="First subject token; events are <root>.<service>.<entity>.<event>."
    )
    artifact_root: str = Field(".tuneforge/artifacts", description="fsspec URI or path of the artifact store.")
    grpc_host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    log_level: str = Field("INFO", description="Python log level.")
    metrics_port: int = Field(-1, description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables.")
    service_token: str = Field(
        "",
        description="Shared secret TuneForge services present to each other (required; keep it in a Secret). "
        "Calls with it act across projects, so never give it to users.",
    )
    auth_cache_seconds: float = Field(
        5.0, description="How long a checked API key is trusted before it is checked again (bounds revocation delay)."
    )
    tls_cert_file: str = Field(
        "",
        description="PEM certificate (chain) of this service; with tls_key_file its gRPC server listens with TLS, "
        "its channels present it to servers that require client certificates, and the gateway serves HTTPS with it "
        "(unless gateway_https_cert_file is set). Empty: plaintext.",
    )
    tls_key_file: str = Field("", description="PEM private key (unencrypted) of tls_cert_file.")
    tls_ca_file: str = Field(
        "",
        description="PEM CA certificates that verify the servers this process dials (empty: the system roots) and, "
        "with tls_require_client_cert, the clients it serves. Set alone, channels use TLS without a certificate of "
        "their own (an agent on a GPU node that only verifies the jobs service).",
    )
    tls_require_client_cert: bool = Field(
        False,
        description="mTLS between services: gRPC servers refuse clients without a certificate signed by tls_ca_file. "
        "The gateway's HTTP side still accepts browsers without one.",
    )


def require_service_token(settings: CommonSettings) -> None:
    """Services refuse to start without one: they could not call each other, and an empty token must never
    match."""
    if not settings.service_token:
        raise SystemExit("TUNEFORGE_SERVICE_TOKEN is required: a long random secret shared by the TuneForge services")
