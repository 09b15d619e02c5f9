# TuneForge gateway (HTTP/JSON, SSE, OpenAI-compatible routes, the web dashboard). Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t tuneforge/gateway .

# The dashboard, as `make dashboard` builds it: npm ci on the committed lock file, Vite into the gateway package.
FROM node:20-slim AS dashboard
WORKDIR /src/dashboard
COPY dashboard/package.json dashboard/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY dashboard/index.html dashboard/tsconfig.json dashboard/vite.config.ts ./
COPY dashboard/src ./src
RUN npm run build

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY services/common /src/services/common
COPY services/gateway /src/services/gateway
COPY --from=dashboard /src/services/gateway/tuneforge_gateway/web /src/services/gateway/tuneforge_gateway/web
RUN pip install /src/services/common /src/services/gateway && rm -rf /src

RUN useradd --uid 10001 --create-home --home-dir /home/tuneforge tuneforge \
    && mkdir -p /data/uploads && chown -R 10001:10001 /data
USER 10001

ENV TUNEFORGE_GATEWAY_HOST=0.0.0.0 TUNEFORGE_GATEWAY_PORT=8080 TUNEFORGE_GATEWAY_UPLOAD_DIR=/data/uploads
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3).status != 200)"]
CMD ["python", "-m", "tuneforge_gateway"]
