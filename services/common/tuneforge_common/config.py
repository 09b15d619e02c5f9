"""Settings shared by every service, read from TUNEFORGE_* environment variables (pydantic-settings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore", frozen=True)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server with JetStream.")
    events_stream: str = Field("TUNEFORGE", description="JetStream stream that holds all events.")
    events_subject_root: str = Field(
        "tuneforge", description="First subject token; events are <root>.<service>.<entity>.<event>."
    )
    artifact_root: str = Field(".tuneforge/artifacts", description="fsspec URI or path of the artifact store.")
    grpc_host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    log_level: str = Field("INFO", description="Python log level.")
    metrics_port: int = Field(-1, description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables.")
