# TuneForge trainer agent for GPU nodes. Build from the repository root:
#   docker build -f deploy/trainer.Dockerfile -t tuneforge/trainer .
# CUDA runtime base; torch pinned first (PyPI's Linux wheels are the CUDA 12 builds), then the trainer with
# its gpu extra (bitsandbytes for QLoRA), as `make install` does with the CPU build.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

RUN pip install --upgrade pip && pip install torch==2.13.0
COPY services/common /src/services/common
COPY services/trainer /src/services/trainer
RUN pip install /src/services/common "/src/services/trainer[gpu]" && rm -rf /src
COPY deploy/healthcheck.py /app/

# Ubuntu 24.04's image has user 1000 (ubuntu); ours is 10001 like the other images.
RUN useradd --uid 10001 --create-home --home-dir /home/tuneforge tuneforge \
    && mkdir -p /data/artifacts /var/lib/tuneforge/agent \
    && chown -R 10001:10001 /data /var/lib/tuneforge
USER 10001
WORKDIR /var/lib/tuneforge

# Added methods' stage files live in the shared artifact volume, so every node (and every multi-node pod)
# finds the same files: copy a method's directory into <artifact volume>/methods once.
ENV TUNEFORGE_GRPC_HOST=0.0.0.0 TUNEFORGE_AGENT_GRPC_PORT=50053 TUNEFORGE_ARTIFACT_ROOT=/data/artifacts \
    TUNEFORGE_AGENT_WORK_DIR=/var/lib/tuneforge/agent TUNEFORGE_AGENT_METHODS_DIR=/data/artifacts/methods \
    TUNEFORGE_AGENT_PYTHON=/opt/venv/bin/python HF_HOME=/var/lib/tuneforge/hf
EXPOSE 50053
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["python", "/app/healthcheck.py", "50053"]
CMD ["python", "-m", "tuneforge_trainer.agent"]
