# TuneForge jobs service. Build from the repository root:
#   docker build -f deploy/jobs.Dockerfile -t tuneforge/jobs .
# No torch: the jobs service schedules; trainers run the training.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY services/common /src/services/common
COPY services/jobs /src/services/jobs
RUN pip install /src/services/common /src/services/jobs && rm -rf /src
COPY deploy/healthcheck.py deploy/migrate.py /app/

RUN useradd --uid 10001 --create-home --home-dir /home/tuneforge tuneforge \
    && mkdir -p /data/artifacts && chown -R 10001:10001 /data
USER 10001

ENV TUNEFORGE_GRPC_HOST=0.0.0.0 TUNEFORGE_JOBS_GRPC_PORT=50052 TUNEFORGE_ARTIFACT_ROOT=/data/artifacts
EXPOSE 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["python", "/app/healthcheck.py", "50052"]
CMD ["python", "-m", "tuneforge_jobs"]
