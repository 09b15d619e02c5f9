# TuneForge catalog service. Build from the repository root:
#   docker build -f deploy/catalog.Dockerfile -t tuneforge/catalog .
# No torch: the catalog reads tokenizers and model headers only.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY services/common /src/services/common
COPY services/catalog /src/services/catalog
RUN pip install /src/services/common /src/services/catalog && rm -rf /src
COPY deploy/healthcheck.py deploy/migrate.py /app/

RUN useradd --uid 10001 --create-home --home-dir /home/tuneforge tuneforge \
    && mkdir -p /data/artifacts && chown -R 10001:10001 /data
USER 10001

# Containers listen on all interfaces; the defaults (127.0.0.1) suit the embedded default only.
ENV TUNEFORGE_GRPC_HOST=0.0.0.0 TUNEFORGE_CATALOG_GRPC_PORT=50051 TUNEFORGE_ARTIFACT_ROOT=/data/artifacts
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["python", "/app/healthcheck.py", "50051"]
CMD ["python", "-m", "tuneforge_catalog"]
